//! The CUDA backend's paged KV cache: a pool of BF16 blocks in device memory, allocated once at
//! construction from a memory budget, the shared [`BlockManager`] deciding which sequence owns
//! which block (exactly as the CPU backend's cache does), and a device-resident block table the
//! kernels read.
//!
//! Pool layout (BF16 bits, `u16`): per layer, the keys `[block][BLOCK_TOKENS][kv_dim]` then the
//! values laid out alike, layers back to back ([`KvLayout`]). Blocks `0..total_blocks` are the
//! manager's; one more, the padding block, takes the rows that pad a decode batch up to its
//! graph bucket, so padding never writes into a live sequence's block.
//!
//! Block table: i32 `[slots][max_blocks]` on the device, `slots = max_sequences + 1` (the last
//! is the padding slot, every entry the padding block) and `max_blocks =
//! ceil(max_context / BLOCK_TOKENS)`. Position `p` of the sequence in slot `s` lives in block
//! `table[s * max_blocks + p / BLOCK_TOKENS]`, row `p % BLOCK_TOKENS` (kernels/rope.cu,
//! kernels/attention.cu). The per-token `slot` input the decode graphs read is unchanged; the
//! table sits at a fixed address, so a captured graph stays valid while tables change. A host
//! mirror ([`BlockTables`]) holds what the device table holds; when a sequence gains blocks,
//! only the entries that changed go up, asynchronously through the backend's
//! [`Staging`] memory, stream-ordered before the step that reads them. Nothing is allocated
//! per step: a step that needs blocks that are not free is refused with
//! [`DeviceError::KvFull`] before anything runs.

use std::sync::Arc;

use super::driver::{Context, DevBuf, GpuResult, Staging};
use crate::device::blocks::{BlockManager, MAX_SEQUENCES};
use crate::device::{DeviceError, KvUsage, SeqId};

/// Positions per block: the CPU backend's and the planner's (`model::memory::BLOCK_TOKENS`), so both backends
/// count capacity in the same blocks. The kernels take it as `KV_BLOCK` (kernels/common.cuh).
pub const BLOCK_TOKENS: usize = 16;

/// Byte offsets into the pool, without device memory (testable anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Width of one position's keys (or values), BF16 elements.
    pub kv_dim: usize,
    /// Blocks in the pool, the padding block included.
    pub blocks: usize,
}

impl KvLayout {
    /// Bytes of one block of one layer's keys (or values).
    pub fn block_bytes(&self) -> usize {
        BLOCK_TOKENS * self.kv_dim * 2
    }

    /// Bytes of one layer's keys (or values), every block.
    pub fn layer_bytes(&self) -> usize {
        self.blocks * self.block_bytes()
    }

    /// Bytes of the whole pool.
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

    /// Offset, inside one layer's keys or values, of position `pos` of a sequence whose
    /// position `pos` is in block `block`: the kernels' index
    /// `(block * BLOCK_TOKENS + pos % BLOCK_TOKENS) * kv_dim` BF16 elements.
    #[cfg(test)]
    pub fn row(&self, block: usize, pos: usize) -> usize {
        (block * BLOCK_TOKENS + pos % BLOCK_TOKENS) * self.kv_dim * 2
    }
}

/// Bytes of one block over every layer (keys and values, BF16): what one [`BLOCK_TOKENS`] of
/// one sequence take, `2 × layers × kv_dim × 2` bytes per token.
pub fn block_bytes(layers: usize, kv_dim: usize) -> usize {
    layers * 2 * BLOCK_TOKENS * kv_dim * 2
}

/// Blocks a sequence of `tokens` positions holds.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// The slot (row of the block table) of a sequence handle: its low 16 bits, as
/// [`BlockManager`] hands them out (the high bits are the slot's generation).
pub fn slot_of(seq: SeqId) -> usize {
    seq.0 as usize % MAX_SEQUENCES
}

/// The host mirror of the device block table: what each entry holds on the device, and the
/// entries a sequence's new blocks change (no device memory; unit-tested).
#[derive(Clone, Debug)]
pub struct BlockTables {
    /// Entries per slot.
    max_blocks: usize,
    /// `[slots][max_blocks]`, as on the device.
    host: Vec<i32>,
}

