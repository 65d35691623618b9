//! The paged KV cache's bookkeeping, without any memory of its own: fixed-size blocks of
//! `block_tokens` positions, a free list, a block table per sequence, and generation-tagged
//! sequence handles. A backend owns one [`BlockManager`] next to the memory the block ids index
//! (the CPU backend's block pool); the engine sees its counts through
//! [`Backend::kv_usage`](super::Backend::kv_usage).
//!
//! Why blocks: capacity is then counted in tokens a sequence actually holds (rounded up to its
//! last, partly filled block), not in slots × the context limit, so a cache that holds two
//! sequences of 8192 tokens holds a hundred of 100 tokens.
//!
//! Why here and not in `engine`: the memory a block id indexes lives in the backend, and the
//! dependency points `device ← engine`; this module is pure Rust so both backends and the
//! engine's admission rule use one definition of "a block".
//!
//! Invariants (checked by [`BlockManager::check`], property-tested below): every block is
//! either free (on the free list exactly once) or owned by exactly one live sequence (no
//! sharing, no double free, no leak); a live sequence owns exactly
//! `ceil(len / block_tokens)` blocks, plus whatever [`BlockManager::reserve`] took ahead of a
//! step; a handle stops working once its sequence is freed, even after its slot is reused.

use super::{DeviceError, SeqId};

/// Slots a [`SeqId`] can name: its low 16 bits are the slot, its high 16 bits the generation.
pub const MAX_SEQUENCES: usize = 1 << 16;

/// A free block's owner marker.
const FREE: u32 = u32::MAX;

/// What a sequence slot holds.
#[derive(Clone, Debug, Default)]
struct Slot {
    /// Bumped each time the slot is handed out; part of the handle.
    generation: u16,
    /// The live sequence, when there is one.
    live: Option<Table>,
}

/// A live sequence's block table.
#[derive(Clone, Debug, Default)]
struct Table {
    /// Tokens held (positions 0..len have keys and values).
    len: usize,
    /// Block ids in position order: position `p` lives in `blocks[p / block_tokens]`.
    blocks: Vec<u32>,
}

/// Counts of a paged KV cache, for admission decisions and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvUsage {
    /// Positions per block.
    pub block_tokens: usize,
    /// Blocks in the cache.
    pub total_blocks: usize,
    /// Blocks not owned by any sequence.
    pub free_blocks: usize,
    /// Tokens the live sequences hold.
    pub used_tokens: usize,
    /// Live sequences.
    pub sequences: usize,
}

impl KvUsage {
    /// Blocks owned by live sequences.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks - self.free_blocks
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks * self.block_tokens
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens.max(1))
    }
}

/// Block tables, the free list and sequence handles of one paged KV cache.
#[derive(Clone, Debug)]
pub struct BlockManager {
    block_tokens: usize,
    max_context: usize,
    /// Free block ids; the last is handed out first (a recently freed block is warm).
    free: Vec<u32>,
    /// Per block, the slot owning it, or [`FREE`].
    owner: Vec<u32>,
    slots: Vec<Slot>,
    /// Free slot indices, handed out lowest first.
    free_slots: Vec<u32>,
    used_tokens: usize,
}

