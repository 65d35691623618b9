//! The tbe3 kernels (kernels/tbe3_decode.cu, kernels/tbe3_gemv.cu) against the CPU decoder of the
//! runtime form (`codec::runtime`, the reference) and a CPU f64 GEMV, on random matrices with
//! escapes forced; outputs poisoned first (BF16 0xFFFF, f32 NaN). Also the row-range decode
//! (`Tbe3Kernels::decode_rows`, the chunked strategies' first half) and every product strategy
//! through `linear::Products::run` on both storage forms (tbe3 and raw BF16 must give
//! bit-identical outputs). The embedding gather (`tbe3_gather_f32`, kernels/tbe3_gather.cu)
//! against the f32 of the original BF16 rows.
//!
//! Every GPU test is `#[ignore]`d (tests/gpu_required/mod.rs): a plain `cargo test` reports it
//! as not run; scripts/gpu-check runs it, and there a missing GPU fails it. The launch-geometry helpers are unit-tested on the CPU in
//! `src/device/cuda/tbe3.rs`.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use triton_unweight::codec::runtime::{self, RuntimeMatrix, Shape};
use triton_unweight::device::cuda::tbe3;
use triton_unweight::model::synth::f32_to_bf16;
use triton_unweight::model::weights::bf16_to_f32;

mod gpu_required;
use gpu_required::require_gpu;

fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

/// How a test matrix's BF16 patterns are drawn.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// N(0, 0.02) with `escape_pct` % of weights given a random finite exponent in 60..=180
    /// (escapes in most tiles, GEMV-safe).
    Normal { escape_pct: f64 },
    /// Any of the 65,536 patterns (NaN, inf, subnormals): most weights escape.
    AnyBits,
    /// Exponents 240..=255 (bases at MAX_BASE = 249, escapes at code 7 next to base 249).
    HighExponents,
}

fn weights(n: usize, kind: Kind, seed: u64) -> Vec<u16> {
    let mut r = rng(seed);
    let normal = Normal::new(0.0f32, 0.02).unwrap();
    (0..n)
        .map(|_| match kind {
            Kind::Normal { escape_pct } => {
                let b = f32_to_bf16(normal.sample(&mut r));
                if r.gen_bool(escape_pct / 100.0) {
                    let e: u16 = r.gen_range(60..=180);
                    (b & 0x807f) | (e << 7)
                } else {
                    b
                }
            }
            Kind::AnyBits => r.gen::<u16>(),
            Kind::HighExponents => {
                let e: u16 = r.gen_range(240..=255);
                (r.gen::<u16>() & 0x807f) | (e << 7)
            }
        })
        .collect()
}

fn encode(bits: &[u16], shape: Shape) -> RuntimeMatrix {
    let m = runtime::encode(bits, shape).unwrap();
    // The CPU decoder is the reference, itself checked against the original here.
    assert_eq!(runtime::decode(&m.view().unwrap()).unwrap(), bits);
    m
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn decode_kernel_equals_cpu_decoder_bit_for_bit() {
    require_gpu();
    let h = tbe3::Tbe3Harness::new().unwrap();
    let normal = Kind::Normal { escape_pct: 3.0 };
    // (rows, cols, tile or 0 for the loader's choice, kind)
    let cases: &[(usize, usize, usize, Kind)] = &[
        (1024, 4096, 0, normal),                            // Llama-3.1-8B k/v_proj
        (4096, 4096, 0, normal),                            // q/o_proj
        (512, 14336, 0, normal),                            // rows of down_proj (tile 2048)
        (14336, 4096, 0, Kind::Normal { escape_pct: 0.0 }), // gate/up, natural escapes only
        (1, 1, 0, normal),                                  // one weight, partial group and tile
        (3, 100, 0, normal),                                // groups and tiles straddle rows
        (17, 1000, 0, Kind::AnyBits),                       // dense escapes, odd sizes
        (5, 384, 0, Kind::AnyBits),                         // tile 128: four tiles per warp step
        (9, 2304, 0, normal),                               // tile 256
        (20, 1536, 0, normal),                              // tile 512: one tile per step
        (33, 777, 4096, Kind::HighExponents),               // tile 4096, base 249 next to escapes
        (3, 70_000, 65536, Kind::AnyBits),                  // the largest tile, many steps per tile
        (64, 4096, 2048, Kind::HighExponents),
    ];
    for (i, &(rows, cols, tile, kind)) in cases.iter().enumerate() {
        let shape = if tile == 0 {
            Shape::for_matrix(rows, cols).unwrap()
        } else {
            Shape::new(rows, cols, tile).unwrap()
        };
        let bits = weights(rows * cols, kind, 100 + i as u64);
        let m = encode(&bits, shape);
        let got = h.decode(&m).unwrap();
        let bad = got.iter().zip(&bits).position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "{rows}x{cols} tile {} {kind:?} ({} escapes): first mismatch at {} (gpu {:#06x}, cpu {:#06x})",
            shape.tile_elems,
            m.escape_count(),
            bad.unwrap(),
            got[bad.unwrap()],
            bits[bad.unwrap()]
        );
        println!(
            "decode {rows}x{cols} tile {} {kind:?}: {} escapes, bit-exact",
            shape.tile_elems,
            m.escape_count()
        );
    }
}

