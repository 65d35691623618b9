//! Tests of the GGUF reader and of `fetch-test-model`'s conversion to a Hugging Face checkpoint.
//!
//! Files are built here by a small GGUF writer written independently of the crate's reader (the
//! layout of the GGUF specification), and every expected value is derived here: dequantized
//! values by hand, the q/k row order by llama.cpp's own `permute` formula, names and shapes
//! from the Hugging Face Llama layout.
//!
//! The last group runs on the real SmolLM2 checkpoint that `unweight fetch-test-model --out
//! .cache/smollm2` writes (`make test` fetches it first). Without it those tests print
//! "skipped: test model not fetched" and pass, unless UNWEIGHT_REQUIRE_TEST_MODEL=1 (set by
//! `make test`) makes its absence a failure.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use triton_unweight::gguf::{Array, GgmlType, GgufError, GgufFile, Value as GValue};
use triton_unweight::model::fetch::{self, convert_gguf, Source};
use triton_unweight::model::synth::f32_to_bf16;

const BIN: &str = env!("CARGO_BIN_EXE_unweight");

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer (v3, little-endian).

/// A metadata value to write.
#[derive(Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements.
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    fn put(&self, b: &mut Vec<u8>) {
        match self {
            V::U8(v) => b.push(*v),
            V::I8(v) => b.push(*v as u8),
            V::U16(v) => b.extend(v.to_le_bytes()),
            V::I16(v) => b.extend(v.to_le_bytes()),
            V::U32(v) => b.extend(v.to_le_bytes()),
            V::I32(v) => b.extend(v.to_le_bytes()),
            V::F32(v) => b.extend(v.to_le_bytes()),
            V::Bool(v) => b.push(*v as u8),
            V::Str(s) => put_str(b, s),
            V::Arr(ty, items) => {
                b.extend(ty.to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.put(b);
                }
            }
            V::U64(v) => b.extend(v.to_le_bytes()),
            V::I64(v) => b.extend(v.to_le_bytes()),
            V::F64(v) => b.extend(v.to_le_bytes()),
        }
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn strs(items: &[&str]) -> V {
    V::Arr(8, items.iter().map(|s| V::Str(s.to_string())).collect())
}

/// A tensor to write: name, ggml dims (fastest first), type id, data bytes.
struct T {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn t(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> T {
    T {
        name: name.to_string(),
        dims: dims.to_vec(),
        ty,
        data,
    }
}

fn align(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

/// A complete GGUF v3 file. `alignment` must match any `general.alignment` among `kvs`.
fn build(kvs: &[(&str, V)], tensors: &[T], alignment: usize) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut b, k);
        b.extend(v.type_id().to_le_bytes());
        v.put(&mut b);
    }
    let mut offsets = Vec::new();
    let mut off = 0;
    for x in tensors {
        off = align(off, alignment);
        offsets.push(off);
        off += x.data.len();
    }
    for (x, off) in tensors.iter().zip(&offsets) {
        put_str(&mut b, &x.name);
        b.extend((x.dims.len() as u32).to_le_bytes());
        for d in &x.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(x.ty.to_le_bytes());
        b.extend((*off as u64).to_le_bytes());
    }
    let start = align(b.len(), alignment);
    b.resize(start, 0);
    for (x, off) in tensors.iter().zip(&offsets) {
        b.resize(start + off, 0);
        b.extend(&x.data);
    }
    b
}

fn read(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes("test.gguf", bytes)
}

fn err(bytes: Vec<u8>) -> String {
    match read(bytes) {
        Ok(_) => panic!("a corrupt file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// Hand-built blocks, values derived by hand.

/// Q8_0, one block: d = 0.5 (f16 0x3800), quants -16..=15.
fn q8_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = vec![0x00, 0x38];
    b.extend((-16i8..16).map(|q| q as u8));
    (b, (-16..16).map(|q| q as f32 * 0.5).collect())
}

/// Q4_0, one block: d = 2.0 (f16 0x4000); byte j = low nibble j, high nibble 15 - j.
fn q4_0_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = vec![0x00, 0x40];
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Elements 0..16 are the low nibbles 0..15, 16..32 the high nibbles 15..0; x = (q - 8) * 2.
    let want = (0..16)
        .chain((0..16).rev())
        .map(|q| (q as f32 - 8.0) * 2.0)
        .collect();
    (b, want)
}

/// Q4_1, one block: d = 0.25 (0x3400), m = -1.0 (0xbc00); byte j = low j, high (j + 3) & 15.
fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = vec![0x00, 0x34, 0x00, 0xbc];
    b.extend((0..16u8).map(|j| j | (((j + 3) & 15) << 4)));
    let want = (0..16)
        .chain((0..16).map(|j| (j + 3) & 15))
        .map(|q| q as f32 * 0.25 - 1.0)
        .collect();
    (b, want)
}

#[test]
fn hand_built_file_reads_back_with_every_value_type() {
    let (q8, q8_want) = q8_block();
    let (q40, q40_want) = q4_0_block();
    let (q41, q41_want) = q4_1_block();
    let mut q41x2 = q41.clone();
    q41x2.extend(&q41);
    let kvs = vec![
        ("general.architecture", V::Str("llama".into())),
        ("general.alignment", V::U32(64)),
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-100)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-30000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.f32", V::F32(1e-5)),
        ("t.bool", V::Bool(true)),
        ("t.str", V::Str("héllo\nworld".into())),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(-0.125)),
        ("t.strings", strs(&["<|im_start|>", "Ġt", "", "東京"])),
        ("t.i32s", V::Arr(5, vec![V::I32(3), V::I32(-1)])),
        ("t.bools", V::Arr(7, vec![V::Bool(false), V::Bool(true)])),
        (
            "t.nested",
            V::Arr(9, vec![V::Arr(0, vec![V::U8(1), V::U8(2)]), strs(&["a"])]),
        ),
        ("t.empty", V::Arr(8, vec![])),
    ];
    let tensors = vec![
        t("f32", &[2, 2], 0, f32_bytes(&[1.5, -2.0, 0.25, 3.0])),
        t("f16", &[2], 1, vec![0x00, 0x3c, 0x00, 0xc0]),
        t("bf16", &[2], 30, vec![0x80, 0x3f, 0xa0, 0xc0]),
        t("q8_0", &[32], 8, q8),
        t("q4_0", &[32, 1], 2, q40),
        t("q4_1", &[32, 2], 3, q41x2),
    ];
    let g = read(build(&kvs, &tensors, 64)).unwrap();

    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_start() % 64, 0);
    let keys: Vec<&str> = g.metadata().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        kvs.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        "metadata in file order"
    );
    assert_eq!(g.get("t.u8"), Some(&GValue::U8(200)));
    assert_eq!(g.get("t.i8"), Some(&GValue::I8(-100)));
    assert_eq!(g.get("t.u16"), Some(&GValue::U16(60000)));
    assert_eq!(g.get("t.i16"), Some(&GValue::I16(-30000)));
    assert_eq!(g.require_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get("t.i32"), Some(&GValue::I32(-2_000_000_000)));
    assert_eq!(g.get("t.f32"), Some(&GValue::F32(1e-5)));
    assert_eq!(g.get("t.bool"), Some(&GValue::Bool(true)));
    assert_eq!(g.require_str("t.str").unwrap(), "héllo\nworld");
    assert_eq!(g.require_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(g.get("t.i64"), Some(&GValue::I64(i64::MIN)));
    assert_eq!(g.require_f64("t.f64").unwrap(), -0.125);
    let s = g.require_array("t.strings").unwrap().as_strings().unwrap();
    assert_eq!(s, ["<|im_start|>", "Ġt", "", "東京"]);
    assert_eq!(g.require_array("t.i32s").unwrap(), &Array::I32(vec![3, -1]));
    assert_eq!(
        g.require_array("t.bools").unwrap(),
        &Array::Bool(vec![false, true])
    );
    assert_eq!(
        g.require_array("t.nested").unwrap(),
        &Array::Array(vec![Array::U8(vec![1, 2]), Array::String(vec!["a".into()])])
    );
    assert!(g.require_array("t.empty").unwrap().is_empty());
    // Typed access errors name the key.
    let e = g.require_str("t.u8").unwrap_err().to_string();
    assert!(
        e.contains("test.gguf") && e.contains("`t.u8`") && e.contains("expected a string"),
        "{e}"
    );
    let e = g.require("nope").unwrap_err().to_string();
    assert!(e.contains("`nope`") && e.contains("missing"), "{e}");

    let info = g.tensor("q4_1").unwrap();
    assert_eq!(info.dims, [32, 2]);
    assert_eq!(info.row_major_shape(), [2, 32]);
    assert_eq!(info.ggml_type, GgmlType::Q4_1);
    assert_eq!(info.elements, 64);
    assert_eq!(info.byte_len, Some(40));
    for x in g.tensors() {
        assert_eq!(x.offset % 64, 0, "{} aligned", x.name);
    }
    assert_eq!(g.dequantize("f32").unwrap(), [1.5, -2.0, 0.25, 3.0]);
    assert_eq!(g.dequantize("f16").unwrap(), [1.0, -2.0]);
    assert_eq!(g.dequantize("bf16").unwrap(), [1.0, -5.0]);
    assert_eq!(g.dequantize("q8_0").unwrap(), q8_want);
    assert_eq!(g.dequantize("q4_0").unwrap(), q40_want);
    let mut want = q41_want.clone();
    want.extend(&q41_want);
    assert_eq!(g.dequantize("q4_1").unwrap(), want);
    // Spot values of the Q4_1 block, by hand: element 0 = 0 * 0.25 - 1, element 16 = the high
    // nibble of byte 0 = 3 -> -0.25, element 31 = high nibble of byte 15 = 18 & 15 = 2 -> -0.5.
    assert_eq!((want[0], want[16], want[31]), (-1.0, -0.25, -0.5));
    let e = g.dequantize("missing").unwrap_err().to_string();
    assert!(e.contains("tensor `missing`"), "{e}");
}

