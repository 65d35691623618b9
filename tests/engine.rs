//! Tests of the CPU backend and the engine on synthetic tiny checkpoints (written and compressed
//! here), plus end-to-end checks on the real SmolLM2 test model when it has been fetched.
//!
//! Logits are compared bit for bit (`f32::to_bits`): the CPU backend promises that the weight
//! form (plain, compressed and decoded at load, compressed and decoded on the fly), the batch a
//! sequence shares and the way a prompt is split never change a single bit.

#[macro_use]
mod backend_wrap;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use triton_unweight::container::{self, Checkpoint, CompressOptions};
use triton_unweight::device::cpu::{CpuBackend, CpuOptions, KV_BLOCK_TOKENS};
use triton_unweight::device::{
    Backend, ChunkItem, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, Launched, LogitEdit,
    RowSampling, SeqId, StepChoice,
};
use triton_unweight::engine::{
    sampler, Detokenizer, Engine, EngineOptions, Event, Request, RequestId, SamplingParams,
    StopReason,
};
use triton_unweight::model::memory::Dims;
use triton_unweight::model::synth::{synth_checkpoint, SynthOptions};
use triton_unweight::model::weights::{LlamaWeights, MatrixData, WeightMode};
use triton_unweight::model::{LlamaConfig, LlamaShape};

const BIN: &str = env!("CARGO_BIN_EXE_unweight");

/// A tiny synthetic checkpoint and its compressed form, written once per test run under Cargo's
/// scratch directory. σ = 0.5 spreads the logits so that greedy choices are not near-ties.
fn tiny() -> (&'static Path, &'static Path) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    let d = DIRS.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("engine-tiny");
        let (plain, comp) = (root.join("tiny"), root.join("tiny-c"));
        let opts = SynthOptions {
            seed: 7,
            sigma: 0.5,
            force: true,
            ..SynthOptions::default()
        };
        synth_checkpoint(&LlamaShape::preset("tiny").unwrap(), &plain, &opts).unwrap();
        let copts = CompressOptions {
            progress: false,
            force: true,
            ..CompressOptions::default()
        };
        container::compress_dir(&plain, &comp, &copts).unwrap();
        (plain, comp)
    });
    (&d.0, &d.1)
}

fn backend(dir: &Path, mode: WeightMode) -> CpuBackend {
    CpuBackend::load(
        dir,
        mode,
        &CpuOptions {
            max_sequences: 8,
            ..CpuOptions::default()
        },
    )
    .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    triton_unweight::engine::sampler::argmax(v)
}

/// Prefills `prompt`, then decodes greedily `steps` times; returns every logits row and token.
fn greedy_run(b: &mut CpuBackend, prompt: &[u32], steps: usize) -> (Vec<Vec<u32>>, Vec<u32>) {
    let s = b.new_sequence().unwrap();
    let mut logits = b.prefill(s, prompt).unwrap();
    let (mut rows, mut tokens) = (vec![bits(&logits)], Vec::new());
    for i in 0..steps {
        let t = argmax(&logits);
        tokens.push(t);
        let item = DecodeItem {
            seq: s,
            token: t,
            pos: prompt.len() + i,
        };
        logits = b.decode(&[item]).unwrap().data;
        rows.push(bits(&logits));
    }
    b.free_sequence(s);
    (rows, tokens)
}

const PROMPT: [u32; 9] = [1, 17, 300, 5, 999, 42, 42, 7, 512];

/// Asserts two logits rows are bit-identical, naming the first difference (rows are too long to
/// print whole).
fn same_bits(a: &[u32], b: &[u32], what: &str) {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
        panic!("{what}: logit {i}: {x} ({:#x}) vs {y} ({:#x})", a[i], b[i]);
    }
    assert_eq!(a.len(), b.len(), "{what}: row lengths");
}

/// Asserts two greedy runs are identical, step by step.
fn same_run(a: &(Vec<Vec<u32>>, Vec<u32>), b: &(Vec<Vec<u32>>, Vec<u32>), what: &str) {
    for (step, (ra, rb)) in a.0.iter().zip(&b.0).enumerate() {
        same_bits(ra, rb, &format!("{what}, step {step}"));
    }
    assert_eq!((a.0.len(), &a.1), (b.0.len(), &b.1), "{what}: tokens");
}

#[test]
fn compressed_and_plain_checkpoints_give_bit_identical_logits() {
    let (plain, comp) = tiny();
    assert!(Checkpoint::open(comp).unwrap().is_compressed());
    let mut a = backend(plain, WeightMode::Decoded);
    let mut b = backend(comp, WeightMode::Decoded);
    let mut c = backend(comp, WeightMode::OnTheFly);
    // The on-the-fly backend really holds compressed matrices (down_proj rows straddle chunks).
    assert!(matches!(
        c.weights().layers[0].down_proj.data,
        MatrixData::Compressed(_)
    ));
    assert!(c.weights().resident_bytes() < a.weights().resident_bytes() * 9 / 10);
    let ra = greedy_run(&mut a, &PROMPT, 12);
    same_run(
        &ra,
        &greedy_run(&mut b, &PROMPT, 12),
        "compressed, decoded at load",
    );
    same_run(
        &ra,
        &greedy_run(&mut c, &PROMPT, 12),
        "compressed, on the fly",
    );
    // Not a degenerate model: the logits vary and the greedy tokens are not all one.
    assert!(ra.1.iter().any(|&t| t != ra.1[0]), "{:?}", ra.1);
    // A prompt long enough for the products split by tokens (on the fly: groups of chunks
    // decoded into scratch, the embedding gathered by chunk).
    let long: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 1000).collect();
    let la = greedy_run(&mut a, &long, 3);
    same_run(
        &la,
        &greedy_run(&mut c, &long, 3),
        "long prompt, on the fly",
    );
}

#[test]
fn on_the_fly_needs_a_compressed_checkpoint() {
    let (plain, _) = tiny();
    let err = CpuBackend::load(plain, WeightMode::OnTheFly, &CpuOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("needs a compressed checkpoint"),
        "{err}"
    );
}

#[test]
fn batched_decode_equals_decoding_each_alone() {
    let (_, comp) = tiny();
    for mode in [WeightMode::Decoded, WeightMode::OnTheFly] {
        let prompts: [&[u32]; 3] = [&PROMPT[..3], &PROMPT, &PROMPT[2..7]];
        let alone: Vec<_> = prompts
            .iter()
            .map(|p| greedy_run(&mut backend(comp, mode), p, 6))
            .collect();
        let mut b = backend(comp, mode);
        let seqs: Vec<SeqId> = prompts.iter().map(|_| b.new_sequence().unwrap()).collect();
        let mut last: Vec<Vec<f32>> = seqs
            .iter()
            .zip(prompts)
            .map(|(&s, p)| b.prefill(s, p).unwrap())
            .collect();
        for step in 0..6 {
            let batch: Vec<DecodeItem> = seqs
                .iter()
                .zip(prompts)
                .zip(&last)
                .map(|((&seq, p), l)| DecodeItem {
                    seq,
                    token: argmax(l),
                    pos: p.len() + step,
                })
                .collect();
            let out = b.decode(&batch).unwrap();
            assert_eq!(out.rows(), 3);
            for (i, a) in alone.iter().enumerate() {
                same_bits(
                    &bits(out.row(i)),
                    &a.0[step + 1],
                    &format!("{mode:?}: sequence {i}, step {step}"),
                );
                last[i] = out.row(i).to_vec();
            }
        }
    }
}

/// A fused step (prompt chunks of two sequences and the decode rows of two others through the
/// model as one matrix) gives every row the bits it gets alone: each decode row those of the
/// same token decoded alone, each chunk's row those of prefilling the same tokens alone (the
/// second chunk continuing a prompt past a KV block boundary); a failed fused step changes no
/// sequence.
#[test]
fn a_fused_step_gives_every_row_its_bits_alone() {
    let (plain, _) = tiny();
    let long: Vec<u32> = (0..KV_BLOCK_TOKENS as u32 + 7)
        .map(|i| i * 37 % 1000)
        .collect();
    let split = KV_BLOCK_TOKENS - 3;
    // Alone: two decoding sequences, one prompt prefilled whole, one in two pieces.
    let mut alone = backend(plain, WeightMode::Decoded);
    let runs: Vec<_> = [&PROMPT[..3], &PROMPT[..]]
        .iter()
        .map(|p| greedy_run(&mut alone, p, 1))
        .collect();
    let s = alone.new_sequence().unwrap();
    let whole = bits(&alone.prefill(s, &PROMPT[2..8]).unwrap());
    let s = alone.new_sequence().unwrap();
    alone.prefill(s, &long[..split]).unwrap();
    let continued = bits(&alone.prefill(s, &long[split..]).unwrap());
    // Fused.
    let mut b = backend(plain, WeightMode::Decoded);
    assert!(b.fuses_steps());
    let dec: Vec<SeqId> = (0..2).map(|_| b.new_sequence().unwrap()).collect();
    let firsts = [
        argmax(&b.prefill(dec[0], &PROMPT[..3]).unwrap()),
        argmax(&b.prefill(dec[1], &PROMPT).unwrap()),
    ];
    let (p0, p1) = (b.new_sequence().unwrap(), b.new_sequence().unwrap());
    b.prefill(p1, &long[..split]).unwrap();
    let chunks = [
        ChunkItem {
            seq: p0,
            tokens: &PROMPT[2..8],
        },
        ChunkItem {
            seq: p1,
            tokens: &long[split..],
        },
    ];
    let batch = [
        DecodeItem {
            seq: dec[0],
            token: firsts[0],
            pos: 3,
        },
        DecodeItem {
            seq: dec[1],
            token: firsts[1],
            pos: PROMPT.len(),
        },
    ];
    // A bad row fails the whole step and leaves every sequence as it was.
    let bad = [
        batch[0],
        DecodeItem {
            token: 1 << 30,
            ..batch[1]
        },
    ];
    assert!(matches!(
        b.step(&chunks, &bad),
        Err(DeviceError::BadToken { .. })
    ));
    assert_eq!(b.sequence_len(p0).unwrap(), 0);
    assert_eq!(b.sequence_len(p1).unwrap(), split);
    let out = b.step(&chunks, &batch).unwrap();
    assert_eq!(out.rows(), 4);
    same_bits(&bits(out.row(0)), &whole, "chunk of a new prompt");
    same_bits(&bits(out.row(1)), &continued, "chunk continuing a prompt");
    for (i, run) in runs.iter().enumerate() {
        same_bits(&bits(out.row(2 + i)), &run.0[1], &format!("decode row {i}"));
    }
    assert_eq!(b.sequence_len(p1).unwrap(), long.len());
    assert_eq!(b.sequence_len(dec[1]).unwrap(), PROMPT.len() + 1);
}

/// Records what each [`Backend::step`] call held: (chunk lengths, decode rows).
struct StepLog {
    inner: CpuBackend,
    calls: Vec<(Vec<usize>, usize)>,
    decodes: usize,
}

impl Backend for StepLog {
    forward_backend_to_inner!();
    fn decode(
        &mut self,
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.decodes += 1;
        self.inner.decode(batch)
    }
    fn fuses_steps(&self) -> bool {
        true
    }
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.calls
            .push((chunks.iter().map(|c| c.tokens.len()).collect(), batch.len()));
        self.inner.step(chunks, batch)
    }
}

