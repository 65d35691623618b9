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
use crate::device::{DeviceError, SeqId};

/// The slab and its slots.
pub struct KvCache {
    buf: DevBuf,
    /// Token counts of live sequences, by slot.
    lens: Vec<Option<usize>>,
    layers: usize,
    kv_dim: usize,
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
        let bytes = (max_sequences + 1) * Self::slot_bytes(layers, kv_dim, max_context);
        Ok(Self {
            buf: DevBuf::new(ctx, bytes)?,
            lens: vec![None; max_sequences],
            layers,
            kv_dim,
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

    fn layer_bytes(&self) -> usize {
        (self.max_sequences + 1) * self.max_context * self.kv_dim * 4
    }

    /// Device address of layer `l`'s keys, `[slot][position][kv_dim]`.
    pub fn keys(&self, l: usize) -> u64 {
        debug_assert!(l < self.layers);
        self.buf.at(2 * l * self.layer_bytes())
    }

    /// Device address of layer `l`'s values, laid out like the keys.
    pub fn values(&self, l: usize) -> u64 {
        self.buf.at((2 * l + 1) * self.layer_bytes())
    }

    /// Takes a free slot.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        let i = self
            .lens
            .iter()
            .position(Option::is_none)
            .ok_or(DeviceError::NoFreeSlot(self.max_sequences))?;
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

    /// Records that a live sequence now holds `len` tokens.
    pub fn set_len(&mut self, seq: SeqId, len: usize) {
        if let Some(Some(l)) = self.lens.get_mut(seq.0 as usize) {
            *l = len;
        }
    }
}