#[test]
fn default_alignment_is_32_and_files_are_read_from_disk() {
    let tensors = vec![
        t("a", &[3], 0, f32_bytes(&[1.0, 2.0, 3.0])),
        t("b", &[1], 0, f32_bytes(&[4.0])),
    ];
    let bytes = build(&[("k", V::U8(1))], &tensors, 32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    fs::write(&path, &bytes).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.tensor("b").unwrap().offset, 32);
    assert_eq!(g.dequantize("b").unwrap(), [4.0]);
    // An empty file is an error, not a failed mmap.
    let empty = dir.path().join("empty.gguf");
    fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).err().unwrap().to_string();
    assert!(e.contains("empty.gguf") && e.contains("truncated"), "{e}");
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let (q41, _) = q4_1_block();
    let bytes = build(
        &[
            ("general.name", V::Str("x".into())),
            ("list", strs(&["a", "bc"])),
        ],
        &[
            t("w", &[32], 3, q41),
            t("n", &[2], 0, f32_bytes(&[1.0, 2.0])),
        ],
        32,
    );
    assert!(read(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let e = err(bytes[..len].to_vec());
        assert!(
            e.starts_with("test.gguf: not a valid GGUF file:"),
            "prefix {len}: {e}"
        );
        assert!(e.contains("truncated"), "prefix {len}: {e}");
    }
}

