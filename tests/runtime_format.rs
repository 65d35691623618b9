//! The `tbe3` runtime form (docs/format.md §6) against the original weights: every BF16 pattern,
//! awkward shapes, random matrices from several distributions, per-tile decoding, corruption,
//! transcoding from the stored form, and the 72%-of-BF16 memory budget on synthetic and real
//! weights.
//!
//! `reference_decode` below is written from the text of docs/format.md §6 alone, with the
//! popcount rank a GPU kernel uses, and every test checks the library against it too, so the
//! document and the code cannot drift apart silently.

use std::path::Path;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use triton_unweight::codec::runtime::{
    self, decode, decode_tile, encode, encode_le_bytes, transcode, RuntimeView, Shape,
    DEFAULT_TILE, GROUP_CODE_BYTES, MAX_BASE, PLANE_ALIGN,
};
use triton_unweight::codec::{self, Params};
use triton_unweight::model::synth::f32_to_bf16;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// Decodes weight `i` following docs/format.md §6 literally (offsets from §6.3, codes from §6.4,
/// the escape rank by popcounts, as a kernel computes it without scanning before its tile).
fn reference_weight(shape: &Shape, img: &[u8], i: usize) -> u16 {
    let align = |x: usize| x.div_ceil(256) * 256;
    let groups = shape.len().div_ceil(128);
    let tiles = shape.len().div_ceil(shape.tile_elems);
    let sm_off = 0;
    let codes_off = align(groups * 128);
    let bases_off = align(codes_off + groups * 48);
    let starts_off = align(bases_off + tiles);
    let esc_off = align(starts_off + 4 * (tiles + 1));
    let (g, p) = (i / 128, i % 128);
    let t = i / shape.tile_elems;
    let plane = |g: usize, k: usize, q: usize| u32_at(img, codes_off + 48 * g + 16 * k + 4 * q);
    let (q, j) = (p / 32, p % 32);
    let code = ((plane(g, 0, q) >> j) & 1)
        | (((plane(g, 1, q) >> j) & 1) << 1)
        | (((plane(g, 2, q) >> j) & 1) << 2);
    let sm = img[sm_off + i] as u16;
    let e = if code < 7 {
        img[bases_off + t] as u16 + code as u16
    } else {
        let mask = |g: usize, q: usize| plane(g, 0, q) & plane(g, 1, q) & plane(g, 2, q);
        let mut rank = u32_at(img, starts_off + 4 * t) as usize;
        for g2 in t * shape.tile_elems / 128..g {
            rank += (0..4)
                .map(|q| mask(g2, q).count_ones() as usize)
                .sum::<usize>();
        }
        rank += (0..q)
            .map(|q2| mask(g, q2).count_ones() as usize)
            .sum::<usize>();
        rank += (mask(g, q) & ((1u64 << j) - 1) as u32).count_ones() as usize;
        img[esc_off + rank] as u16
    };
    ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7f)
}

/// Encodes, checks the layout, the library decoder (whole and per tile) and the reference
/// decoder against the input, and returns the runtime matrix.
fn roundtrip(bits: &[u16], shape: Shape) -> runtime::RuntimeMatrix {
    let rt = encode(bits, shape).unwrap();
    let view = rt.view().unwrap();
    let l = shape.layout(rt.escape_count());
    assert_eq!(rt.image.len(), l.total);
    assert_eq!(l.total % 16, 0);
    for r in [&l.sm, &l.codes, &l.bases, &l.esc_start, &l.escapes] {
        assert_eq!(r.start % PLANE_ALIGN, 0, "plane at {r:?}");
    }
    assert_eq!(decode(&view).unwrap(), bits, "whole decode {shape:?}");
    let mut buf = vec![0u16; shape.tile_elems];
    for t in 0..shape.tiles() {
        let r = shape.tile_range(t);
        decode_tile(&view, t, &mut buf[..r.len()]).unwrap();
        assert_eq!(&buf[..r.len()], &bits[r], "tile {t} of {shape:?}");
    }
    for (i, &b) in bits.iter().enumerate() {
        assert_eq!(
            reference_weight(&shape, &rt.image, i),
            b,
            "weight {i} of {shape:?}"
        );
    }
    // The escapes are exactly the weights outside their tile's window.
    let mut expected = 0;
    for t in 0..shape.tiles() {
        let base = rt.image[l.bases.start + t];
        assert!(base <= MAX_BASE);
        expected += bits[shape.tile_range(t)]
            .iter()
            .filter(|&&b| ((b >> 7) as u8).wrapping_sub(base) >= 7)
            .count();
    }
    assert_eq!(rt.escape_count(), expected);
    let s = rt.stats();
    assert_eq!(s.bytes as usize, rt.image.len());
    assert_eq!(s.escapes as usize, expected);
    rt
}

