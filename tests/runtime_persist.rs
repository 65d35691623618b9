//! The persisted runtime form (`device::cuda::persist`, `stream::stream_weights_persisted`), on
//! the CPU: the first load computes and persists the tbe3 images, a later load reads them and
//! encodes nothing, and what reaches the upload is the same either way (raw layers included,
//! decoded back from their images); changed weights, a corrupt file and a directory that cannot
//! be written all still load the right weights, with the reason reported.

use std::path::{Path, PathBuf};

use triton_unweight::codec::runtime::Shape;
use triton_unweight::container::{self, Checkpoint, CompressOptions};
use triton_unweight::device::cuda::persist::runtime_path;
use triton_unweight::device::cuda::plan::{Plan, Role, Storage};
use triton_unweight::device::cuda::sizing::role_shapes;
use triton_unweight::device::cuda::stream::{
    stream_weights, stream_weights_persisted, HostLinear, Persisted, Slot, StreamTimes, WeightSink,
};
use triton_unweight::device::DeviceError;
use triton_unweight::model::synth::{synth_checkpoint, SynthOptions};
use triton_unweight::model::{LlamaConfig, LlamaShape};

/// Every piece as the upload would get it, bytes only (raw BF16, or the tbe3 image and shape).
#[derive(Default, PartialEq, Debug)]
struct Keep {
    pieces: Vec<(Slot, String, Vec<u8>)>,
}

impl WeightSink for Keep {
    fn vector(&mut self, s: Slot, v: Vec<f32>) -> Result<(), DeviceError> {
        let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.pieces.push((s, "f32".into(), b));
        Ok(())
    }
    fn linear(&mut self, s: Slot, shape: Shape, f: HostLinear) -> Result<(), DeviceError> {
        let (kind, b) = match f {
            HostLinear::Raw(b) => (format!("raw {shape:?}"), b),
            HostLinear::Tbe3(m) => (format!("tbe3 {:?}", m.shape), m.image),
        };
        self.pieces.push((s, kind, b));
        Ok(())
    }
}

/// A compressed synthetic model of `seed` in `root/name`.
fn model(root: &Path, name: &str, seed: u64) -> PathBuf {
    let plain = root.join(format!("{name}-plain"));
    let opts = SynthOptions {
        seed,
        force: true,
        ..SynthOptions::default()
    };
    synth_checkpoint(&LlamaShape::preset("tiny").unwrap(), &plain, &opts).unwrap();
    let comp = root.join(name);
    let copts = CompressOptions {
        progress: false,
        force: true,
        ..CompressOptions::default()
    };
    container::compress_dir(&plain, &comp, &copts).unwrap();
    comp
}

/// A plan with both storages: the default (every role tbe3) with `o` raw.
fn mixed_plan(cfg: &LlamaConfig) -> Plan {
    let shapes = role_shapes(cfg).unwrap();
    let mut plan = Plan::default_for(&shapes, 132);
    plan.set_storage(Role::O, Storage::Raw, &shapes[&Role::O], 132, None);
    assert_eq!(plan.storage(Role::Qkv), Storage::Tbe3);
    assert_eq!(plan.storage(Role::O), Storage::Raw);
    plan
}

fn load(dir: &Path, plan: &Plan) -> (Keep, StreamTimes, Persisted) {
    let cfg = LlamaConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut keep = Keep::default();
    let (t, p) = stream_weights_persisted(&ckpt, &cfg, plan, &mut keep, dir).unwrap();
    (keep, t, p)
}

/// The pieces computed without any persisted form (the reference).
fn computed(dir: &Path, plan: &Plan) -> Keep {
    let cfg = LlamaConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut keep = Keep::default();
    stream_weights(&ckpt, &cfg, plan, &mut keep).unwrap();
    keep
}

