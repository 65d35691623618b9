//! The autotuner (`device::cuda::tune`) on the device: tables it measures are complete, sorted and
//! hold the raw baseline; a plan from a table runs the engine and equals its raw twin bit for
//! bit; the load-time path (`PlanSource::Auto`) tunes once, saves the table in the model
//! directory and finds it again, and re-tunes when the table is malformed or keyed for another
//! device. No assertion depends on a measured time.
//!
//! Every GPU test is `#[ignore]`d (tests/gpu_required/mod.rs): a plain `cargo test` reports it
//! as not run; scripts/gpu-check runs it, and there a missing GPU fails it. The CPU side (key,
//! file, candidates) is unit-tested in `src/device/cuda/tune/mod.rs`.

use std::path::Path;
use std::time::Duration;

use triton_unweight::device::cuda::driver::Context;
use triton_unweight::device::cuda::plan::{Role, Storage, Strategy, TuneTable};
use triton_unweight::device::cuda::tune::{self, TuneOptions};
use triton_unweight::device::cuda::{self, CudaBackend, CudaOptions, PlanSource};
use triton_unweight::device::{Backend, DecodeItem};
use triton_unweight::engine::sampler::argmax;
use triton_unweight::model::synth::{synth_checkpoint, SynthOptions};
use triton_unweight::model::{LlamaConfig, LlamaShape};

mod gpu_required;
use gpu_required::require_gpu;

fn tiny_cfg() -> LlamaConfig {
    let s = LlamaShape::preset("tiny").unwrap();
    LlamaConfig::from_json(s.config_json().as_object().unwrap()).unwrap()
}

/// Held by every test here that runs on the GPU: they time products, and a test capturing a
/// timing graph while another runs in the same process can lose a candidate (seen on an H200:
/// one raw chunked cuBLAS candidate of 40 left out while two tests ran at once), which the
/// completeness check below rightly fails. Timings taken side by side are not worth having anyway.
static GPU_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    GPU_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A generous cap, never reached by the tiny shapes (no assertion depends on it).
const BUDGET: Duration = Duration::from_secs(120);

fn tune_tiny(batches: &[usize]) -> TuneTable {
    let ctx = Context::new(0).unwrap();
    let samples = tune::synthetic_samples(&tiny_cfg(), 1, 0.02).unwrap();
    let opts = TuneOptions {
        batches: batches.to_vec(),
        budget: BUDGET,
        reps: 3,
        progress: false,
    };
    tune::tune(&ctx, &samples, &opts).unwrap()
}

