//! The CPU backend's KV-cache manager: owns the key/value memory of every live sequence and
//! hands out [`SeqId`] slot handles.
//!
//! A sequence's cache grows as tokens are appended (f32, `[position][kv_heads × head_dim]` per
//! layer), so memory follows the tokens actually held rather than the context limit. Slots are
//! reused after [`KvCache::free`].

use crate::device::{DeviceError, SeqId};

/// Keys and values of one sequence.
pub struct SeqCache {
    /// Tokens whose keys and values are complete in every layer.
    pub len: usize,
    /// Per layer, `len × kv_dim` keys (more while a step is appending).
    pub keys: Vec<Vec<f32>>,
    /// Per layer, values laid out like the keys.
    pub values: Vec<Vec<f32>>,
}

/// Every sequence slot.
pub struct KvCache {
    slots: Vec<Option<SeqCache>>,
    layers: usize,
    kv_dim: usize,
    /// Live sequences at most.
    pub max_sequences: usize,
    /// Tokens per sequence at most.
    pub max_context: usize,
}

impl KvCache {
    /// An empty cache for a model of `layers` layers whose keys are `kv_dim` wide.
    pub fn new(layers: usize, kv_dim: usize, max_sequences: usize, max_context: usize) -> Self {
        Self {
            slots: Vec::new(),
            layers,
            kv_dim,
            max_sequences,
            max_context,
        }
    }

    /// Takes a free slot.
    pub fn alloc(&mut self) -> Result<SeqId, DeviceError> {
        let empty = || SeqCache {
            len: 0,
            keys: vec![Vec::new(); self.layers],
            values: vec![Vec::new(); self.layers],
        };
        let i = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.slots.len() < self.max_sequences => {
                self.slots.push(None);
                self.slots.len() - 1
            }
            None => return Err(DeviceError::NoFreeSlot(self.max_sequences)),
        };
        self.slots[i] = Some(empty());
        Ok(SeqId(i as u32))
    }

    /// Releases a slot and its memory.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.slots.get_mut(seq.0 as usize) {
            *s = None;
        }
    }

    /// A live sequence.
    pub fn get(&self, seq: SeqId) -> Result<&SeqCache, DeviceError> {
        self.slots
            .get(seq.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(DeviceError::UnknownSequence(seq))
    }

    /// A live sequence, mutably.
    pub fn get_mut(&mut self, seq: SeqId) -> Result<&mut SeqCache, DeviceError> {
        self.slots
            .get_mut(seq.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(DeviceError::UnknownSequence(seq))
    }

    /// Drops everything a sequence holds past `len` tokens (undoing a failed step).
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let kv_dim = self.kv_dim;
        if let Ok(s) = self.get_mut(seq) {
            s.len = s.len.min(len);
            for v in s.keys.iter_mut().chain(s.values.iter_mut()) {
                v.truncate(len * kv_dim);
            }
        }
    }
}
