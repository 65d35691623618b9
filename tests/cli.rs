//! End-to-end tests of the `unweight` binary: compress / decompress / verify / inspect / synth run
//! as child processes on real files, with exit codes, stdout and stderr checked.
//!
//! Everything the tests compare against is computed independently of the crate: tensors are read
//! back with the `safetensors` crate, and damaged or edited files are produced by parsing the
//! safetensors header here (8-byte little-endian length, JSON, data).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

// build/cuda.rs (how the build finds nvcc) is unit-tested here: a build script has no test
// harness of its own, so its `#[cfg(test)]` module runs in this target.
#[path = "../build/cuda.rs"]
#[allow(dead_code)]
mod build_cuda;
// Its `git` runs the tests' git commands; the version test computes the commit on its own.
#[path = "../build/commit.rs"]
#[allow(dead_code)]
mod build_commit;

const BIN: &str = env!("CARGO_BIN_EXE_unweight");
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
/// A linear weight of the tiny preset (688 × 256, several chunks' worth of data).
const GATE0: &str = "model.layers.0.mlp.gate_proj.weight";

// ---------------------------------------------------------------------------------------------
// Running the binary.

/// The outcome of one run of the binary.
struct Run {
    args: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "`unweight {}` failed\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        self
    }

    /// Asserts exit code 2 with a properly prefixed error message on stderr.
    fn error(self) -> Self {
        assert_eq!(
            self.code, 2,
            "`unweight {}` should fail with 2\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        assert!(
            self.stderr.starts_with("unweight: error:"),
            "`unweight {}`: stderr does not start with `unweight: error:`:\n{}",
            self.args,
            self.stderr
        );
        self
    }

    /// Asserts that the error message mentions every one of `needles`.
    fn error_mentions(self, needles: &[&str]) -> Self {
        let run = self.error();
        for n in needles {
            assert!(
                run.stderr.contains(n),
                "`unweight {}`: stderr does not mention `{n}`:\n{}",
                run.args,
                run.stderr
            );
        }
        run
    }
}