/// A header with the given counts, then `rest`.
fn header(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(rest);
    b
}

#[test]
fn corrupt_headers_are_clear_errors_without_huge_allocations() {
    // Magic and versions.
    assert!(err(b"GGML\x03\0\0\0".to_vec()).contains("bad magic"));
    let mut v1 = header(0, 0, &[]);
    v1[4] = 1;
    assert!(err(v1).contains("version 1 is not supported"));
    let mut v9 = header(0, 0, &[]);
    v9[4] = 9;
    assert!(err(v9).contains("version 9 is not supported"));
    let mut be = header(0, 0, &[]);
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err(be).contains("big-endian"));
    // Counts far beyond the file: refused before any allocation.
    assert!(err(header(0, u64::MAX, &[])).contains("metadata entries declared"));
    assert!(err(header(1 << 40, 0, &[0; 64])).contains("tensor infos declared"));
    // A string length beyond the file.
    let mut kv = Vec::new();
    kv.extend(u64::MAX.to_le_bytes());
    kv.extend([0; 16]);
    let e = err(header(0, 1, &kv));
    assert!(e.contains("truncated") && e.contains("string"), "{e}");
    // An array count beyond the file.
    let mut kv = Vec::new();
    put_str(&mut kv, "a");
    kv.extend(9u32.to_le_bytes());
    kv.extend(8u32.to_le_bytes());
    kv.extend((1u64 << 60).to_le_bytes());
    assert!(err(header(0, 1, &kv)).contains("array elements declared"));
    // Unknown value type, unknown array element type, bad bool, non-UTF-8 string.
    let one = |key: &str, ty: u32, payload: &[u8]| {
        let mut kv = Vec::new();
        put_str(&mut kv, key);
        kv.extend(ty.to_le_bytes());
        kv.extend(payload);
        header(0, 1, &kv)
    };
    assert!(err(one("k", 13, &[0; 8])).contains("unknown value type 13"));
    let mut arr = 42u32.to_le_bytes().to_vec();
    arr.extend(1u64.to_le_bytes());
    assert!(err(one("k", 9, &arr)).contains("unknown array element type 42"));
    assert!(err(one("k", 7, &[2])).contains("not 0 or 1"));
    let mut bad = 2u64.to_le_bytes().to_vec();
    bad.extend([0xff, 0xfe]);
    assert!(err(one("k", 8, &bad)).contains("not UTF-8"));
    // Arrays nested deeper than the limit.
    let mut deep = V::Arr(0, vec![]);
    for _ in 0..20 {
        deep = V::Arr(9, vec![deep]);
    }
    assert!(err(build(&[("deep", deep)], &[], 32)).contains("nested deeper"));
    // Duplicate keys, bad alignment.
    assert!(err(build(&[("k", V::U8(1)), ("k", V::U8(2))], &[], 32)).contains("appears twice"));
    assert!(err(build(&[("general.alignment", V::U32(48))], &[], 32)).contains("power of two"));
    assert!(err(build(&[("general.alignment", V::U32(0))], &[], 32)).contains("power of two"));
}

