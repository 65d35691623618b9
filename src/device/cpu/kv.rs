//! The CPU backend's paged KV cache: a [`BlockManager`] (block tables, free list, handles) over
//! a pool of blocks, each holding `block_tokens` positions of every layer's keys and values.
//!
//! A block is one allocation, per layer the keys `[kv_dim][position in block]` then the values
//! `[position in block][kv_dim]` (BF16 bits; the layouts [`AttnQuery`] reads), made the first
//! time its id is handed out and kept for reuse after the sequence that held it ends (the pool
//! grows to the most blocks ever held at once, never past `total_blocks`). Capacity is counted
//! in blocks, that is in tokens actually held: a sequence of 100 tokens takes
//! `ceil(100 / block_tokens)` blocks, whatever the context limit.
//!
//! Keys (after RoPE) and values are computed in f32 and rounded to BF16, to nearest with ties to
//! even, when they are written; attention widens them back exactly (`bits << 16`) and does its
//! arithmetic in f32. The CUDA engine stores its cache the same way, so the two engines stay
//! comparable, and a token costs half the memory of f32 keys and values. A prompt's own
//! positions are read back from the cache like any other, so a token's logits do not depend on
//! whether its prompt ran alone, batched or split into chunks.

use super::attn::{AttnQuery, KEY_BLOCK};
use crate::device::blocks::BlockManager;
use crate::device::{DeviceError, KvUsage, SeqId};
use crate::model::synth::f32_to_bf16;

/// Positions per block: the key block of the attention's online softmax.
pub const BLOCK_TOKENS: usize = KEY_BLOCK;

/// Bytes one cached key or value element takes: BF16.
pub const ELEMENT_BYTES: usize = std::mem::size_of::<u16>();

/// Every sequence's keys and values, in blocks.
pub struct KvCache {
    blocks: BlockManager,
    /// Block memory by id (BF16 bits); `None` until first used.
    pool: Vec<Option<Box<[u16]>>>,
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

    /// Bytes one block holds (keys and values of every layer, BF16).
    pub fn block_bytes(layers: usize, kv_dim: usize) -> usize {
        layers * 2 * BLOCK_TOKENS * kv_dim * ELEMENT_BYTES
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
            self.pool[b].get_or_insert_with(|| vec![0u16; size].into_boxed_slice());
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

    /// Writes the keys and values of position `pos` in `layer` (reserved beforehand), rounded
    /// to BF16 (nearest, ties to even).
    pub fn write(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), DeviceError> {
        let kvd = self.kv_dim;
        if k.len() != kvd || v.len() != kvd {
            return Err(DeviceError::Invalid(format!(
                "keys of {} and values of {} elements for a cache {kvd} wide",
                k.len(),
                v.len()
            )));
        }
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
            block[ko + c * BLOCK_TOKENS + j] = f32_to_bf16(kc);
        }
        for (o, &vc) in block[vo + j * kvd..vo + (j + 1) * kvd].iter_mut().zip(v) {
            *o = f32_to_bf16(vc);
        }
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
    use crate::model::weights::bf16_to_f32;

    /// What the cache must give back for `x`: BF16 round to nearest even, widened exactly.
    fn rounded(x: &[f32]) -> Vec<u32> {
        x.iter()
            .map(|&x| bf16_to_f32(f32_to_bf16(x)).to_bits())
            .collect()
    }

    fn bits(x: &[u16]) -> Vec<u32> {
        x.iter().map(|&b| bf16_to_f32(b).to_bits()).collect()
    }

    #[test]
    fn positions_round_trip_across_block_boundaries_and_layers() {
        let (layers, kvd) = (3, 4);
        let mut kv = KvCache::new(layers, kvd, 8, 2, 100);
        let a = kv.alloc().unwrap();
        let b = kv.alloc().unwrap();
        let n = BLOCK_TOKENS * 2 + 3;
        kv.reserve(a, n).unwrap();
        kv.reserve(b, 5).unwrap();
        // Values that need rounding (more than 8 significant bits), distinct per position.
        let val = |s: usize, l: usize, p: usize, v: bool| {
            (0..kvd)
                .map(|d| {
                    (1.0 + (s * 1000 + l * 100 + p * 4 + d) as f32 / 4096.0)
                        * if v { -1.0 } else { 1.0 }
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
                let key: Vec<u16> = (0..kvd)
                    .map(|c| r.keys[blk][c * BLOCK_TOKENS + j])
                    .collect();
                assert_eq!(bits(&key), rounded(&val(0, l, p, false)));
                assert_eq!(
                    bits(&r.values[blk][j * kvd..(j + 1) * kvd]),
                    rounded(&val(0, l, p, true))
                );
            }
            let r = kv.read(b, l, 5).unwrap();
            assert_eq!(
                bits(&[r.keys[0][2 * BLOCK_TOKENS + 4]]),
                rounded(&val(1, l, 4, false)[2..3])
            );
            assert_eq!(
                bits(&r.values[0][4 * kvd..5 * kvd]),
                rounded(&val(1, l, 4, true))
            );
        }
        // Writing past what was reserved is an error, not a write into someone else's block.
        assert!(kv.write(b, 0, BLOCK_TOKENS, &[0.0; 4], &[0.0; 4]).is_err());
        // So is a row of the wrong width.
        assert!(kv.write(b, 0, 0, &[0.0; 3], &[0.0; 4]).is_err());
        assert_eq!(kv.usage().used_blocks(), 4);
        kv.free(a);
        assert_eq!(kv.usage().used_blocks(), 1);
    }

    #[test]
    fn stores_round_to_nearest_even_and_read_back_exactly() {
        let mut kv = KvCache::new(1, 8, 1, 1, 16);
        let s = kv.alloc().unwrap();
        kv.reserve(s, 1).unwrap();
        let x = [
            1.0,                         // exact
            f32::from_bits(0x3f80_8000), // halfway, even below: down
            f32::from_bits(0x3f81_8000), // halfway, odd below: up
            f32::from_bits(0x3f80_8001), // just above halfway: up
            f32::from_bits(0x3f80_7fff), // just below halfway: down
            -0.0,
            f32::INFINITY,
            -f32::MAX, // rounds past the largest BF16: -inf
        ];
        let want = [
            0x3f80u16, 0x3f80, 0x3f82, 0x3f81, 0x3f80, 0x8000, 0x7f80, 0xff80,
        ];
        kv.write(s, 0, 0, &x, &x).unwrap();
        kv.set_len(s, 1).unwrap();
        let r = kv.read(s, 0, 1).unwrap();
        let key: Vec<u16> = (0..8).map(|c| r.keys[0][c * BLOCK_TOKENS]).collect();
        assert_eq!(key, want);
        assert_eq!(&r.values[0][..8], &want);
    }

    #[test]
    fn a_block_takes_block_bytes_of_bf16() {
        let (layers, kvd) = (3, 8);
        let mut kv = KvCache::new(layers, kvd, 2, 1, 64);
        let s = kv.alloc().unwrap();
        kv.reserve(s, 1).unwrap();
        let block = kv.pool[0].as_deref().unwrap();
        assert_eq!(
            std::mem::size_of_val(block),
            KvCache::block_bytes(layers, kvd)
        );
        // Two bytes per element: layers × (K and V) × 16 positions × kv_dim × 2.
        assert_eq!(KvCache::block_bytes(layers, kvd), layers * 2 * 16 * kvd * 2);
    }
}