fn run_unweight(args: &[&OsStr]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawning the unweight binary");
    Run {
        args: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        code: out.status.code().expect("unweight was killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `uw!("compress", &dir, "--out", &out)` runs the binary with those arguments.
macro_rules! uw {
    ($($a:expr),* $(,)?) => {
        run_unweight(&[$(OsStr::new(&$a)),*])
    };
}

/// `git` in the checkout the tests run from; `None` outside one (a source tarball).
fn git(args: &[&str]) -> Option<String> {
    build_commit::git(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let r = uw!("--version").ok();
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        // Built outside a checkout: no commit to name.
        assert_eq!(
            r.stdout.trim(),
            format!("unweight {}", env!("CARGO_PKG_VERSION"))
        );
        return;
    };
    // cargo rebuilt the binary for the tree as it is now (build.rs reruns on a commit and on any
    // edit of these sources), so its commit is HEAD, dirty exactly when they differ from it.
    let changed = git(&[
        "status",
        "--porcelain",
        "--untracked-files=normal",
        "--",
        "src",
        "kernels",
        "build.rs",
        "build",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .expect("git status");
    let suffix = if changed.is_empty() { "" } else { "-dirty" };
    assert_eq!(
        r.stdout.trim(),
        format!(
            "unweight {} (commit {head}{suffix})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

fn synth(out: &Path, shape: &str, extra: &[&str]) {
    let mut args: Vec<&OsStr> = vec![
        "synth".as_ref(),
        "--shape".as_ref(),
        shape.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run_unweight(&args).ok();
}

fn compress(input: &Path, out: &Path) {
    uw!("compress", input, "--out", out, "--no-progress").ok();
}

fn decompress(input: &Path, out: &Path) {
    uw!("decompress", input, "--out", out, "--no-progress").ok();
}

/// A tiny synthetic checkpoint at `tmp/orig` and its compressed form at `tmp/comp`.
fn tiny_pair(tmp: &Path) -> (PathBuf, PathBuf) {
    let orig = tmp.join("orig");
    let comp = tmp.join("comp");
    synth(&orig, "tiny", &[]);
    compress(&orig, &comp);
    (orig, comp)
}

/// Copies a flat directory (checkpoints have no subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        assert!(
            e.file_type().unwrap().is_file(),
            "unexpected non-file {}",
            e.path().display()
        );
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that neither `target` nor any hidden staging directory for it exists.
fn assert_no_output(target: &Path) {
    assert!(
        !target.exists(),
        "{} was created by a failed run",
        target.display()
    );
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let staging: Vec<String> = listing(target.parent().unwrap())
        .into_iter()
        .filter(|n| n.starts_with(&format!(".{name}.partial-")))
        .collect();
    assert!(
        staging.is_empty(),
        "staging directories left behind: {staging:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Reading tensors with the safetensors crate.

#[derive(Debug, PartialEq)]
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Every tensor of one safetensors file, by name, and the file's `__metadata__`.
fn read_tensors(path: &Path) -> (BTreeMap<String, Tensor>, Option<BTreeMap<String, String>>) {
    let buf = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (_, meta) =
        SafeTensors::read_metadata(&buf).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let user = meta.metadata().clone().map(|m| m.into_iter().collect());
    let st = SafeTensors::deserialize(&buf).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Tensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect();
    (tensors, user)
}

/// Every tensor of a plain checkpoint directory (single file or sharded), by name, with the
/// file that holds it.
fn read_checkpoint(dir: &Path) -> BTreeMap<String, (String, Tensor)> {
    let files: Vec<String> = if dir.join(INDEX).exists() {
        let wm = weight_map(dir);
        wm.values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        vec![SINGLE.to_string()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        for (n, t) in read_tensors(&dir.join(&f)).0 {
            assert!(
                out.insert(n.clone(), (f.clone(), t)).is_none(),
                "tensor {n} stored twice"
            );
        }
    }
    out
}

/// The `weight_map` of a sharded checkpoint's index.
fn weight_map(dir: &Path) -> BTreeMap<String, String> {
    let v: Value = serde_json::from_str(&fs::read_to_string(dir.join(INDEX)).unwrap()).unwrap();
    v["weight_map"]
        .as_object()
        .expect("index has a weight_map object")
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().expect("shard name is a string").to_string(),
            )
        })
        .collect()
}

/// Asserts two plain checkpoints hold the same tensors (name, file, dtype, shape, bytes).
fn assert_same_tensors(a: &Path, b: &Path) {
    let ta = read_checkpoint(a);
    let tb = read_checkpoint(b);
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "tensor names differ"
    );
    for (name, (fa, x)) in &ta {
        let (fb, y) = &tb[name];
        assert_eq!(fa, fb, "{name} is in different files");
        assert_eq!(x.dtype, y.dtype, "{name}: dtype differs");
        assert_eq!(x.shape, y.shape, "{name}: shape differs");
        assert!(x.bytes == y.bytes, "{name}: bytes differ");
    }
}

// ---------------------------------------------------------------------------------------------
// Raw safetensors headers.

/// The JSON header of a safetensors file and the absolute offset of its data section.
///
/// Reads only the header: the memory test calls this on a large file, and the test process's own
/// peak memory would show up in its children's (see `run_measuring_rss`).
fn read_header(path: &Path) -> (Map<String, Value>, usize) {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let n = u64::from_le_bytes(len) as usize;
    let mut text = vec![0u8; n];
    f.read_exact(&mut text).unwrap();
    let header: Value = serde_json::from_slice(&text).expect("header is JSON");
    (
        header.as_object().expect("header is an object").clone(),
        8 + n,
    )
}

/// Absolute byte range of a stored tensor in a safetensors file.
fn stored_range(path: &Path, name: &str) -> Range<usize> {
    let (h, start) = read_header(path);
    let t = h
        .get(name)
        .unwrap_or_else(|| panic!("{} has no stored tensor `{name}`", path.display()));
    let off = t["data_offsets"].as_array().unwrap();
    start + off[0].as_u64().unwrap() as usize..start + off[1].as_u64().unwrap() as usize
}

/// Rewrites a safetensors file with a new header, keeping its data section (so the header must
/// keep the same data offsets). The JSON is padded with spaces to a multiple of 8.
fn rewrite_header(path: &Path, header: &Map<String, Value>) {
    let buf = fs::read(path).unwrap();
    let (_, data_start) = read_header(path);
    let mut text = serde_json::to_vec(header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&buf[data_start..]);
    fs::write(path, out).unwrap();
}

/// Applies `edit` to the parsed `unweight` metadata of a compressed file and writes it back.
fn edit_unweight_meta(path: &Path, edit: impl FnOnce(&mut Value)) {
    let (mut h, _) = read_header(path);
    let meta = h
        .get_mut("__metadata__")
        .expect("compressed file has __metadata__")
        .as_object_mut()
        .unwrap();
    let mut uw: Value = serde_json::from_str(
        meta["unweight"]
            .as_str()
            .expect("unweight metadata is a string"),
    )
    .unwrap();
    edit(&mut uw);
    meta.insert(
        "unweight".into(),
        Value::String(serde_json::to_string(&uw).unwrap()),
    );
    rewrite_header(path, &h);
    // The edited file must still be a valid safetensors file, or the test would prove nothing.
    let buf = fs::read(path).unwrap();
    SafeTensors::deserialize(&buf).expect("edited file is still valid safetensors");
}

/// The metadata entry of one logical tensor inside the `unweight` JSON.
fn tensor_meta<'a>(uw: &'a mut Value, name: &str) -> &'a mut Value {
    uw["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no metadata for {name}"))
}

fn inspect_json(dir: &Path) -> Value {
    let r = uw!("inspect", "--json", dir).ok();
    let v: Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("inspect --json is not one JSON value ({e}):\n{}", r.stdout));
    assert!(v.is_object(), "inspect --json prints an object");
    v
}

fn bf16_bits(x: f32) -> u16 {
    // Round to nearest even; the inputs here are finite.
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn tiny_round_trip_is_byte_identical_and_copies_configs() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());

    let v = uw!("verify", &orig, &comp, "--no-progress").ok();
    assert!(!v.stdout.contains("MISMATCH"), "{}", v.stdout);

    // The compressed file is not just a copy: its tensors are stored differently.
    let (stored, _) = read_tensors(&comp.join(SINGLE));
    assert!(
        stored.keys().any(|k| k.ends_with("#exp")),
        "nothing was encoded: {:?}",
        stored.keys()
    );

    let back = tmp.path().join("back");
    decompress(&comp, &back);
    assert!(!back.join(INDEX).exists());
    assert_same_tensors(&orig, &back);
    // User metadata survives and the unweight entry is gone again.
    assert_eq!(
        read_tensors(&orig.join(SINGLE)).1,
        read_tensors(&back.join(SINGLE)).1
    );

    for f in ["config.json", "generation_config.json"] {
        let want = fs::read(orig.join(f)).unwrap();
        assert_eq!(
            fs::read(comp.join(f)).unwrap(),
            want,
            "{f} not copied into the compressed dir"
        );
        assert_eq!(
            fs::read(back.join(f)).unwrap(),
            want,
            "{f} not copied into the decompressed dir"
        );
    }
    assert_eq!(listing(&orig), listing(&back));
}

#[test]
fn sharded_checkpoint_keeps_shards_and_round_trips() {
    let tmp = tempdir();
    let orig = tmp.path().join("orig");
    synth(&orig, "tiny", &["--shard-size", "600000"]);
    let orig_map = weight_map(&orig);
    let shards: BTreeSet<&String> = orig_map.values().collect();
    assert!(shards.len() >= 3, "expected several shards, got {shards:?}");
    assert!(!orig.join(SINGLE).exists());

    let comp = tmp.path().join("comp");
    compress(&orig, &comp);
    assert_eq!(
        listing(&orig),
        listing(&comp),
        "compressed dir has different file names"
    );
    assert!(!comp.join(SINGLE).exists());
    let comp_map = weight_map(&comp);
    assert_eq!(
        comp_map, orig_map,
        "index must map every logical tensor to the same shard"
    );
    // And each shard really holds the tensors its index says (raw, or as parts).
    for (name, shard) in &comp_map {
        let (h, _) = read_header(&comp.join(shard));
        assert!(
            !stored_names(&h, name).is_empty(),
            "{shard} does not hold {name}"
        );
        let mut uw: Value =
            serde_json::from_str(h["__metadata__"]["unweight"].as_str().unwrap()).unwrap();
        tensor_meta(&mut uw, name);
    }

    uw!("verify", &orig, &comp, "--no-progress").ok();
    let back = tmp.path().join("back");
    decompress(&comp, &back);
    assert_eq!(listing(&orig), listing(&back));
    assert_eq!(weight_map(&back), orig_map);
    assert_same_tensors(&orig, &back);
}

/// Name, dtype, shape, bytes and expected encoding of a hand-made tensor.
type PassCase<'a> = (&'a str, Dtype, Vec<usize>, &'a [u8], &'a str);

#[test]
fn non_bf16_and_small_tensors_pass_through_raw() {
    let tmp = tempdir();
    let orig = tmp.path().join("orig");
    fs::create_dir(&orig).unwrap();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let f32s: Vec<u8> = (0..64 * 64)
        .flat_map(|_| rng.gen::<f32>().to_le_bytes())
        .collect();
    let f16s: Vec<u8> = (0..64 * 64)
        .flat_map(|_| rng.gen::<u16>().to_le_bytes())
        .collect();
    let bf16_1d: Vec<u8> = (0..4096)
        .flat_map(|_| bf16_bits(normal.sample(&mut rng)).to_le_bytes())
        .collect();
    let bf16_2d: Vec<u8> = (0..128 * 64)
        .flat_map(|_| bf16_bits(normal.sample(&mut rng)).to_le_bytes())
        .collect();
    let i64s: Vec<u8> = (0..100i64)
        .flat_map(|i| (i * 1_000_003 - 7).to_le_bytes())
        .collect();
    let cases: Vec<PassCase> = vec![
        ("a.f32", Dtype::F32, vec![64, 64], &f32s, "raw"),
        ("b.f16", Dtype::F16, vec![64, 64], &f16s, "raw"),
        ("c.bf16_1d", Dtype::BF16, vec![4096], &bf16_1d, "raw"),
        (
            "d.bf16_2d",
            Dtype::BF16,
            vec![128, 64],
            &bf16_2d,
            "exp-rans",
        ),
        ("e.i64", Dtype::I64, vec![100], &i64s, "raw"),
        ("f.empty", Dtype::BF16, vec![0, 8], &[], "raw"),
    ];
    let views: Vec<(&str, TensorView)> = cases
        .iter()
        .map(|(n, d, sh, b, _)| (*n, TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &orig.join(SINGLE)).unwrap();

    let comp = tmp.path().join("comp");
    compress(&orig, &comp);
    uw!("verify", &orig, &comp, "--no-progress").ok();

    let report = inspect_json(&comp);
    let rows = report["tensors"].as_array().unwrap();
    assert_eq!(rows.len(), cases.len());
    for (name, dtype, shape, bytes, encoding) in &cases {
        let row = rows
            .iter()
            .find(|r| r["name"] == *name)
            .unwrap_or_else(|| panic!("inspect lacks {name}"));
        assert_eq!(row["encoding"], *encoding, "{name}");
        assert_eq!(row["shape"], serde_json::json!(shape), "{name}");
        assert_eq!(row["dtype"], format!("{dtype:?}"), "{name}");
        assert_eq!(row["original_bytes"], bytes.len() as u64, "{name}");
    }

    let back = tmp.path().join("back");
    decompress(&comp, &back);
    let (got, _) = read_tensors(&back.join(SINGLE));
    assert_eq!(got.len(), cases.len());
    for (name, dtype, shape, bytes, _) in &cases {
        let t = &got[*name];
        assert_eq!(t.dtype, *dtype, "{name}");
        assert_eq!(&t.shape, shape, "{name}");
        assert!(t.bytes == *bytes, "{name}: bytes differ");
    }
}

#[test]
fn inspect_json_has_the_documented_schema_and_consistent_totals() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    let orig_tensors = read_checkpoint(&orig);

    for (dir, compressed) in [(&comp, true), (&orig, false)] {
        let v = inspect_json(dir);
        let rows = v["tensors"].as_array().expect("`tensors` is an array");
        assert_eq!(rows.len(), orig_tensors.len(), "{}", dir.display());
        let (mut orig_sum, mut stored_sum) = (0u64, 0u64);
        for r in rows {
            for key in [
                "name",
                "shape",
                "encoding",
                "original_bytes",
                "stored_bytes",
                "exponent_entropy_bits",
                "value_entropy_bits",
                "exponent_floor_bytes",
                "value_floor_bytes",
            ] {
                assert!(r.get(key).is_some(), "row lacks `{key}`: {r}");
            }
            let name = r["name"].as_str().unwrap();
            let (_, t) = &orig_tensors[name];
            assert_eq!(r["shape"], serde_json::json!(t.shape), "{name}");
            let original = r["original_bytes"].as_u64().unwrap();
            let stored = r["stored_bytes"].as_u64().unwrap();
            assert_eq!(original, t.bytes.len() as u64, "{name}");
            let h = r["exponent_entropy_bits"]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: BF16 tensor without entropy"));
            assert!((0.0..=8.0).contains(&h), "{name}: entropy {h}");
            let hv = r["value_entropy_bits"].as_f64().unwrap();
            assert!((h..=h + 8.0).contains(&hv), "{name}: value entropy {hv}");
            let n = (t.bytes.len() / 2) as f64;
            let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.max(1.0);
            assert!(close(
                r["exponent_floor_bytes"].as_f64().unwrap(),
                n * (8.0 + h) / 8.0
            ));
            assert!(close(
                r["value_floor_bytes"].as_f64().unwrap(),
                n * hv / 8.0
            ));
            if compressed {
                let enc = r["encoding"].as_str().unwrap();
                let want = if t.shape.len() >= 2 {
                    "exp-rans"
                } else {
                    "raw"
                };
                assert_eq!(enc, want, "{name}");
                if enc == "raw" {
                    assert_eq!(stored, original, "{name}");
                } else {
                    // The whole-value entropy really bounds the size from below; its value is
                    // recomputed here from the original bytes.
                    assert!(stored < original, "{name}: {stored} >= {original}");
                    let mut counts = vec![0u64; 1 << 16];
                    for p in t.bytes.chunks_exact(2) {
                        counts[u16::from_le_bytes([p[0], p[1]]) as usize] += 1;
                    }
                    let h_value: f64 = counts
                        .iter()
                        .filter(|&&c| c > 0)
                        .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
                        .sum();
                    assert!(
                        close(hv, h_value),
                        "{name}: recorded {hv}, counted {h_value}"
                    );
                    assert!(
                        stored as f64 >= n * h_value / 8.0,
                        "{name}: beats the floor"
                    );
                }
            } else {
                assert_eq!(
                    stored, original,
                    "{name}: plain tensors are stored as they are"
                );
            }
            orig_sum += original;
            stored_sum += stored;
        }
        assert_eq!(v["total"]["original_bytes"].as_u64(), Some(orig_sum));
        assert_eq!(v["total"]["stored_bytes"].as_u64(), Some(stored_sum));
        assert_eq!(
            orig_sum,
            orig_tensors
                .values()
                .map(|(_, t)| t.bytes.len() as u64)
                .sum::<u64>()
        );
        if compressed {
            assert!(
                (stored_sum as f64) < 0.7 * orig_sum as f64,
                "stored {stored_sum} of {orig_sum}"
            );
            // Stored bytes are the bytes of the tensors actually in the file.
            let file_data: usize = read_tensors(&comp.join(SINGLE))
                .0
                .values()
                .map(|t| t.bytes.len())
                .sum();
            assert_eq!(stored_sum, file_data as u64);
        } else {
            assert_eq!(stored_sum, orig_sum);
        }
    }
    // The table form works too.
    let t = uw!("inspect", &comp).ok();
    assert!(!t.stdout.trim().is_empty());
}

/// The stored tensors that hold the logical tensor `name` of a compressed file: `name` itself when
/// stored raw, or its `name#part` parts.
fn stored_names(header: &Map<String, Value>, name: &str) -> Vec<String> {
    let prefix = format!("{name}#");
    header
        .keys()
        .filter(|k| *k == name || k.starts_with(&prefix))
        .cloned()
        .collect()
}

#[test]
fn corruption_in_any_stored_part_is_detected_and_named() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    let file = comp.join(SINGLE);
    let (header, _) = read_header(&file);
    let parts = stored_names(&header, GATE0);
    assert!(
        parts.iter().all(|p| p.starts_with(&format!("{GATE0}#"))),
        "{GATE0} is not encoded: {parts:?}"
    );

    // One flipped byte in the middle of every stored part...
    let mut cases: Vec<(String, usize)> = parts
        .iter()
        .map(|p| {
            let r = stored_range(&file, p);
            assert!(!r.is_empty(), "part {p} is empty");
            (p.clone(), r.start + r.len() / 2)
        })
        .collect();
    // ...and in each region of the index part, laid out as docs/format.md §4.2 says: C + 1 u32
    // chunk offsets, 32 × C u32 lane states, then the code table (1 + 3k bytes).
    let mut uw: Value =
        serde_json::from_str(header["__metadata__"]["unweight"].as_str().unwrap()).unwrap();
    let m = tensor_meta(&mut uw, GATE0).clone();
    let numel: u64 = m["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .product();
    let chunks = numel.div_ceil(m["rans"]["chunk_elems"].as_u64().unwrap()) as usize;
    assert!(
        chunks >= 2,
        "{GATE0} has {chunks} chunk(s); pick a larger tensor"
    );
    let index = stored_range(&file, &format!("{GATE0}#index"));
    let (offsets_end, states_end) = (
        index.start + 4 * (chunks + 1),
        index.start + 4 * (chunks + 1) + 128 * chunks,
    );
    let bytes = fs::read(&file).unwrap();
    let k = bytes[states_end] as usize + 1;
    // Version 2 with 3 coded mantissa bits: the key of every symbol follows, 2 bytes each.
    assert_eq!(m["rans"]["mantissa_bits"], 3);
    assert_eq!(
        index.end,
        states_end + 1 + 3 * k + 2 * k,
        "index part does not have the documented layout"
    );
    cases.push(("index offsets".into(), index.start + 4)); // chunk 1's offset
    cases.push((
        "index states".into(),
        offsets_end + 4 * 32 * (chunks - 1) + 5,
    ));
    cases.push(("index table symbol".into(), states_end + 1 + k / 2));
    cases.push(("index table frequency".into(), states_end + 3 * k));
    cases.push(("index table key".into(), index.end - 1));

    for (i, (what, at)) in cases.iter().enumerate() {
        let bad = tmp.path().join(format!("bad-{i}"));
        copy_dir(&comp, &bad);
        let mut damaged = bytes.clone();
        damaged[*at] ^= 0x5a;
        fs::write(bad.join(SINGLE), damaged).unwrap();

        let v = uw!("verify", &orig, &bad, "--no-progress");
        assert_eq!(
            v.code, 1,
            "verify with damaged {what}:\n{}\n{}",
            v.stdout, v.stderr
        );
        assert_eq!(
            mismatch_names(&v.stdout),
            BTreeSet::from([GATE0.to_string()]),
            "damaged {what}:\n{}",
            v.stdout
        );

        let out = tmp.path().join(format!("out-{i}"));
        uw!("decompress", &bad, "--out", &out, "--no-progress").error_mentions(&[GATE0]);
        assert_no_output(&out);
    }
}

/// Cuts the last `n` bytes off a file.
fn truncate_by(f: &Path, n: u64) {
    let len = fs::metadata(f).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(f)
        .unwrap()
        .set_len(len - n)
        .unwrap();
}

#[test]
fn truncated_garbage_and_missing_inputs_are_errors_naming_the_culprit() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    let out = tmp.path().join("out");

    // A truncated plain checkpoint.
    let trunc = tmp.path().join("trunc");
    copy_dir(&orig, &trunc);
    let f = trunc.join(SINGLE);
    truncate_by(&f, 100);
    let fs_ = s(&f);
    uw!("compress", &trunc, "--out", &out, "--no-progress").error_mentions(&[&fs_]);
    assert_no_output(&out);
    uw!("inspect", &trunc).error_mentions(&[&fs_]);
    uw!("verify", &trunc, &comp, "--no-progress").error_mentions(&[&fs_]);

    // A truncated compressed checkpoint.
    let ctrunc = tmp.path().join("ctrunc");
    copy_dir(&comp, &ctrunc);
    let f = ctrunc.join(SINGLE);
    truncate_by(&f, 100);
    let cfs = s(&f);
    uw!("verify", &orig, &ctrunc, "--no-progress").error_mentions(&[&cfs]);
    uw!("inspect", &ctrunc).error_mentions(&[&cfs]);
    uw!("decompress", &ctrunc, "--out", &out, "--no-progress").error_mentions(&[&cfs]);
    assert_no_output(&out);

    // Random bytes under the weights' name.
    let garbage = tmp.path().join("garbage");
    fs::create_dir(&garbage).unwrap();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let noise: Vec<u8> = (0..65536).map(|_| rng.gen()).collect();
    fs::write(garbage.join(SINGLE), noise).unwrap();
    let gfs = s(&garbage.join(SINGLE));
    uw!("compress", &garbage, "--out", &out, "--no-progress").error_mentions(&[&gfs]);
    assert_no_output(&out);
    uw!("inspect", &garbage).error_mentions(&[&gfs]);
    uw!("verify", &garbage, &comp, "--no-progress").error_mentions(&[&gfs]);
    // A small header length followed by junk: not JSON.
    let mut junk = 16u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"{not json at all, really}");
    fs::write(garbage.join(SINGLE), junk).unwrap();
    uw!("inspect", &garbage).error_mentions(&[&gfs]);

    // A directory that does not exist.
    let missing = tmp.path().join("no-such-dir");
    let ms = s(&missing);
    uw!("compress", &missing, "--out", &out, "--no-progress").error_mentions(&[&ms]);
    assert_no_output(&out);
    uw!("inspect", &missing).error_mentions(&[&ms]);
    uw!("decompress", &missing, "--out", &out, "--no-progress").error_mentions(&[&ms]);
    uw!("verify", &orig, &missing, "--no-progress").error_mentions(&[&ms]);
    uw!("verify", &missing, &comp, "--no-progress").error_mentions(&[&ms]);
    // A directory without weights.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    uw!("inspect", &empty).error_mentions(&[&s(&empty)]);

    // A sharded checkpoint with one shard deleted, plain and compressed.
    let sharded = tmp.path().join("sharded");
    synth(&sharded, "tiny", &["--shard-size", "600000"]);
    let csharded = tmp.path().join("csharded");
    compress(&sharded, &csharded);
    let victim = weight_map(&sharded).values().nth(3).unwrap().clone();
    fs::remove_file(sharded.join(&victim)).unwrap();
    fs::remove_file(csharded.join(&victim)).unwrap();
    uw!("compress", &sharded, "--out", &out, "--no-progress").error_mentions(&[&victim]);
    assert_no_output(&out);
    uw!("inspect", &sharded).error_mentions(&[&victim]);
    uw!("inspect", &csharded).error_mentions(&[&victim]);
    uw!("decompress", &csharded, "--out", &out, "--no-progress").error_mentions(&[&victim]);
    assert_no_output(&out);
}

