//! The GPU load's CPU side (`device::cuda::stream`), run here without a GPU: every piece the
//! CUDA backend would upload equals the weights the CPU engine loads (raw BF16 bit for bit, tbe3
//! decoding to them bit for bit), and the host memory held while streaming stays bounded by a few
//! of the largest fused layers, never by the model, where the old path (decode the whole model,
//! then encode) holds the model.
//!
//! One test in its own binary: the heap is counted by a global allocator, which another test
//! running in parallel would disturb.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use triton_unweight::codec::runtime::{decode, Shape};
use triton_unweight::container::{self, Checkpoint, CompressOptions};
use triton_unweight::device::cuda::plan::{Plan, Storage};
use triton_unweight::device::cuda::sizing::role_shapes;
use triton_unweight::device::cuda::stream::{
    stream_weights, stream_weights_persisted, HostLinear, Persisted, Slot, WeightSink,
};
use triton_unweight::device::DeviceError;
use triton_unweight::model::synth::{synth_checkpoint, SynthOptions};
use triton_unweight::model::weights::{LlamaWeights, Matrix, MatrixData, WeightMode};
use triton_unweight::model::{LlamaConfig, LlamaShape};

/// Counts live heap bytes and their peak since the last [`reset_peak`].
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes live now; the peak restarts from here.
fn reset_peak() -> usize {
    let now = LIVE.load(Ordering::SeqCst);
    PEAK.store(now, Ordering::SeqCst);
    now
}

/// Drops every piece at once (the upload's place), recording the largest.
#[derive(Default)]
struct Discard {
    largest: usize,
    pieces: usize,
}

impl WeightSink for Discard {
    fn vector(&mut self, _: Slot, v: Vec<f32>) -> Result<(), DeviceError> {
        self.pieces += 1;
        self.largest = self.largest.max(4 * v.len());
        Ok(())
    }
    fn linear(&mut self, _: Slot, _: Shape, f: HostLinear) -> Result<(), DeviceError> {
        self.pieces += 1;
        self.largest = self.largest.max(f.host_bytes());
        Ok(())
    }
}

/// Keeps every piece (for the equality checks).
#[derive(Default)]
struct Keep {
    linears: Vec<(Slot, Shape, HostLinear)>,
    vectors: Vec<(Slot, Vec<f32>)>,
}

impl WeightSink for Keep {
    fn vector(&mut self, s: Slot, v: Vec<f32>) -> Result<(), DeviceError> {
        self.vectors.push((s, v));
        Ok(())
    }
    fn linear(&mut self, s: Slot, shape: Shape, f: HostLinear) -> Result<(), DeviceError> {
        self.linears.push((s, shape, f));
        Ok(())
    }
}

fn bf16(m: &Matrix) -> &[u8] {
    match &m.data {
        MatrixData::Bf16(b) => b,
        MatrixData::Compressed(_) => panic!("decoded weights expected"),
    }
}

/// The CPU engine's BF16 of a slot, fused as the backend fuses it.
fn expected(w: &LlamaWeights, slot: Slot) -> Vec<u8> {
    let parts: Vec<&Matrix> = match slot {
        Slot::Embed => vec![&w.embed_tokens],
        Slot::Qkv(l) => vec![
            &w.layers[l].q_proj,
            &w.layers[l].k_proj,
            &w.layers[l].v_proj,
        ],
        Slot::O(l) => vec![&w.layers[l].o_proj],
        Slot::GateUp(l) => vec![&w.layers[l].gate_proj, &w.layers[l].up_proj],
        Slot::Down(l) => vec![&w.layers[l].down_proj],
        Slot::LmHead => vec![w.lm_head.as_ref().unwrap()],
        other => panic!("{other:?} is not a linear"),
    };
    parts.iter().flat_map(|m| bf16(m).iter().copied()).collect()
}

fn expected_vector(w: &LlamaWeights, slot: Slot) -> &[f32] {
    match slot {
        Slot::InputNorm(l) => &w.layers[l].input_norm,
        Slot::PostNorm(l) => &w.layers[l].post_attention_norm,
        Slot::Norm => &w.norm,
        other => panic!("{other:?} is not a vector"),
    }
}

fn model(root: &Path) -> std::path::PathBuf {
    // Eight layers of tiny's width: the model is many times its largest fused layer.
    let shape = LlamaShape {
        layers: 8,
        ..LlamaShape::preset("tiny").unwrap()
    };
    let plain = root.join("plain");
    let opts = SynthOptions {
        seed: 11,
        force: true,
        ..SynthOptions::default()
    };
    synth_checkpoint(&shape, &plain, &opts).unwrap();
    let comp = root.join("comp");
    let copts = CompressOptions {
        progress: false,
        force: true,
        ..CompressOptions::default()
    };
    container::compress_dir(&plain, &comp, &copts).unwrap();
    comp
}