#[test]
fn a_fusing_engine_runs_chunks_and_decode_rows_in_one_call_per_step() {
    // Two streams decoding when a 40-token prompt arrives, 16 prompt tokens per step: each of
    // the three admission steps is one call holding the chunk and both decode rows, and every
    // request generates what it generates alone. A step with no prompt chunk is not a `step`
    // call: it is the plain decode step (`launch_decode`, left in flight on a device and its
    // graph replayed there), as on a backend that does not fuse.
    let long: Vec<u32> = (0..40u32).map(|i| (i * 53 + 11) % 700).collect();
    let alone = |p: &[u32], n: usize| {
        let mut e = engine(false);
        e.add(Request::greedy(p.to_vec(), n)).unwrap();
        run_all(&mut e).remove(0).1
    };
    let b = StepLog {
        inner: backend(tiny().0, WeightMode::Decoded),
        calls: Vec::new(),
        decodes: 0,
    };
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        max_prefill_tokens: 16,
        max_step_slowdown: None,
        ..EngineOptions::for_config(b.config())
    };
    let mut e = Engine::new(b, None, opts);
    let a = e.add(Request::greedy(PROMPT.to_vec(), 8)).unwrap();
    let c = e.add(Request::greedy(PROMPT[3..].to_vec(), 8)).unwrap();
    let mut got: std::collections::HashMap<RequestId, Vec<u32>> = Default::default();
    let mut take = |events: Vec<Event>| {
        for ev in events {
            if let Event::Token { id, token, .. } = ev {
                got.entry(id).or_default().push(token);
            }
        }
    };
    take(e.step().unwrap()); // both short prompts: 9 + 6 tokens in one call
    take(e.step().unwrap()); // one decode step (launch_decode, not step)
    let l = e.add(Request::greedy(long.clone(), 3)).unwrap();
    let mut steps = 2;
    while e.has_work() {
        take(e.step().unwrap());
        steps += 1;
    }
    let calls = &e.backend().calls;
    assert_eq!(calls[0], (vec![9, 6], 0));
    assert_eq!(calls[1..4], [(vec![16], 2), (vec![16], 2), (vec![8], 2)]);
    assert!(
        calls.iter().all(|(chunks, _)| !chunks.is_empty()),
        "decode-only steps are not step calls: {calls:?}"
    );
    // One backend call per engine step: the decode-only steps' (launch_decode's default, a
    // `decode`) and the fused ones', never both in one step.
    assert_eq!(
        e.backend().decodes + calls.len(),
        steps,
        "one call per step"
    );
    assert_eq!(got[&a], alone(&PROMPT, 8));
    assert_eq!(got[&c], alone(&PROMPT[3..], 8));
    assert_eq!(got[&l], alone(&long, 3));
}

#[test]
fn kv_cache_reuse_matches_a_whole_prompt() {
    let (plain, _) = tiny();
    let mut b = backend(plain, WeightMode::Decoded);
    let whole = {
        let s = b.new_sequence().unwrap();
        let l = b.prefill(s, &PROMPT).unwrap();
        b.free_sequence(s);
        bits(&l)
    };
    // In two prefills (the cache from the first is reused by the second).
    let s = b.new_sequence().unwrap();
    b.prefill(s, &PROMPT[..4]).unwrap();
    assert_eq!(b.sequence_len(s).unwrap(), 4);
    same_bits(
        &bits(&b.prefill(s, &PROMPT[4..]).unwrap()),
        &whole,
        "two prefills",
    );
    b.free_sequence(s);
    // One token at a time through decode steps; the freed blocks are reused with a clean
    // cache, under a new handle (the old one is dead).
    let s2 = b.new_sequence().unwrap();
    assert_ne!(s2, s, "a new handle");
    assert!(b.sequence_len(s).is_err(), "the freed handle is dead");
    let mut l = b.prefill(s2, &PROMPT[..1]).unwrap();
    for (pos, &t) in PROMPT.iter().enumerate().skip(1) {
        l = b
            .decode(&[DecodeItem {
                seq: s2,
                token: t,
                pos,
            }])
            .unwrap()
            .data;
    }
    same_bits(&bits(&l), &whole, "token by token");
    assert_eq!(b.sequence_len(s2).unwrap(), PROMPT.len());
}

#[test]
fn backend_rejects_bad_steps_without_changing_state() {
    let (plain, _) = tiny();
    let opts = CpuOptions {
        max_sequences: 2,
        max_context: Some(12),
        ..CpuOptions::default()
    };
    let mut b = CpuBackend::load(plain, WeightMode::Decoded, &opts).unwrap();
    let s = b.new_sequence().unwrap();
    b.prefill(s, &PROMPT[..3]).unwrap();
    let err = b
        .decode(&[DecodeItem {
            seq: s,
            token: 5,
            pos: 7,
        }])
        .unwrap_err();
    assert!(
        matches!(err, DeviceError::BadPosition { len: 3, pos: 7, .. }),
        "{err}"
    );
    assert!(matches!(
        b.decode(&[DecodeItem {
            seq: s,
            token: 5000,
            pos: 3
        }]),
        Err(DeviceError::BadToken { .. })
    ));
    assert!(matches!(
        b.prefill(SeqId(9), &[1]),
        Err(DeviceError::UnknownSequence(_))
    ));
    assert!(matches!(
        b.prefill(s, &[1; 10]),
        Err(DeviceError::ContextFull {
            want: 13,
            max: 12,
            ..
        })
    ));
    let twice = [
        DecodeItem {
            seq: s,
            token: 1,
            pos: 3,
        },
        DecodeItem {
            seq: s,
            token: 1,
            pos: 3,
        },
    ];
    assert!(b.decode(&twice).unwrap_err().to_string().contains("twice"));
    assert_eq!(
        b.sequence_len(s).unwrap(),
        3,
        "failed steps leave the sequence as it was"
    );
    b.new_sequence().unwrap();
    assert!(matches!(b.new_sequence(), Err(DeviceError::NoFreeSlot(2))));
}

/// A CPU backend over the tiny model whose KV cache holds `blocks` blocks.
fn paged_backend(blocks: u64, max_sequences: usize) -> CpuBackend {
    let cfg = LlamaConfig::from_dir(tiny().0).unwrap();
    let block = CpuBackend::kv_bytes_per_token(&cfg) * KV_BLOCK_TOKENS as u64;
    let opts = CpuOptions {
        max_sequences,
        // A little over `blocks` blocks: the count is rounded down.
        kv_cache_bytes: Some(blocks * block + block / 2),
        ..CpuOptions::default()
    };
    CpuBackend::load(tiny().0, WeightMode::Decoded, &opts).unwrap()
}

#[test]
fn the_kv_cache_costs_bf16_per_token_as_the_planner_counts() {
    // Keys and values are BF16: 2 (K and V) x layers x kv_heads x head_dim x 2 bytes a token,
    // the planner's figure (and the CUDA engine's); a budget of that many bytes buys exactly
    // its blocks (an f32 cache would get half of them).
    let cfg = LlamaConfig::from_dir(tiny().0).unwrap();
    let per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2) as u64;
    assert_eq!(CpuBackend::kv_bytes_per_token(&cfg), per_token);
    assert_eq!(
        Dims::of_config(&cfg).kv_bytes_per_token(),
        per_token,
        "the planner"
    );
    let opts = CpuOptions {
        max_sequences: 2,
        kv_cache_bytes: Some(6 * KV_BLOCK_TOKENS as u64 * per_token),
        ..CpuOptions::default()
    };
    let b = CpuBackend::load(tiny().0, WeightMode::Decoded, &opts).unwrap();
    assert_eq!(b.kv_usage().total_blocks, 6);
}

#[test]
fn kv_blocks_follow_the_tokens_held_and_a_full_cache_changes_nothing() {
    let bt = KV_BLOCK_TOKENS;
    let mut b = paged_backend(3, 4);
    let u = b.kv_usage();
    assert_eq!((u.total_blocks, u.free_blocks, u.block_tokens), (3, 3, bt));
    let s = b.new_sequence().unwrap();
    let prompt: Vec<u32> = (0..bt as u32 + 1).collect();
    b.prefill(s, &prompt).unwrap();
    let u = b.kv_usage();
    assert_eq!(
        (u.used_blocks(), u.used_tokens, u.sequences),
        (2, bt + 1, 1)
    );
    // A second prompt that needs 2 blocks when 1 is free: refused, nothing taken.
    let t = b.new_sequence().unwrap();
    let err = b.prefill(t, &prompt).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::KvFull {
                need: 2,
                free: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(b.sequence_len(t).unwrap(), 0);
    assert_eq!(b.kv_usage().free_blocks, 1);
    // Decoding both: t's first token takes the last block; then s fills its second block and
    // needs a fourth: refused as a whole, t's position not taken either.
    b.prefill(t, &prompt[..1]).unwrap();
    assert_eq!(b.kv_usage().free_blocks, 0);
    for pos in bt + 1..2 * bt {
        b.decode(&[DecodeItem {
            seq: s,
            token: 3,
            pos,
        }])
        .unwrap();
    }
    let both = [
        DecodeItem {
            seq: t,
            token: 3,
            pos: 1,
        },
        DecodeItem {
            seq: s,
            token: 3,
            pos: 2 * bt,
        },
    ];
    assert!(matches!(b.decode(&both), Err(DeviceError::KvFull { .. })));
    assert_eq!(b.sequence_len(t).unwrap(), 1);
    assert_eq!(b.sequence_len(s).unwrap(), 2 * bt);
    // Freeing s returns its blocks; a freed handle is not accepted again.
    b.free_sequence(s);
    assert_eq!(b.kv_usage().free_blocks, 2);
    assert!(matches!(
        b.sequence_len(s),
        Err(DeviceError::UnknownSequence(_))
    ));
    let again = b.new_sequence().unwrap();
    assert_ne!(again, s, "a reused slot gets a new handle");
    assert!(matches!(
        b.prefill(s, &[1]),
        Err(DeviceError::UnknownSequence(_))
    ));
}

#[test]
fn paged_cache_gives_the_same_bits_as_an_unlimited_one() {
    // A prompt over several blocks, prefilled in pieces that cross block boundaries, then
    // decoded: the logits are those of the default cache, bit for bit.
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 500).collect();
    let want = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &prompt, 20);
    let mut b = paged_backend(4, 2);
    let s = b.new_sequence().unwrap();
    b.prefill(s, &prompt[..15]).unwrap();
    let l = b.prefill(s, &prompt[15..]).unwrap();
    same_bits(&bits(&l), &want.0[0], "prefill in pieces over blocks");
    b.free_sequence(s);
    let got = greedy_run(&mut b, &prompt, 20);
    same_run(&got, &want, "paged");
    assert_eq!(b.kv_usage().used_blocks(), 0, "everything freed");
}

// ---------------------------------------------------------------------------------------------
// Engine.

/// Token `i` reads `<i>`.
struct Angle;
impl Detokenizer for Angle {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        Ok(ids.iter().map(|i| format!("<{i}>")).collect())
    }
}

fn engine(detok: bool) -> Engine<CpuBackend> {
    let b = backend(tiny().0, WeightMode::Decoded);
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    Engine::new(
        b,
        detok.then(|| Arc::new(Angle) as Arc<dyn Detokenizer>),
        opts,
    )
}