impl BlockManager {
    /// A cache of `total_blocks` blocks of `block_tokens` positions, for at most
    /// `max_sequences` live sequences (clamped to [`MAX_SEQUENCES`]) of at most `max_context`
    /// tokens each.
    pub fn new(
        total_blocks: usize,
        block_tokens: usize,
        max_sequences: usize,
        max_context: usize,
    ) -> Self {
        let total_blocks = total_blocks.min(FREE as usize);
        let max_sequences = max_sequences.clamp(1, MAX_SEQUENCES);
        Self {
            block_tokens: block_tokens.max(1),
            max_context,
            free: (0..total_blocks as u32).rev().collect(),
            owner: vec![FREE; total_blocks],
            slots: vec![Slot::default(); max_sequences],
            free_slots: (0..max_sequences as u32).rev().collect(),
            used_tokens: 0,
        }
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Blocks in the cache.
    pub fn total_blocks(&self) -> usize {
        self.owner.len()
    }

    /// Live sequences at most.
    pub fn max_sequences(&self) -> usize {
        self.slots.len()
    }

    /// Tokens per sequence at most.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The counts.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            block_tokens: self.block_tokens,
            total_blocks: self.owner.len(),
            free_blocks: self.free.len(),
            used_tokens: self.used_tokens,
            sequences: self.slots.len() - self.free_slots.len(),
        }
    }

    /// A new, empty sequence (no blocks yet).
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        let i = self
            .free_slots
            .pop()
            .ok_or(DeviceError::NoFreeSlot(self.slots.len()))?;
        let slot = &mut self.slots[i as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.live = Some(Table::default());
        Ok(SeqId(u32::from(slot.generation) << 16 | i))
    }

    fn slot_of(&self, seq: SeqId) -> Option<usize> {
        let (i, generation) = ((seq.0 & 0xffff) as usize, (seq.0 >> 16) as u16);
        let slot = self.slots.get(i)?;
        (slot.generation == generation && slot.live.is_some()).then_some(i)
    }

    fn table(&self, seq: SeqId) -> Result<&Table, DeviceError> {
        self.slot_of(seq)
            .and_then(|i| self.slots[i].live.as_ref())
            .ok_or(DeviceError::UnknownSequence(seq))
    }

    /// Ends a sequence and returns its blocks to the free list. Unknown and stale handles (a
    /// sequence already freed, even if its slot was reused since) are ignored.
    pub fn free(&mut self, seq: SeqId) {
        let Some(i) = self.slot_of(seq) else { return };
        let table = self.slots[i].live.take().expect("slot_of checks liveness");
        self.used_tokens -= table.len;
        for b in table.blocks {
            debug_assert_eq!(self.owner[b as usize], i as u32);
            self.owner[b as usize] = FREE;
            self.free.push(b);
        }
        self.free_slots.push(i as u32);
        // Lowest slot first, so slot numbers stay small and tests are predictable.
        self.free_slots.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Tokens a live sequence holds.
    pub fn len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        Ok(self.table(seq)?.len)
    }

    /// A live sequence's block table (position `p` is in block `table[p / block_tokens]`; it may
    /// be longer than its tokens need after [`BlockManager::reserve`]).
    pub fn blocks(&self, seq: SeqId) -> Result<&[u32], DeviceError> {
        Ok(&self.table(seq)?.blocks)
    }

    /// Makes room for the sequence to hold `tokens` positions, taking blocks from the free
    /// list. All or nothing: when the context or the free blocks do not suffice, nothing
    /// changes and the error says which ([`DeviceError::ContextFull`], [`DeviceError::KvFull`]).
    /// Returns the blocks taken (to be given back by [`BlockManager::truncate`] if the step
    /// that needed them fails).
    pub fn reserve(&mut self, seq: SeqId, tokens: usize) -> Result<usize, DeviceError> {
        let i = self.slot_of(seq).ok_or(DeviceError::UnknownSequence(seq))?;
        if tokens > self.max_context {
            return Err(DeviceError::ContextFull {
                seq,
                want: tokens,
                max: self.max_context,
            });
        }
        let have = self.slots[i].live.as_ref().map_or(0, |t| t.blocks.len());
        let need = tokens.div_ceil(self.block_tokens).saturating_sub(have);
        if need > self.free.len() {
            return Err(DeviceError::KvFull {
                seq,
                need,
                free: self.free.len(),
            });
        }
        let table = self.slots[i]
            .live
            .as_mut()
            .expect("slot_of checks liveness");
        for _ in 0..need {
            let b = self.free.pop().expect("counted above");
            self.owner[b as usize] = i as u32;
            table.blocks.push(b);
        }
        Ok(need)
    }

    /// Records that a live sequence now holds `len` tokens, within the blocks it has reserved.
    pub fn set_len(&mut self, seq: SeqId, len: usize) -> Result<(), DeviceError> {
        let i = self.slot_of(seq).ok_or(DeviceError::UnknownSequence(seq))?;
        let bt = self.block_tokens;
        let table = self.slots[i]
            .live
            .as_mut()
            .expect("slot_of checks liveness");
        if len > table.blocks.len() * bt {
            return Err(DeviceError::Invalid(format!(
                "sequence {seq:?} would hold {len} tokens in {} reserved blocks of {bt}",
                table.blocks.len()
            )));
        }
        self.used_tokens = self.used_tokens - table.len + len;
        table.len = len;
        Ok(())
    }

    /// Shrinks a live sequence to at most `len` tokens and gives back every block it no longer
    /// needs (undoing a failed step's [`BlockManager::reserve`]). Unknown handles are ignored.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let Some(i) = self.slot_of(seq) else { return };
        let bt = self.block_tokens;
        let table = self.slots[i]
            .live
            .as_mut()
            .expect("slot_of checks liveness");
        let len = len.min(table.len);
        self.used_tokens = self.used_tokens - table.len + len;
        table.len = len;
        while table.blocks.len() > len.div_ceil(bt) {
            let b = table.blocks.pop().expect("longer than needed");
            self.owner[b as usize] = FREE;
            self.free.push(b);
        }
    }

    /// Checks every invariant in the module documentation; the error says which broke.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = vec![false; self.owner.len()];
        for &b in &self.free {
            let b = b as usize;
            if b >= seen.len() || seen[b] {
                return Err(format!(
                    "block {b} is on the free list twice or out of range"
                ));
            }
            if self.owner[b] != FREE {
                return Err(format!("free block {b} has owner {}", self.owner[b]));
            }
            seen[b] = true;
        }
        let mut tokens = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(t) = &slot.live else { continue };
            tokens += t.len;
            if t.blocks.len() < t.len.div_ceil(self.block_tokens) {
                return Err(format!(
                    "slot {i} holds {} tokens in {} blocks",
                    t.len,
                    t.blocks.len()
                ));
            }
            for &b in &t.blocks {
                let b = b as usize;
                if seen[b] {
                    return Err(format!("block {b} is shared or also free (slot {i})"));
                }
                if self.owner[b] != i as u32 {
                    return Err(format!(
                        "block {b} in slot {i}'s table has owner {}",
                        self.owner[b]
                    ));
                }
                seen[b] = true;
            }
        }
        if let Some(b) = seen.iter().position(|s| !s) {
            return Err(format!("block {b} is neither free nor owned (leaked)"));
        }
        if tokens != self.used_tokens {
            return Err(format!(
                "used_tokens {} but tables hold {tokens}",
                self.used_tokens
            ));
        }
        let live = self.slots.iter().filter(|s| s.live.is_some()).count();
        if live + self.free_slots.len() != self.slots.len() {
            return Err("a slot is both free and live, or neither".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn blocks_follow_tokens_not_the_context() {
        // 10 blocks of 16 tokens, context 8192: two sequences of 8192 would not fit, ten of 16 do.
        let mut m = BlockManager::new(10, 16, 64, 8192);
        let seqs: Vec<SeqId> = (0..10).map(|_| m.alloc().unwrap()).collect();
        for &s in &seqs {
            assert_eq!(m.reserve(s, 16).unwrap(), 1);
            m.set_len(s, 16).unwrap();
        }
        assert_eq!(m.usage().free_blocks, 0);
        assert_eq!(m.usage().used_tokens, 160);
        // The 17th token of any of them needs a block that is not there: all or nothing.
        let err = m.reserve(seqs[0], 17).unwrap_err();
        assert!(
            matches!(
                err,
                DeviceError::KvFull {
                    need: 1,
                    free: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(m.blocks(seqs[0]).unwrap().len(), 1);
        m.free(seqs[3]);
        assert_eq!(m.reserve(seqs[0], 17).unwrap(), 1);
        m.check().unwrap();
    }

    #[test]
    fn context_limit_and_reserve_are_all_or_nothing() {
        let mut m = BlockManager::new(4, 4, 2, 10);
        let s = m.alloc().unwrap();
        assert!(matches!(
            m.reserve(s, 11),
            Err(DeviceError::ContextFull {
                want: 11,
                max: 10,
                ..
            })
        ));
        assert!(matches!(m.reserve(s, 10), Ok(3)));
        assert!(
            m.set_len(s, 13).is_err(),
            "more than the reserved blocks hold"
        );
        m.set_len(s, 10).unwrap();
        // A second sequence cannot take two blocks when one is free.
        let t = m.alloc().unwrap();
        assert!(matches!(
            m.reserve(t, 5),
            Err(DeviceError::KvFull {
                need: 2,
                free: 1,
                ..
            })
        ));
        assert_eq!(m.usage().free_blocks, 1);
        m.truncate(s, 4);
        assert_eq!(m.usage().free_blocks, 3);
        assert_eq!(m.len(s).unwrap(), 4);
        m.check().unwrap();
    }

    #[test]
    fn stale_handles_are_refused_even_after_the_slot_is_reused() {
        let mut m = BlockManager::new(4, 4, 1, 16);
        let a = m.alloc().unwrap();
        m.reserve(a, 4).unwrap();
        m.free(a);
        let b = m.alloc().unwrap();
        assert_ne!(a, b, "same slot, new generation");
        assert_eq!(a.0 & 0xffff, b.0 & 0xffff);
        assert!(matches!(m.len(a), Err(DeviceError::UnknownSequence(_))));
        assert!(matches!(
            m.reserve(a, 4),
            Err(DeviceError::UnknownSequence(_))
        ));
        m.free(a); // stale: ignored, b keeps its slot
        assert_eq!(m.len(b).unwrap(), 0);
        assert!(matches!(m.alloc(), Err(DeviceError::NoFreeSlot(1))));
        m.check().unwrap();
    }

    /// One operation of the property test; indices pick among the live handles (or a stale
    /// one) modulo their count.
    #[derive(Clone, Debug)]
    enum Op {
        Alloc,
        Free(usize),
        FreeStale(usize),
        Grow(usize, usize),
        Truncate(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Alloc),
            1 => any::<usize>().prop_map(Op::Free),
            1 => any::<usize>().prop_map(Op::FreeStale),
            4 => (any::<usize>(), 0usize..40).prop_map(|(i, n)| Op::Grow(i, n)),
            1 => (any::<usize>(), 0usize..40).prop_map(|(i, n)| Op::Truncate(i, n)),
        ]
    }

    proptest! {
        /// Any sequence of operations keeps every block free exactly once or owned by exactly
        /// one live sequence, matches a simple model of each sequence's length, and frees
        /// everything when every sequence ends.
        #[test]
        fn no_double_free_no_leak_no_sharing(
            blocks in 1usize..24,
            bt in 1usize..6,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut m = BlockManager::new(blocks, bt, 6, 64);
            let mut live: Vec<(SeqId, usize)> = Vec::new();
            let mut stale: Vec<SeqId> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => match m.alloc() {
                        Ok(s) => live.push((s, 0)),
                        Err(DeviceError::NoFreeSlot(_)) => prop_assert_eq!(live.len(), 6),
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    Op::Free(i) if !live.is_empty() => {
                        let (s, _) = live.swap_remove(i % live.len());
                        m.free(s);
                        stale.push(s);
                    }
                    Op::FreeStale(i) if !stale.is_empty() => {
                        let before = m.usage();
                        m.free(stale[i % stale.len()]);
                        prop_assert_eq!(m.usage(), before);
                    }
                    Op::Grow(i, n) if !live.is_empty() => {
                        let k = i % live.len();
                        let (s, len) = live[k];
                        let free = m.usage().free_blocks;
                        let want = len + n;
                        let need = want.div_ceil(bt).saturating_sub(m.blocks(s).unwrap().len());
                        match m.reserve(s, want) {
                            Ok(took) => {
                                prop_assert_eq!(took, need);
                                m.set_len(s, want).unwrap();
                                live[k].1 = want;
                            }
                            Err(DeviceError::KvFull { .. }) => {
                                prop_assert!(need > free);
                                prop_assert_eq!(m.usage().free_blocks, free);
                            }
                            Err(DeviceError::ContextFull { .. }) => prop_assert!(want > 64),
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Truncate(i, n) if !live.is_empty() => {
                        let k = i % live.len();
                        let (s, len) = live[k];
                        m.truncate(s, n);
                        live[k].1 = len.min(n);
                        prop_assert_eq!(m.blocks(s).unwrap().len(), live[k].1.div_ceil(bt));
                    }
                    _ => {}
                }
                if let Err(e) = m.check() {
                    prop_assert!(false, "{e}");
                }
                for &(s, len) in &live {
                    prop_assert_eq!(m.len(s).unwrap(), len);
                }
                for &s in &stale {
                    prop_assert!(m.len(s).is_err(), "a freed handle still works");
                }
                let held: usize = live.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(m.usage().used_tokens, held);
            }
            for (s, _) in live {
                m.free(s);
            }
            prop_assert_eq!(m.usage().free_blocks, blocks);
            prop_assert_eq!(m.usage().sequences, 0);
        }
    }
}