/// An entry the device never holds: a row marked with it is uploaded in full next time.
const UNKNOWN: i32 = -1;

impl BlockTables {
    /// Tables for `slots` slots of `max_blocks` entries, every entry `pad_block` (what the
    /// device table is initialised with).
    pub fn new(slots: usize, max_blocks: usize, pad_block: i32) -> Self {
        Self {
            max_blocks,
            host: vec![pad_block; slots * max_blocks],
        }
    }

    /// Entries per slot.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Every entry, `[slots][max_blocks]` (the device table's initial contents).
    pub fn entries(&self) -> &[i32] {
        &self.host
    }

    /// Records that `slot`'s table starts with `blocks` and returns the entries to upload for
    /// the device to agree: `(first entry index, values)` of the smallest contiguous range that
    /// changed, or `None` when the device already holds them. Entries past `blocks.len()` are
    /// left as they are (no kernel reads them: a sequence's positions lie in its first blocks).
    pub fn update(&mut self, slot: usize, blocks: &[u32]) -> Option<(usize, Vec<i32>)> {
        assert!(
            blocks.len() <= self.max_blocks,
            "{} blocks in a table of {}",
            blocks.len(),
            self.max_blocks
        );
        let row = &mut self.host[slot * self.max_blocks..][..blocks.len()];
        let differs = |(i, (&h, &b)): (usize, (&i32, &u32))| (h != b as i32).then_some(i);
        let first = row.iter().zip(blocks).enumerate().find_map(differs)?;
        let last = row.iter().zip(blocks).enumerate().rev().find_map(differs)?;
        let vals: Vec<i32> = blocks[first..=last].iter().map(|&b| b as i32).collect();
        row[first..=last].copy_from_slice(&vals);
        Some((slot * self.max_blocks + first, vals))
    }

    /// Forgets what `slot`'s entries hold on the device (an upload of them failed), so that the
    /// next [`BlockTables::update`] sends them again.
    pub fn forget(&mut self, slot: usize) {
        self.host[slot * self.max_blocks..][..self.max_blocks].fill(UNKNOWN);
    }
}

/// The pool, its block manager and the device block table.
pub struct KvCache {
    pool: DevBuf,
    table: DevBuf,
    blocks: BlockManager,
    tables: BlockTables,
    layout: KvLayout,
    /// Live sequences at most (the padding slot is one more).
    pub max_sequences: usize,
    /// Tokens per sequence at most.
    pub max_context: usize,
}

impl KvCache {
    /// Allocates a pool of `total_blocks` blocks plus the padding block, and the block table of
    /// `max_sequences` slots plus the padding slot, every entry the padding block.
    pub fn new(
        ctx: &Arc<Context>,
        layers: usize,
        kv_dim: usize,
        total_blocks: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> GpuResult<Self> {
        let layout = KvLayout {
            layers,
            kv_dim,
            blocks: total_blocks + 1,
        };
        let tables = BlockTables::new(
            max_sequences + 1,
            blocks_for(max_context),
            total_blocks as i32,
        );
        Ok(Self {
            pool: DevBuf::new(ctx, layout.bytes())?,
            table: DevBuf::from_host(ctx, tables.entries())?,
            blocks: BlockManager::new(total_blocks, BLOCK_TOKENS, max_sequences, max_context),
            tables,
            layout,
            max_sequences,
            max_context,
        })
    }

    /// Bytes of the pool and the block table.
    pub fn bytes(&self) -> usize {
        self.pool.bytes() + self.table.bytes()
    }

    /// The slot padding rows use (its table points at the padding block only).
    pub fn pad_slot(&self) -> usize {
        self.max_sequences
    }

    /// Blocks the manager hands out (the padding block not counted).
    pub fn total_blocks(&self) -> usize {
        self.blocks.total_blocks()
    }

    /// Device address of layer `l`'s keys, `[block][BLOCK_TOKENS][kv_dim]` BF16.
    pub fn keys(&self, l: usize) -> u64 {
        debug_assert!(l < self.layout.layers);
        self.pool.at(self.layout.keys(l))
    }

    /// Device address of layer `l`'s values, laid out like the keys.
    pub fn values(&self, l: usize) -> u64 {
        debug_assert!(l < self.layout.layers);
        self.pool.at(self.layout.values(l))
    }

    /// Device address of the block table, i32 `[slots][max_blocks]`.
    pub fn table(&self) -> u64 {
        self.table.ptr()
    }

    /// Entries per slot of the block table.
    pub fn max_blocks(&self) -> usize {
        self.tables.max_blocks()
    }

    /// Takes a handle for a new, empty sequence.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        self.blocks.alloc()
    }