/// y[b][r] = Σ_c W[r][c] · x[b][c] in f64, and Σ |W · x| (the scale of the rounding error).
fn reference(
    bits: &[u16],
    x: &[f32],
    rows: usize,
    cols: usize,
    batch: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; batch * rows];
    let mut mag = vec![0f64; batch * rows];
    for b in 0..batch {
        let xb = &x[b * cols..(b + 1) * cols];
        for r in 0..rows {
            let w = &bits[r * cols..(r + 1) * cols];
            let (mut s, mut a) = (0f64, 0f64);
            for (&wv, &xv) in w.iter().zip(xb) {
                let p = bf16_to_f32(wv) as f64 * xv as f64;
                s += p;
                a += p.abs();
            }
            y[b * rows + r] = s;
            mag[b * rows + r] = a;
        }
    }
    (y, mag)
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn fused_gemv_equals_passthrough_bit_for_bit_and_matches_f64() {
    require_gpu();
    let h = tbe3::Tbe3Harness::new().unwrap();
    let sms = h.sms();
    let cases: &[(usize, usize)] = &[
        (1024, 4096), // k/v_proj
        (4096, 4096), // q/o_proj
        (256, 14336), // rows of down_proj
        (7, 384),     // tile 128, a partial 512-column step, a partial warp of rows
        (33, 640),    // tile 128
        (20, 1536),   // tile 512
        (9, 2304),    // tile 256
        (3, 6144),    // tile 2048, 3 chunks
    ];
    let mut seed = 1000;
    for &(rows, cols) in cases {
        let shape = Shape::for_matrix(rows, cols).unwrap();
        seed += 1;
        let bits = weights(rows * cols, Kind::Normal { escape_pct: 3.0 }, seed);
        let m = encode(&bits, shape);
        for batch in 1..=tbe3::MAX_GEMV_BATCH {
            let mut r = rng(seed * 31 + batch as u64);
            let x: Vec<f32> = (0..batch * cols)
                .map(|_| r.gen_range(0.05f32..1.0) * if r.gen_bool(0.5) { 1.0 } else { -1.0 })
                .collect();
            let (want, mag) = reference(&bits, &x, rows, cols, batch);
            let default = tbe3::gemv_geometry(&shape, batch, sms).unwrap();
            let mut geoms = vec![default];
            for split in [1, 3] {
                let g = tbe3::gemv_geometry_with_split(&shape, batch, split).unwrap();
                if !geoms.contains(&g) {
                    geoms.push(g);
                }
            }
            for g in geoms {
                let (fused, pass) = h.gemv(&m, &bits, &x, &g).unwrap();
                let (fused2, _) = h.gemv(&m, &bits, &x, &g).unwrap();
                for i in 0..fused.len() {
                    assert_eq!(
                        fused[i].to_bits(),
                        pass[i].to_bits(),
                        "{rows}x{cols} b{batch} {g:?}: output {i}: tbe3 {} vs pass-through {}",
                        fused[i],
                        pass[i]
                    );
                    assert_eq!(
                        fused[i].to_bits(),
                        fused2[i].to_bits(),
                        "not deterministic at {i}"
                    );
                    let err = (fused[i] as f64 - want[i]).abs();
                    assert!(
                        fused[i].is_finite() && err <= 1e-5 * mag[i] + 1e-30,
                        "{rows}x{cols} b{batch} {g:?}: output {i} = {} vs f64 {} (|err| {err:e}, scale {:e})",
                        fused[i],
                        want[i],
                        mag[i]
                    );
                }
            }
        }
        println!("gemv {rows}x{cols} (tile {}): batches 1..=8 bit-identical to pass-through, within 1e-5 of f64", shape.tile_elems);
    }
}

