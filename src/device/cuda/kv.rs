//! The CUDA backend's KV cache: one slab of device memory allocated at construction from a
//! memory budget, and the slot bookkeeping over it.
//!
//! Layout (f32, matching the CPU reference's precision): `[layer][k | v][slot][position][kv_dim]`
//! with `max_sequences + 1` slots of `max_context` positions each. The extra last slot is the
//! padding slot: rows that pad a decode batch up to its graph bucket write and read there, never
//! in a live sequence's slot. A slot is a sequence's whole context, so admission is decided by
//! slot count and context length alone, and nothing is allocated after construction: a request
//! that does not fit is refused ([`DeviceError::NoFreeSlot`], [`DeviceError::ContextFull`]),
//! never an out-of-memory failure.

use std::sync::Arc;

use super::driver::{Context, DevBuf, GpuResult};
use crate::device::{DeviceError, KvUsage, SeqId};

/// Byte offsets into the slab, without device memory (testable anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Width of one position's keys (or values), f32.
    pub kv_dim: usize,
    /// Slots, the padding slot included.
    pub slots: usize,
    /// Positions per slot.
    pub max_context: usize,
}

impl KvLayout {
    /// Bytes of one layer's keys (or values), every slot.
    pub fn layer_bytes(&self) -> usize {
        self.slots * self.max_context * self.kv_dim * 4
    }

    /// Bytes of the whole slab.
    pub fn bytes(&self) -> usize {
        2 * self.layers * self.layer_bytes()
    }

    /// Offset of layer `l`'s keys.
    pub fn keys(&self, l: usize) -> usize {
        2 * l * self.layer_bytes()
    }

    /// Offset of layer `l`'s values.
    pub fn values(&self, l: usize) -> usize {
        (2 * l + 1) * self.layer_bytes()
    }

    /// Offset, inside one layer's keys or values, of (slot, position): the kernels' index
    /// `(slot * max_ctx + pos) * kv_dim` f32 (kernels/rope.cu, kernels/attention.cu).
    #[cfg(test)]
    pub fn row(&self, slot: usize, pos: usize) -> usize {
        (slot * self.max_context + pos) * self.kv_dim * 4
    }
}

/// Slot bookkeeping: the token count of each live sequence, by slot (no device memory).
#[derive(Clone, Debug)]
pub struct Slots {
    lens: Vec<Option<usize>>,
}

impl Slots {
    /// `n` free slots.
    pub fn new(n: usize) -> Self {
        Self {
            lens: vec![None; n],
        }
    }

    /// Takes the lowest free slot.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        let i = self
            .lens
            .iter()
            .position(Option::is_none)
            .ok_or(DeviceError::NoFreeSlot(self.lens.len()))?;
        self.lens[i] = Some(0);
        Ok(SeqId(i as u32))
    }

    /// Releases a slot (unknown handles are ignored).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.lens.get_mut(seq.0 as usize) {
            *s = None;
        }
    }

    /// Tokens a live sequence holds.
    pub fn len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.lens
            .get(seq.0 as usize)
            .copied()
            .flatten()
            .ok_or(DeviceError::UnknownSequence(seq))
    }

    /// The counts as [`KvUsage`], a slot being one block of `max_context` tokens (this cache
    /// is not paged: a sequence takes its whole slot whatever it holds).
    pub fn usage(&self, max_context: usize) -> KvUsage {
        let live = self.lens.iter().flatten();
        KvUsage {
            block_tokens: max_context,
            total_blocks: self.lens.len(),
            free_blocks: self.lens.iter().filter(|l| l.is_none()).count(),
            used_tokens: live.clone().sum(),
            sequences: live.count(),
        }
    }

    /// Records that a live sequence now holds `len` tokens.
    pub fn set_len(&mut self, seq: SeqId, len: usize) {
        if let Some(Some(l)) = self.lens.get_mut(seq.0 as usize) {
            *l = len;
        }
    }
}

/// The slab and its slots.
pub struct KvCache {
    buf: DevBuf,
    slots: Slots,
    layout: KvLayout,
    /// Live sequences at most.
    pub max_sequences: usize,
    /// Tokens per sequence at most.
    pub max_context: usize,
}

