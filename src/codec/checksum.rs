//! XXH3-64 (seed 0, default secret), the checksum every stored tensor carries, with its
//! long-input loop in AVX-512 or AVX2 chosen at run time.
//!
//! `xxhash-rust` picks its vector kernel when it is compiled, from the build's target features;
//! the release build targets baseline x86-64, so it hashes with SSE2 on every machine. Hashing
//! the input and the coded parts was 7.3% of `compress`'s CPU (docs/format.md §4.4). Here the
//! part of XXH3 where the bytes go (the accumulate-and-scramble loop over 64-byte stripes of an
//! input longer than 240 bytes, streamed) is written from the XXH3 specification
//! (`doc/xxhash_spec.md` of the xxHash project) for AVX-512 and AVX2, selected with
//! `is_x86_feature_detected!`; inputs of at most 240 bytes, and CPUs with neither feature, go to
//! `xxhash-rust`. The value is XXH3-64's whatever the path: the tests compare every length up to
//! 4096, long random lengths and every way of splitting a streamed input against `xxhash-rust`.

/// The one-shot hash of `bytes`.
pub fn xxh3_64(bytes: &[u8]) -> u64 {
    match Kernel::detect() {
        Some(k) if bytes.len() > MID_SIZE_MAX => {
            let mut h = Long::new(k);
            h.update(bytes);
            h.digest()
        }
        _ => xxhash_rust::xxh3::xxh3_64(bytes),
    }
}

/// A streamed XXH3-64: [`Xxh3::update`] with the bytes in any number of pieces,
/// [`Xxh3::digest`] equals [`xxh3_64`] of their concatenation.
pub struct Xxh3(Inner);

enum Inner {
    Long(Box<Long>),
    Portable(Box<xxhash_rust::xxh3::Xxh3>),
}

impl Default for Xxh3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Xxh3 {
    /// A new hash of no bytes, with the fastest kernel this CPU runs.
    pub fn new() -> Self {
        Self::with_kernel(Kernel::detect())
    }

    /// A new hash with `kernel`, or `xxhash-rust` for `None` (the caller checked the CPU has
    /// the kernel's feature; tests use this to try every kernel).
    fn with_kernel(kernel: Option<Kernel>) -> Self {
        Self(match kernel {
            Some(k) => Inner::Long(Box::new(Long::new(k))),
            None => Inner::Portable(Box::new(xxhash_rust::xxh3::Xxh3::new())),
        })
    }

    /// Adds `bytes` to the hashed stream.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            Inner::Long(h) => h.update(bytes),
            Inner::Portable(h) => h.update(bytes),
        }
    }

    /// The hash of every byte added so far (the stream can go on).
    pub fn digest(&self) -> u64 {
        match &self.0 {
            Inner::Long(h) => h.digest(),
            Inner::Portable(h) => h.digest(),
        }
    }
}

/// Inputs up to this many bytes take XXH3's short paths (not this module's loop).
const MID_SIZE_MAX: usize = 240;
/// Bytes per stripe: one accumulation into the eight 64-bit accumulators.
const STRIPE: usize = 64;
/// Stripes per block; the accumulators are scrambled after each block.
const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / 8;
/// Bytes held back before any stripe is consumed: more than [`MID_SIZE_MAX`], so a stream that
/// ends short is hashed whole by the short path.
const HOLD: usize = 256;

const PRIME32_1: u64 = 0x9E37_79B1;
const PRIME32_2: u64 = 0x85EB_CA77;
const PRIME32_3: u64 = 0xC2B2_AE3D;
const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// The specification's default secret (`kSecret`), 192 bytes.
const SECRET: [u8; 192] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
];

/// Where in the secret the last stripe's key starts.
const SECRET_LAST_STRIPE: usize = SECRET.len() - STRIPE - 7;
/// Where in the secret the keys of the final merge start.
const SECRET_MERGE: usize = 11;
/// Where in the secret the scramble key starts.
const SECRET_SCRAMBLE: usize = SECRET.len() - STRIPE;

/// The vector kernel of the long-input loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
}

impl Kernel {
    /// The widest kernel this CPU runs, if any.
    fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Some(Self::Avx2);
            }
        }
        None
    }
}