#[test]
fn the_runtime_form_is_computed_once_then_read_and_follows_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "m", 5);
    let cfg = LlamaConfig::from_dir(&dir).unwrap();
    let plan = mixed_plan(&cfg);
    let linears = 4 * cfg.num_hidden_layers + 1 + usize::from(!cfg.tie_word_embeddings);
    let reference = computed(&dir, &plan);
    let path = runtime_path(&dir);
    assert!(!path.exists());

    // First load: every linear layer encoded once (the raw ones too: the file serves any plan),
    // and persisted.
    let (first, t, p) = load(&dir, &plan);
    assert_eq!(
        p,
        Persisted::Written {
            path: path.clone(),
            replaced: None
        }
    );
    assert_eq!((t.encoded, t.from_persisted), (linears, 0));
    assert!(first == reference, "the first load's pieces differ");
    assert!(path.exists());

    // Later loads: nothing encoded, every layer from the file, the same pieces.
    for _ in 0..2 {
        let (again, t, p) = load(&dir, &plan);
        assert_eq!(p, Persisted::Read(path.clone()));
        assert_eq!((t.encoded, t.from_persisted), (0, linears));
        assert!(again == reference, "the pieces read back differ");
    }
    // Another plan reads the same file (all raw is not persisted at all: nothing to encode).
    let all_tbe3 = Plan::default_for(&role_shapes(&cfg).unwrap(), 132);
    let (other, t, p) = load(&dir, &all_tbe3);
    assert_eq!((t.encoded, p), (0, Persisted::Read(path.clone())));
    assert!(other == computed(&dir, &all_tbe3));
    let (_, t, p) = load(&dir, &Plan::baseline());
    assert_eq!((t.encoded, t.from_persisted, p), (0, 0, Persisted::Off));

    // The weights file changes (the same model, other weights): the file is not used, the new
    // weights are computed and persisted in its place.
    let other_dir = model(tmp.path(), "other", 6);
    std::fs::copy(
        other_dir.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let reference2 = computed(&dir, &plan);
    assert!(reference2 != reference);
    let (changed, t, p) = load(&dir, &plan);
    match &p {
        Persisted::Written {
            replaced: Some(why),
            ..
        } => assert!(why.contains("other weights"), "{why}"),
        other => panic!("expected a rewrite, got {other:?}"),
    }
    assert_eq!(t.encoded, linears);
    assert!(changed == reference2, "changed weights: the pieces differ");
    let (_, t, p) = load(&dir, &plan);
    assert_eq!((t.encoded, p), (0, Persisted::Read(path.clone())));
}

#[test]
fn a_corrupt_or_unwritable_runtime_form_still_loads_the_right_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "m", 7);
    let cfg = LlamaConfig::from_dir(&dir).unwrap();
    let plan = mixed_plan(&cfg);
    let linears = 4 * cfg.num_hidden_layers + 1 + usize::from(!cfg.tie_word_embeddings);
    let reference = computed(&dir, &plan);
    let path = runtime_path(&dir);
    load(&dir, &plan);
    let good = std::fs::read(&path).unwrap();

    // A flipped byte in an image, found half-way: the rest is computed, the bad file removed,
    // and the next load persists it again.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    let (got, t, p) = load(&dir, &plan);
    match &p {
        Persisted::NotSaved(why) => assert!(why.contains("fails its checksum"), "{why}"),
        other => panic!("expected the corrupt file to be reported, got {other:?}"),
    }
    assert!(t.encoded > 0 && t.from_persisted < linears);
    assert!(got == reference, "corrupt image: the pieces differ");
    assert!(!path.exists(), "the corrupt file is removed");
    let (got, t, p) = load(&dir, &plan);
    assert!(
        matches!(p, Persisted::Written { replaced: None, .. }),
        "{p:?}"
    );
    assert_eq!(t.encoded, linears);
    assert!(got == reference);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the rewrite is the same file"
    );

    // A truncated file (a corrupt index): refused before anything is read, rewritten.
    std::fs::write(&path, &good[..good.len() - 5]).unwrap();
    let (got, _, p) = load(&dir, &plan);
    match &p {
        Persisted::Written {
            replaced: Some(why),
            ..
        } => assert!(why.contains("magic") || why.contains("index"), "{why}"),
        other => panic!("expected a rewrite, got {other:?}"),
    }
    assert!(got == reference);

    // A model directory that cannot be written: a file where `runtime/` would go (refused even
    // for root) and the directory itself read-only. The load computes in memory and says so.
    std::fs::remove_dir_all(dir.join("runtime")).unwrap();
    std::fs::write(dir.join("runtime"), b"not a directory").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = std::panic::catch_unwind(|| load(&dir, &plan));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
    let (got, t, p) = r.unwrap();
    match &p {
        Persisted::NotSaved(why) => assert!(why.contains("cannot be written"), "{why}"),
        other => panic!("expected not persisted, got {other:?}"),
    }
    let planned_tbe3 = reference
        .pieces
        .iter()
        .filter(|p| p.1.starts_with("tbe3"))
        .count();
    assert!(planned_tbe3 > 0 && planned_tbe3 < linears);
    assert_eq!((t.encoded, t.from_persisted), (planned_tbe3, 0));
    assert!(got == reference, "read-only directory: the pieces differ");
}