#[test]
fn unknown_format_version_is_refused() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    edit_unweight_meta(&comp.join(SINGLE), |uw| {
        assert_eq!(uw["format"], "unweight");
        assert!(uw["version"].is_u64(), "version is a number: {uw}");
        uw["version"] = 99.into();
    });
    let out = tmp.path().join("out");
    uw!("inspect", &comp).error_mentions(&["version 99", &s(&comp.join(SINGLE))]);
    uw!("inspect", "--json", &comp).error_mentions(&["version 99"]);
    uw!("decompress", &comp, "--out", &out, "--no-progress").error_mentions(&["version 99"]);
    assert_no_output(&out);
    uw!("verify", &orig, &comp, "--no-progress").error_mentions(&["version 99"]);
}

/// A dtype to write into a tensor's metadata, and the edit that writes it.
type DtypeEdit<'a> = (&'a str, &'a dyn Fn(&mut Value));

#[test]
fn unsupported_dtype_of_an_encoded_tensor_is_refused() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    let out = tmp.path().join("out");
    // F32 with a consistent recorded size (so only the dtype is wrong), then an unknown name.
    let cases: [DtypeEdit; 2] = [
        ("F32", &|t: &mut Value| {
            assert_eq!(t["encoding"], "exp-rans");
            t["dtype"] = "F32".into();
            t["original_bytes"] = (t["original_bytes"].as_u64().unwrap() * 2).into();
        }),
        ("Q4", &|t: &mut Value| t["dtype"] = "Q4".into()),
    ];
    for (dtype, edit) in cases {
        let bad = tmp.path().join(format!("bad-{dtype}"));
        copy_dir(&comp, &bad);
        edit_unweight_meta(&bad.join(SINGLE), |uw| edit(tensor_meta(uw, GATE0)));
        uw!("inspect", &bad).error_mentions(&[GATE0, dtype]);
        uw!("decompress", &bad, "--out", &out, "--no-progress").error_mentions(&[GATE0, dtype]);
        assert_no_output(&out);
        uw!("verify", &orig, &bad, "--no-progress").error_mentions(&[GATE0, dtype]);
    }
}