/// The streamed state of the long-input loop. Stripes are consumed only once a byte follows
/// them (the last stripe of the input is hashed differently, at the digest), so bytes not yet
/// consumed wait in `pending`, and `last` keeps the 64 consumed bytes just before them (the
/// last stripe overlaps them when fewer than 64 bytes are pending).
struct Long {
    kernel: Kernel,
    acc: [u64; 8],
    /// Stripes of the current block consumed.
    stripes: usize,
    total: u64,
    pending: [u8; HOLD + STRIPE],
    pending_len: usize,
    last: [u8; STRIPE],
}

impl Long {
    fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            acc: [
                PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5,
                PRIME32_1,
            ],
            stripes: 0,
            total: 0,
            pending: [0; HOLD + STRIPE],
            pending_len: 0,
            last: [0; STRIPE],
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let held = self.pending_len;
        if held + bytes.len() <= HOLD {
            self.pending[held..held + bytes.len()].copy_from_slice(bytes);
            self.pending_len += bytes.len();
            return;
        }
        if held > 0 {
            // Complete the pending bytes' last stripe, then consume them all if a byte follows.
            let top = (STRIPE - held % STRIPE) % STRIPE;
            let take = top.min(bytes.len());
            self.pending[held..held + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if bytes.is_empty() {
                return;
            }
            let n = self.pending_len;
            let pending = self.pending;
            consume(self.kernel, &mut self.acc, &mut self.stripes, &pending[..n]);
            self.last.copy_from_slice(&pending[n - STRIPE..n]);
            self.pending_len = 0;
        }
        // Straight from the input: every stripe that a byte follows.
        let n = (bytes.len() - 1) / STRIPE * STRIPE;
        if n > 0 {
            consume(self.kernel, &mut self.acc, &mut self.stripes, &bytes[..n]);
            self.last.copy_from_slice(&bytes[n - STRIPE..n]);
        }
        let rest = &bytes[n..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn digest(&self) -> u64 {
        let held = &self.pending[..self.pending_len];
        if self.total <= MID_SIZE_MAX as u64 {
            // Everything is still pending: the short paths.
            return xxhash_rust::xxh3::xxh3_64(held);
        }
        let (mut acc, mut stripes) = (self.acc, self.stripes);
        let whole = (held.len() - 1) / STRIPE * STRIPE;
        consume(self.kernel, &mut acc, &mut stripes, &held[..whole]);
        let mut last = [0u8; STRIPE];
        if held.len() >= STRIPE {
            last.copy_from_slice(&held[held.len() - STRIPE..]);
        } else {
            let before = STRIPE - held.len();
            last[..before].copy_from_slice(&self.last[held.len()..]);
            last[before..].copy_from_slice(held);
        }
        accumulate_scalar(&mut acc, &last, &SECRET[SECRET_LAST_STRIPE..]);
        let mut h = self.total.wrapping_mul(PRIME64_1);
        for i in 0..4 {
            let k0 = read64(&SECRET, SECRET_MERGE + 16 * i);
            let k1 = read64(&SECRET, SECRET_MERGE + 16 * i + 8);
            h = h.wrapping_add(fold_mul(acc[2 * i] ^ k0, acc[2 * i + 1] ^ k1));
        }
        avalanche(h)
    }
}

fn read64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 128-bit product of `a` and `b`, its halves xored.
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = a as u128 * b as u128;
    (p as u64) ^ ((p >> 64) as u64)
}

fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(0x1656_6791_9E37_79F9);
    h ^ (h >> 32)
}

/// One stripe into the accumulators, in scalar code (the last stripe only).
fn accumulate_scalar(acc: &mut [u64; 8], stripe: &[u8], key: &[u8]) {
    for i in 0..8 {
        let v = read64(stripe, 8 * i);
        let k = v ^ read64(key, 8 * i);
        acc[i ^ 1] = acc[i ^ 1].wrapping_add(v);
        acc[i] = acc[i].wrapping_add((k & 0xffff_ffff).wrapping_mul(k >> 32));
    }
}

