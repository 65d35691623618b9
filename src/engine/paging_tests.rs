//! Property tests of the engine's KV admission and preemption over a fake backend whose cache
//! is a real [`BlockManager`] and whose "model" picks the next token from a hash of everything
//! the sequence was fed: a preempted sequence recomputed with the wrong tokens would diverge.
//! Any mix of requests, cache sizes, arrival times and cancellations must serve every accepted
//! request its exact tokens (or, cancelled, their beginning), refuse only requests larger than
//! the whole cache, never hang, never leak a block.

use proptest::prelude::*;

use super::*;
use crate::device::blocks::BlockManager;
use crate::device::{KvCapacity, SeqId, WeightMemory};

const VOCAB: usize = 64;
const BLOCK: usize = 4;

/// The fake model's next token after `history`.
fn next(history: &[u32]) -> u32 {
    let h = history.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        (h ^ u64::from(t)).wrapping_mul(0x1000_0000_01b3)
    });
    (h % VOCAB as u64) as u32
}

struct Paged {
    cfg: LlamaConfig,
    blocks: BlockManager,
    fed: std::collections::HashMap<SeqId, Vec<u32>>,
}

impl Paged {
    fn row(history: &[u32]) -> Vec<f32> {
        let mut r = vec![0.0; VOCAB];
        r[next(history) as usize] = 1.0;
        r
    }
}

impl Backend for Paged {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            max_sequences: self.blocks.max_sequences(),
            max_context: self.blocks.max_context(),
        }
    }
    fn kv_usage(&self) -> KvUsage {
        self.blocks.usage()
    }
    fn weight_memory(&self) -> WeightMemory {
        WeightMemory {
            bytes: 0,
            bf16_bytes: 0,
        }
    }
    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        let s = self.blocks.alloc()?;
        self.fed.insert(s, Vec::new());
        Ok(s)
    }
    fn free_sequence(&mut self, seq: SeqId) {
        self.blocks.free(seq);
        self.fed.remove(&seq);
    }
    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.blocks.len(seq)
    }
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        let len = self.blocks.len(seq)?;
        self.blocks.reserve(seq, len + tokens.len())?;
        self.blocks.set_len(seq, len + tokens.len())?;
        let h = self.fed.get_mut(&seq).expect("live");
        h.extend_from_slice(tokens);
        Ok(Self::row(h))
    }
    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        for (i, it) in batch.iter().enumerate() {
            let len = self.blocks.len(it.seq)?;
            assert_eq!(it.pos, len, "positions are consecutive");
            if let Err(e) = self.blocks.reserve(it.seq, len + 1) {
                for done in &batch[..i] {
                    self.blocks.truncate(done.seq, done.pos);
                }
                return Err(e);
            }
        }
        let mut data = Vec::new();
        for it in batch {
            self.blocks.set_len(it.seq, it.pos + 1)?;
            let h = self.fed.get_mut(&it.seq).expect("live");
            h.push(it.token);
            data.extend(Self::row(h));
        }
        Ok(Logits { vocab: VOCAB, data })
    }
}

fn engine(blocks: usize, max_batch: usize) -> Engine<Paged> {
    engine_with(blocks, BLOCK, max_batch)
}

fn engine_with(blocks: usize, block_tokens: usize, max_batch: usize) -> Engine<Paged> {
    let cfg = LlamaConfig::tiny_for_tests(VOCAB);
    let backend = Paged {
        cfg,
        blocks: BlockManager::new(blocks, block_tokens, 16, 4096),
        fed: Default::default(),
    };
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        max_batch,
        max_prefill_tokens: 64,
        max_step_slowdown: None,
        short_prompt_tokens: 0,
    };
    Engine::new(backend, None, opts)
}