fn all_patterns(extra: usize, shuffle: bool, seed: u64) -> Vec<u16> {
    let mut v: Vec<u16> = (0..=u16::MAX).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    if shuffle {
        for i in (1..v.len()).rev() {
            v.swap(i, rng.gen_range(0..=i));
        }
    }
    v.extend((0..extra).map(|_| rng.gen::<u16>()));
    v
}

#[test]
fn every_bf16_pattern_round_trips_in_awkward_shapes() {
    // rows × cols not multiples of the group or the tile; tiles and groups straddle rows.
    for (rows, cols, tile, shuffle) in [
        (331, 199, 2048, true),
        (331, 199, 128, false),
        (257, 257, 65536, true),
        (65537, 1, 512, false),
        (1, 65539, 1024, true),
        (2, 32800, DEFAULT_TILE, false),
    ] {
        let n = rows * cols;
        let bits = all_patterns(n - 65536, shuffle, n as u64);
        let shape = Shape::new(rows, cols, tile).unwrap();
        roundtrip(&bits, shape);
    }
}

#[test]
fn specials_round_trip_through_escapes() {
    // NaNs with payloads, infinities, subnormals, ±0 among ordinary weights.
    let specials = [
        0x7fc0u16, 0xffc1, 0x7f81, 0x7f80, 0xff80, 0x0001, 0x807f, 0x0000, 0x8000, 0x7f7f,
    ];
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let mut bits: Vec<u16> = (0..3 * 1017)
        .map(|_| f32_to_bf16(normal.sample(&mut rng)))
        .collect();
    for (k, &s) in specials.iter().enumerate() {
        bits[k * 301 + 5] = s;
    }
    let rt = roundtrip(&bits, Shape::new(3, 1017, 256).unwrap());
    assert!(rt.escape_count() >= specials.len() - 2);
}

#[test]
fn shape_rules() {
    assert_eq!(Shape::for_matrix(14336, 4096).unwrap().tile_elems, 2048);
    assert_eq!(Shape::for_matrix(4096, 14336).unwrap().tile_elems, 2048);
    assert_eq!(Shape::for_matrix(576, 1536).unwrap().tile_elems, 512);
    assert_eq!(
        Shape::for_matrix(576, 576).unwrap().tile_elems,
        DEFAULT_TILE
    );
    assert!(Shape::new(4, 4, 100).is_err());
    assert!(Shape::new(4, 4, 64).is_err());
    assert!(Shape::new(4, 4, 1 << 17).is_err());
    assert!(Shape::new(1 << 20, 1 << 13, 2048).is_err(), "2^33 weights");
    // Layout of a small shape, the worked example of docs/format.md §6.3.
    let l = Shape::new(3, 1000, 1024).unwrap().layout(5);
    assert_eq!(
        (l.sm, l.codes, l.bases, l.esc_start, l.escapes, l.total),
        (
            0..3072,
            3072..4224,
            4352..4355,
            4608..4624,
            4864..4869,
            4880
        )
    );
    // An empty matrix is a valid (tiny) image.
    let rt = encode(&[], Shape::new(0, 5, 128).unwrap()).unwrap();
    assert_eq!(decode(&rt.view().unwrap()).unwrap(), Vec::<u16>::new());
}