#[test]
fn output_directories_are_never_clobbered_without_force() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());

    let existing = tmp.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("keep.txt"), b"precious").unwrap();
    uw!("compress", &orig, "--out", &existing, "--no-progress")
        .error_mentions(&[&s(&existing), "--force"]);
    assert_eq!(listing(&existing), ["keep.txt"]);
    assert_eq!(fs::read(existing.join("keep.txt")).unwrap(), b"precious");
    uw!("decompress", &comp, "--out", &existing, "--no-progress").error();
    assert_eq!(listing(&existing), ["keep.txt"]);
    assert!(
        listing(tmp.path()).iter().all(|n| !n.contains(".partial-")),
        "{:?}",
        listing(tmp.path())
    );

    // An empty existing directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    compress(&orig, &empty);
    assert_eq!(listing(&empty), listing(&comp));

    // With --force the directory is replaced, not merged into.
    uw!(
        "compress",
        &orig,
        "--out",
        &existing,
        "--force",
        "--no-progress"
    )
    .ok();
    assert_eq!(listing(&existing), listing(&comp));
    uw!("verify", &orig, &existing, "--no-progress").ok();

    // A compressed checkpoint is not compressed again, and a plain one is not decompressed.
    let twice = tmp.path().join("twice");
    uw!("compress", &comp, "--out", &twice, "--no-progress").error_mentions(&[&s(&comp)]);
    assert_no_output(&twice);
    uw!("decompress", &orig, "--out", &twice, "--no-progress").error_mentions(&[&s(&orig)]);
    assert_no_output(&twice);
    // Nor can the original be handed to verify as the compressed side.
    uw!("verify", &orig, &orig, "--no-progress").error();

    // --force never replaces the input itself or a directory that contains it.
    let before = listing(&orig);
    for target in [orig.clone(), tmp.path().to_path_buf()] {
        uw!(
            "compress",
            &orig,
            "--out",
            &target,
            "--force",
            "--no-progress"
        )
        .error_mentions(&["would replace the input"]);
        assert_eq!(listing(&orig), before);
    }
    uw!(
        "decompress",
        &comp,
        "--out",
        &comp,
        "--force",
        "--no-progress"
    )
    .error_mentions(&["would replace the input"]);
    uw!("verify", &orig, &comp, "--no-progress").ok();
}