#[test]
fn corrupt_tensor_infos_are_clear_errors() {
    let f = |tensors: &[T]| err(build(&[], tensors, 32));
    let e = f(&[t("w", &[1, 1, 1, 1, 1], 0, vec![0; 4])]);
    assert!(e.contains("`w` has 5 dimensions"), "{e}");
    let e = f(&[t("w", &[u64::MAX, 4], 0, vec![])]);
    assert!(e.contains("overflow"), "{e}");
    let e = f(&[t("w", &[20], 3, vec![0; 20])]);
    assert!(e.contains("not a whole number of Q4_1 blocks"), "{e}");
    let e = f(&[t("a", &[1], 0, vec![0; 4]), t("a", &[1], 0, vec![0; 4])]);
    assert!(e.contains("`a` appears twice"), "{e}");
    // Data past the end: a tensor whose dims promise more than the file holds.
    let e = f(&[t("w", &[1024], 0, vec![0; 16])]);
    assert!(e.contains("`w`") && e.contains("past the end"), "{e}");
    // Unaligned and overlapping offsets (patched into a well-formed file).
    let good = build(
        &[],
        &[t("a", &[8], 0, vec![0; 32]), t("b", &[8], 0, vec![0; 32])],
        32,
    );
    // b's info: name, 1 dimension of 8, type F32, offset 32; find its offset field.
    let mut info_b = Vec::new();
    put_str(&mut info_b, "b");
    info_b.extend(1u32.to_le_bytes());
    info_b.extend(8u64.to_le_bytes());
    info_b.extend(0u32.to_le_bytes());
    info_b.extend(32u64.to_le_bytes());
    let at = good
        .windows(info_b.len())
        .position(|w| w == info_b)
        .unwrap();
    let off_b = at + info_b.len() - 8;
    let mut unaligned = good.clone();
    unaligned[off_b] = 4;
    assert!(err(unaligned).contains("not a multiple of the alignment 32"));
    let mut overlap = good.clone();
    overlap[off_b] = 0;
    assert!(err(overlap).contains("overlap"));
    // An unknown tensor type is listed but cannot be read.
    let g = read(build(&[], &[t("x", &[4], 99, vec![0; 4])], 32)).unwrap();
    assert_eq!(g.tensor("x").unwrap().byte_len, None);
    let e = g.dequantize("x").unwrap_err().to_string();
    assert!(e.contains("tensor `x`") && e.contains("type 99"), "{e}");
    // A known type the dequantizer does not decode.
    let g = read(build(&[], &[t("k", &[256], 12, vec![0; 144])], 32)).unwrap();
    let e = g.dequantize("k").unwrap_err().to_string();
    assert!(
        e.contains("tensor `k`") && e.contains("Q4_K is not supported"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Conversion of a tiny llama GGUF.

/// GPT-2's byte-to-unicode alphabet, in the order of GPT-2's vocabulary.
fn byte_alphabet() -> Vec<String> {
    let mut printable: Vec<u32> = (0x21..=0x7e)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    chars
        .into_iter()
        .map(|c| char::from_u32(c).unwrap().to_string())
        .collect()
}

/// A deterministic pseudo-random f32 in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;

/// (f16 bits, value) pairs for Q4_1 scales and minimums.
const D: [(u16, f32); 3] = [(0x2c00, 0.0625), (0x3000, 0.125), (0x2800, 0.03125)];
const M: [(u16, f32); 3] = [(0xb000, -0.125), (0xb400, -0.25), (0xac00, -0.0625)];

/// Random Q4_1 data for `n` elements and its values (q * d + m).
fn q4_1_random(rng: &mut Lcg, n: usize) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for blk in 0..n / 32 {
        let (dh, d) = D[blk % 3];
        let (mh, m) = M[(blk / 3) % 3];
        bytes.extend(dh.to_le_bytes());
        bytes.extend(mh.to_le_bytes());
        let qs: Vec<u8> = (0..16)
            .map(|_| ((rng.next() + 1.0) * 128.0) as u8)
            .collect();
        bytes.extend(&qs);
        vals.extend(qs.iter().map(|q| (q & 15) as f32 * d + m));
        vals.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
    }
    (bytes, vals)
}

/// llama.cpp's `permute` of HF rows into GGUF rows (reshape (heads, 2, hd/2), swap axes 1, 2).
fn llama_cpp_permute(hf: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = hf.len() / cols;
    let hd = rows / heads;
    let mut out = vec![0.0; hf.len()];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..hd / 2 {
                let dst = h * hd + 2 * b + a;
                let src = h * hd + a * hd / 2 + b;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

struct Tiny {
    gguf: Vec<u8>,
    /// HF name -> (shape, f32 values in HF layout).
    want: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    template: String,
}

fn tiny_llama(extra_tensor: bool) -> Tiny {
    let mut rng = Lcg(7);
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_alphabet());
    let merges = ["H e", "l l", "He ll", "Hell o", "Ġ w"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let vocab = tokens.len();
    let types: Vec<V> = (0..vocab)
        .map(|i| V::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let template = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}";
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let kvs = vec![
        ("general.architecture", V::Str("llama".into())),
        ("general.name", V::Str("tiny".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-6)),
        ("llama.rope.dimension_count", V::U32(HEAD_DIM as u32)),
        ("llama.vocab_size", V::U32(vocab as u32)),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str("smollm".into())),
        ("tokenizer.ggml.tokens", strs(&token_refs)),
        ("tokenizer.ggml.token_type", V::Arr(5, types)),
        ("tokenizer.ggml.merges", strs(&merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.padding_token_id", V::U32(2)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ("tokenizer.chat_template", V::Str(template.into())),
    ];
    let mut tensors = Vec::new();
    let mut want = BTreeMap::new();
    // Embedding: Q8_0 with d = 0.5 and quants from the rng; HF shape [vocab, hidden].
    let mut emb = Vec::new();
    let mut emb_vals = Vec::new();
    for _ in 0..vocab * HIDDEN / 32 {
        emb.extend([0x00, 0x38]);
        for _ in 0..32 {
            let q = (rng.next() * 127.0) as i8;
            emb.push(q as u8);
            emb_vals.push(q as f32 * 0.5);
        }
    }
    tensors.push(t(
        "token_embd.weight",
        &[HIDDEN as u64, vocab as u64],
        8,
        emb,
    ));
    want.insert(
        "model.embed_tokens.weight".to_string(),
        (vec![vocab, HIDDEN], emb_vals),
    );
    for l in 0..LAYERS {
        let mut f32_tensor =
            |g: &str, hf: &str, rows: usize, cols: usize, permute_heads: Option<usize>| {
                let hf_vals: Vec<f32> = (0..rows * cols).map(|_| rng.next()).collect();
                let stored = match permute_heads {
                    Some(h) => llama_cpp_permute(&hf_vals, h, cols),
                    None => hf_vals.clone(),
                };
                let dims: Vec<u64> = if rows == 1 {
                    vec![cols as u64]
                } else {
                    vec![cols as u64, rows as u64]
                };
                tensors.push(t(&format!("blk.{l}.{g}"), &dims, 0, f32_bytes(&stored)));
                let shape = if rows == 1 {
                    vec![cols]
                } else {
                    vec![rows, cols]
                };
                want.insert(format!("model.layers.{l}.{hf}"), (shape, hf_vals));
            };
        f32_tensor(
            "attn_norm.weight",
            "input_layernorm.weight",
            1,
            HIDDEN,
            None,
        );
        f32_tensor(
            "attn_q.weight",
            "self_attn.q_proj.weight",
            HEADS * HEAD_DIM,
            HIDDEN,
            Some(HEADS),
        );
        f32_tensor(
            "attn_k.weight",
            "self_attn.k_proj.weight",
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            Some(KV_HEADS),
        );
        f32_tensor(
            "attn_v.weight",
            "self_attn.v_proj.weight",
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            None,
        );
        f32_tensor(
            "attn_output.weight",
            "self_attn.o_proj.weight",
            HIDDEN,
            HEADS * HEAD_DIM,
            None,
        );
        f32_tensor(
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            1,
            HIDDEN,
            None,
        );
        for (g, hf, rows, cols) in [
            ("ffn_gate.weight", "mlp.gate_proj.weight", FFN, HIDDEN),
            ("ffn_up.weight", "mlp.up_proj.weight", FFN, HIDDEN),
            ("ffn_down.weight", "mlp.down_proj.weight", HIDDEN, FFN),
        ] {
            let (bytes, vals) = q4_1_random(&mut rng, rows * cols);
            tensors.push(t(
                &format!("blk.{l}.{g}"),
                &[cols as u64, rows as u64],
                3,
                bytes,
            ));
            want.insert(format!("model.layers.{l}.{hf}"), (vec![rows, cols], vals));
        }
    }
    let norm: Vec<f32> = (0..HIDDEN).map(|i| 1.0 + i as f32 / 8.0).collect();
    tensors.push(t(
        "output_norm.weight",
        &[HIDDEN as u64],
        0,
        f32_bytes(&norm),
    ));
    want.insert("model.norm.weight".to_string(), (vec![HIDDEN], norm));
    if extra_tensor {
        tensors.push(t("rope_freqs.weight", &[4], 0, f32_bytes(&[1.0; 4])));
    }
    Tiny {
        gguf: build(&kvs, &tensors, 32),
        want,
        template: template.to_string(),
    }
}

fn test_source() -> Source {
    Source {
        name: "tiny".into(),
        description: "a test file".into(),
        sha256: "0".repeat(64),
        model: "tiny test model".into(),
        license: "apache-2.0".into(),
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn tiny_llama_converts_to_hf_names_shapes_and_row_order() {
    let tiny = tiny_llama(false);
    let g = read(tiny.gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let report = convert_gguf(&g, &out, &test_source(), false).unwrap();
    assert_eq!(report.tensors.len(), 2 + 9 * LAYERS);
    for f in fetch::OUTPUT_FILES {
        assert!(out.join(f).is_file(), "{f} written");
    }

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        tiny.want.keys().cloned().collect::<Vec<_>>(),
        "exactly the HF tensors, no lm_head"
    );
    for (name, (shape, vals)) in &tiny.want {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::BF16, "{name}");
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        let got: Vec<u16> = view
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let want: Vec<u16> = vals.iter().map(|&v| f32_to_bf16(v)).collect();
        assert!(
            got == want,
            "{name}: values differ from the HF-layout originals rounded to BF16"
        );
    }

    let config = read_json(&out.join("config.json"));
    let expect = [
        ("hidden_size", 32.0),
        ("intermediate_size", 64.0),
        ("num_hidden_layers", 2.0),
        ("num_attention_heads", 4.0),
        ("num_key_value_heads", 2.0),
        ("head_dim", 8.0),
        ("vocab_size", 264.0),
        ("max_position_embeddings", 64.0),
        ("rope_theta", 10000.0),
        ("rms_norm_eps", 1e-6),
        ("bos_token_id", 1.0),
        ("eos_token_id", 2.0),
        ("pad_token_id", 2.0),
    ];
    for (k, v) in expect {
        assert_eq!(config[k].as_f64(), Some(v), "config.json {k}");
    }
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["torch_dtype"], "bfloat16");
    let gen = read_json(&out.join("generation_config.json"));
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );

    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(
        tc["chat_template"].as_str(),
        Some(tiny.template.as_str()),
        "template copied verbatim"
    );
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);

    let tk = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "Hello, world! 12345";
    let enc = tk.encode(text, false).unwrap();
    assert_eq!(enc.get_tokens()[0], "Hello", "merges applied");
    assert_eq!(
        &enc.get_tokens()[enc.len() - 5..],
        ["1", "2", "3", "4", "5"],
        "digits one per token"
    );
    assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), text);
    assert_eq!(
        tk.encode("<|im_start|>user", false).unwrap().get_ids()[0],
        1
    );

    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("These are not the original weights") && card.contains("license: apache-2.0")
    );

    // A second conversion into the same place needs `replace`.
    let e = convert_gguf(&g, &out, &test_source(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn tensors_without_a_hf_counterpart_are_refused() {
    let g = read(tiny_llama(true).gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = convert_gguf(&g, &dir.path().join("hf"), &test_source(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test.gguf") && e.contains("rope_freqs.weight"),
        "{e}"
    );
    assert!(!dir.path().join("hf").exists(), "nothing left behind");
}

#[test]
fn fetch_refuses_an_occupied_output_before_downloading() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("occupied");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("mine.txt"), "keep").unwrap();
    let cache = dir.path().join("cache");
    let r = Command::new(BIN)
        .args(["fetch-test-model", "--out"])
        .arg(&out)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("unweight: error:") && stderr.contains("not empty"),
        "{stderr}"
    );
    assert!(!cache.exists(), "no download was started");
    assert_eq!(fs::read_to_string(out.join("mine.txt")).unwrap(), "keep");
}

// ---------------------------------------------------------------------------------------------
// The real test model (SmolLM2-135M-Instruct), when fetched.

/// The fetched checkpoint and its GGUF, or `None` (after saying so loudly) when not fetched.
fn real_model() -> Option<(PathBuf, PathBuf)> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache");
    let dir = cache.join("smollm2");
    let gguf = fetch::cached_gguf_path(&cache);
    if fetch::is_up_to_date(&dir) && gguf.is_file() {
        return Some((dir, gguf));
    }
    if std::env::var("UNWEIGHT_REQUIRE_TEST_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "UNWEIGHT_REQUIRE_TEST_MODEL=1 but the test model is not fetched (run `unweight \
             fetch-test-model --out .cache/smollm2` first; `make test` does)"
        );
    }
    eprintln!("\n*** skipped: test model not fetched (run `cargo run --release -- fetch-test-model --out .cache/smollm2`) ***\n");
    None
}