#[test]
fn documented_bit_order() {
    // Weight 37 of group 1 of a 2-group matrix: exponent base + 5 (code 0b101) sits at bit 5 of
    // word q = 1 of planes 0 and 2 (docs/format.md §6.4); an escape holds the full exponent.
    let mut bits = vec![0x3f80u16; 256]; // 1.0: exponent 127
    bits[128 + 37] = 0x4200 | 0x8000 | 0x05; // exponent 132 = 127 + 5, negative, mantissa 5
    bits[128 + 50] = 0x4280; // exponent 133 = 127 + 6 (code 0b110): the base must be 127
    bits[128 + 100] = 0x0001; // subnormal: exponent 0, an escape
    let shape = Shape::new(1, 256, 128).unwrap();
    let rt = roundtrip(&bits, shape);
    let l = shape.layout(rt.escape_count());
    let img = &rt.image;
    assert_eq!(img[l.bases.start + 1], 127);
    let word = |g: usize, k: usize, q: usize| u32_at(img, l.codes.start + 48 * g + 16 * k + 4 * q);
    assert_eq!(word(1, 0, 1), 1 << 5);
    assert_eq!(word(1, 1, 1), 1 << 18);
    assert_eq!(word(1, 2, 1), (1 << 5) | (1 << 18));
    for k in 0..3 {
        assert_eq!(word(1, k, 3), 1 << 4, "weight 100 = 32·3 + 4 is code 7");
    }
    assert_eq!(img[l.sm.start + 128 + 37], 0x85);
    assert_eq!(rt.escape_count(), 1);
    assert_eq!(img[l.escapes.start], 0);
    assert_eq!(u32_at(img, l.esc_start.start + 4), 0);
    assert_eq!(u32_at(img, l.esc_start.start + 8), 1);
}