/// Peak resident set of a child, in bytes, read with `wait4` so that children of other tests
/// running concurrently in this process do not count (`getrusage(RUSAGE_CHILDREN)` reports the
/// largest of all reaped children).
///
/// Caveat: Linux carries the peak RSS across `execve` in the process's signal struct, and std
/// spawns with `posix_spawn` (a `CLONE_VM | CLONE_VFORK` child that shares this process's memory
/// until exec), so the figure is at least this test process's own peak RSS. The tests therefore
/// never load a large file into memory themselves; `self_peak_rss` lets a failure say how much
/// of the figure is inherited.
fn run_measuring_rss(args: &[&OsStr]) -> (i32, u64) {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 writes into the two out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    // The child is reaped; `child` must not be waited on again (dropping it does not wait).
    drop(child);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally (status {status})"
    );
    // Linux reports ru_maxrss in KiB.
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

/// Peak resident set of this test process, in bytes.
fn self_peak_rss() -> u64 {
    // SAFETY: as above.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn compress_verify_and_decompress_peak_memory_stay_bounded() {
    let tmp = tempdir();
    let orig = tmp.path().join("orig");
    synth(&orig, "smollm2-135m", &[]);
    let size = fs::metadata(orig.join(SINGLE)).unwrap().len();
    let largest = read_header(&orig.join(SINGLE))
        .0
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| {
            let o = t["data_offsets"].as_array().unwrap();
            o[1].as_u64().unwrap() - o[0].as_u64().unwrap()
        })
        .max()
        .unwrap();
    assert!(size > 250_000_000, "checkpoint is {size} bytes");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;

    let comp = tmp.path().join("comp");
    let (code, rss) = run_measuring_rss(&[
        "compress".as_ref(),
        orig.as_os_str(),
        "--out".as_ref(),
        comp.as_os_str(),
        "--no-progress".as_ref(),
    ]);
    assert_eq!(code, 0);
    let context = format!(
        "checkpoint {:.1} MiB, largest tensor {:.1} MiB, test process peak {:.1} MiB",
        mib(size),
        mib(largest),
        mib(self_peak_rss())
    );
    eprintln!("compress peak RSS {:.1} MiB ({context})", mib(rss));
    assert!(
        rss < 200_000_000,
        "compress peak RSS {:.1} MiB ({context})",
        mib(rss)
    );

    // Verify holds one original tensor, its decoded copy and its parts at a time.
    let (code, rss) = run_measuring_rss(&[
        "verify".as_ref(),
        orig.as_os_str(),
        comp.as_os_str(),
        "--no-progress".as_ref(),
    ]);
    assert_eq!(code, 0);
    eprintln!("verify peak RSS {:.1} MiB", mib(rss));
    assert!(
        rss < size,
        "verify peak RSS {:.1} MiB ({context})",
        mib(rss)
    );

    // Decompress holds a few tensors' parts and decoded bytes at a time (its read-ahead), not
    // the checkpoint.
    let back = tmp.path().join("back");
    let (code, rss) = run_measuring_rss(&[
        "decompress".as_ref(),
        comp.as_os_str(),
        "--out".as_ref(),
        back.as_os_str(),
        "--no-progress".as_ref(),
    ]);
    assert_eq!(code, 0);
    eprintln!("decompress peak RSS {:.1} MiB", mib(rss));
    assert!(
        rss < size,
        "decompress peak RSS {:.1} MiB ({context})",
        mib(rss)
    );
}

