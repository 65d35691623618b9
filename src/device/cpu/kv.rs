//! The CPU backend's paged KV cache: a [`BlockManager`] (block tables, free list, handles) over
//! a pool of blocks, each holding `block_tokens` positions of every layer's keys and values.
//!
//! A block is one allocation, per layer the keys `[kv_dim][position in block]` then the values
//! `[position in block][kv_dim]` (f32; the layouts [`AttnQuery`] reads), made the first
//! time its id is handed out and kept for reuse after the sequence that held it ends (the pool
//! grows to the most blocks ever held at once, never past `total_blocks`). Capacity is counted
//! in blocks, that is in tokens actually held: a sequence of 100 tokens takes
//! `ceil(100 / block_tokens)` blocks, whatever the context limit.
//!
//! Keys and values stay f32, as the CPU reference always kept them: rounding them to BF16 here
//! alone would move the CPU away from the CUDA engine's f32 cache, which the GPU tests compare it
//! with at tolerances of 1e-4 (docs/engine.md, "KV cache").

use super::attn::{AttnQuery, KEY_BLOCK};
use crate::device::blocks::BlockManager;
use crate::device::{DeviceError, KvUsage, SeqId};

/// Positions per block: the key block of the attention's online softmax.
pub const BLOCK_TOKENS: usize = KEY_BLOCK;

/// Every sequence's keys and values, in blocks.
pub struct KvCache {
    blocks: BlockManager,
    /// Block memory by id; `None` until first used.
    pool: Vec<Option<Box<[f32]>>>,
    layers: usize,
    kv_dim: usize,
}

impl KvCache {
    /// An empty cache of `total_blocks` blocks for a model of `layers` layers whose keys are
    /// `kv_dim` wide.
    pub fn new(
        layers: usize,
        kv_dim: usize,
        total_blocks: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> Self {
        Self {
            blocks: BlockManager::new(total_blocks, BLOCK_TOKENS, max_sequences, max_context),
            pool: Vec::new(),
            layers,
            kv_dim,
        }
    }

    /// Bytes one block holds (keys and values of every layer, f32).
    pub fn block_bytes(layers: usize, kv_dim: usize) -> usize {
        layers * 2 * BLOCK_TOKENS * kv_dim * 4
    }

    /// Live sequences at most.
    pub fn max_sequences(&self) -> usize {
        self.blocks.max_sequences()
    }

    /// Tokens per sequence at most.
    pub fn max_context(&self) -> usize {
        self.blocks.max_context()
    }

    /// The block counts.
    pub fn usage(&self) -> KvUsage {
        self.blocks.usage()
    }

    /// Takes a handle for a new, empty sequence.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        self.blocks.alloc()
    }

    /// Ends a sequence; its blocks go back to the free list.
    pub fn free(&mut self, seq: SeqId) {
        self.blocks.free(seq)
    }