#[test]
fn without_a_gpu_tuning_is_an_error_not_a_panic() {
    if cuda::probe().is_ok() {
        println!("(a GPU is present: nothing to check here)");
        return;
    }
    assert!(Context::new(0).is_err());
    let dir = tempfile::tempdir().unwrap();
    let r = tune::table_for_model(
        dir.path(),
        &Default::default(),
        || Ok(Vec::new()),
        0,
        &TuneOptions::default(),
    );
    assert!(r.is_err());
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn tuned_entries_are_complete_sorted_and_hold_the_baseline() {
    require_gpu();
    let _gpu = gpu_lock();
    let ctx = Context::new(0).unwrap();
    let key = tune::tune_key(&ctx).unwrap();
    let cfg = tiny_cfg();
    // The tiny roles, o_proj replaced by Llama-3.1-8B's (copies rotated past the L2, whole and
    // chunked decodes, split-K GEMVs, the tensor cores).
    let mut samples = tune::synthetic_samples(&cfg, 1, 0.02).unwrap();
    let o = samples.iter().position(|s| s.0 == Role::O).unwrap();
    samples[o] = (
        Role::O,
        4096,
        4096,
        tune::MatrixSource::Synthetic {
            seed: 9,
            sigma: 0.02,
        },
    );
    // One matrix per role: a second O is refused.
    let mut twice = tune::synthetic_samples(&cfg, 1, 0.02).unwrap();
    twice.push((
        Role::O,
        256,
        256,
        tune::MatrixSource::Synthetic {
            seed: 2,
            sigma: 0.02,
        },
    ));
    let e = tune::tune(&ctx, &twice, &TuneOptions::default()).unwrap_err();
    assert!(e.to_string().contains("two matrices for O"), "{e}");
    let batches = [1, 8, 16];
    let opts = TuneOptions {
        batches: batches.to_vec(),
        budget: BUDGET,
        reps: 3,
        // Prints the reason of any candidate left out, so a failure below says why.
        progress: true,
    };
    let t = tune::tune(&ctx, &samples, &opts).unwrap();
    assert_eq!(tune::usable(&t, &key), Ok(()));
    assert_eq!(t.entries.len(), samples.len() * batches.len(), "{t:#?}");
    let sms = cuda::probe().unwrap().multiprocessors as usize;
    let l2 = cuda::probe().unwrap().l2_bytes as usize;
    for e in &t.entries {
        assert!(!e.timings.is_empty());
        assert!(
            e.timings.windows(2).all(|w| w[0].us <= w[1].us),
            "not sorted: {e:?}"
        );
        assert!(
            e.timings.iter().all(|x| x.us.is_finite() && x.us > 0.0),
            "{e:?}"
        );
        assert!(e
            .timings
            .iter()
            .any(|x| x.storage == Storage::Raw && x.strategy == Strategy::BASELINE));
        // Every candidate ran, once.
        let shape = triton_unweight::codec::runtime::Shape::for_matrix(e.rows, e.cols).unwrap();
        let mut want = tune::measured_candidates(&shape, e.batch, sms, l2);
        let mut got: Vec<(Storage, Strategy)> =
            e.timings.iter().map(|x| (x.storage, x.strategy)).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{:?} at {}", e.role, e.batch);
        assert!(e.best(Storage::Tbe3).is_some());
    }
    // The table survives the file.
    let dir = tempfile::tempdir().unwrap();
    let path = tune::table_path(dir.path(), &key.device);
    tune::write_table(&path, &t).unwrap();
    assert_eq!(tune::read_table(&path).unwrap(), Some(t));
    // A spent budget: nothing measured, no error.
    let none = tune::tune(
        &ctx,
        &samples,
        &TuneOptions {
            budget: Duration::ZERO,
            ..opts
        },
    )
    .unwrap();
    assert!(none.entries.is_empty());
}

/// Prefill three prompts, then decode `steps` greedy steps of all three as one batch; returns
/// every logit produced, in order. Tokens come from `tokens` when given (teacher forcing).
fn run_engine(b: &mut CudaBackend, steps: usize, tokens: Option<&[u32]>) -> (Vec<f32>, Vec<u32>) {
    let vocab = b.config().vocab_size as u32;
    let prompts: [Vec<u32>; 3] = [
        vec![1, 5, 9],
        (0..11).map(|i| (i * 37 + 3) % vocab).collect(),
        (0..6).map(|i| (i * 101 + 7) % vocab).collect(),
    ];
    let mut all = Vec::new();
    let mut used = Vec::new();
    let mut seqs = Vec::new();
    let mut next = Vec::new();
    let mut pos = Vec::new();
    for p in &prompts {
        let s = b.new_sequence().unwrap();
        let l = b.prefill(s, p).unwrap();
        next.push(argmax(&l));
        all.extend(l);
        seqs.push(s);
        pos.push(p.len());
    }
    let mut k = 0;
    for _ in 0..steps {
        let batch: Vec<DecodeItem> = (0..seqs.len())
            .map(|i| {
                let token = tokens.map_or(next[i], |t| t[k + i]);
                used.push(token);
                DecodeItem {
                    seq: seqs[i],
                    token,
                    pos: pos[i],
                }
            })
            .collect();
        k += seqs.len();
        let logits = b.decode(&batch).unwrap();
        for i in 0..seqs.len() {
            let row = &logits.data[i * logits.vocab..(i + 1) * logits.vocab];
            next[i] = argmax(row);
            pos[i] += 1;
        }
        all.extend(logits.data);
    }
    (all, used)
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn a_tuned_plan_runs_the_engine_and_equals_its_raw_twin_bit_for_bit() {
    require_gpu();
    let _gpu = gpu_lock();
    let measured = tune_tiny(&[1, 2, 4, 8, 16]);
    // The same table with every raw time inflated: every role goes to tbe3 storage with its
    // fastest tbe3 strategies, so the compressed kernels certainly run.
    let mut forced = measured.clone();
    for e in &mut forced.entries {
        for t in &mut e.timings {
            if t.storage == Storage::Raw {
                t.us *= 1e6;
            }
        }
        e.timings.sort_by(|a, b| a.us.total_cmp(&b.us));
    }
    for (name, table) in [("measured", measured), ("tbe3-forced", forced)] {
        let opts = CudaOptions {
            max_sequences: 4,
            max_context: Some(64),
            plan: PlanSource::Table(table.clone()),
            ..CudaOptions::default()
        };
        let mut plan_b = CudaBackend::synthetic(tiny_cfg(), 5, 0.02, &opts).unwrap();
        assert_eq!(plan_b.plan().source, "table");
        if name == "tbe3-forced" {
            for r in Role::ALL {
                assert_eq!(plan_b.plan().storage(r), Storage::Tbe3, "{r:?}");
            }
        }
        let (a, tokens) = run_engine(&mut plan_b, 6, None);
        drop(plan_b);
        let twin_opts = CudaOptions { twin: true, ..opts };
        let mut twin_b = CudaBackend::synthetic(tiny_cfg(), 5, 0.02, &twin_opts).unwrap();
        for r in Role::ALL {
            assert_eq!(twin_b.plan().storage(r), Storage::Raw);
        }
        let (b, _) = run_engine(&mut twin_b, 6, Some(&tokens));
        assert_eq!(a.len(), b.len());
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "{name}: {differ} of {} logits differ", a.len());
        assert!(a.iter().all(|x| x.is_finite()));
    }
}

fn synth_tiny(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        seed,
        force: true,
        ..SynthOptions::default()
    };
    synth_checkpoint(
        &LlamaShape::preset("tiny").unwrap(),
        &dir.path().join("m"),
        &opts,
    )
    .unwrap();
    dir
}