impl KvCache {
    /// Bytes of one slot over all layers (keys and values).
    pub fn slot_bytes(layers: usize, kv_dim: usize, max_context: usize) -> usize {
        layers * 2 * max_context * kv_dim * 4
    }

    /// Allocates the slab for `max_sequences` slots plus the padding slot.
    pub fn new(
        ctx: &Arc<Context>,
        layers: usize,
        kv_dim: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> GpuResult<Self> {
        let layout = KvLayout {
            layers,
            kv_dim,
            slots: max_sequences + 1,
            max_context,
        };
        Ok(Self {
            buf: DevBuf::new(ctx, layout.bytes())?,
            slots: Slots::new(max_sequences),
            layout,
            max_sequences,
            max_context,
        })
    }

    /// Bytes of the slab.
    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }

    /// The slot padding rows use.
    pub fn pad_slot(&self) -> usize {
        self.max_sequences
    }

    /// Device address of layer `l`'s keys, `[slot][position][kv_dim]`.
    pub fn keys(&self, l: usize) -> u64 {
        debug_assert!(l < self.layout.layers);
        self.buf.at(self.layout.keys(l))
    }

    /// Device address of layer `l`'s values, laid out like the keys.
    pub fn values(&self, l: usize) -> u64 {
        debug_assert!(l < self.layout.layers);
        self.buf.at(self.layout.values(l))
    }

    /// Takes a free slot.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        self.slots.alloc()
    }

    /// Releases a slot (unknown handles are ignored).
    pub fn free(&mut self, seq: SeqId) {
        self.slots.free(seq)
    }

    /// Tokens a live sequence holds.
    pub fn len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.slots.len(seq)
    }

    /// Records that a live sequence now holds `len` tokens.
    pub fn set_len(&mut self, seq: SeqId, len: usize) {
        self.slots.set_len(seq, len)
    }

    /// The counts, one block per slot.
    pub fn usage(&self) -> KvUsage {
        self.slots.usage(self.max_context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_llama_8b_slab_exceeds_i32_without_overlap() {
        // Llama-3.1-8B: 32 layers, kv_dim 1024; 64 sequences + pad of 4096 tokens: 65 GiB.
        let l = KvLayout {
            layers: 32,
            kv_dim: 1024,
            slots: 65,
            max_context: 4096,
        };
        assert_eq!(l.bytes(), 65 * KvCache::slot_bytes(32, 1024, 4096));
        assert_eq!(KvCache::slot_bytes(32, 1024, 4096), 1 << 30);
        assert!(l.bytes() > i32::MAX as usize);
        // Layers are back to back, keys then values, and the last row of the last layer's
        // values ends exactly at the end of the slab.
        for i in 0..l.layers {
            assert_eq!(l.values(i), l.keys(i) + l.layer_bytes());
            assert_eq!(l.keys(i + 1), l.values(i) + l.layer_bytes());
        }
        let last = l.values(l.layers - 1) + l.row(l.slots - 1, l.max_context - 1) + 4 * l.kv_dim;
        assert_eq!(last, l.bytes());
        // Rows of different slots never overlap: slot s+1 starts after slot s's last position.
        assert_eq!(l.row(1, 0), l.row(0, l.max_context - 1) + 4 * l.kv_dim);
    }

    #[test]
    fn slots_are_reused_and_refused_when_full() {
        let mut s = Slots::new(2);
        let a = s.alloc().unwrap();
        let b = s.alloc().unwrap();
        assert_ne!(a, b);
        assert!(matches!(s.alloc(), Err(DeviceError::NoFreeSlot(2))));
        s.set_len(a, 7);
        assert_eq!(s.len(a).unwrap(), 7);
        let u = s.usage(100);
        assert_eq!((u.free_blocks, u.used_tokens, u.sequences), (0, 7, 2));
        assert_eq!(u.capacity_tokens(), 200);
        s.free(a);
        assert!(matches!(s.len(a), Err(DeviceError::UnknownSequence(_))));
        // set_len on a freed slot does not revive it.
        s.set_len(a, 3);
        assert!(s.len(a).is_err());
        let c = s.alloc().unwrap();
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(s.len(c).unwrap(), 0, "a reused slot starts empty");
        s.free(SeqId(99)); // unknown: ignored
        assert!(matches!(
            s.len(SeqId(99)),
            Err(DeviceError::UnknownSequence(_))
        ));
    }
}