#[test]
fn real_model_tokenizer_splits_digits_and_round_trips() {
    let Some((dir, _)) = real_model() else { return };
    let tk = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(tk.get_vocab_size(true), 49152);
    let text = "Hello, world! 12345";
    let enc = tk.encode(text, false).unwrap();
    assert_eq!(
        enc.get_tokens(),
        ["Hello", ",", "Ġworld", "!", "Ġ", "1", "2", "3", "4", "5"]
    );
    assert_eq!(enc.get_ids(), [19556, 28, 905, 17, 216, 33, 34, 35, 36, 37]);
    assert_eq!(tk.decode(enc.get_ids(), false).unwrap(), text);
    // ChatML as the template renders it for one user message with the generation prompt.
    let chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tk.encode(chat, false).unwrap().get_ids().to_vec();
    assert_eq!(&ids[..3], [1, 9690, 198], "<|im_start|> system \\n");
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        3,
        "three <|im_start|>"
    );
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2, "two <|im_end|>");
    assert_eq!(tk.decode(&ids, false).unwrap(), chat);
}

#[test]
fn real_model_chat_template_and_config_come_from_the_gguf() {
    let Some((dir, gguf)) = real_model() else {
        return;
    };
    let g = GgufFile::open(&gguf).unwrap();
    let tc = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(
        tc["chat_template"].as_str().unwrap(),
        g.require_str("tokenizer.chat_template").unwrap()
    );
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("You are a helpful AI assistant named SmolLM"));
    let config = read_json(&dir.join("config.json"));
    let preset = triton_unweight::model::LlamaShape::preset("smollm2-135m").unwrap();
    for (k, v) in [
        ("hidden_size", preset.hidden),
        ("intermediate_size", preset.intermediate),
        ("num_hidden_layers", preset.layers),
        ("num_attention_heads", preset.heads),
        ("num_key_value_heads", preset.kv_heads),
        ("head_dim", 64),
        ("vocab_size", preset.vocab),
        ("max_position_embeddings", 8192),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(config[k].as_u64(), Some(v as u64), "config.json {k}");
    }
    assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(config["tie_word_embeddings"], true);
}