/// Checks a `decode_rows` buffer: the rows' weights equal the original bits, and the `guard`
/// values after them still hold the poison (nothing written past the range).
fn check_rows(got: &[u16], bits: &[u16], cols: usize, rows: &std::ops::Range<usize>, what: &str) {
    let want = &bits[rows.start * cols..rows.end * cols];
    let bad = got[..want.len()].iter().zip(want).position(|(a, b)| a != b);
    assert!(
        bad.is_none(),
        "{what} rows {rows:?}: first mismatch at weight {} of the range (gpu {:#06x}, cpu {:#06x})",
        bad.unwrap(),
        got[bad.unwrap()],
        want[bad.unwrap()]
    );
    let tail = got[want.len()..].iter().position(|&v| v != 0xFFFF);
    assert!(
        tail.is_none(),
        "{what} rows {rows:?}: written {} values past the range",
        tail.unwrap() + 1
    );
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn decode_rows_equals_cpu_decoder_on_row_ranges() {
    require_gpu();
    let h = tbe3::Tbe3Harness::new().unwrap();
    const GUARD: usize = 1500;
    // Every tile size from 128 to 2048 on 50 rows of 1024: the first chunk, a middle one, the
    // last (partial) one, the whole matrix, and rows starting at 3 (3072 weights: on a span
    // boundary for tiles up to 1024, refused for 2048).
    for (i, tile) in [128usize, 256, 512, 1024, 2048].into_iter().enumerate() {
        for kind in [Kind::Normal { escape_pct: 3.0 }, Kind::AnyBits] {
            let shape = Shape::new(50, 1024, tile).unwrap();
            let bits = weights(shape.len(), kind, 400 + 2 * i as u64);
            let m = encode(&bits, shape);
            for rows in [0..8, 24..32, 48..50, 0..50, 3..11, 7..7] {
                let what = format!("50x1024 tile {tile} {kind:?}");
                let res = h.decode_rows(&m, rows.clone(), GUARD);
                if tbe3::decode_range_ok(&shape, &rows) {
                    check_rows(&res.unwrap(), &bits, 1024, &rows, &what);
                } else {
                    let e = res.expect_err("a range off a span boundary must be refused");
                    assert!(e.to_string().contains("tile boundary"), "{what}: {e}");
                }
            }
        }
    }
    // Llama shapes in 256-row chunks (the engine's chunked decode), and a width that is not a
    // multiple of 128 (tiles straddle rows) decoded whole and from a span-aligned row.
    let cases: &[(usize, usize, &[std::ops::Range<usize>])] = &[
        (1024, 4096, &[0..256, 512..768, 768..1024]),
        (300, 14336, &[0..64, 128..192, 256..300]),
        (37, 1000, &[0..37, 0..1]),
        (64, 576, &[32..64, 0..64]), // 32 × 576 = 9 tiles of 2048
    ];
    for (i, &(rows_n, cols, ranges)) in cases.iter().enumerate() {
        let shape = Shape::for_matrix(rows_n, cols).unwrap();
        let bits = weights(
            shape.len(),
            Kind::Normal { escape_pct: 3.0 },
            500 + i as u64,
        );
        let m = encode(&bits, shape);
        for rows in ranges {
            assert!(
                tbe3::decode_range_ok(&shape, rows),
                "{rows_n}x{cols} {rows:?}"
            );
            let got = h.decode_rows(&m, rows.clone(), GUARD).unwrap();
            check_rows(&got, &bits, cols, rows, &format!("{rows_n}x{cols}"));
        }
        println!(
            "decode_rows {rows_n}x{cols} (tile {}): {} ranges bit-exact, nothing written past them",
            shape.tile_elems,
            ranges.len()
        );
    }
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn products_run_every_strategy_bit_identical_on_both_storages() {
    require_gpu();
    use triton_unweight::device::cuda::plan::Strategy;
    let h = tbe3::Tbe3Harness::new().unwrap();
    let sms = h.sms();
    // (rows, cols): chunks of 384 and 64 rows do not divide the rows; 640 and 576 have tiles of
    // 128 and 2048 (576: no GEMV, no tensor cores); 1024 and 4096 columns take every strategy.
    let cases: &[(usize, usize)] = &[
        (1000, 4096),
        (300, 640),
        (96, 576),
        (520, 1024),
        (64, 14336),
    ];
    let mut seed = 2000;
    for &(rows, cols) in cases {
        let shape = Shape::for_matrix(rows, cols).unwrap();
        seed += 1;
        let bits = weights(rows * cols, Kind::Normal { escape_pct: 3.0 }, seed);
        let m = encode(&bits, shape);
        let mut ran = Vec::new();
        for n in [1usize, 3, 8, 16, 37] {
            let mut r = rng(seed * 7 + n as u64);
            let x: Vec<f32> = (0..n * cols)
                .map(|_| r.gen_range(0.05f32..1.0) * if r.gen_bool(0.5) { 1.0 } else { -1.0 })
                .collect();
            let (want, mag) = reference(&bits, &x, rows, cols, n);
            let mut strategies = vec![
                Strategy::Cublas { chunk_rows: 0 },
                Strategy::Cublas { chunk_rows: 64 },
                Strategy::Cublas { chunk_rows: 384 },
                Strategy::Cublas { chunk_rows: 7 },
                Strategy::Gemv { ksplit: 1 },
                Strategy::Gemv { ksplit: 3 },
                Strategy::Mma,
            ];
            if let Ok(g) = tbe3::gemv_geometry(&shape, n, sms) {
                strategies.push(Strategy::Gemv { ksplit: g.ksplit });
            }
            strategies.sort();
            strategies.dedup();
            for st in strategies {
                for split in [true, false] {
                    if matches!(st, Strategy::Gemv { .. }) && !split {
                        continue; // the GEMV reads f32 activations either way
                    }
                    let what = format!(
                        "{rows}x{cols} (tile {}) n {n} {st:?} split {split}",
                        shape.tile_elems
                    );
                    let res = h.product(&m, &bits, st, &x, n, split);
                    if let Some(why) = st.unsupported(&shape, n) {
                        let e = res.expect_err(&format!("{what}: unsupported ({why}) but ran"));
                        assert!(!e.to_string().is_empty());
                        continue;
                    }
                    let (t, raw) = res.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let exact = matches!(st, Strategy::Gemv { .. }) || split;
                    let tol = if exact { 5e-5 } else { 5e-3 };
                    for i in 0..t.len() {
                        assert_eq!(
                            t[i].to_bits(),
                            raw[i].to_bits(),
                            "{what}: output {i}: tbe3 {} vs raw {}",
                            t[i],
                            raw[i]
                        );
                        let err = (t[i] as f64 - want[i]).abs();
                        assert!(
                            t[i].is_finite() && err <= tol * mag[i] + 1e-30,
                            "{what}: output {i} = {} vs f64 {} (|err| {err:e}, scale {:e})",
                            t[i],
                            want[i],
                            mag[i]
                        );
                    }
                    if !ran.contains(&st) {
                        ran.push(st);
                    }
                }
            }
        }
        println!(
            "products {rows}x{cols} (tile {}): tbe3 = raw bit for bit and within tolerance of f64 for {ran:?}",
            shape.tile_elems
        );
    }
}

/// Gathers `tokens` rows of `m` with `tbe3_gather_f32` into an output poisoned with 0xFFFFFFFF
/// (never the f32 of a BF16: those have 16 zero low bits), `GUARD` values past the end included;
/// returns all of it as bits.
fn gather(
    ctx: &std::sync::Arc<triton_unweight::device::cuda::driver::Context>,
    k: &triton_unweight::device::cuda::gather::GatherKernel,
    m: &RuntimeMatrix,
    tokens: &[i32],
) -> Vec<u32> {
    use triton_unweight::device::cuda::driver::DevBuf;
    const GUARD: usize = 64;
    let table = tbe3::DeviceTbe3::upload(ctx, m).unwrap();
    let len = tokens.len() * m.shape.cols + GUARD;
    let x = DevBuf::from_host(ctx, &vec![u32::MAX; len]).unwrap();
    let t = DevBuf::from_host(ctx, tokens).unwrap();
    // SAFETY: `tokens` holds tokens.len() i32 row indices < rows (the caller's), `x` room for
    // tokens.len() × cols f32; both are device memory of `ctx`.
    unsafe { k.run(&table, t.ptr(), x.ptr(), tokens.len()) }.unwrap();
    let mut got = vec![0u32; len];
    x.download(&mut got).unwrap();
    got
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu-check"]
fn gather_kernel_equals_the_f32_of_the_original_rows_bit_for_bit() {
    use triton_unweight::device::cuda::driver::Context;
    use triton_unweight::device::cuda::gather::{gather_unsupported, GatherKernel};
    require_gpu();
    let ctx = Context::new(0).unwrap();
    let k = GatherKernel::load(&ctx).unwrap();
    // Every one of the 65,536 BF16 patterns exactly once (NaNs, infinities, subnormals, both
    // zeros), in random order, as a 128 × 512 table.
    let mut every: Vec<u16> = (0..=u16::MAX).collect();
    let mut r = rng(700);
    for i in (1..every.len()).rev() {
        every.swap(i, r.gen_range(0..=i));
    }
    // (rows, cols, tile or 0 for the loader's choice, kind; None = `every`)
    let cases: &[(usize, usize, usize, Option<Kind>)] = &[
        (128, 512, 0, None),
        (1000, 4096, 0, Some(Kind::Normal { escape_pct: 3.0 })), // Llama's row width
        (300, 2048, 0, Some(Kind::Normal { escape_pct: 0.0 })),  // natural escapes only
        (257, 1024, 128, Some(Kind::HighExponents)),             // tile < step: span 512
        (64, 2048, 256, Some(Kind::AnyBits)),
        (40, 1536, 512, Some(Kind::AnyBits)), // tile = step, 3 spans: warps 3 to 7 idle
        (17, 8192, 4096, Some(Kind::HighExponents)), // base 249 next to escapes
        (5, 65536, 65536, Some(Kind::AnyBits)), // the largest tile: one span, 128 steps
    ];
    for (i, &(rows, cols, tile, kind)) in cases.iter().enumerate() {
        let shape = if tile == 0 {
            Shape::for_matrix(rows, cols).unwrap()
        } else {
            Shape::new(rows, cols, tile).unwrap()
        };
        assert_eq!(
            gather_unsupported(&shape),
            None,
            "{rows}x{cols} tile {tile}"
        );
        let bits = match kind {
            Some(kind) => weights(rows * cols, kind, 800 + i as u64),
            None => every.clone(),
        };
        assert_eq!(bits.len(), rows * cols);
        let m = encode(&bits, shape);
        // The last row first, the first row last, random rows between (duplicates certain:
        // more tokens than rows in the small tables, and row 1 / the last row repeated).
        let mut r = rng(900 + i as u64);
        let last = rows as i32 - 1;
        let mut tokens = vec![last, 1.min(last)];
        tokens.extend((0..(2 * rows).min(300)).map(|_| r.gen_range(0..rows as i32)));
        tokens.extend([1.min(last), last, 0]);
        let got = gather(&ctx, &k, &m, &tokens);
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &bits[tok as usize * cols..(tok as usize + 1) * cols];
            let out = &got[t * cols..(t + 1) * cols];
            let bad = out
                .iter()
                .zip(row)
                .position(|(&g, &b)| g != (b as u32) << 16);
            assert!(
                bad.is_none(),
                "{rows}x{cols} tile {} {kind:?}: token {t} (row {tok}), column {}: gpu {:#010x}, want {:#010x}",
                shape.tile_elems,
                bad.unwrap(),
                out[bad.unwrap()],
                (row[bad.unwrap()] as u32) << 16
            );
        }
        let tail = &got[tokens.len() * cols..];
        assert!(
            tail.iter().all(|&v| v == u32::MAX),
            "{rows}x{cols}: written past the {} rows",
            tokens.len()
        );
        println!(
            "gather {rows}x{cols} tile {} {kind:?} ({} escapes): {} rows bit-exact",
            shape.tile_elems,
            m.escape_count(),
            tokens.len()
        );
    }
}