fn load(dir: &Path) -> CudaBackend {
    let opts = CudaOptions {
        max_sequences: 4,
        max_context: Some(64),
        ..CudaOptions::default()
    };
    CudaBackend::load(dir, &opts).unwrap()
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn auto_tunes_once_saves_the_table_and_finds_it_again() {
    require_gpu();
    let _gpu = gpu_lock();
    let tmp = synth_tiny(3);
    let dir = tmp.path().join("m");
    let device = cuda::probe().unwrap().name;
    let path = tune::table_path(&dir, &device);
    assert!(!path.exists());
    let b = load(&dir);
    let src = b.plan().source.clone();
    assert!(
        src.starts_with("tuned at load") && src.contains("saved to"),
        "{src}"
    );
    drop(b);
    let first = tune::read_table(&path)
        .unwrap()
        .expect("the table was saved");
    assert_eq!(first.entries.len(), 5 * 9, "all of tiny fits the budget");
    // Found again, not re-tuned.
    let b = load(&dir);
    assert!(
        b.plan().source.starts_with("tuning table"),
        "{}",
        b.plan().source
    );
    drop(b);
    assert_eq!(tune::read_table(&path).unwrap(), Some(first.clone()));
    // The plan is the table's.
    let mut p = CudaBackend::load(
        &dir,
        &CudaOptions {
            max_sequences: 4,
            max_context: Some(64),
            plan: PlanSource::Table(first.clone()),
            ..CudaOptions::default()
        },
    )
    .unwrap();
    let q = load(&dir);
    assert_eq!(p.plan().roles, q.plan().roles);
    let s = p.new_sequence().unwrap();
    assert!(p
        .prefill(s, &[1, 2, 3])
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    drop((p, q));
    // A table keyed for another device is not used: tuned again, overwritten.
    let mut other = first.clone();
    other.key.device = "Some Other GPU".into();
    tune::write_table(&path, &other).unwrap();
    let b = load(&dir);
    assert!(
        b.plan().source.starts_with("tuned at load"),
        "{}",
        b.plan().source
    );
    drop(b);
    assert_eq!(tune::read_table(&path).unwrap().unwrap().key, first.key);
    // A malformed table: a warning, tuned again, overwritten.
    std::fs::write(&path, "not json").unwrap();
    let b = load(&dir);
    assert!(
        b.plan().source.starts_with("tuned at load"),
        "{}",
        b.plan().source
    );
    assert!(tune::read_table(&path).is_ok());
    // Explicit sources are left alone: no table consulted.
    drop(b);
    let c = CudaBackend::load(
        &dir,
        &CudaOptions {
            max_sequences: 4,
            max_context: Some(64),
            plan: PlanSource::Compressed,
            ..CudaOptions::default()
        },
    )
    .unwrap();
    assert_eq!(c.plan().source, "default");
}