/// Runs until idle; returns per request its tokens, its text and its stop reason.
fn run_all(e: &mut Engine<CpuBackend>) -> Vec<(RequestId, Vec<u32>, String, StopReason)> {
    let mut out: Vec<(RequestId, Vec<u32>, String, Option<StopReason>)> = Vec::new();
    let slot = |out: &mut Vec<(RequestId, Vec<u32>, String, Option<StopReason>)>, id: RequestId| {
        if let Some(i) = out.iter().position(|o| o.0 == id) {
            i
        } else {
            out.push((id, Vec::new(), String::new(), None));
            out.len() - 1
        }
    };
    while e.has_work() {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token {
                    id,
                    token,
                    text_delta,
                } => {
                    let i = slot(&mut out, id);
                    assert!(out[i].3.is_none(), "token after Finished");
                    out[i].1.push(token);
                    out[i].2.push_str(&text_delta);
                }
                Event::Finished {
                    id,
                    reason,
                    text_delta,
                } => {
                    let i = slot(&mut out, id);
                    assert!(out[i].3.is_none(), "two Finished events");
                    out[i].2.push_str(&text_delta);
                    out[i].3 = Some(reason);
                }
            }
        }
    }
    out.sort_by_key(|o| o.0);
    out.into_iter()
        .map(|(id, t, s, r)| (id, t, s, r.expect("every request finishes")))
        .collect()
}

#[test]
fn engine_greedy_matches_the_backend_and_stops_at_max_tokens() {
    let want = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &PROMPT, 7).1;
    let mut e = engine(true);
    e.add(Request::greedy(PROMPT.to_vec(), 8)).unwrap();
    let r = run_all(&mut e);
    assert_eq!(r[0].1.len(), 8);
    assert_eq!(r[0].1[..7], want[..]);
    assert_eq!(r[0].3, StopReason::MaxTokens);
    let text: String = r[0].1.iter().map(|t| format!("<{t}>")).collect();
    assert_eq!(r[0].2, text);
}

#[test]
fn requests_joining_between_steps_generate_what_they_would_alone() {
    let prompts = [PROMPT.to_vec(), PROMPT[..4].to_vec(), PROMPT[3..].to_vec()];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut e = engine(false);
            e.add(Request::greedy(p.clone(), 6)).unwrap();
            run_all(&mut e).remove(0).1
        })
        .collect();
    let mut e = engine(false);
    let mut got = vec![Vec::new(); 3];
    let mut ids = vec![e.add(Request::greedy(prompts[0].clone(), 6)).unwrap()];
    for step in 0..20 {
        if step == 2 || step == 3 {
            ids.push(
                e.add(Request::greedy(prompts[ids.len()].clone(), 6))
                    .unwrap(),
            );
        }
        for ev in e.step().unwrap() {
            if let Event::Token { id, token, .. } = ev {
                got[ids.iter().position(|&i| i == id).unwrap()].push(token);
            }
        }
    }
    assert_eq!(got, alone);
    assert!(!e.has_work());
    assert_eq!(e.stats().generated_tokens, 18);
}

/// The chunked-prefill scenario: a 70-token prompt, two short prompts whose streams generate
/// `stream_tokens` tokens, and what each generates alone with an unlimited budget (the short
/// ones `stream_tokens`, the long one 4).
fn chunking_case(stream_tokens: usize) -> (Vec<u32>, [Vec<u32>; 2], [Vec<u32>; 3]) {
    let long: Vec<u32> = (0..70u32).map(|i| (i * 37 + 5) % 500).collect();
    let short = [PROMPT.to_vec(), PROMPT[2..].to_vec()];
    let alone = |p: &[u32], n: usize| {
        let mut e = engine(false);
        e.add(Request::greedy(p.to_vec(), n)).unwrap();
        run_all(&mut e).remove(0).1
    };
    let want = [
        alone(&short[0], stream_tokens),
        alone(&short[1], stream_tokens),
        alone(&long, 4),
    ];
    (long, short, want)
}

/// An engine over the tiny model with a budget of 16 prompt tokens a step, prompts longer than
/// that paced by `max_step_slowdown`.
fn chunking_engine(max_step_slowdown: Option<f64>) -> Engine<CpuBackend> {
    let b = backend(tiny().0, WeightMode::Decoded);
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        max_prefill_tokens: 16,
        max_step_slowdown,
        short_prompt_tokens: 16,
        ..EngineOptions::for_config(b.config())
    };
    Engine::new(b, None, opts)
}

/// Appends each token event's token to `got[i]`, `i` being its request's index in `ids`;
/// returns how many tokens each request got in these events.
fn record_tokens(events: Vec<Event>, got: &mut [Vec<u32>], ids: &[RequestId]) -> Vec<usize> {
    let mut per = vec![0usize; got.len()];
    for ev in events {
        if let Event::Token { id, token, .. } = ev {
            let i = ids.iter().position(|&x| x == id).unwrap();
            got[i].push(token);
            per[i] += 1;
        }
    }
    per
}