#[test]
fn corrupt_or_truncated_images_are_errors_not_panics() {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    let bits: Vec<u16> = (0..37 * 301)
        .map(|_| f32_to_bf16(normal.sample(&mut rng)))
        .collect();
    let shape = Shape::new(37, 301, 512).unwrap();
    let rt = encode(&bits, shape).unwrap();
    let l = shape.layout(rt.escape_count());
    assert!(rt.escape_count() > 50);
    for cut in [
        0,
        1,
        l.escapes.start - 1,
        l.escapes.start,
        rt.image.len() - 17,
    ] {
        assert!(
            RuntimeView::new(shape, &rt.image[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut longer = rt.image.clone();
    longer.extend_from_slice(&[0; 16]);
    assert!(RuntimeView::new(shape, &longer).is_err());
    let bad = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = rt.image.clone();
        f(&mut img);
        match RuntimeView::new(shape, &img) {
            Err(_) => true,
            Ok(v) => decode(&v).is_err(),
        }
    };
    assert!(bad(&|i| i[l.bases.start + 2] = MAX_BASE + 1));
    assert!(bad(&|i| i[l.esc_start.start] = 1));
    assert!(
        bad(&|i| i[l.esc_start.start + 8] ^= 0xff),
        "starts out of order"
    );
    // Turning a weight into an escape (or back) breaks its tile's escape count.
    let w0 = |k: usize| u32_at(&rt.image, l.codes.start + 16 * k);
    let j = (!(w0(0) & w0(1) & w0(2))).trailing_zeros() as usize; // a weight that is no escape
    assert!(j < 32);
    assert!(bad(&|i| {
        for k in 0..3 {
            i[l.codes.start + 16 * k + j / 8] |= 1 << (j % 8);
        }
    }));
    // Codes in the padding after the last weight.
    let last = l.codes.start + (shape.groups() - 1) * GROUP_CODE_BYTES;
    assert!(bad(&|i| i[last + 12] |= 0x80));
    // A view with another shape is refused by size.
    assert!(RuntimeView::new(Shape::new(38, 301, 512).unwrap(), &rt.image).is_err());
    // Out-of-range tiles and wrong output lengths.
    let v = rt.view().unwrap();
    assert!(decode_tile(&v, shape.tiles(), &mut [0; 512]).is_err());
    assert!(decode_tile(&v, 0, &mut [0; 511]).is_err());
    assert!(encode(&bits[1..], shape).is_err());
    assert!(encode_le_bytes(&[0; 3], shape).is_err());
}

#[test]
fn random_byte_damage_never_panics() {
    let bits: Vec<u16> = all_patterns(0, true, 11)[..5000].to_vec();
    let shape = Shape::new(50, 100, 256).unwrap();
    let rt = encode(&bits, shape).unwrap();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
    for _ in 0..2000 {
        let mut img = rt.image.clone();
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..img.len());
            img[i] = rng.gen();
        }
        if let Ok(v) = RuntimeView::new(shape, &img) {
            let _ = decode(&v);
        }
        let cut = rng.gen_range(0..img.len());
        if let Ok(v) = RuntimeView::new(shape, &img[..cut]) {
            let _ = decode(&v);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Dist {
    Normal(f32),
    /// Uniformly random exponents: nearly every weight escapes.
    WideExponents,
    /// Normal with a fraction (per mille) of huge and tiny outliers.
    Outliers(f32, u32),
    Constant(u16),
}

fn sample(d: Dist, n: usize, seed: u64) -> Vec<u16> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    match d {
        Dist::Normal(s) => {
            let nd = Normal::new(0.0f32, s).unwrap();
            (0..n).map(|_| f32_to_bf16(nd.sample(&mut rng))).collect()
        }
        Dist::WideExponents => (0..n).map(|_| rng.gen()).collect(),
        Dist::Outliers(s, pm) => {
            let nd = Normal::new(0.0f32, s).unwrap();
            (0..n)
                .map(|_| {
                    let x = nd.sample(&mut rng);
                    let x = match rng.gen_range(0..1000) {
                        k if k < pm => x * 1e6,
                        k if k < 2 * pm => x * 1e-9,
                        _ => x,
                    };
                    f32_to_bf16(x)
                })
                .collect()
        }
        Dist::Constant(b) => vec![b; n],
    }
}

fn dist() -> impl Strategy<Value = Dist> {
    prop_oneof![
        prop::sample::select(vec![1e-6f32, 1e-3, 0.02, 1.0, 3e4]).prop_map(Dist::Normal),
        Just(Dist::WideExponents),
        (prop::sample::select(vec![0.02f32, 1.0]), 1u32..50)
            .prop_map(|(s, p)| Dist::Outliers(s, p)),
        prop::sample::select(vec![
            0u16, 0x8000, 0x3f80, 0x7fc0, 0xff80, 0x0001, 0x7f7f, 0xbc23
        ])
        .prop_map(Dist::Constant),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_matrices_round_trip(
        d in dist(),
        rows in 1usize..40,
        cols in 1usize..400,
        tile in prop::sample::select(vec![128usize, 256, 1024, 2048, 65536]),
        seed in any::<u64>(),
    ) {
        let bits = sample(d, rows * cols, seed);
        let shape = Shape::new(rows, cols, tile).unwrap();
        let rt = roundtrip(&bits, shape);
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        prop_assert_eq!(&encode_le_bytes(&bytes, shape).unwrap(), &rt);
    }
}

#[test]
fn transcode_from_the_stored_form_equals_direct_encoding() {
    for (rows, cols, d) in [
        (300, 576, Dist::Normal(0.02)),
        (77, 1000, Dist::WideExponents),
        (64, 4096, Dist::Outliers(0.02, 3)),
    ] {
        let bits = sample(d, rows * cols, 9);
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let stored = codec::encode(&bytes, Params::default()).unwrap();
        let parts = stored.to_parts();
        let shape = Shape::for_matrix(rows, cols).unwrap();
        let rt = transcode(&parts.view(bits.len(), stored.params), shape).unwrap();
        assert_eq!(rt, encode(&bits, shape).unwrap());
        assert_eq!(decode(&rt.view().unwrap()).unwrap(), bits);
        let wrong = Shape::for_matrix(rows + 1, cols).unwrap();
        assert!(transcode(&parts.view(bits.len(), stored.params), wrong).is_err());
    }
}

#[test]
fn synthetic_normal_weights_fit_72_percent_of_bf16() {
    // Llama-3.1-8B row shapes (cols 4096 and 14336), N(0, 0.02) as `unweight synth` writes.
    for (rows, cols) in [(1024, 4096), (256, 14336)] {
        let bits = sample(Dist::Normal(0.02), rows * cols, 1);
        let shape = Shape::for_matrix(rows, cols).unwrap();
        let rt = encode(&bits, shape).unwrap();
        assert_eq!(decode(&rt.view().unwrap()).unwrap(), bits);
        let s = rt.stats();
        println!(
            "N(0,0.02) {rows}x{cols} tile {}: {:.4} bits/weight, ratio {:.4}, escapes {:.3}%",
            shape.tile_elems,
            s.bits_per_weight(),
            s.ratio(),
            100.0 * s.escape_rate()
        );
        assert!(s.ratio() <= 0.72, "ratio {}", s.ratio());
        assert!(s.escape_rate() < 0.03, "escape rate {}", s.escape_rate());
    }
}

#[test]
fn real_test_model_fits_72_percent_and_round_trips_from_its_compressed_form() {
    use triton_unweight::container::meta::part_name;
    use triton_unweight::container::{compress_dir, Checkpoint, CompressOptions};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/smollm2");
    if !dir.join("model.safetensors").is_file() {
        if std::env::var_os("UNWEIGHT_REQUIRE_TEST_MODEL").is_some_and(|v| v == "1") {
            panic!(
                "the test model is required (UNWEIGHT_REQUIRE_TEST_MODEL=1) but {} is missing",
                dir.display()
            );
        }
        println!("*** skipped: test model not fetched (run `unweight fetch-test-model --out .cache/smollm2`) ***");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    let opts = CompressOptions {
        params: Params::default(),
        force: false,
        progress: false,
    };
    compress_dir(&dir, &out, &opts).unwrap();
    let (plain, comp) = (
        Checkpoint::open(&dir).unwrap(),
        Checkpoint::open(&out).unwrap(),
    );
    let mut total = runtime::Stats::default();
    let mut matrices = 0;
    for e in comp.entries() {
        let Some(m) = e
            .meta
            .as_ref()
            .and_then(|m| m.rans.as_ref().map(|r| (m, r)))
        else {
            continue;
        };
        let (_, r) = m;
        let f = &comp.files()[e.file];
        let part = |p: &str| f.bytes(&part_name(&e.name, p)).unwrap();
        let index = part("index");
        let chunks = e.numel().div_ceil(r.chunk_elems);
        let (offsets, rest) = index.split_at(4 * (chunks + 1));
        let (states, table) = rest.split_at(4 * 32 * chunks);
        let view = codec::EncodedView {
            len: e.numel(),
            params: Params {
                chunk_elems: r.chunk_elems,
                prob_bits: r.prob_bits,
                mantissa_bits: r.mantissa_bits,
            },
            raw: part("sm"),
            exp_words: part("exp"),
            offsets,
            states,
            table,
        };
        let shape = Shape::for_matrix(e.shape[0], e.shape[1]).unwrap();
        let rt = transcode(&view, shape).unwrap();
        let original = plain.load(&e.name).unwrap();
        let back = decode(&rt.view().unwrap()).unwrap();
        let back_bytes: Vec<u8> = back.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert!(back_bytes == *original, "{} differs", e.name);
        total.add(&rt.stats());
        matrices += 1;
    }
    println!(
        "smollm2: {matrices} matrices, {:.4} bits/weight, ratio {:.4}, escapes {:.3}%",
        total.bits_per_weight(),
        total.ratio(),
        100.0 * total.escape_rate()
    );
    assert!(
        matrices >= 200,
        "every linear weight and the embedding: {matrices}"
    );
    assert!(total.ratio() <= 0.72, "ratio {}", total.ratio());
}

/// Transcode throughput on the largest Llama-3.1-8B linear shape (run with `--ignored
/// --nocapture`; the number is in docs/format.md §6.5).
#[test]
#[ignore]
fn transcode_speed_llama8b_shape() {
    let (rows, cols) = (14336, 4096);
    let bits = sample(Dist::Normal(0.02), rows * cols, 2);
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let stored = codec::encode(&bytes, Params::default()).unwrap();
    let parts = stored.to_parts();
    let view = parts.view(bits.len(), stored.params);
    let shape = Shape::for_matrix(rows, cols).unwrap();
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let dec = codec::decode(&view).unwrap();
        let t1 = std::time::Instant::now();
        let rt = encode_le_bytes(&dec, shape).unwrap();
        let t2 = std::time::Instant::now();
        let gb = bytes.len() as f64 / 1e9;
        println!(
            "{rows}x{cols} on {} threads: rANS decode {:.2} GB/s, tbe3 encode {:.2} GB/s, transcode {:.2} GB/s",
            rayon::current_num_threads(),
            gb / (t1 - t0).as_secs_f64(),
            gb / (t2 - t1).as_secs_f64(),
            gb / (t2 - t0).as_secs_f64()
        );
        assert_eq!(rt.shape, shape);
    }
}