/// The tokens a request gets alone.
fn alone(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut h = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let t = next(&h);
        out.push(t);
        h.push(t);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_accepted_request_gets_its_tokens_and_the_cache_ends_empty(
        blocks in 2usize..24,
        max_batch in 1usize..6,
        reqs in proptest::collection::vec(
            (
                proptest::collection::vec(0u32..VOCAB as u32, 1..30),
                1usize..30,
                0usize..6,
                proptest::option::weighted(0.25, 0usize..40),
            ),
            1..12,
        ),
    ) {
        let mut e = engine(blocks, max_batch);
        let mut want: std::collections::HashMap<RequestId, Vec<u32>> = Default::default();
        let mut got: std::collections::HashMap<RequestId, Vec<u32>> = Default::default();
        let mut finished: std::collections::HashMap<RequestId, StopReason> = Default::default();
        let mut pending: Vec<_> = reqs.clone();
        let mut cancels: Vec<(usize, RequestId)> = Vec::new();
        let mut step = 0usize;
        while !pending.is_empty() || e.has_work() {
            // Requests arrive at their step.
            let (now, later): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|r| r.2 <= step);
            pending = later;
            for (prompt, max_tokens, _, cancel) in now {
                let fits = (prompt.len() + max_tokens - 1).div_ceil(BLOCK) <= blocks;
                match e.add(Request::greedy(prompt.clone(), max_tokens)) {
                    Ok(id) => {
                        prop_assert!(fits, "accepted a request larger than the cache");
                        want.insert(id, alone(&prompt, max_tokens));
                        if let Some(at) = cancel {
                            cancels.push((step + at, id));
                        }
                    }
                    Err(err) => {
                        prop_assert!(!fits, "refused a request that fits: {err}");
                    }
                }
            }
            for &(_, id) in cancels.iter().filter(|c| c.0 == step) {
                e.cancel(id);
            }
            for ev in e.step().map_err(|err| TestCaseError::fail(err.to_string()))? {
                match ev {
                    Event::Token { id, token, .. } => {
                        prop_assert!(!finished.contains_key(&id), "token after Finished");
                        got.entry(id).or_default().push(token);
                    }
                    Event::Finished { id, reason, .. } => {
                        prop_assert!(finished.insert(id, reason).is_none(), "two Finished");
                    }
                }
            }
            prop_assert!(e.kv_usage().used_blocks() <= blocks);
            step += 1;
            prop_assert!(step < 5_000, "no progress: a hang");
        }
        for (id, tokens) in &want {
            let out = got.get(id).cloned().unwrap_or_default();
            match finished.get(id) {
                Some(StopReason::MaxTokens) => prop_assert_eq!(&out, tokens),
                // Cancelled (waiting, running or preempted): what came out is its beginning.
                Some(StopReason::Cancelled) => {
                    prop_assert!(cancels.iter().any(|c| c.1 == *id));
                    prop_assert_eq!(&out[..], &tokens[..out.len()]);
                }
                other => prop_assert!(false, "{id:?} ended with {other:?}"),
            }
        }
        let u = e.kv_usage();
        prop_assert_eq!((u.used_blocks(), u.used_tokens, u.sequences), (0, 0, 0));
    }
}

#[test]
fn two_growing_requests_in_four_blocks_preempt_and_still_get_their_tokens() {
    // Each holds up to 4 + 8 - 1 = 11 tokens (3 blocks of 4); both are admitted at 1 block each,
    // and as they grow the newer is preempted, recomputed and finished after the older.
    let mut e = engine(4, 4);
    let prompts = [[1u32, 2, 3, 4], [5, 6, 7, 8]];
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| e.add(Request::greedy(p.to_vec(), 8)).unwrap())
        .collect();
    let mut got: std::collections::HashMap<RequestId, Vec<u32>> = Default::default();
    let mut order = Vec::new();
    for _ in 0..100 {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { id, token, .. } => got.entry(id).or_default().push(token),
                Event::Finished { id, .. } => order.push(id),
            }
        }
    }
    assert!(!e.has_work());
    assert!(e.stats().preemptions > 0);
    assert_eq!(order, ids, "the older finishes first");
    for (p, id) in prompts.iter().zip(&ids) {
        assert_eq!(got[id], alone(p, 8));
    }
    assert_eq!(e.kv_usage().used_blocks(), 0);
}

#[test]
fn slots_of_a_whole_context_are_all_used_without_a_watermark() {
    // A backend whose block is the whole context (as the CUDA engine's slots): 3 slots serve 3
    // requests at once, none kept back.
    let mut e = engine_with(3, 4096, 8);
    for p in [[1u32], [2], [3]] {
        e.add(Request::greedy(p.to_vec(), 4)).unwrap();
    }
    e.step().unwrap();
    assert_eq!(e.load(), (0, 3));
    assert_eq!(e.kv_usage().free_blocks, 0);
}