#[test]
fn real_model_tensors_match_the_smollm2_layout_and_the_gguf() {
    let Some((dir, gguf)) = real_model() else {
        return;
    };
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let preset = triton_unweight::model::LlamaShape::preset("smollm2-135m").unwrap();
    let mut want = preset.tensors();
    want.sort();
    let mut got: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    got.sort();
    assert_eq!(
        got, want,
        "names and shapes of SmolLM2-135M (tied: no lm_head)"
    );
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == Dtype::BF16));

    // Row order: HF rows of q/k are GGUF rows permuted back by llama.cpp's permute formula.
    let g = GgufFile::open(&gguf).unwrap();
    for (hf, gg, heads) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
            Some(9),
        ),
        (
            "model.layers.17.self_attn.k_proj.weight",
            "blk.17.attn_k.weight",
            Some(3),
        ),
        (
            "model.layers.5.self_attn.v_proj.weight",
            "blk.5.attn_v.weight",
            None,
        ),
    ] {
        let stored = g.dequantize(gg).unwrap();
        let view = st.tensor(hf).unwrap();
        let cols = view.shape()[1];
        let ours: Vec<u16> = view
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        let mut matched = 0;
        for (r, row) in ours.chunks_exact(cols).enumerate() {
            // GGUF row of HF row r: within a head, r = a * hd/2 + b comes from 2b + a.
            let src = match heads {
                None => r,
                Some(heads) => {
                    let hd = view.shape()[0] / heads;
                    let (h, i) = (r / hd, r % hd);
                    h * hd + 2 * (i % (hd / 2)) + i / (hd / 2)
                }
            };
            let want: Vec<u16> = stored[src * cols..(src + 1) * cols]
                .iter()
                .map(|&v| f32_to_bf16(v))
                .collect();
            matched += usize::from(row == want.as_slice());
        }
        assert_eq!(matched, view.shape()[0], "{hf}: rows in HF order");
    }
}

#[test]
fn fetching_again_is_a_no_op() {
    let Some((dir, _)) = real_model() else { return };
    let r = Command::new(BIN)
        .args(["fetch-test-model", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(stdout.contains("is up to date"), "{stdout}");
}