    /// Tokens a live sequence holds.
    pub fn len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.blocks.len(seq)
    }

    /// Makes room for the sequence to hold `tokens` positions (all or nothing), allocating the
    /// memory of blocks never used before.
    pub fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<(), DeviceError> {
        self.blocks.reserve(seq, tokens)?;
        let size = self.layers * 2 * BLOCK_TOKENS * self.kv_dim;
        for &b in self.blocks.blocks(seq)? {
            let b = b as usize;
            if self.pool.len() <= b {
                self.pool.resize_with(b + 1, || None);
            }
            self.pool[b].get_or_insert_with(|| vec![0f32; size].into_boxed_slice());
        }
        Ok(())
    }

    /// Records that a sequence now holds `len` tokens (within what it reserved).
    pub fn set_len(&mut self, seq: SeqId, len: usize) -> Result<(), DeviceError> {
        self.blocks.set_len(seq, len)
    }

    /// Drops everything a sequence holds past `len` tokens and the blocks it no longer needs
    /// (undoing a failed step).
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        self.blocks.truncate(seq, len)
    }

    fn offset(&self, layer: usize, values: bool) -> usize {
        (2 * layer + usize::from(values)) * BLOCK_TOKENS * self.kv_dim
    }

    /// Writes the keys and values of position `pos` in `layer` (reserved beforehand).
    pub fn write(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), DeviceError> {
        let kvd = self.kv_dim;
        let (ko, vo) = (self.offset(layer, false), self.offset(layer, true));
        let b = *self
            .blocks
            .blocks(seq)?
            .get(pos / BLOCK_TOKENS)
            .ok_or_else(|| {
                DeviceError::Invalid(format!("position {pos} of {seq:?} not reserved"))
            })?;
        let block = self.pool[b as usize]
            .as_mut()
            .expect("reserve allocates every block it hands out");
        let j = pos % BLOCK_TOKENS;
        for (c, &kc) in k.iter().enumerate() {
            block[ko + c * BLOCK_TOKENS + j] = kc;
        }
        block[vo + j * kvd..vo + (j + 1) * kvd].copy_from_slice(v);
        Ok(())
    }

    /// The first `positions` keys and values of a sequence in `layer`.
    pub fn read(
        &self,
        seq: SeqId,
        layer: usize,
        positions: usize,
    ) -> Result<AttnQuery<'_>, DeviceError> {
        let n = positions.div_ceil(BLOCK_TOKENS);
        let table = self.blocks.blocks(seq)?;
        if table.len() < n {
            return Err(DeviceError::Invalid(format!(
                "{seq:?} has {} blocks, {positions} positions need {n}",
                table.len()
            )));
        }
        let span = BLOCK_TOKENS * self.kv_dim;
        let (ko, vo) = (self.offset(layer, false), self.offset(layer, true));
        let mut keys = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        for &b in &table[..n] {
            let block = self.pool[b as usize]
                .as_deref()
                .expect("reserve allocates every block it hands out");
            keys.push(&block[ko..ko + span]);
            values.push(&block[vo..vo + span]);
        }
        Ok(AttnQuery {
            keys,
            values,
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_across_block_boundaries_and_layers() {
        let (layers, kvd) = (3, 4);
        let mut kv = KvCache::new(layers, kvd, 8, 2, 100);
        let a = kv.alloc().unwrap();
        let b = kv.alloc().unwrap();
        let n = BLOCK_TOKENS * 2 + 3;
        kv.reserve(a, n).unwrap();
        kv.reserve(b, 5).unwrap();
        let val = |s: usize, l: usize, p: usize, v: bool| {
            (0..kvd)
                .map(|d| {
                    (s * 100_000 + l * 10_000 + p * 10 + d) as f32 * if v { -1.0 } else { 1.0 }
                })
                .collect::<Vec<f32>>()
        };
        for l in 0..layers {
            for p in 0..n {
                kv.write(a, l, p, &val(0, l, p, false), &val(0, l, p, true))
                    .unwrap();
            }
            for p in 0..5 {
                kv.write(b, l, p, &val(1, l, p, false), &val(1, l, p, true))
                    .unwrap();
            }
        }
        kv.set_len(a, n).unwrap();
        kv.set_len(b, 5).unwrap();
        for l in 0..layers {
            let r = kv.read(a, l, n).unwrap();
            assert_eq!(r.keys.len(), 3);
            for p in 0..n {
                let (blk, j) = (p / BLOCK_TOKENS, p % BLOCK_TOKENS);
                let key: Vec<f32> = (0..kvd)
                    .map(|c| r.keys[blk][c * BLOCK_TOKENS + j])
                    .collect();
                assert_eq!(key, val(0, l, p, false));
                assert_eq!(
                    &r.values[blk][j * kvd..(j + 1) * kvd],
                    &val(0, l, p, true)[..]
                );
            }
            let r = kv.read(b, l, 5).unwrap();
            assert_eq!(r.keys[0][2 * BLOCK_TOKENS + 4], val(1, l, 4, false)[2]);
            assert_eq!(&r.values[0][4 * kvd..5 * kvd], &val(1, l, 4, true)[..]);
        }
        // Writing past what was reserved is an error, not a write into someone else's block.
        assert!(kv.write(b, 0, BLOCK_TOKENS, &[0.0; 4], &[0.0; 4]).is_err());
        assert_eq!(kv.usage().used_blocks(), 4);
        kv.free(a);
        assert_eq!(kv.usage().used_blocks(), 1);
    }
}