#[test]
fn verify_reports_every_differing_missing_and_extra_tensor() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());

    // Another seed: the tensors that differ are exactly those whose bytes differ.
    let other = tmp.path().join("other");
    synth(&other, "tiny", &["--seed", "12345"]);
    let a = read_checkpoint(&orig);
    let b = read_checkpoint(&other);
    let differing: BTreeSet<&str> = a
        .iter()
        .filter(|(n, (_, t))| b[*n].1.bytes != t.bytes)
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(!differing.is_empty());
    let v = uw!("verify", &other, &comp, "--no-progress");
    assert_eq!(v.code, 1, "{}\n{}", v.stdout, v.stderr);
    let named = mismatch_names(&v.stdout);
    assert_eq!(
        named,
        differing
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );

    // An original missing one tensor: the compressed one has an extra tensor.
    let dropped = "model.layers.1.self_attn.v_proj.weight";
    let fewer = tmp.path().join("fewer");
    fs::create_dir(&fewer).unwrap();
    let (tensors, user) = read_tensors(&orig.join(SINGLE));
    assert!(tensors.contains_key(dropped));
    let views: Vec<(&String, TensorView)> = tensors
        .iter()
        .filter(|(n, _)| n.as_str() != dropped)
        .map(|(n, t)| {
            (
                n,
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    let user = user.map(|m| m.into_iter().collect());
    safetensors::serialize_to_file(views, &user, &fewer.join(SINGLE)).unwrap();
    let v = uw!("verify", &fewer, &comp, "--no-progress");
    assert_eq!(v.code, 1, "{}\n{}", v.stdout, v.stderr);
    assert_eq!(
        mismatch_names(&v.stdout),
        BTreeSet::from([dropped.to_string()])
    );

    // And the other way round: the compressed checkpoint lacks a tensor of the original.
    let cfewer = tmp.path().join("cfewer");
    compress(&fewer, &cfewer);
    let v = uw!("verify", &orig, &cfewer, "--no-progress");
    assert_eq!(v.code, 1, "{}\n{}", v.stdout, v.stderr);
    assert_eq!(
        mismatch_names(&v.stdout),
        BTreeSet::from([dropped.to_string()])
    );
}

/// Tensor names on the `MISMATCH name: reason` lines of verify's output.
fn mismatch_names(stdout: &str) -> BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("MISMATCH "))
        .map(|l| l.split_once(':').map_or(l, |(n, _)| n).trim().to_string())
        .collect()
}