#[test]
fn by_default_a_burst_of_short_prompts_starts_whole_next_to_running_streams() {
    // The default options pace long prompts (max_step_slowdown) but not short ones: while two
    // streams decode, three prompts of 9, 7 and 70 tokens (all within the default cap of 256)
    // arriving together are prefilled whole in the next step, each giving its first token
    // there, while both streams still get theirs. Every request generates what it does alone.
    let (long, short, want) = chunking_case(12);
    let b = backend(tiny().0, WeightMode::Decoded);
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    assert_eq!(
        opts.max_step_slowdown,
        Some(triton_unweight::engine::DEFAULT_STEP_SLOWDOWN)
    );
    let mut e = Engine::new(b, None, opts);
    let mut ids = vec![
        e.add(Request::greedy(short[0].clone(), 12)).unwrap(),
        e.add(Request::greedy(short[1].clone(), 12)).unwrap(),
    ];
    let mut got = vec![Vec::new(); 5];
    for _ in 0..3 {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    for p in [&short[0], &short[1], &long] {
        ids.push(e.add(Request::greedy(p.clone(), 4)).unwrap());
    }
    let before = e.stats().prefill_tokens;
    let per = record_tokens(e.step().unwrap(), &mut got, &ids);
    assert_eq!(e.stats().prefill_tokens - before, (9 + 7 + 70) as u64);
    assert_eq!(
        per, [1; 5],
        "every stream and every new request got a token"
    );
    while e.has_work() {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    let alone = |p: &[u32]| {
        let mut e = engine(false);
        e.add(Request::greedy(p.to_vec(), 4)).unwrap();
        run_all(&mut e).remove(0).1
    };
    let mut want = want.to_vec();
    want.truncate(2);
    want.extend([alone(&short[0]), alone(&short[1]), alone(&long)]);
    assert_eq!(got, want);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_running_streams_keep_decoding() {
    // Two streams are decoding when a 70-token prompt arrives; with a budget of 16 prompt tokens
    // per step it is prefilled over 5 steps, and every one of those steps still gives both
    // streams a token. Chunking must not change a single token: each request generates what it
    // generates alone with an unlimited budget, and a prompt cancelled half-way frees its blocks.
    let (long, short, want) = chunking_case(12);
    let mut e = chunking_engine(None);
    let ids = [
        e.add(Request::greedy(short[0].clone(), 12)).unwrap(),
        e.add(Request::greedy(short[1].clone(), 12)).unwrap(),
    ];
    let mut got = vec![Vec::new(); 3];
    // The short prompts (9 + 7 tokens, one step), then two steps of decoding both.
    for _ in 0..3 {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    let ids = [
        ids[0],
        ids[1],
        e.add(Request::greedy(long.clone(), 4)).unwrap(),
    ];
    let before = e.stats().prefill_tokens;
    for step in 0..5 {
        let per = record_tokens(e.step().unwrap(), &mut got, &ids);
        assert_eq!(
            per[..2],
            [1, 1],
            "step {step}: the running streams each got a token"
        );
        let prefilled = e.stats().prefill_tokens - before;
        assert_eq!(prefilled, (16 * (step as u64 + 1)).min(70), "step {step}");
        assert_eq!(
            per[2],
            usize::from(step == 4),
            "the first token after the last chunk"
        );
    }
    while e.has_work() {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    assert_eq!(got, want);

    // Cancelled while its prompt is half prefilled: it ends, and the cache ends empty.
    let id = e.add(Request::greedy(long.clone(), 4)).unwrap();
    e.step().unwrap();
    assert!(e.kv_usage().used_tokens > 0);
    assert!(e.cancel(id));
    let events = e.step().unwrap();
    assert!(events.iter().any(|ev| matches!(ev,
        Event::Finished { id: i, reason: StopReason::Cancelled, .. } if *i == id)));
    assert!(!e.has_work());
    assert_eq!(e.kv_usage().used_tokens, 0);
}

#[test]
fn paced_prefill_keeps_every_stream_decoding_and_runs_at_the_cap_when_alone() {
    // Pacing (max_step_slowdown, on by default, here for prompts over the cap of 16): chunk
    // sizes follow measured step times, so this checks what holds whatever they are. A prompt alone prefills at the token cap; while two
    // streams decode, every step still gives both a token, each step's chunk stays within the
    // cap, the prompt keeps progressing, and the tokens are those of an unchunked run.
    // Long enough that the streams outlive the prompt's prefill even at one token a step.
    let (long, short, want) = chunking_case(80);
    let mut e = chunking_engine(Some(triton_unweight::engine::DEFAULT_STEP_SLOWDOWN));

    // Alone: the cap, every step.
    let solo = e.add(Request::greedy(long.clone(), 1)).unwrap();
    for step in 0..4 {
        e.step().unwrap();
        assert_eq!(e.stats().prefill_tokens, 16 * (step + 1), "step {step}");
    }
    assert!(e.cancel(solo));
    e.step().unwrap();
    assert!(!e.has_work());

    let mut ids = vec![
        e.add(Request::greedy(short[0].clone(), 80)).unwrap(),
        e.add(Request::greedy(short[1].clone(), 80)).unwrap(),
    ];
    let mut got = vec![Vec::new(); 3];
    // Their prompts, then decode-only steps (the pacer's reference).
    for _ in 0..4 {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    ids.push(e.add(Request::greedy(long.clone(), 4)).unwrap());
    let mut steps = 0;
    while got[2].is_empty() {
        let before = e.stats().prefill_tokens;
        let per = record_tokens(e.step().unwrap(), &mut got, &ids);
        let chunk = e.stats().prefill_tokens - before;
        assert_eq!(per[..2], [1, 1], "step {steps}: both streams got a token");
        assert!(chunk <= 16, "step {steps}: {chunk} tokens over the cap");
        steps += 1;
        // At least a token a step, but for the steps kept for the pacer's reference (one in 65).
        assert!(steps <= 72, "the prompt stalled");
    }
    while e.has_work() {
        record_tokens(e.step().unwrap(), &mut got, &ids);
    }
    assert_eq!(got, want);
}

/// An engine over [`paged_backend`].
fn paged_engine(blocks: u64, max_sequences: usize) -> Engine<CpuBackend> {
    let b = paged_backend(blocks, max_sequences);
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    Engine::new(b, Some(Arc::new(Angle) as Arc<dyn Detokenizer>), opts)
}

#[test]
fn a_tiny_cache_serves_every_request_by_preempting_and_recomputing() {
    // Six requests of 20-token prompts and 30 tokens each (49 tokens cached at most, 4 blocks)
    // through a cache of 8 blocks: at most two fit at once, and as they grow the newest is
    // preempted and recomputed later. Every request must still finish with exactly the tokens
    // and text it generates alone, and the cache must end empty.
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|r| (0..20u32).map(|i| (r * 101 + i * 13 + 1) % 500).collect())
        .collect();
    let alone: Vec<(Vec<u32>, String)> = prompts
        .iter()
        .map(|p| {
            let mut e = engine(true);
            e.add(Request::greedy(p.clone(), 30)).unwrap();
            let r = run_all(&mut e).remove(0);
            (r.1, r.2)
        })
        .collect();
    let mut e = paged_engine(8, 16);
    for p in &prompts {
        e.add(Request::greedy(p.clone(), 30)).unwrap();
    }
    let mut most = 0;
    let mut out = Vec::new();
    while e.has_work() {
        out.extend(e.step().unwrap());
        most = most.max(e.load().1);
        let u = e.kv_usage();
        assert!(u.used_blocks() <= 8);
    }
    let mut got = vec![(Vec::new(), String::new(), None); 6];
    for ev in out {
        match ev {
            Event::Token {
                id,
                token,
                text_delta,
            } => {
                got[id.0 as usize].0.push(token);
                got[id.0 as usize].1.push_str(&text_delta);
            }
            Event::Finished {
                id,
                reason,
                text_delta,
            } => {
                got[id.0 as usize].1.push_str(&text_delta);
                assert!(got[id.0 as usize].2.replace(reason).is_none());
            }
        }
    }
    for (i, (tokens, text, reason)) in got.into_iter().enumerate() {
        assert_eq!(reason, Some(StopReason::MaxTokens), "request {i}");
        assert_eq!((tokens, text), alone[i], "request {i}");
    }
    assert!(e.stats().preemptions > 0, "the cache was meant to fill");
    assert!(most >= 2, "two requests ran together");
    let u = e.kv_usage();
    assert_eq!((u.used_blocks(), u.used_tokens, u.sequences), (0, 0, 0));
}

#[test]
fn a_request_larger_than_the_whole_cache_is_refused() {
    let mut e = paged_engine(2, 4);
    // 20 + 13 - 1 = 32 tokens = 2 blocks: accepted; one more token is not.
    e.add(Request::greedy(PROMPT.repeat(3)[..20].to_vec(), 13))
        .unwrap();
    let err = e
        .add(Request::greedy(PROMPT.repeat(3)[..20].to_vec(), 14))
        .unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
    assert!(err.to_string().contains("max_tokens 14"), "{err}");
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let run = |seed| {
        let mut e = engine(false);
        let sampling = SamplingParams {
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            seed,
            ..SamplingParams::default()
        };
        e.add(Request {
            sampling,
            ..Request::greedy(PROMPT.to_vec(), 24)
        })
        .unwrap();
        run_all(&mut e).remove(0).1
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

/// Top-p sampling hot enough that the tiny model's tokens vary (its logits are spread wide).
fn nucleus(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 3.0,
        top_p: 0.98,
        seed,
        ..SamplingParams::default()
    }
}

/// A sampled request's tokens are those it generates alone whatever else is in the batch
/// (other sampled and greedy requests joining at other steps): each draw is keyed by its seed
/// and position only.
#[test]
fn sampled_tokens_do_not_depend_on_the_batch() {
    let prompts = [PROMPT.to_vec(), PROMPT[..4].to_vec(), PROMPT[3..].to_vec()];
    let request = |i: usize| Request {
        sampling: if i == 1 {
            SamplingParams::default()
        } else {
            nucleus(40 + i as u64)
        },
        ..Request::greedy(prompts[i].clone(), 10)
    };
    let alone = tokens_alone(3, request);
    let mut e = engine(false);
    let mut got = vec![Vec::new(); 3];
    let mut ids = vec![e.add(request(0)).unwrap()];
    for step in 0..30 {
        if step == 2 || step == 5 {
            ids.push(e.add(request(ids.len())).unwrap());
        }
        for ev in e.step().unwrap() {
            if let Event::Token { id, token, .. } = ev {
                got[ids.iter().position(|&i| i == id).unwrap()].push(token);
            }
        }
    }
    assert_eq!(got, alone);
    // The same prompt under another seed goes elsewhere (the draws are not all the argmax).
    let mut e = engine(false);
    e.add(Request {
        sampling: nucleus(7),
        ..request(0)
    })
    .unwrap();
    assert_ne!(run_all(&mut e).remove(0).1, alone[0]);
}

/// The tokens each of requests `0..n` generates alone, on a fresh engine each.
fn tokens_alone(n: usize, request: impl Fn(usize) -> Request) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let mut e = engine(false);
            e.add(request(i)).unwrap();
            run_all(&mut e).remove(0).1
        })
        .collect()
}

/// Sampled requests preempted and recomputed (a cache of 8 blocks for six of them) finish with
/// exactly the tokens they generate alone.
#[test]
fn preempted_sampled_requests_draw_the_same_tokens() {
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|r| (0..20u32).map(|i| (r * 101 + i * 13 + 1) % 500).collect())
        .collect();
    let request = |r: usize| Request {
        sampling: nucleus(r as u64),
        ..Request::greedy(prompts[r].clone(), 30)
    };
    let alone = tokens_alone(6, request);
    let mut e = paged_engine(8, 16);
    for r in 0..6 {
        e.add(request(r)).unwrap();
    }
    let got: Vec<Vec<u32>> = run_all(&mut e).into_iter().map(|r| r.1).collect();
    assert!(e.stats().preemptions > 0, "the cache was meant to fill");
    assert_eq!(got, alone);
}

/// A request's stop tokens end it like an end-of-sequence token (not emitted), also with
/// `ignore_eos`; `min_tokens` masks them until reached; ids outside the vocabulary are refused.
#[test]
fn stop_tokens_end_the_sequence_and_min_tokens_masks_them() {
    let greedy = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &PROMPT, 8).1;
    let stop = greedy[3];
    let first = greedy.iter().position(|&t| t == stop).unwrap();
    let never = (0..).find(|t| !greedy.contains(t)).unwrap();
    let mut e = engine(true);
    e.add(Request {
        stop_token_ids: vec![never, stop],
        ignore_eos: true,
        ..Request::greedy(PROMPT.to_vec(), 50)
    })
    .unwrap();
    e.add(Request {
        stop_token_ids: vec![stop],
        min_tokens: first + 2,
        ..Request::greedy(PROMPT.to_vec(), 8)
    })
    .unwrap();
    let r = run_all(&mut e);
    assert_eq!(
        (r[0].1.clone(), r[0].3),
        (greedy[..first].to_vec(), StopReason::StopToken)
    );
    assert!(!r[0].2.contains(&format!("<{stop}>")));
    let out = &r[1].1;
    assert_eq!(out[..first], greedy[..first]);
    assert!(!out[..first + 2].contains(&stop), "{out:?}");
    let vocab = backend(tiny().0, WeightMode::Decoded).config().vocab_size as u32;
    let err = e
        .add(Request {
            stop_token_ids: vec![vocab],
            ..Request::greedy(PROMPT.to_vec(), 4)
        })
        .unwrap_err();
    assert!(err.to_string().contains("stop token"), "{err}");
}

/// The greedy continuation of PROMPT, its token 3 made the end-of-sequence token, the position
/// where that token first appears, and an engine that knows it as EOS.
fn engine_with_greedy_eos() -> (Vec<u32>, u32, usize, Engine<CpuBackend>) {
    let greedy = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &PROMPT, 6).1;
    let eos = greedy[3];
    let first = greedy.iter().position(|&t| t == eos).unwrap();
    let b = backend(tiny().0, WeightMode::Decoded);
    let opts = EngineOptions {
        eos_token_ids: vec![eos],
        ..EngineOptions::for_config(b.config())
    };
    let e = Engine::new(b, Some(Arc::new(Angle) as Arc<dyn Detokenizer>), opts);
    (greedy, eos, first, e)
}

#[test]
fn eos_stops_and_is_not_emitted() {
    let (greedy, eos, first, mut e) = engine_with_greedy_eos();
    e.add(Request::greedy(PROMPT.to_vec(), 50)).unwrap();
    let mut ignoring = Request::greedy(PROMPT.to_vec(), 6);
    ignoring.ignore_eos = true;
    e.add(ignoring).unwrap();
    let r = run_all(&mut e);
    assert_eq!(
        (r[0].1.clone(), r[0].3),
        (greedy[..first].to_vec(), StopReason::Eos)
    );
    assert!(!r[0].2.contains(&format!("<{eos}>")));
    assert_eq!(
        (r[1].1.clone(), r[1].3),
        (greedy[..6].to_vec(), StopReason::MaxTokens)
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let greedy = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &PROMPT, 6).1;
    let mut e = engine(true);
    // The stop string spans the end of token 2's text and the start of token 3's.
    let t2 = format!("<{}>", greedy[2]);
    let stop = format!("{}<{}", &t2[t2.len() - 2..], greedy[3]);
    let req = Request {
        stop: vec![stop.clone(), "never".into()],
        ..Request::greedy(PROMPT.to_vec(), 50)
    };
    e.add(req).unwrap();
    let r = run_all(&mut e);
    assert_eq!(r[0].3, StopReason::StopString);
    assert_eq!(r[0].1, greedy[..4].to_vec());
    let full: String = greedy[..4].iter().map(|t| format!("<{t}>")).collect();
    assert_eq!(r[0].2, full[..full.find(&stop).unwrap()]);
}

#[test]
fn cancellation_of_waiting_and_running_requests() {
    let mut e = engine(false);
    let a = e.add(Request::greedy(PROMPT.to_vec(), 50)).unwrap();
    let first = e.step().unwrap();
    assert!(matches!(first[..], [Event::Token { id, .. }] if id == a));
    let b = e.add(Request::greedy(PROMPT.to_vec(), 50)).unwrap();
    assert!(e.cancel(b), "waiting request");
    assert!(e.cancel(a), "running request");
    assert!(!e.cancel(a), "already cancelling");
    assert!(!e.cancel(RequestId(99)));
    let mut ev = e.step().unwrap();
    ev.sort_by_key(|e| match e {
        Event::Finished { id, .. } | Event::Token { id, .. } => *id,
    });
    assert_eq!(
        ev,
        vec![
            Event::Finished {
                id: a,
                reason: StopReason::Cancelled,
                text_delta: String::new()
            },
            Event::Finished {
                id: b,
                reason: StopReason::Cancelled,
                text_delta: String::new()
            },
        ]
    );
    assert!(!e.has_work());
    assert_eq!(e.backend().kv_capacity().max_sequences, 8);
}

#[test]
fn context_full_stops_a_sequence() {
    let b = CpuBackend::load(
        tiny().0,
        WeightMode::Decoded,
        &CpuOptions {
            max_context: Some(12),
            ..CpuOptions::default()
        },
    )
    .unwrap();
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    let mut e = Engine::new(b, None, opts);
    e.add(Request::greedy(PROMPT.to_vec(), 50)).unwrap();
    let r = run_all(&mut e);
    // 9 prompt tokens + 3 fed back fill 12 positions; the 4th token needs no position.
    assert_eq!((r[0].1.len(), r[0].3), (4, StopReason::ContextFull));
    assert!(e
        .add(Request::greedy(vec![1; 12], 5))
        .unwrap_err()
        .to_string()
        .contains("no room"));
}