    /// Ends a sequence; its blocks go back to the free list (unknown handles are ignored). The
    /// device table keeps its stale entries: nothing reads them before the slot's next sequence
    /// reserves blocks, which overwrites them.
    pub fn free(&mut self, seq: SeqId) {
        self.blocks.free(seq)
    }

    /// Tokens a live sequence holds.
    pub fn len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.blocks.len(seq)
    }

    /// Makes room for the sequence to hold `tokens` positions (all or nothing:
    /// [`DeviceError::KvFull`] or [`DeviceError::ContextFull`] and nothing changed), and queues
    /// the upload of the table entries its new blocks changed on the stream, through `staging`.
    pub fn reserve(
        &mut self,
        staging: &mut Staging,
        seq: SeqId,
        tokens: usize,
    ) -> Result<(), DeviceError> {
        let before = self.blocks.len(seq)?;
        self.blocks.reserve(seq, tokens)?;
        let slot = slot_of(seq);
        let Some((at, vals)) = self.tables.update(slot, self.blocks.blocks(seq)?) else {
            return Ok(());
        };
        if let Err(e) = staging.upload(&self.table, 4 * at, &vals) {
            self.tables.forget(slot);
            self.blocks.truncate(seq, before);
            return Err(e.into());
        }
        Ok(())
    }

    /// Records that a live sequence now holds `len` tokens, within what it reserved (the
    /// backend reserves before every step, so this cannot fail for a step that ran).
    pub fn set_len(&mut self, seq: SeqId, len: usize) {
        let r = self.blocks.set_len(seq, len);
        debug_assert!(r.is_ok(), "{r:?}");
    }

    /// Drops what a sequence holds past `len` tokens and the blocks it no longer needs (undoing
    /// a failed step's reservation).
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        self.blocks.truncate(seq, len)
    }

    /// The block counts.
    pub fn usage(&self) -> KvUsage {
        self.blocks.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_bytes_are_two_bytes_per_element_and_match_the_cpu_blocks() {
        assert_eq!(BLOCK_TOKENS, crate::model::memory::BLOCK_TOKENS);
        // Llama-3.1-8B: 32 layers, kv_dim 1024: 128 KiB per token, 2 MiB per block.
        assert_eq!(block_bytes(32, 1024), 16 * 2 * 32 * 1024 * 2);
        assert_eq!(
            block_bytes(32, 1024) / BLOCK_TOKENS,
            crate::model::memory::Dims::of_shape(
                &crate::model::LlamaShape::preset("llama-3.1-8b").unwrap()
            )
            .kv_bytes_per_token() as usize
        );
        assert_eq!(blocks_for(0), 0);
        assert_eq!(blocks_for(16), 1);
        assert_eq!(blocks_for(17), 2);
    }

    #[test]
    fn layout_of_a_large_pool_exceeds_i32_without_overlap() {
        // Llama-3.1-8B, 40000 blocks (640k tokens) + the padding block: 78 GiB.
        let l = KvLayout {
            layers: 32,
            kv_dim: 1024,
            blocks: 40_001,
        };
        assert_eq!(l.bytes(), 40_001 * block_bytes(32, 1024));
        assert!(l.bytes() > i32::MAX as usize);
        for i in 0..l.layers {
            assert_eq!(l.values(i), l.keys(i) + l.layer_bytes());
            assert_eq!(l.keys(i + 1), l.values(i) + l.layer_bytes());
        }
        // The last row of the last block of the last layer's values ends the pool.
        let last = l.values(l.layers - 1) + l.row(l.blocks - 1, BLOCK_TOKENS - 1) + 2 * l.kv_dim;
        assert_eq!(last, l.bytes());
        // Positions 15 and 16 of a sequence are in different blocks wherever those are; rows of
        // one block are consecutive and blocks do not overlap.
        assert_eq!(l.row(7, 16), l.row(7, 0));
        assert_eq!(l.row(7, 15) + 2 * l.kv_dim, l.row(8, 0));
        assert_eq!(l.block_bytes(), l.row(1, 0));
    }

    #[test]
    fn tables_upload_only_the_entries_that_changed() {
        let mut t = BlockTables::new(3, 4, 99);
        // Initially every entry is the padding block.
        assert!(t.entries().iter().all(|&e| e == 99));
        // A sequence in slot 1 gains its first block, then a second: one entry each time.
        assert_eq!(t.update(1, &[5]), Some((4, vec![5])));
        assert_eq!(t.update(1, &[5]), None, "nothing changed");
        assert_eq!(t.update(1, &[5, 2]), Some((5, vec![2])));
        assert_eq!(&t.entries()[4..8], &[5, 2, 99, 99]);
        // The slot is reused by a sequence given other blocks: the changed range only.
        assert_eq!(t.update(1, &[5, 7, 3]), Some((5, vec![7, 3])));
        assert_eq!(t.update(1, &[0, 7, 3, 1]), Some((4, vec![0, 7, 3, 1])));
        // Other slots are untouched.
        assert!(t.entries()[..4].iter().all(|&e| e == 99));
        assert!(t.entries()[8..].iter().all(|&e| e == 99));
        // After a failed upload the whole reserved prefix goes up again.
        t.forget(1);
        assert_eq!(t.update(1, &[0, 7]), Some((4, vec![0, 7])));
        assert_eq!(t.update(2, &[]), None);
    }

    #[test]
    fn the_mirror_follows_the_block_manager_through_alloc_grow_and_free() {
        // Drives a BlockManager as the backend does (reserve, then update the mirror) and checks
        // that the mirror, after applying every returned upload to a model of the device table,
        // maps every held position to the manager's block, and the padding slot to the padding
        // block only.
        let (seqs, ctx, total) = (3, 100, 12);
        let max_blocks = blocks_for(ctx);
        let mut m = BlockManager::new(total, BLOCK_TOKENS, seqs, ctx);
        let mut t = BlockTables::new(seqs + 1, max_blocks, total as i32);
        let mut device = t.entries().to_vec();
        let apply = |device: &mut Vec<i32>, u: Option<(usize, Vec<i32>)>| {
            if let Some((at, v)) = u {
                device[at..at + v.len()].copy_from_slice(&v);
            }
        };
        let a = m.alloc().unwrap();
        let b = m.alloc().unwrap();
        let mut lens = vec![(a, 0usize), (b, 0)];
        for step in 0..60 {
            let k = step % lens.len();
            let (s, len) = lens[k];
            let want = len + if step % 7 == 0 { 20 } else { 1 };
            match m.reserve(s, want) {
                Ok(_) => {
                    apply(&mut device, t.update(slot_of(s), m.blocks(s).unwrap()));
                    m.set_len(s, want).unwrap();
                    lens[k].1 = want;
                }
                Err(DeviceError::KvFull { .. }) | Err(DeviceError::ContextFull { .. }) => {
                    // Free the other sequence and start a new one in its slot.
                    let (o, _) = lens[1 - k];
                    m.free(o);
                    lens[1 - k] = (m.alloc().unwrap(), 0);
                }
                Err(e) => panic!("{e}"),
            }
            for &(s, len) in &lens {
                let blocks = m.blocks(s).unwrap();
                for p in 0..len {
                    assert_eq!(
                        device[slot_of(s) * max_blocks + p / BLOCK_TOKENS],
                        blocks[p / BLOCK_TOKENS] as i32,
                        "step {step}: position {p} of slot {}",
                        slot_of(s)
                    );
                }
            }
            let pad = &device[seqs * max_blocks..];
            assert!(pad.iter().all(|&e| e == total as i32));
        }
        m.check().unwrap();
    }
}