#[test]
fn tune_without_a_gpu_fails_saying_so() {
    // UNWEIGHT_FORCE_NO_GPU=1 makes the probe report no GPU even on a GPU machine.
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("UNWEIGHT_FORCE_NO_GPU", "1")
            .stdin(Stdio::null())
            .output()
            .expect("spawning the unweight binary")
    };
    let out = run(&["tune", "--shape", "tiny", "--budget-s", "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("unweight: error:") && stderr.contains("no usable GPU"),
        "{stderr}"
    );
    assert!(stderr.contains("UNWEIGHT_FORCE_NO_GPU"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Bad options are named before the device is looked at.
    let out = run(&["tune", "--shape", "tiny", "--batches", "1,3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("batch 3"), "{stderr}");
    let out = run(&["tune", "--shape", "tiny", "--budget-s", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--budget-s"), "{stderr}");
    // A model directory that is not there is never created.
    let tmp = tempdir();
    let missing = tmp.path().join("nope");
    let out = run(&["tune", &s(&missing)]);
    assert_ne!(out.status.code(), Some(0));
    assert!(!missing.exists());
}

// ---------------------------------------------------------------------------------------------
// --device cuda without a usable GPU.

/// Makes the CUDA probe report no GPU on every machine, so the tests below take the no-GPU path
/// on a GPU machine too (src/device/cuda/mod.rs, `FORCE_NO_GPU_ENV`).
const FORCE_NO_GPU: &str = "UNWEIGHT_FORCE_NO_GPU";

/// Runs the binary with `UNWEIGHT_FORCE_NO_GPU=1`.
fn run_without_gpu(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env(FORCE_NO_GPU, "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawning the unweight binary");
    Run {
        args: args.join(" "),
        code: out.status.code().expect("unweight was killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A word-level `tokenizer.json` with one word `t<i>` per id of the tiny preset's 1024-token
/// vocabulary, so `generate` can run on a synthetic checkpoint.
fn write_tiny_tokenizer(dir: &Path) {
    let vocab: Map<String, Value> = (0..1024u32)
        .map(|i| (format!("t{i}"), Value::from(i)))
        .collect();
    let doc = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    fs::write(dir.join("tokenizer.json"), doc.to_string()).unwrap();
}

#[test]
fn generate_on_cuda_without_a_gpu_falls_back_to_the_cpu_saying_why() {
    let tmp = tempdir();
    let model = tmp.path().join("m");
    synth(&model, "tiny", &[]);
    write_tiny_tokenizer(&model);
    let m = s(&model);
    let generate = |device: &str| {
        let run = run_without_gpu(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "t5 t7 t9 t11",
            "--max-tokens",
            "4",
            "--json",
            "--device",
            device,
        ])
        .ok();
        let v: Value = serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: stdout:\n{}", run.stdout));
        assert!(!v["output_tokens"].as_array().unwrap().is_empty(), "{v}");
        (v["output_tokens"].clone(), v["text"].clone(), run.stderr)
    };
    let (cpu_tokens, cpu_text, cpu_err) = generate("cpu");
    assert!(!cpu_err.contains("CUDA"), "{cpu_err}");
    let (tokens, text, err) = generate("cuda");
    // The reason is the probe's, stated once, on stderr (stdout stays the JSON document).
    assert!(
        err.contains(&format!(
            "unweight: CUDA is not usable ({FORCE_NO_GPU}=1); running on the CPU"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // And the CPU then computes exactly what --device cpu does.
    assert_eq!((tokens, text), (cpu_tokens, cpu_text));
}

#[test]
fn bench_decode_on_cuda_without_a_gpu_fails_saying_why() {
    // A CPU number under a CUDA label would be wrong: bench decode refuses to fall back.
    let tmp = tempdir();
    let model = tmp.path().join("m");
    synth(&model, "tiny", &[]);
    let out = tmp.path().join("decode.json");
    let (m, o) = (s(&model), s(&out));
    for source in [["--shape", "tiny"], ["--model", m.as_str()]] {
        let mut args = vec!["bench", "decode", "--device", "cuda"];
        args.extend(source);
        args.extend(["--batch", "1", "--tokens", "2", "--out", o.as_str()]);
        let run =
            run_without_gpu(&args).error_mentions(&["no usable GPU", &format!("{FORCE_NO_GPU}=1")]);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        assert!(!run.stderr.contains("running on the CPU"), "{}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert!(!out.exists(), "a failed run wrote {}", out.display());
    }
}

// ---------------------------------------------------------------------------------------------
// plan-memory.

/// The JSON a successful run printed.
fn json_of(r: Run) -> Value {
    let r = r.ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn plan_memory_of_a_checkpoint_counts_its_weights_and_kv_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let (orig, comp) = tiny_pair(tmp.path());
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(orig.join("config.json")).unwrap()).unwrap();
    let n = |k: &str| cfg[k].as_u64().unwrap();
    let kv_per_token = 2 * n("num_hidden_layers") * n("num_key_value_heads") * n("head_dim") * 2;
    let bf16_bytes = fs::metadata(orig.join(SINGLE)).unwrap().len();
    let plan = |dir: &Path| {
        json_of(uw!(
            "plan-memory",
            dir,
            "--gpu-mem-gib",
            "2",
            "--context",
            "1024",
            "--json"
        ))
    };
    let (p, c) = (plan(&orig), plan(&comp));
    // The same weights, plain or compressed on disk: the same plan.
    assert_eq!(p["bf16"], c["bf16"]);
    assert_eq!(p["compressed"], c["compressed"]);
    assert_eq!(p["kv_bytes_per_token"], kv_per_token);
    // BF16 weights: the safetensors payload (the file less its small header).
    let w = p["bf16"]["weights_bytes"].as_u64().unwrap();
    assert!(
        w <= bf16_bytes && bf16_bytes - w < 64 << 10,
        "{w} vs {bf16_bytes}"
    );
    for form in ["bf16", "compressed"] {
        let f = &p[form];
        let tokens = f["kv_tokens"].as_u64().unwrap();
        assert!(
            tokens * kv_per_token <= f["kv_bytes"].as_u64().unwrap(),
            "{form}"
        );
        assert_eq!(tokens % 16, 0, "{form}: whole blocks");
        assert_eq!(f["sequences"].as_u64().unwrap(), tokens / 1024, "{form}");
        assert_eq!(f["fits"], true, "{form}");
    }
    let cw = p["compressed"]["weights_bytes"].as_u64().unwrap();
    assert!(cw < w * 8 / 10, "compressed {cw} of {w}");
}

#[test]
fn plan_memory_of_llama_70b_on_one_gpu() {
    let plan = |gib: &str| {
        json_of(uw!(
            "plan-memory",
            "--shape",
            "llama-3.1-70b",
            "--gpu-mem-gib",
            gib,
            "--json"
        ))
    };
    let p = plan("139");
    // 70,553,706,496 parameters; 2 x 80 layers x 8 KV heads x 128 x 2 bytes per token.
    assert_eq!(p["bf16"]["weights_bytes"], 2 * 70_553_706_496u64);
    assert_eq!(p["kv_bytes_per_token"], 327_680);
    assert_eq!(p["context"], 8192);
    let (b, c) = (&p["bf16"], &p["compressed"]);
    let ratio = c["weights_bytes"].as_f64().unwrap() / b["weights_bytes"].as_f64().unwrap();
    assert!((0.65..0.75).contains(&ratio), "{ratio}");
    assert_eq!(b["fits"], true);
    let (sb, sc) = (
        b["sequences"].as_u64().unwrap(),
        c["sequences"].as_u64().unwrap(),
    );
    assert!(sc > 4 * sb, "compressed {sc} sequences, BF16 {sb}");
    // On 80 GiB neither form fits.
    let p = plan("80");
    assert_eq!(p["bf16"]["fits"], false);
    assert_eq!(p["compressed"]["fits"], false);
    assert_eq!(p["compressed"]["kv_tokens"], 0);
}

#[test]
fn plan_memory_refuses_bad_arguments() {
    uw!("plan-memory", "--shape", "tiny", "--gpu-mem-gib", "0").error_mentions(&["--gpu-mem-gib"]);
    uw!(
        "plan-memory",
        "--shape",
        "tiny",
        "--gpu-mem-gib",
        "8",
        "--context",
        "4096"
    )
    .error_mentions(&["--context", "2048"]);
    uw!(
        "plan-memory",
        "--shape",
        "tiny",
        "--gpu-mem-gib",
        "8",
        "--kv-fraction",
        "1.5"
    )
    .error_mentions(&["--kv-fraction"]);
    let tmp = tempfile::tempdir().unwrap();
    uw!("plan-memory", tmp.path(), "--gpu-mem-gib", "8").error_mentions(&["config.json"]);
}

#[test]
fn bench_load_streams_the_same_runtime_forms_as_the_whole_model_path() {
    let tmp = tempdir();
    let (_, comp) = tiny_pair(tmp.path());
    let out = tmp.path().join("load.json");
    for plan in ["compressed", "baseline"] {
        for path in ["whole", "streamed"] {
            uw!("bench", "load", &comp, "--path", path, "--plan", plan, "--out", &out).ok();
        }
    }
    let doc: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    assert!(
        doc["commit"].is_string() && doc["machine"].is_object(),
        "{doc}"
    );
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{doc}");
    // Both paths hand over the same pieces in the same forms (a mismatch in how either resolves
    // the plan shows here), and the compressed plan's forms are smaller than BF16.
    for pair in rows.chunks(2) {
        let (whole, streamed) = (&pair[0], &pair[1]);
        assert_eq!(whole["path"], "whole");
        assert_eq!(streamed["path"], "streamed");
        for k in [
            "pieces",
            "runtime_bytes",
            "largest_runtime_piece_bytes",
            "model_bf16_bytes",
        ] {
            assert_eq!(whole[k], streamed[k], "{k}: {doc}");
        }
        assert!(streamed["encode_seconds"].is_number() && whole["encode_seconds"].is_null());
    }
    let rt = |i: usize| rows[i]["runtime_bytes"].as_u64().unwrap();
    assert!(rt(0) < rt(2), "tbe3 {} vs BF16 {}", rt(0), rt(2));
}

#[test]
fn bench_load_persisted_computes_the_runtime_form_once_then_reads_it() {
    let tmp = tempdir();
    let (_, comp) = tiny_pair(tmp.path());
    let out = tmp.path().join("load.json");
    uw!("bench", "load", &comp, "--path", "streamed", "--out", &out).ok();
    uw!(
        "bench",
        "load",
        &comp,
        "--path",
        "persisted",
        "--fresh",
        "--out",
        &out
    )
    .ok();
    assert!(comp.join("runtime/tbe3.bin").is_file());
    uw!("bench", "load", &comp, "--path", "persisted", "--out", &out).ok();
    let doc: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    let rows = doc["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{doc}");
    let (computed, first, later) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(computed["runtime_form"], "computed");
    assert_eq!(first["runtime_form"], "computed and persisted");
    assert_eq!(later["runtime_form"], "read from the persisted copy");
    let n = |r: &Value, k: &str| r[k].as_u64().unwrap();
    // The first load encodes every linear layer (the file serves any plan), a later one none.
    assert!(n(first, "encoded_layers") >= n(computed, "encoded_layers"));
    assert!(n(computed, "encoded_layers") > 0);
    assert_eq!(n(later, "encoded_layers"), 0);
    assert_eq!(
        n(later, "persisted_layers_read"),
        n(first, "encoded_layers")
    );
    // The same pieces reach the upload either way.
    for k in ["pieces", "runtime_bytes", "largest_runtime_piece_bytes"] {
        assert_eq!(computed[k], later[k], "{k}: {doc}");
        assert_eq!(computed[k], first[k], "{k}: {doc}");
    }
    assert!(n(later, "persisted_file_bytes") > 0 && later["load_average_before"].is_number());
    // --fresh only goes with the persisted path.
    uw!("bench", "load", &comp, "--path", "streamed", "--fresh").error_mentions(&["--fresh"]);
}

/// A stand-in for the reference Python: run as `PY scripts/hf_prefill.py --model DIR --threads
/// N`, it speaks that script's protocol (a ready line, then one answer per request), logs every
/// request to `log`, and takes a fixed 0.25 s per prefill, so the bench's arithmetic and the
/// order of its requests can be checked without torch. `die_after` requests, it exits instead of
/// answering (0: right after its ready line).
fn fake_hf_python(dir: &Path, log: &Path, die_after: Option<usize>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let py = dir.join("fake-python");
    let die = die_after.map_or(String::new(), |n| {
        format!("[ \"$n\" -ge {n} ] && {{ echo 'Traceback: model on fire' >&2; exit 3; }}\n  ")
    });
    let script = format!(
        "#!/bin/sh\n\
         case \"$1\" in */scripts/hf_prefill.py) ;; *) echo \"unexpected script $1\" >&2; exit 9;; esac\n\
         echo '{{\"ready\": true, \"torch_version\": \"fake\", \"transformers_version\": \"fake\", \"threads\": 2}}'\n\
         n=0\n\
         while read -r dtype len; do\n  {die}echo \"$dtype $len\" >> '{}'\n  n=$((n + 1))\n  echo '{{\"seconds\": 0.25}}'\n\
         done\n",
        log.display()
    );
    fs::write(&py, script).unwrap();
    fs::set_permissions(&py, fs::Permissions::from_mode(0o755)).unwrap();
    py
}

/// `bench decode` on the CPU of `orig` and its compressed `comp`, one short decode and the
/// prefill of `lengths`, transformers' side played by `py`; `extra` arguments appended.
fn bench_prefill(orig: &Path, comp: &Path, lengths: &str, py: &Path, extra: &[&OsStr]) -> Run {
    let fixed = [
        "bench",
        "decode",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--tokens",
        "2",
        "--prefill",
    ];
    let mut args: Vec<&OsStr> = fixed.iter().map(OsStr::new).collect();
    args.push(OsStr::new(lengths));
    args.extend([
        OsStr::new("--model"),
        orig.as_os_str(),
        OsStr::new("--compressed"),
        comp.as_os_str(),
        OsStr::new("--hf-python"),
        py.as_os_str(),
    ]);
    args.extend(extra);
    run_unweight(&args)
}

#[test]
fn bench_prefill_alternates_its_runs_with_transformers_and_reports_both() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    let log = tmp.path().join("requests.log");
    let py = fake_hf_python(tmp.path(), &log, None);
    let out = tmp.path().join("decode.json");
    bench_prefill(
        &orig,
        &comp,
        "8,24",
        &py,
        &["--out".as_ref(), out.as_os_str()],
    )
    .ok();
    // Five repeats; in each, both lengths in order, each with f32 then BF16 after ours.
    let requests: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let one_repeat = ["float32 8", "bfloat16 8", "float32 24", "bfloat16 24"];
    let expected: Vec<String> = (0..5)
        .flat_map(|_| one_repeat.iter().map(|s| s.to_string()))
        .collect();
    assert_eq!(requests, expected);
    let doc: Value = serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    let hf = &doc["hf_transformers_prefill"];
    for dtype in ["float32", "bfloat16"] {
        // 0.25 s per prefill: 8 and 24 tokens give 32 and 96 tokens/s.
        assert_eq!(hf[dtype]["8"].as_f64(), Some(32.0), "{hf}");
        assert_eq!(hf[dtype]["24"].as_f64(), Some(96.0), "{hf}");
    }
    assert_eq!(hf["repeats"], 5);
    assert_eq!(hf["torch_version"], "fake");
    assert!(hf.get("ready").is_none(), "{hf}");
    // Ours: three weight forms per length, each timed as often.
    let ours = doc["prefill"].as_array().unwrap();
    assert_eq!(ours.len(), 6, "{ours:?}");
    for row in ours {
        assert_eq!(row["repeats"], 5, "{row}");
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn bench_prefill_names_a_reference_python_that_dies_and_its_stderr() {
    let tmp = tempdir();
    let (orig, comp) = tiny_pair(tmp.path());
    for die_after in [0, 3] {
        let log = tmp.path().join(format!("requests-{die_after}.log"));
        let py = fake_hf_python(tmp.path(), &log, Some(die_after));
        let r = bench_prefill(&orig, &comp, "8", &py, &[]);
        // The bench's progress lines come first on stderr; the error is the last thing said.
        assert_eq!(r.code, 2, "{}", r.stderr);
        let error = &r.stderr[r.stderr.find("unweight: error:").expect(&r.stderr)..];
        for needle in [
            "scripts/hf_prefill.py: it exited",
            "Traceback: model on fire",
        ] {
            assert!(error.contains(needle), "no `{needle}` in:\n{error}");
        }
    }
}