#[test]
fn invalid_requests_are_refused_with_reasons() {
    fn e_add_err(e: &mut Engine<CpuBackend>, r: Request) -> String {
        e.add(r).unwrap_err().to_string()
    }
    let mut e2 = engine(false);
    assert!(e_add_err(&mut e2, Request::greedy(vec![], 4)).contains("prompt is empty"));
    assert!(e_add_err(&mut e2, Request::greedy(vec![5000], 4)).contains("outside the vocabulary"));
    assert!(e_add_err(&mut e2, Request::greedy(vec![1], 0)).contains("max_tokens"));
    let hot = SamplingParams {
        temperature: -0.5,
        ..SamplingParams::default()
    };
    assert!(e_add_err(
        &mut e2,
        Request {
            sampling: hot,
            ..Request::greedy(vec![1], 4)
        }
    )
    .contains("temperature"));
    let stop = Request {
        stop: vec!["x".into()],
        ..Request::greedy(vec![1], 4)
    };
    assert!(e_add_err(&mut e2, stop).contains("tokenizer"));
}

// ---------------------------------------------------------------------------------------------
// Config and weights against the checkpoint.

/// A copy of the tiny checkpoint with its config.json edited.
fn with_config(edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(tiny().0.join(f), dir.join(f)).unwrap();
    }
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    CpuBackend::load(dir, WeightMode::Decoded, &CpuOptions::default())
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn config_errors_name_the_field() {
    let (_t, d) = with_config(|v| v["attention_bias"] = true.into());
    assert!(load_err(&d).contains("`attention_bias` = true is not supported"));
    let (_t, d) = with_config(|v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})
    });
    assert!(load_err(&d).contains("`rope_scaling.rope_type` = \"dynamic\""));
    let (_t, d) = with_config(|v| v["hidden_act"] = "relu".into());
    assert!(load_err(&d).contains("`hidden_act`"));
}

#[test]
fn weight_shape_mismatch_names_tensor_and_shapes() {
    let (_t, d) = with_config(|v| v["intermediate_size"] = 700.into());
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[688, 256]")
            && e.contains("[700, 256]"),
        "{e}"
    );
    let (_t, d) = with_config(|v| v["tie_word_embeddings"] = true.into());
    // Tied: lm_head is simply unused; the model still loads.
    assert!(CpuBackend::load(&d, WeightMode::Decoded, &CpuOptions::default()).is_ok());
    let (_t, d) = with_config(|v| v["num_hidden_layers"] = 3.into());
    assert!(load_err(&d).contains("`model.layers.2.input_layernorm.weight` is missing"));
    let cfg = LlamaConfig::from_dir(tiny().0).unwrap();
    let ck = Checkpoint::open(tiny().1).unwrap();
    let w = LlamaWeights::load(&ck, &cfg, WeightMode::OnTheFly).unwrap();
    assert_eq!(w.layers.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// The CLI.

fn unweight(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn generate_rejects_invalid_sampling_parameters() {
    let dir = tiny().0.to_str().unwrap();
    for (flag, value, msg) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "1.5", "top_p"),
    ] {
        let (code, _, err) = unweight(&["generate", "--model", dir, "--prompt", "hi", flag, value]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.starts_with("unweight: error:") && err.contains(msg),
            "{err}"
        );
    }
    let (code, _, err) = unweight(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "hi",
        "--max-tokens",
        "0",
    ]);
    assert!(code == 2 && err.contains("--max-tokens"), "{err}");
    let (code, _, err) = unweight(&["generate", "--model", dir, "--prompt", "hi"]);
    assert!(code == 2 && err.contains("no tokenizer.json"), "{err}");
}

#[test]
fn bench_decode_compares_the_three_weight_forms() {
    let (plain, comp) = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("decode.json");
    let (code, stdout, err) = unweight(&[
        "bench",
        "decode",
        "--model",
        plain.to_str().unwrap(),
        "--compressed",
        comp.to_str().unwrap(),
        "--batch",
        "1,3",
        "--tokens",
        "3",
        "--sampling",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    assert!(
        stdout.contains("all configurations generated identical tokens"),
        "{stdout}"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows
        .iter()
        .all(|r| r["tokens_per_s"].as_f64().unwrap() > 0.0));
    // --sampling: greedy and sampled side by side per batch size, then the sampler alone.
    let sampling = doc["sampling"].as_array().unwrap();
    assert_eq!(sampling.len(), 3, "{sampling:?}");
    for (r, batch) in sampling.iter().zip([1, 3]) {
        assert_eq!(r["batch"], batch);
        for k in [
            "greedy_tokens_per_s",
            "sampled_tokens_per_s",
            "host_ms_per_step_sampled",
        ] {
            assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
    }
    assert!(sampling[2]["sampler_us_per_row"].as_f64().unwrap() > 0.0);
}

// ---------------------------------------------------------------------------------------------
// The real model (SmolLM2-135M-Instruct from `unweight fetch-test-model`), when present.

fn smollm2() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/smollm2");
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        return Some(dir);
    }
    if std::env::var_os("UNWEIGHT_REQUIRE_TEST_MODEL").is_some_and(|v| v == "1") {
        panic!(
            "the test model is required (UNWEIGHT_REQUIRE_TEST_MODEL=1) but {} is missing",
            dir.display()
        );
    }
    println!("*** skipped: test model not fetched (run `unweight fetch-test-model`) ***");
    None
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(dir) = smollm2() else { return };
    let (code, out, err) = unweight(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "40",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    // ChatML with the template's default system message, as rendered by minijinja.
    let prompt: Vec<u64> = v["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(prompt[0], 1, "starts with <|im_start|>");
    assert_eq!(
        prompt.iter().filter(|&&t| t == 2).count(),
        2,
        "two <|im_end|>: system and user turns"
    );
    assert_eq!(v["finish_reason"], "eos");
}

#[test]
fn smollm2_compressed_on_the_fly_generates_the_same_tokens() {
    let Some(dir) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let comp = tmp.path().join("c");
    container::compress_dir(
        &dir,
        &comp,
        &CompressOptions {
            progress: false,
            ..CompressOptions::default()
        },
    )
    .unwrap();
    let run = |d: &Path, weights: &str| {
        let (code, out, err) = unweight(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "The three primary colors are",
            "--max-tokens",
            "12",
            "--json",
            "--weights",
            weights,
        ]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        (v["output_tokens"].clone(), v["text"].clone())
    };
    let a = run(&dir, "decoded");
    assert_eq!(a, run(&comp, "on-the-fly"));
    assert_eq!(a, run(&comp, "decoded"));
}

#[test]
fn min_tokens_masks_eos_until_reached() {
    let (greedy, eos, first, mut e) = engine_with_greedy_eos();
    let min = first + 3;
    e.add(Request {
        min_tokens: min,
        ..Request::greedy(PROMPT.to_vec(), 12)
    })
    .unwrap();
    let r = run_all(&mut e);
    let out = &r[0].1;
    assert!(out.len() >= min, "{} tokens, min_tokens {min}", out.len());
    assert!(!out.contains(&eos), "an end-of-sequence token was emitted");
    // Up to the first masked position the output is the plain greedy one.
    assert_eq!(out[..first], greedy[..first]);
    let err = e
        .add(Request {
            min_tokens: 5,
            ..Request::greedy(vec![1], 4)
        })
        .unwrap_err();
    assert!(err.to_string().contains("min_tokens"), "{err}");
}

/// A CPU backend whose `n`-th decode call fails.
struct FailingDecode {
    inner: CpuBackend,
    fail_at: usize,
    decodes: usize,
}

impl Backend for FailingDecode {
    forward_backend_to_inner!();
    fn decode(
        &mut self,
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.decodes += 1;
        if self.decodes == self.fail_at {
            return Err(DeviceError::Invalid("injected failure".into()));
        }
        self.inner.decode(batch)
    }
}

#[test]
fn a_failed_step_names_its_requests_and_loses_no_events() {
    let alone = greedy_run(&mut backend(tiny().0, WeightMode::Decoded), &PROMPT, 8).1;
    let b = FailingDecode {
        inner: backend(tiny().0, WeightMode::Decoded),
        fail_at: 1,
        decodes: 0,
    };
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    let mut e = Engine::new(b, None, opts);
    let a = e.add(Request::greedy(PROMPT.to_vec(), 8)).unwrap();
    let first = e.step().unwrap();
    assert!(matches!(first[..], [Event::Token { id, .. }] if id == a));
    // Step 2 prefills B (a token event), then the decode of A fails.
    let b_id = e.add(Request::greedy(PROMPT.to_vec(), 8)).unwrap();
    let err = e.step().unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(e.take_failed(), vec![a]);
    assert!(e.take_failed().is_empty());
    // B goes on from where it was, its first token included.
    let mut b_tokens = Vec::new();
    let mut finished = false;
    while e.has_work() {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { id, token, .. } => {
                    assert_eq!(id, b_id);
                    b_tokens.push(token);
                }
                Event::Finished { id, .. } => {
                    assert_eq!(id, b_id);
                    finished = true;
                }
            }
        }
    }
    assert!(finished);
    assert_eq!(b_tokens, alone);
}

/// A CPU backend that records how the engine fetched each decode step: the batch sizes of
/// `decode_argmax` (greedy ids) and of `decode` (logits) calls. With `short`, `decode_argmax`
/// returns no ids (a broken backend).
struct Paths {
    inner: CpuBackend,
    short: bool,
    ids: Vec<usize>,
    logits: Vec<usize>,
}

impl Backend for Paths {
    forward_backend_to_inner!();
    fn decode(
        &mut self,
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.logits.push(batch.len());
        self.inner.decode(batch)
    }
    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        self.ids.push(batch.len());
        let ids = self.inner.decode_argmax(batch)?;
        Ok(if self.short { Vec::new() } else { ids })
    }
}

fn paths_engine(short: bool) -> Engine<Paths> {
    let b = Paths {
        inner: backend(tiny().0, WeightMode::Decoded),
        short,
        ids: Vec::new(),
        logits: Vec::new(),
    };
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    Engine::new(b, None, opts)
}

fn all_events<B: Backend>(e: &mut Engine<B>) -> Vec<Vec<Event>> {
    let mut out = Vec::new();
    while e.has_work() {
        out.push(e.step().unwrap());
    }
    out
}