/// Consumes `bytes` (whole stripes), block by block: the accumulators are scrambled after a
/// block's last stripe (one is consumed only once a byte follows it, so XXH3 would too).
fn consume(kernel: Kernel, acc: &mut [u64; 8], stripes: &mut usize, bytes: &[u8]) {
    debug_assert!(bytes.len().is_multiple_of(STRIPE));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a kernel is only chosen (`Kernel::detect`, or tests after the same check) on a
    // CPU with its feature.
    unsafe {
        match kernel {
            Kernel::Avx512 => x86::consume_avx512(acc, stripes, bytes),
            Kernel::Avx2 => x86::consume_avx2(acc, stripes, bytes),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, acc, stripes, bytes);
        unreachable!("no vector kernel is detected off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PRIME32_1, SECRET, SECRET_SCRAMBLE, STRIPE, STRIPES_PER_BLOCK};
    use std::arch::x86_64::*;

    /// [`super::consume`] with one 512-bit register of eight accumulators.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `bytes.len()` a multiple of 64.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn consume_avx512(acc: &mut [u64; 8], stripes: &mut usize, bytes: &[u8]) {
        let sp = SECRET.as_ptr();
        // SAFETY: every load reads 64 bytes inside `acc`, `bytes` (whole stripes) or the
        // secret (offsets at most 8 * 15 + 64 <= 192); unaligned loads.
        unsafe {
            let mut a = _mm512_loadu_si512(acc.as_ptr().cast());
            let prime = _mm512_set1_epi64(PRIME32_1 as i64);
            let scramble_key = _mm512_loadu_si512(sp.add(SECRET_SCRAMBLE).cast());
            let mut p = bytes.as_ptr();
            let mut left = bytes.len() / STRIPE;
            while left > 0 {
                let n = left.min(STRIPES_PER_BLOCK - *stripes);
                for s in *stripes..*stripes + n {
                    let v = _mm512_loadu_si512(p.cast());
                    let k = _mm512_xor_si512(v, _mm512_loadu_si512(sp.add(8 * s).cast()));
                    let prod = _mm512_mul_epu32(k, _mm512_srli_epi64::<32>(k));
                    let swapped = _mm512_shuffle_epi32::<0b01_00_11_10>(v);
                    a = _mm512_add_epi64(a, _mm512_add_epi64(prod, swapped));
                    p = p.add(STRIPE);
                }
                left -= n;
                *stripes += n;
                if *stripes == STRIPES_PER_BLOCK {
                    let x = _mm512_xor_si512(a, _mm512_srli_epi64::<47>(a));
                    let x = _mm512_xor_si512(x, scramble_key);
                    let lo = _mm512_mul_epu32(x, prime);
                    let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), prime);
                    a = _mm512_add_epi64(lo, _mm512_slli_epi64::<32>(hi));
                    *stripes = 0;
                }
            }
            _mm512_storeu_si512(acc.as_mut_ptr().cast(), a);
        }
    }

    /// [`super::consume`] with two 256-bit registers of four accumulators each.
    ///
    /// # Safety
    /// The CPU must have AVX2; `bytes.len()` a multiple of 64.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn consume_avx2(acc: &mut [u64; 8], stripes: &mut usize, bytes: &[u8]) {
        let sp = SECRET.as_ptr();
        // SAFETY: as in `consume_avx512`, in 32-byte halves.
        unsafe {
            let mut a = [
                _mm256_loadu_si256(acc.as_ptr().cast()),
                _mm256_loadu_si256(acc.as_ptr().add(4).cast()),
            ];
            let prime = _mm256_set1_epi64x(PRIME32_1 as i64);
            let key_at = |off: usize, h: usize| _mm256_loadu_si256(sp.add(off + 32 * h).cast());
            let scramble_key = [key_at(SECRET_SCRAMBLE, 0), key_at(SECRET_SCRAMBLE, 1)];
            let mut p = bytes.as_ptr();
            let mut left = bytes.len() / STRIPE;
            while left > 0 {
                let n = left.min(STRIPES_PER_BLOCK - *stripes);
                for s in *stripes..*stripes + n {
                    for (h, a) in a.iter_mut().enumerate() {
                        let v = _mm256_loadu_si256(p.add(32 * h).cast());
                        let k = _mm256_xor_si256(v, key_at(8 * s, h));
                        let prod = _mm256_mul_epu32(k, _mm256_srli_epi64::<32>(k));
                        let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(v);
                        *a = _mm256_add_epi64(*a, _mm256_add_epi64(prod, swapped));
                    }
                    p = p.add(STRIPE);
                }
                left -= n;
                *stripes += n;
                if *stripes == STRIPES_PER_BLOCK {
                    for (a, key) in a.iter_mut().zip(scramble_key) {
                        let x = _mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a));
                        let x = _mm256_xor_si256(x, key);
                        let lo = _mm256_mul_epu32(x, prime);
                        let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), prime);
                        *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
                    }
                    *stripes = 0;
                }
            }
            _mm256_storeu_si256(acc.as_mut_ptr().cast(), a[0]);
            _mm256_storeu_si256(acc.as_mut_ptr().add(4).cast(), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU runs (`None`: `xxhash-rust`).
    fn kernels() -> Vec<Option<Kernel>> {
        let mut k = vec![None];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                k.push(Some(Kernel::Avx512));
            } else {
                eprintln!("skipped: no AVX-512F on this CPU, its XXH3 kernel is not checked");
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                k.push(Some(Kernel::Avx2));
            } else {
                eprintln!("skipped: no AVX2 on this CPU, its XXH3 kernel is not checked");
            }
        }
        k
    }

    /// Deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn hash_in_pieces(kernel: Option<Kernel>, pieces: &[&[u8]]) -> u64 {
        let mut h = Xxh3::with_kernel(kernel);
        for p in pieces {
            h.update(p);
        }
        h.digest()
    }

    #[test]
    fn every_length_to_4096_hashes_as_xxhash_rust_does() {
        let data = bytes(4096, 1);
        for k in kernels() {
            for n in 0..=data.len() {
                let want = xxhash_rust::xxh3::xxh3_64(&data[..n]);
                assert_eq!(hash_in_pieces(k, &[&data[..n]]), want, "{k:?}, {n} bytes");
            }
        }
        for n in 0..=data.len() {
            assert_eq!(xxh3_64(&data[..n]), xxhash_rust::xxh3::xxh3_64(&data[..n]));
        }
    }

    #[test]
    fn long_random_lengths_hash_as_xxhash_rust_does() {
        let data = bytes(3 << 20, 2);
        let mut x = 12345u64;
        for _ in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = (x >> 33) as usize % data.len();
            let want = xxhash_rust::xxh3::xxh3_64(&data[..n]);
            assert_eq!(xxh3_64(&data[..n]), want, "{n} bytes");
            for k in kernels() {
                assert_eq!(hash_in_pieces(k, &[&data[..n]]), want, "{k:?}, {n} bytes");
            }
        }
    }

    #[test]
    fn every_split_of_a_stream_hashes_as_its_whole() {
        // Every split into two pieces and, for three pieces, every first cut with a spread of
        // second cuts, across lengths near the short-path limit, the hold and block bounds.
        let data = bytes(2300, 3);
        for k in kernels() {
            for n in [
                0, 1, 64, 239, 240, 241, 255, 256, 257, 319, 320, 321, 1024, 1025, 2300,
            ] {
                let d = &data[..n];
                let want = xxhash_rust::xxh3::xxh3_64(d);
                for a in 0..=n {
                    assert_eq!(
                        hash_in_pieces(k, &[&d[..a], &d[a..]]),
                        want,
                        "{k:?} {n} {a}"
                    );
                    for b in (a..=n).step_by(37).chain([n]) {
                        let got = hash_in_pieces(k, &[&d[..a], &d[a..b], &d[b..]]);
                        assert_eq!(got, want, "{k:?} {n} {a} {b}");
                    }
                }
            }
            // Many small pieces of varied sizes, digested along the way.
            let mut h = Xxh3::with_kernel(k);
            let (mut at, mut step) = (0, 1);
            while at < data.len() {
                let end = (at + step).min(data.len());
                h.update(&data[at..end]);
                assert_eq!(h.digest(), xxhash_rust::xxh3::xxh3_64(&data[..end]));
                at = end;
                step = step * 7 % 131 + 1;
            }
        }
    }
}