#[test]
fn streaming_holds_a_few_layers_not_the_model_and_gives_the_cpu_engines_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path());
    let cfg = LlamaConfig::from_dir(&dir).unwrap();
    let shapes = role_shapes(&cfg).unwrap();
    let tbe3 = Plan::default_for(&shapes, 132);
    assert!(
        shapes.keys().any(|&r| tbe3.storage(r) == Storage::Tbe3),
        "the default plan compresses some role"
    );
    let model_bf16: usize = {
        let ckpt = Checkpoint::open(&dir).unwrap();
        ckpt.entries()
            .iter()
            .map(|e| 2 * e.shape.iter().product::<usize>())
            .sum()
    };
    // The largest fused layer in BF16 (gate|up).
    let largest_fused = 2 * 2 * cfg.intermediate_size * cfg.hidden_size;
    assert!(
        model_bf16 > 8 * largest_fused,
        "{model_bf16} vs {largest_fused}"
    );

    // Peak heap while streaming, for both storages.
    for (name, plan) in [("baseline", Plan::baseline()), ("tbe3", tbe3.clone())] {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let before = reset_peak();
        let mut sink = Discard::default();
        stream_weights(&ckpt, &cfg, &plan, &mut sink).unwrap();
        let peak = PEAK.load(Ordering::SeqCst) - before;
        drop(ckpt);
        eprintln!(
            "{name}: streaming peak {peak} bytes over the start; model {model_bf16} bytes BF16, \
             largest fused layer {largest_fused}, {} pieces",
            sink.pieces
        );
        assert_eq!(sink.pieces, 1 + 6 * cfg.num_hidden_layers + 2);
        // A fused BF16 layer, one of its parts, its encoded form and the codec's work buffers.
        assert!(
            peak <= 3 * largest_fused,
            "{name}: {peak} bytes held while streaming, over 3 × {largest_fused}"
        );
    }

    // The old path, for contrast (and to show the count sees a model-sized hold): the whole
    // model decoded to BF16 before anything is encoded.
    let ckpt = Checkpoint::open(&dir).unwrap();
    let before = reset_peak();
    let w = LlamaWeights::load(&ckpt, &cfg, WeightMode::Decoded).unwrap();
    let whole = PEAK.load(Ordering::SeqCst) - before;
    eprintln!("decoding the whole model first: peak {whole} bytes over the start");
    assert!(whole >= model_bf16, "{whole} < {model_bf16}");

    // Every piece equals the CPU engine's weights: raw bit for bit, tbe3 decoding to them.
    for plan in [Plan::baseline(), tbe3.clone()] {
        let mut keep = Keep::default();
        stream_weights(&ckpt, &cfg, &plan, &mut keep).unwrap();
        assert_eq!(keep.vectors.len(), 2 * cfg.num_hidden_layers + 1);
        for (slot, v) in &keep.vectors {
            assert_eq!(v.as_slice(), expected_vector(&w, *slot), "{slot:?}");
        }
        assert_eq!(keep.linears.len(), 4 * cfg.num_hidden_layers + 2);
        for (slot, shape, form) in &keep.linears {
            let want = expected(&w, *slot);
            assert_eq!(2 * shape.len(), want.len(), "{slot:?}");
            let storage = match slot.role() {
                Some(r) => plan.storage(r),
                None => plan.embed,
            };
            let got: Vec<u8> = match form {
                HostLinear::Raw(b) => {
                    assert_eq!(storage, Storage::Raw, "{slot:?}");
                    b.clone()
                }
                HostLinear::Tbe3(m) => {
                    assert_eq!(storage, Storage::Tbe3, "{slot:?}");
                    decode(&m.view().unwrap())
                        .unwrap()
                        .iter()
                        .flat_map(|b| b.to_le_bytes())
                        .collect()
                }
            };
            assert!(got == want, "{slot:?}: the uploaded form differs");
        }
    }

    // The load as the CUDA backend runs it (the runtime form persisted next to the weights):
    // the first load, which also writes every image, and a later one, which reads them back,
    // hold no more than computing does.
    for (name, want) in [("first", "written"), ("later", "read")] {
        let ckpt = Checkpoint::open(&dir).unwrap();
        let before = reset_peak();
        let mut sink = Discard::default();
        let (_, p) = stream_weights_persisted(&ckpt, &cfg, &tbe3, &mut sink, &dir).unwrap();
        let peak = PEAK.load(Ordering::SeqCst) - before;
        eprintln!("persisted, {name} load: peak {peak} bytes over the start ({p:?})");
        match (want, &p) {
            ("written", Persisted::Written { .. }) | ("read", Persisted::Read(_)) => {}
            _ => panic!("{name} load: {p:?}"),
        }
        assert!(
            peak <= 3 * largest_fused,
            "{name} persisted load: {peak} bytes held, over 3 × {largest_fused}"
        );
    }

    // A corrupt tensor fails the stream naming it (checksums are verified on the way).
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x5a;
    std::fs::write(&file, bytes).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let e = stream_weights(&ckpt, &cfg, &Plan::baseline(), &mut Discard::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lm_head.weight") || e.contains("model."), "{e}");
}