/// A decode step fetches only greedy ids when every row is plain greedy (no sampling, no
/// `min_tokens` masking), the logits otherwise; the events are those of the plain engine.
#[test]
fn greedy_steps_fetch_ids_and_other_steps_fetch_logits() {
    let requests = || {
        vec![
            Request::greedy(PROMPT.to_vec(), 6),
            Request {
                min_tokens: 3,
                ..Request::greedy(PROMPT[2..].to_vec(), 8)
            },
            Request {
                sampling: SamplingParams {
                    temperature: 0.9,
                    top_k: 20,
                    top_p: 0.9,
                    seed: 5,
                    ..SamplingParams::default()
                },
                ..Request::greedy(PROMPT[..5].to_vec(), 3)
            },
        ]
    };
    let mut plain = engine(false);
    let mut e = paths_engine(false);
    for r in requests() {
        plain.add(r.clone()).unwrap();
        e.add(r).unwrap();
    }
    assert_eq!(all_events(&mut e), all_events(&mut plain));
    // Step 1 prefills all three; steps 2 and 3 decode all three on logits (a sampled request,
    // and min_tokens masking EOS); then the sampled request is done and the masking over, so
    // steps 4-6 (two rows) and 7-8 (one) fetch ids.
    assert_eq!(e.backend().logits, vec![3, 3]);
    assert_eq!(e.backend().ids, vec![2, 2, 2, 1, 1]);

    // A backend that returns the wrong number of ids fails the step, naming the requests.
    let mut e = paths_engine(true);
    let id = e.add(Request::greedy(PROMPT.to_vec(), 4)).unwrap();
    e.step().unwrap();
    let err = e.step().unwrap_err();
    assert!(err.to_string().contains("returned 0 ids"), "{err}");
    assert_eq!(e.take_failed(), vec![id]);
}

/// A CPU backend that chooses tokens "on the device" (`samples_on_device`): its
/// `decode_sampled`, `prefill_sampled` and `step_sampled` run `decode`, `prefill` or `step` on the
/// inner backend and the reference `sampler::choose` per row, recording every row's sampling
/// record; its own `decode`, `prefill` and `step` (logits handed to the engine) are counted.
/// With `short`, `decode_sampled` returns one id too few (a broken backend); with `fused`, it
/// fuses steps (the engine calls `step_sampled`).
struct DeviceSampler {
    inner: CpuBackend,
    short: bool,
    fused: bool,
    sampled: Vec<Vec<RowSampling>>,
    /// The rows of `prefill_sampled` calls, and the chunk rows of `step_sampled` calls.
    first: Vec<RowSampling>,
    chunk_rows: Vec<Vec<Option<RowSampling>>>,
    ids: usize,
    logits: usize,
    prompt_logits: usize,
}

fn device_sampler(short: bool, fused: bool) -> DeviceSampler {
    DeviceSampler {
        inner: backend(tiny().0, WeightMode::Decoded),
        short,
        fused,
        sampled: Vec::new(),
        first: Vec::new(),
        chunk_rows: Vec::new(),
        ids: 0,
        logits: 0,
        prompt_logits: 0,
    }
}

impl Backend for DeviceSampler {
    forward_backend_to_inner!(without_prefill);
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        self.prompt_logits += 1;
        self.inner.prefill(seq, tokens)
    }
    fn decode(
        &mut self,
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.logits += 1;
        self.inner.decode(batch)
    }
    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        self.ids += 1;
        self.inner.decode_argmax(batch)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn decode_sampled(
        &mut self,
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        self.sampled.push(rows.to_vec());
        let logits = self.inner.decode(batch)?;
        let mut ids: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| sampler::choose(logits.row(i), r))
            .collect();
        if self.short {
            ids.pop();
        }
        Ok(ids)
    }
    fn prefill_sampled(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        row: &RowSampling,
    ) -> Result<u32, DeviceError> {
        self.first.push(row.clone());
        let logits = self.inner.prefill(seq, tokens)?;
        Ok(sampler::choose(&logits, row))
    }
    fn fuses_steps(&self) -> bool {
        self.fused
    }
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.logits += 1;
        self.inner.step(chunks, batch)
    }
    fn step_sampled(
        &mut self,
        chunks: &[ChunkItem<'_>],
        chunk_rows: &[Option<RowSampling>],
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        self.chunk_rows.push(chunk_rows.to_vec());
        if !batch.is_empty() {
            self.sampled.push(rows.to_vec());
        }
        let logits = self.inner.step(chunks, batch)?;
        let wanted = chunk_rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)));
        let decode = rows.iter().enumerate().map(|(j, r)| (chunks.len() + j, r));
        Ok(wanted
            .chain(decode)
            .map(|(i, r)| sampler::choose(logits.row(i), r))
            .collect())
    }
}

/// On a backend that samples where the logits are, every decode step that needs more than the
/// argmax goes through `decode_sampled` (no logits come back), with each row's penalties, masks,
/// parameters and position, and the events are exactly those of the host-sampling engine.
#[test]
fn device_sampling_steps_send_each_rows_sampling_and_match_host_sampling() {
    let sampled = |seed, frequency_penalty, presence_penalty| SamplingParams {
        temperature: 0.9,
        top_k: 30,
        top_p: 0.9,
        seed,
        frequency_penalty,
        presence_penalty,
    };
    let requests = || {
        vec![
            Request::greedy(PROMPT.to_vec(), 7),
            Request {
                sampling: sampled(11, 0.7, 0.3),
                ..Request::greedy(PROMPT[1..].to_vec(), 6)
            },
            Request {
                min_tokens: 3,
                stop_token_ids: vec![17, 300],
                sampling: sampled(12, 0.0, 0.0),
                ..Request::greedy(PROMPT[2..].to_vec(), 5)
            },
            Request {
                sampling: SamplingParams {
                    temperature: 1.2,
                    top_p: 0.5,
                    seed: 13,
                    ..SamplingParams::default()
                },
                ..Request::greedy(PROMPT[..4].to_vec(), 4)
            },
        ]
    };
    let mut plain = engine(false);
    let b = device_sampler(false, false);
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    };
    let mut e = Engine::new(b, None, opts);
    let mut ids = Vec::new();
    for r in requests() {
        plain.add(r.clone()).unwrap();
        ids.push(e.add(r).unwrap());
    }
    let events = all_events(&mut e);
    assert_eq!(events, all_events(&mut plain));
    let b = e.backend();
    assert_eq!(b.logits, 0, "no decode step brought logits back");
    assert_eq!(b.prompt_logits, 0, "no prompt's logits came back");
    // Every prompt's first token was chosen where its logits are, from its own record: at
    // position 0 with no penalties yet, the min_tokens request masking its stop ids.
    assert_eq!(b.first.len(), 4);
    assert!(b.first.iter().all(|r| r.position == 0));
    assert!(b.first[0].is_greedy() && b.first[0].edits.is_empty());
    assert_eq!((b.first[1].seed, b.first[1].temperature), (11, 0.9));
    assert!(b.first[1].edits.is_empty());
    assert_eq!(
        b.first[2].edits,
        vec![(17, LogitEdit::Mask), (300, LogitEdit::Mask)]
    );
    assert_eq!((b.first[3].seed, b.first[3].top_p), (13, 0.5));
    assert!(!b.sampled.is_empty());
    // The penalized request (row 1 while all four run): it generated one token before the first
    // decode step, so that step's row is at position 1 and penalizes that token by f + p.
    let first = &b.sampled[0];
    assert_eq!(first.len(), 4);
    let tokens_of = |id: RequestId| -> Vec<u32> {
        events
            .iter()
            .flatten()
            .filter_map(|ev| match ev {
                Event::Token { id: i, token, .. } if *i == id => Some(*token),
                _ => None,
            })
            .collect()
    };
    let t1 = tokens_of(ids[1]);
    assert_eq!((first[1].position, first[1].seed), (1, 11));
    assert_eq!(
        first[1].edits,
        vec![(t1[0], LogitEdit::Subtract(0.7 * 1.0 + 0.3))]
    );
    // The greedy row carries no edits; the min_tokens row masks its stop ids (in id order).
    assert!(first[0].is_greedy() && first[0].edits.is_empty());
    assert_eq!(
        first[2].edits,
        vec![(17, LogitEdit::Mask), (300, LogitEdit::Mask)]
    );
    assert_eq!((first[3].top_p, first[3].top_k), (0.5, 0));
    // Positions advance by one per step for a row that keeps running.
    let second = &b.sampled[1];
    assert_eq!(second[1].position, 2);

    // A backend that returns the wrong number of ids fails the step, naming the call.
    let b = device_sampler(true, false);
    let opts = EngineOptions::for_config(b.config());
    let mut e = Engine::new(b, None, opts);
    let id = e
        .add(Request {
            sampling: sampled(1, 0.0, 0.0),
            ..Request::greedy(PROMPT.to_vec(), 4)
        })
        .unwrap();
    e.step().unwrap();
    let err = e.step().unwrap_err();
    assert!(
        err.to_string().contains("decode_sampled returned 0 ids"),
        "{err}"
    );
    assert_eq!(e.take_failed(), vec![id]);
}

/// On a backend that fuses steps and samples where the logits are, every step (prompt chunks
/// mixed with decode rows) goes through `step_sampled`: no logits come back, a chunk gets a
/// sampling record only when it ends its prompt, and the events are exactly those of the
/// host-sampling engine, for prompts split into chunks, sampled, penalized and under
/// `min_tokens`.
#[test]
fn fused_device_sampling_chooses_prompt_tokens_on_the_device_and_matches_host_sampling() {
    let long: Vec<u32> = (0..40u32).map(|i| (i * 53 + 11) % 700).collect();
    let sampled = |seed| SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::default()
    };
    let requests = || {
        vec![
            Request {
                sampling: sampled(21),
                ..Request::greedy(PROMPT.to_vec(), 6)
            },
            Request {
                min_tokens: 4,
                stop_token_ids: vec![5],
                sampling: sampled(22),
                ..Request::greedy(long.clone(), 5)
            },
            Request::greedy(PROMPT[3..].to_vec(), 5),
        ]
    };
    let opts = |b: &dyn Backend| EngineOptions {
        eos_token_ids: Vec::new(),
        max_prefill_tokens: 16,
        max_step_slowdown: None,
        ..EngineOptions::for_config(b.config())
    };
    let host = backend(tiny().0, WeightMode::Decoded);
    let o = opts(&host);
    let mut plain = Engine::new(host, None, o);
    let b = device_sampler(false, true);
    let o = opts(&b);
    let mut e = Engine::new(b, None, o);
    for r in requests() {
        plain.add(r.clone()).unwrap();
        e.add(r).unwrap();
    }
    assert_eq!(all_events(&mut e), all_events(&mut plain));
    let b = e.backend();
    assert_eq!(
        (b.logits, b.prompt_logits),
        (0, 0),
        "no step brought logits back"
    );
    // The 40-token prompt runs in chunks of at most 16: only its last chunk carries a record,
    // at position 0, masking its stop id (min_tokens); the two short prompts' single chunks
    // carry theirs.
    let records: Vec<&RowSampling> = b.chunk_rows.iter().flatten().flatten().collect();
    let chunks: usize = b.chunk_rows.iter().map(Vec::len).sum();
    assert_eq!(records.len(), 3, "one record per prompt");
    assert!(
        chunks > records.len(),
        "the long prompt ran in several chunks"
    );
    assert!(records.iter().all(|r| r.position == 0));
    let masked: Vec<&&RowSampling> = records.iter().filter(|r| !r.edits.is_empty()).collect();
    assert_eq!(masked.len(), 1);
    assert_eq!(masked[0].edits, vec![(5, LogitEdit::Mask)]);
    assert!(
        !b.sampled.is_empty(),
        "decode rows were sampled on the device"
    );
}

