//! Files written in format version 1 keep reading, verifying and decompressing byte for byte.
//!
//! `tests/fixtures/v1-small/` is a small checkpoint compressed by the version-1 writer (commit
//! f7d92c9, `compress_dir` with 1 Ki-element chunks so that its matrix spans several chunks). Its
//! original tensors are not stored anywhere: [`original_tensors`] regenerates them here from fixed
//! seeds, and the tests compare the decoded bytes with that, never with an earlier output of the
//! decoder.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use safetensors::{Dtype, SafeTensors};

use triton_unweight::container::Checkpoint;

/// BF16 of an f32, rounded to nearest even (NaN kept quiet), as the crate's synthetic weights do.
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn le(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The fixture's original tensors, in name order: (name, dtype, shape, little-endian bytes).
fn original_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5eed_0001);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    // A weight matrix: N(0, 0.02) with a few outliers and special values, 3 chunks of 1 Ki.
    let mut w: Vec<u16> = (0..48 * 64)
        .map(|_| bf16(normal.sample(&mut rng)))
        .collect();
    let specials = [
        0x7fc1u16, 0xff80, 0x7f80, 0x8000, 0x0001, 0x807f, 0x3f80, 0xc2f7,
    ];
    for (k, &s) in specials.iter().enumerate() {
        w[k * 377 + 5] = s;
    }
    // A vector (stored raw) and an F32 tensor (stored raw).
    let norm: Vec<u16> = (0..64).map(|i| bf16(1.0 + i as f32 / 64.0)).collect();
    let f32s: Vec<u8> = (0..16)
        .flat_map(|_| rng.gen::<f32>().to_le_bytes())
        .collect();
    vec![
        ("model.norm.weight", Dtype::BF16, vec![64], le(&norm)),
        ("model.proj.weight", Dtype::BF16, vec![48, 64], le(&w)),
        ("model.scale", Dtype::F32, vec![16], f32s),
    ]
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-small")
}

#[test]
fn a_version_1_file_loads_and_verifies_against_the_regenerated_originals() {
    let ck = Checkpoint::open(&fixture()).unwrap();
    assert!(ck.is_compressed());
    let meta = ck.files()[0].unweight().expect("unweight metadata");
    assert_eq!(meta.version, 1, "the fixture must stay a version-1 file");
    for (name, _, _, bytes) in original_tensors() {
        let got = ck.load(name).unwrap();
        assert_eq!(&got[..], &bytes[..], "{name}");
    }
    let proj = ck.entry("model.proj.weight").unwrap();
    assert_eq!(
        proj.meta.as_ref().unwrap().encoding.as_str(),
        "exp-rans",
        "the matrix is rANS-coded"
    );
}

#[test]
fn a_version_1_file_decompresses_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plain");
    triton_unweight::container::decompress_dir(&fixture(), &out, false, false).unwrap();
    let data = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let want = original_tensors();
    assert_eq!(st.len(), want.len());
    for (name, dtype, shape, bytes) in want {
        let t = st.tensor(name).unwrap();
        assert_eq!((t.dtype(), t.shape()), (dtype, &shape[..]), "{name}");
        assert_eq!(t.data(), &bytes[..], "{name}");
    }
}

/// Writes the regenerated originals as a plain checkpoint in `dir`.
fn write_originals(dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    let tensors = original_tensors();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), "{\"fixture\": \"v1-small\"}\n").unwrap();
}

#[test]
fn a_version_1_file_verifies_and_inspects_with_both_floors() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    write_originals(&plain);
    let report = triton_unweight::container::verify_dirs(&plain, &fixture(), false).unwrap();
    assert!(report.ok(), "{report:?}");
    let r = triton_unweight::container::inspect_dir(&fixture()).unwrap();
    let proj = r
        .tensors
        .iter()
        .find(|t| t.name == "model.proj.weight")
        .unwrap();
    // Version 1 records no whole-value entropy: inspect measures it from the decoded values.
    let (_, _, _, bytes) = original_tensors().remove(1);
    let mut counts = vec![0u64; 1 << 16];
    for p in bytes.chunks_exact(2) {
        counts[u16::from_le_bytes([p[0], p[1]]) as usize] += 1;
    }
    let n = (bytes.len() / 2) as f64;
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
        .sum();
    assert!((proj.value_entropy_bits.unwrap() - h).abs() < 1e-9);
    assert!((proj.value_floor_bytes.unwrap() - n * h / 8.0).abs() < 1e-6);
}

#[test]
fn a_damaged_version_1_file_is_an_error_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), bad.join(f)).unwrap();
    }
    let file = bad.join("model.safetensors");
    let mut data = std::fs::read(&file).unwrap();
    let last = data.len() - 1; // the last byte of the data: the matrix's code table
    data[last] ^= 0x04;
    std::fs::write(&file, data).unwrap();
    let ck = Checkpoint::open(&bad).unwrap();
    let err = ck.load("model.proj.weight").unwrap_err().to_string();
    assert!(
        err.contains("model.proj.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

/// Writes the fixture's input checkpoint and compresses it with this build's writer. Run once, by
/// hand, with the version-1 writer (`cargo test --test format_v1 -- --ignored`); kept only as the
/// record of how the fixture was made.
#[test]
#[ignore]
fn write_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_originals(&input);
    let mut opts = triton_unweight::container::CompressOptions::default();
    opts.params.chunk_elems = 1024;
    opts.progress = false;
    let _ = std::fs::remove_dir_all(fixture());
    triton_unweight::container::compress_dir(&input, &fixture(), &opts).unwrap();
}