/// A backend that does not sample on the device refuses `prefill_sampled` and `step_sampled`
/// (the engine never calls them then), naming the contract, and changes nothing.
#[test]
fn host_sampling_backends_refuse_the_device_choosing_calls() {
    let mut b = backend(tiny().0, WeightMode::Decoded);
    let s = b.new_sequence().unwrap();
    let row = RowSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        position: 0,
        edits: Vec::new(),
    };
    let err = b.prefill_sampled(s, &PROMPT, &row).unwrap_err();
    assert!(
        err.to_string().contains("samples_on_device is false"),
        "{err}"
    );
    let chunk = ChunkItem {
        seq: s,
        tokens: &PROMPT,
    };
    let err = b
        .step_sampled(&[chunk], &[Some(row)], &[], &[])
        .unwrap_err();
    assert!(
        err.to_string().contains("samples_on_device is false"),
        "{err}"
    );
    assert_eq!(b.sequence_len(s).unwrap(), 0);
}

/// A CPU backend whose steps are left "in flight": `launch_decode` and (with `fused`)
/// `launch_step` only record the step (and the launch in `log`), and `collect_step` runs it on
/// the inner backend, as a device would between its launch and its synchronisation. Every call
/// that runs the model or touches a sequence panics while a step is in flight (the backend
/// contract), so the engine is seen to wait for the collection before it touches one.
/// `fail_launch` / `fail_collect` make the launch or the collection of that launch (1-based,
/// decode and fused launches counted together) fail, changing nothing. With `device_sampling`
/// it claims to sample on the device: a fused step's ids are chosen at the collection by
/// `sampler::choose` from the inner step's logits.
struct Pipelined {
    inner: CpuBackend,
    held: Option<Held>,
    log: Vec<String>,
    launches: usize,
    fail_launch: Option<usize>,
    fail_collect: Option<usize>,
    fused: bool,
    device_sampling: bool,
}

/// A step `Pipelined` holds until its collection.
enum Held {
    /// A decode batch, its sampling records (`None`: argmax) and whether logits are wanted.
    Decode(Vec<DecodeItem>, Option<Vec<RowSampling>>, bool),
    /// A fused step's chunks (sequence, tokens), decode batch and sampling records (`None`:
    /// logits).
    Fused(
        Vec<(SeqId, Vec<u32>)>,
        Vec<DecodeItem>,
        Option<(Vec<Option<RowSampling>>, Vec<RowSampling>)>,
    ),
}

fn pipelined() -> Pipelined {
    Pipelined {
        inner: backend(tiny().0, WeightMode::Decoded),
        held: None,
        log: Vec::new(),
        launches: 0,
        fail_launch: None,
        fail_collect: None,
        fused: false,
        device_sampling: false,
    }
}

impl Pipelined {
    /// The backend contract: nothing but the collection runs the model or touches a sequence
    /// while a step is in flight.
    fn idle(&self, what: &str) {
        assert!(self.held.is_none(), "{what} while a step is in flight");
    }

    /// Counts a launch; the injected launch failure.
    fn launch(&mut self, what: String) -> Result<(), DeviceError> {
        self.idle("a launch");
        self.launches += 1;
        if self.fail_launch == Some(self.launches) {
            return Err(DeviceError::Invalid("injected launch failure".into()));
        }
        self.log.push(what);
        Ok(())
    }
}

impl Backend for Pipelined {
    fn config(&self) -> &triton_unweight::model::LlamaConfig {
        self.inner.config()
    }
    fn kv_capacity(&self) -> triton_unweight::device::KvCapacity {
        self.inner.kv_capacity()
    }
    fn kv_usage(&self) -> triton_unweight::device::KvUsage {
        self.inner.kv_usage()
    }
    fn weight_memory(&self) -> triton_unweight::device::WeightMemory {
        self.inner.weight_memory()
    }
    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        self.idle("new_sequence");
        self.inner.new_sequence()
    }
    fn free_sequence(&mut self, seq: SeqId) {
        self.idle("free_sequence");
        self.inner.free_sequence(seq)
    }
    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.idle("sequence_len");
        self.inner.sequence_len(seq)
    }
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        self.idle("prefill");
        self.inner.prefill(seq, tokens)
    }
    fn decode(
        &mut self,
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.idle("decode");
        self.log.push("decode".into());
        self.inner.decode(batch)
    }
    fn samples_on_device(&self) -> bool {
        self.device_sampling
    }
    fn fuses_steps(&self) -> bool {
        self.fused
    }
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<triton_unweight::device::Logits, DeviceError> {
        self.idle("step");
        self.log.push("step".into());
        self.inner.step(chunks, batch)
    }
    fn launch_decode(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        self.launch(format!("launch {} rows", batch.len()))?;
        let (rows, logits) = match choice {
            DecodeChoice::Argmax => (None, false),
            DecodeChoice::Sampled(r) => (Some(r.to_vec()), false),
            DecodeChoice::Logits => (None, true),
        };
        self.held = Some(Held::Decode(batch.to_vec(), rows, logits));
        Ok(Launched::InFlight)
    }
    fn launch_step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
        choice: StepChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        let lens: Vec<usize> = chunks.iter().map(|c| c.tokens.len()).collect();
        self.launch(format!("launch_step {lens:?} + {} rows", batch.len()))?;
        let chunks = chunks.iter().map(|c| (c.seq, c.tokens.to_vec())).collect();
        let records = match choice {
            StepChoice::Sampled { chunks, rows } => Some((chunks.to_vec(), rows.to_vec())),
            StepChoice::Logits => None,
        };
        self.held = Some(Held::Fused(chunks, batch.to_vec(), records));
        Ok(Launched::InFlight)
    }
    fn collect_step(&mut self) -> Result<DecodeOutput, DeviceError> {
        let held = self.held.take().expect("a step in flight");
        self.log.push("collect".into());
        if self.fail_collect == Some(self.launches) {
            return Err(DeviceError::Invalid("injected collect failure".into()));
        }
        match held {
            Held::Decode(batch, rows, logits) => {
                let out = self.inner.decode(&batch)?;
                Ok(match (rows, logits) {
                    (_, true) => DecodeOutput::Logits(out),
                    (Some(rows), _) => DecodeOutput::Ids(
                        rows.iter()
                            .enumerate()
                            .map(|(i, r)| sampler::choose(out.row(i), r))
                            .collect(),
                    ),
                    (None, _) => {
                        DecodeOutput::Ids((0..batch.len()).map(|i| argmax(out.row(i))).collect())
                    }
                })
            }
            Held::Fused(chunks, batch, records) => {
                let items: Vec<ChunkItem<'_>> = chunks
                    .iter()
                    .map(|(seq, tokens)| ChunkItem { seq: *seq, tokens })
                    .collect();
                let out = self.inner.step(&items, &batch)?;
                let Some((chunk_rows, rows)) = records else {
                    return Ok(DecodeOutput::Logits(out));
                };
                let chosen = chunk_rows
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.as_ref().map(|r| sampler::choose(out.row(i), r)));
                let decoded = (rows.iter().enumerate())
                    .map(|(j, r)| sampler::choose(out.row(chunks.len() + j), r));
                Ok(DecodeOutput::Ids(chosen.chain(decoded).collect()))
            }
        }
    }
}

fn pipelined_requests() -> Vec<Request> {
    vec![
        Request::greedy(PROMPT.to_vec(), 7),
        Request {
            sampling: SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 31,
                frequency_penalty: 0.4,
                ..SamplingParams::default()
            },
            ..Request::greedy(PROMPT[1..].to_vec(), 6)
        },
        Request {
            min_tokens: 3,
            stop_token_ids: vec![17],
            ..Request::greedy(PROMPT[2..].to_vec(), 5)
        },
    ]
}

fn unfused_opts(b: &dyn Backend) -> EngineOptions {
    EngineOptions {
        eos_token_ids: Vec::new(),
        ..EngineOptions::for_config(b.config())
    }
}

/// Steps split into `begin_step` / `finish_step` over a backend that leaves every decode in
/// flight, with a request added while a step is in flight, give exactly the events of
/// synchronous steps with the request added between them; every decode was launched, then
/// collected, one at a time.
#[test]
fn pipelined_steps_give_the_events_of_synchronous_steps() {
    let late = Request {
        sampling: SamplingParams {
            temperature: 1.1,
            seed: 4,
            ..SamplingParams::default()
        },
        ..Request::greedy(PROMPT[..6].to_vec(), 4)
    };
    let mut plain = engine(false);
    let b = pipelined();
    let o = unfused_opts(&b);
    let mut e = Engine::new(b, None, o);
    for r in pipelined_requests() {
        plain.add(r.clone()).unwrap();
        e.add(r).unwrap();
    }
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut step = 0;
    while plain.has_work() || e.has_work() {
        step += 1;
        want.push(plain.step().unwrap());
        e.begin_step().unwrap();
        if step == 3 {
            // Host work while the step runs: a request arrives.
            assert!(e.step_in_flight());
            e.add(late.clone()).unwrap();
            plain.add(late.clone()).unwrap();
        }
        got.push(e.finish_step().unwrap());
    }
    assert_eq!(got, want);
    let log = &e.backend().log;
    assert!(e.backend().launches > 3);
    assert!(!log.iter().any(|l| l == "decode"), "no synchronous decode");
    for pair in log.chunks(2) {
        assert!(
            pair[0].starts_with("launch") && pair[1] == "collect",
            "{log:?}"
        );
    }
}

/// A cancellation made while a step is in flight takes effect at the next step, exactly as one
/// made right after it: the step's token is still produced, the request is not in the next
/// decode batch, and its `Finished { Cancelled }` comes with the next step. A prompt admitted by
/// the step in flight can be cancelled too.
#[test]
fn a_cancellation_while_a_step_is_in_flight_takes_effect_at_the_next_step() {
    let mut plain = engine(false);
    let b = pipelined();
    let o = unfused_opts(&b);
    let mut e = Engine::new(b, None, o);
    let mut ids = Vec::new();
    for r in pipelined_requests() {
        plain.add(r.clone()).unwrap();
        ids.push(e.add(r).unwrap());
    }
    let (mut want, mut got) = (vec![plain.step().unwrap()], vec![e.step().unwrap()]);
    // Step 2 in flight: cancel request 0; a new request arrives and is admitted by step 3.
    want.push(plain.step().unwrap());
    assert!(plain.cancel(ids[0]));
    e.begin_step().unwrap();
    assert!(e.cancel(ids[0]));
    assert!(!e.cancel(ids[0]), "cancelled once");
    got.push(e.finish_step().unwrap());
    let late = Request::greedy(PROMPT[..5].to_vec(), 6);
    let late_plain = plain.add(late.clone()).unwrap();
    let late_id = e.add(late).unwrap();
    // Step 3 admits the late request (its first token) while the batch is in flight: cancel it.
    want.push(plain.step().unwrap());
    assert!(plain.cancel(late_plain));
    e.begin_step().unwrap();
    assert_eq!(
        e.load().1,
        3,
        "the admitted prompt counts as running in flight"
    );
    assert!(e.cancel(late_id));
    got.push(e.finish_step().unwrap());
    while plain.has_work() || e.has_work() {
        want.push(plain.step().unwrap());
        got.push(e.step().unwrap());
    }
    assert_eq!(got, want);
    // Step 2 still produced request 0's token; its end came with step 3.
    let token_of = |evs: &[Event], id| {
        evs.iter()
            .any(|ev| matches!(ev, Event::Token { id: i, .. } if *i == id))
    };
    assert!(token_of(&got[1], ids[0]));
    assert!(got[2].contains(&Event::Finished {
        id: ids[0],
        reason: StopReason::Cancelled,
        text_delta: String::new(),
    }));
    assert!(!token_of(&got[2], ids[0]), "not in the next step");
    // Batches: 3 rows at step 2, 2 at step 3 (request 0 gone, the late one admitted), then the
    // late one never decodes.
    let log = &e.backend().log;
    assert_eq!(log[0], "launch 3 rows");
    assert_eq!(log[2], "launch 2 rows");
    assert!(got[3].contains(&Event::Finished {
        id: late_id,
        reason: StopReason::Cancelled,
        text_delta: String::new(),
    }));
}

/// A decode whose launch fails, or whose collection fails, fails its step: the running requests
/// are dropped (listed by `take_failed`, their KV slots freed) and the engine serves the next
/// request; `begin_step` twice and `finish_step` without a step are refused.
#[test]
fn a_failed_launch_or_collection_drops_the_running_requests_and_the_engine_goes_on() {
    for at_launch in [true, false] {
        let mut b = pipelined();
        if at_launch {
            b.fail_launch = Some(2);
        } else {
            b.fail_collect = Some(2);
        }
        let o = unfused_opts(&b);
        let mut e = Engine::new(b, None, o);
        let ids: Vec<RequestId> = pipelined_requests()
            .into_iter()
            .map(|r| e.add(r).unwrap())
            .collect();
        e.step().unwrap();
        e.step().unwrap();
        let err = if at_launch {
            e.begin_step().unwrap_err()
        } else {
            e.begin_step().unwrap();
            e.finish_step().unwrap_err()
        };
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!e.step_in_flight());
        let mut failed = e.take_failed();
        failed.sort();
        assert_eq!(failed, ids);
        assert_eq!(e.kv_usage().sequences, 0, "their slots were freed");
        let next = e.add(Request::greedy(PROMPT.to_vec(), 3)).unwrap();
        let events: Vec<Event> = all_events(&mut e).into_iter().flatten().collect();
        assert!(events.contains(&Event::Finished {
            id: next,
            reason: StopReason::MaxTokens,
            text_delta: String::new(),
        }));
    }
    let b = pipelined();
    let o = unfused_opts(&b);
    let mut e = Engine::new(b, None, o);
    assert!(e
        .finish_step()
        .unwrap_err()
        .to_string()
        .contains("finish_step"));
    e.add(Request::greedy(PROMPT.to_vec(), 3)).unwrap();
    e.begin_step().unwrap();
    assert!(e
        .begin_step()
        .unwrap_err()
        .to_string()
        .contains("in flight"));
    e.finish_step().unwrap();
}

/// A `Pipelined` backend that fuses steps: every step with prompt chunks is one `launch_step`
/// left in flight (with `device_sampling`, its ids chosen at the collection).
fn fused_pipelined(device_sampling: bool) -> Pipelined {
    Pipelined {
        fused: true,
        device_sampling,
        ..pipelined()
    }
}

/// Prompts in chunks of at most `chunk` tokens a step, no pacing (so that the schedule depends
/// on nothing measured), no end-of-sequence token.
fn chunked_opts(b: &dyn Backend, chunk: usize) -> EngineOptions {
    EngineOptions {
        eos_token_ids: Vec::new(),
        max_prefill_tokens: chunk,
        max_step_slowdown: None,
        ..EngineOptions::for_config(b.config())
    }
}

/// The CPU engine with `chunked_opts`: its fused steps run synchronously (`launch_step`'s
/// default, `Launched::Done`).
fn chunked_engine(chunk: usize) -> Engine<CpuBackend> {
    let b = backend(tiny().0, WeightMode::Decoded);
    let o = chunked_opts(&b, chunk);
    Engine::new(b, None, o)
}

/// Whether a `Pipelined` log line is a fused step's launch holding decode rows.
fn fused_with_rows(line: &str) -> bool {
    line.starts_with("launch_step") && !line.ends_with("+ 0 rows")
}

/// Fused steps (prompt chunks of 4 tokens with the running streams' decode rows) left in
/// flight, split into `begin_step` / `finish_step` with a request added while one is in flight,
/// give exactly the events of the CPU engine's synchronous fused steps, whether the ids come
/// back chosen "on the device" or the logits are sampled on the host; every step was launched,
/// then collected, one at a time, and no synchronous step, prefill or decode ran.
#[test]
fn fused_steps_left_in_flight_give_the_events_of_synchronous_steps() {
    let late = Request {
        sampling: SamplingParams {
            temperature: 1.1,
            seed: 4,
            ..SamplingParams::default()
        },
        ..Request::greedy(PROMPT[..6].to_vec(), 4)
    };
    for device_sampling in [false, true] {
        let mut plain = chunked_engine(4);
        let b = fused_pipelined(device_sampling);
        let o = chunked_opts(&b, 4);
        let mut e = Engine::new(b, None, o);
        for r in pipelined_requests() {
            plain.add(r.clone()).unwrap();
            e.add(r).unwrap();
        }
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut step = 0;
        while plain.has_work() || e.has_work() {
            step += 1;
            want.push(plain.step().unwrap());
            e.begin_step().unwrap();
            assert!(e.waits_on_device(), "step {step} left in flight");
            if step == 4 {
                // Host work while a fused step runs: a request arrives.
                assert!(fused_with_rows(e.backend().log.last().unwrap()));
                e.add(late.clone()).unwrap();
                plain.add(late.clone()).unwrap();
            }
            got.push(e.finish_step().unwrap());
        }
        assert_eq!(got, want, "device_sampling {device_sampling}");
        let log = &e.backend().log;
        let fused = log.iter().filter(|l| fused_with_rows(l)).count();
        assert!(fused >= 3, "fused steps with decode rows: {log:?}");
        assert!(
            !log.iter().any(|l| ["step", "decode"].contains(&l.as_str())),
            "no synchronous call: {log:?}"
        );
        for pair in log.chunks(2) {
            assert!(
                pair[0].starts_with("launch") && pair[1] == "collect",
                "{log:?}"
            );
        }
    }
}

/// While a fused step is in flight the engine touches no sequence (the backend panics
/// otherwise) and serves host work: counters, load, a new request, and cancellations, of a
/// running request (a decode row of the step) and of a prompt whose chunk is in the step. They
/// take effect at the next step, exactly as ones made right after a synchronous step: the
/// step's tokens are still produced (the running request's token, the prompt's first token),
/// and both end `Cancelled` with the next step.
#[test]
fn a_cancellation_while_a_fused_step_is_in_flight_takes_effect_at_the_next_step() {
    let mut plain = chunked_engine(4);
    let b = fused_pipelined(true);
    let o = chunked_opts(&b, 4);
    let mut e = Engine::new(b, None, o);
    let mut ids = Vec::new();
    for r in pipelined_requests() {
        plain.add(r.clone()).unwrap();
        ids.push(e.add(r).unwrap());
    }
    let (mut want, mut got) = (Vec::new(), Vec::new());
    // Until the step that decodes request 0 and carries the last chunk of request 1's prompt
    // (9 + 8 prompt tokens, 4 a step: step 5, with the first chunk of request 2's).
    for _ in 0..4 {
        want.push(plain.step().unwrap());
        got.push(e.step().unwrap());
    }
    want.push(plain.step().unwrap());
    assert!(plain.cancel(ids[0]) && plain.cancel(ids[1]));
    e.begin_step().unwrap();
    assert_eq!(
        e.backend().log.last().unwrap(),
        "launch_step [1, 3] + 1 rows",
        "request 1's last chunk and request 2's first with request 0's decode row"
    );
    let stats = e.stats();
    assert_eq!(e.load(), (0, 3));
    assert!(e.kv_usage().sequences == 3 && e.has_work());
    assert!(e.cancel(ids[0]) && e.cancel(ids[1]));
    assert!(!e.cancel(ids[1]), "cancelled once");
    let late = Request::greedy(PROMPT[..5].to_vec(), 3);
    plain.add(late.clone()).unwrap();
    e.add(late).unwrap();
    assert_eq!(e.stats(), stats, "nothing counted before the collection");
    got.push(e.finish_step().unwrap());
    while plain.has_work() || e.has_work() {
        want.push(plain.step().unwrap());
        got.push(e.step().unwrap());
    }
    assert_eq!(got, want);
    let token_of = |evs: &[Event], id| {
        evs.iter()
            .any(|ev| matches!(ev, Event::Token { id: i, .. } if *i == id))
    };
    assert!(token_of(&got[4], ids[0]) && token_of(&got[4], ids[1]));
    for &id in &ids[..2] {
        assert!(got[5].contains(&Event::Finished {
            id,
            reason: StopReason::Cancelled,
            text_delta: String::new(),
        }));
        assert!(!token_of(&got[5], id), "not in the next step");
    }
}

/// A fused step whose launch, or whose collection, fails fails its step as a whole: the running
/// request (its decode row) and the prompt whose chunk was in the step are dropped (listed by
/// `take_failed`, their KV slots freed), and nothing of the step is applied; the prompt that was
/// not in the step keeps its place and generates exactly what it would alone.
#[test]
fn a_failed_fused_launch_or_collection_drops_the_steps_requests_and_the_engine_goes_on() {
    let long: Vec<u32> = PROMPT.iter().chain(&PROMPT[..3]).copied().collect();
    let waiting = Request::greedy(PROMPT[2..7].to_vec(), 5);
    let alone = {
        let mut plain = chunked_engine(8);
        plain.add(waiting.clone()).unwrap();
        all_events(&mut plain).concat()
    };
    for at_launch in [true, false] {
        let mut b = fused_pipelined(true);
        // Launches: 1 the first prompt whole, 2 its decode, 3 the fused step that fails.
        if at_launch {
            b.fail_launch = Some(3);
        } else {
            b.fail_collect = Some(3);
        }
        let o = chunked_opts(&b, 8);
        let mut e = Engine::new(b, None, o);
        let first = e.add(Request::greedy(PROMPT[..5].to_vec(), 6)).unwrap();
        e.step().unwrap();
        e.step().unwrap();
        let second = e.add(Request::greedy(long.clone(), 4)).unwrap();
        let third = e.add(waiting.clone()).unwrap();
        let err = if at_launch {
            e.begin_step().unwrap_err()
        } else {
            e.begin_step().unwrap();
            assert_eq!(e.backend().log.last().unwrap(), "launch_step [8] + 1 rows");
            e.finish_step().unwrap_err()
        };
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(!e.step_in_flight());
        let mut failed = e.take_failed();
        failed.sort();
        assert_eq!(failed, vec![first, second], "at_launch {at_launch}");
        assert_eq!(e.kv_usage().sequences, 0, "their slots were freed");
        assert_eq!(e.load(), (1, 0), "the third request still waits");
        let events: Vec<Event> = all_events(&mut e).concat();
        assert!(events.iter().all(|ev| matches!(ev,
            Event::Token { id, .. } | Event::Finished { id, .. } if *id == third)));
        // Its events but for the request's id.
        let tokens = |evs: &[Event]| -> Vec<(Option<u32>, Option<StopReason>)> {
            evs.iter()
                .map(|ev| match ev {
                    Event::Token { token, .. } => (Some(*token), None),
                    Event::Finished { reason, .. } => (None, Some(*reason)),
                })
                .collect()
        };
        assert_eq!(tokens(&events), tokens(&alone), "what it generates alone");
    }
}
