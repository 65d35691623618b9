//! Choosing the next token from a row of logits: greedy, or temperature / top-k / top-p sampling
//! with a counter-based random draw keyed by the request's seed and the token's position, after
//! the OpenAI-style frequency and presence penalties on the tokens generated so far.
//!
//! The semantics are those of docs/sampling.md, written so that a GPU kernel reproduces them
//! exactly: after the one `f32` exponential ([`weight`], plain `f32` multiplies and adds), every
//! step is integer arithmetic on fixed-point weights (sums that do not depend on their order,
//! selection by an integer key), and the random number is Philox4x32-10 of (seed, position), so
//! a token never depends on the batch it ran in, on the draws before it, nor on a preemption.
//! No full sort of the vocabulary: the candidates are the tokens within 2^-32 of the best, and
//! top-k and top-p find their cut by partial selection.

use super::philox;
use super::EngineError;
use crate::device::{LogitEdit, RowSampling};

/// The logit-gap factor and the fixed-point `top_p`: defined with the backend contract
/// (`device::sampling`), because a device sampler receives exactly these values.
pub use crate::device::sampling::{gap_scale, top_p_fixed};

/// How many times each token id was generated, in id order.
pub type TokenCounts = std::collections::BTreeMap<u32, u32>;

/// How a request picks its tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy decoding; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps
    /// all.
    pub top_p: f32,
    /// Key of the request's random draws (docs/sampling.md): with the token's position it
    /// decides each draw.
    pub seed: u64,
    /// Subtracted from a token's logit once for every time the request generated it
    /// (OpenAI's `frequency_penalty`); in [-2, 2], 0 = off.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token the request generated so far (OpenAI's
    /// `presence_penalty`); in [-2, 2], 0 = off.
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges: temperature finite and ≥ 0, top_p in (0, 1], penalties in [-2, 2]
    /// (OpenAI's range).
    pub fn validate(&self) -> Result<(), EngineError> {
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(EngineError::InvalidRequest(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(EngineError::InvalidRequest(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidRequest(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// Whether the choice is the arg-max (of the penalized logits, when there are penalties).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether the logits are changed by penalties before the choice.
    pub fn has_penalties(&self) -> bool {
        self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// The penalty of every token in `generated`, in increasing id order: token t loses
    /// `frequency_penalty × count(t) + presence_penalty` (an `f32` multiply, then an add)
    /// where it occurs. Empty without penalties.
    pub fn penalties(&self, generated: &[u32]) -> Vec<(u32, f32)> {
        if !self.has_penalties() {
            return Vec::new();
        }
        let mut counts = TokenCounts::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        self.penalties_of(&counts)
    }

    /// [`SamplingParams::penalties`] from the generated tokens' counts (what a running
    /// sequence keeps up to date, so a step does not recount its whole output).
    pub fn penalties_of(&self, counts: &TokenCounts) -> Vec<(u32, f32)> {
        if !self.has_penalties() {
            return Vec::new();
        }
        counts
            .iter()
            .map(|(&t, &n)| (t, self.frequency_penalty * n as f32 + self.presence_penalty))
            .collect()
    }

    /// Applies [`SamplingParams::penalties`] to `logits` (ids outside the row are ignored).
    pub fn apply_penalties(&self, logits: &mut [f32], generated: &[u32]) {
        for (t, delta) in self.penalties(generated) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= delta;
            }
        }
    }
}

/// The fixed-point weight of the most likely token: a token's weight is its probability
/// relative to the most likely token's, times 2^32, rounded down ([`weight`]).
pub const WEIGHT_ONE: u64 = 1 << 32;

/// The least scaled logit gap `t = (logit - max) × gap_scale(temperature)` of a candidate: a
/// token further below the best (relative probability under 2^-32, a weight of at most 1) is
/// not a candidate; the draw's 32-bit uniform resolves nothing finer either.
pub const T_MIN: f32 = -32.0;

/// 2^f = e^(f ln 2) on [-0.5, 0.5] as the Taylor polynomial of degree 7: (ln 2)^k / k!,
/// k = 0..=7, rounded to `f32` (truncation error below 3e-9 relative).
const EXP2_POLY: [f32; 8] = [
    1.0,
    6.931472e-1,
    2.402265e-1,
    5.550411e-2,
    9.618129e-3,
    1.333_355_8e-3,
    1.540353e-4,
    1.525_273_4e-5,
];

/// 1.5 × 2^23: `(t + ROUND) - ROUND` rounds an `f32` of magnitude below 2^22 to the nearest
/// integer (ties to even), exactly, with two IEEE additions.
const ROUND: f32 = 12_582_912.0;

/// 2^23: an `f32` at least this large is an integer.
const TWO_23: f32 = 8_388_608.0;

/// [`weight`] as an `f32` (an integer in [0, 2^32], exactly representable): the form the row
/// pass computes, branch-free so that it vectorizes. `t` must be in [`T_MIN`], 0.
#[inline(always)]
fn weight_f32(t: f32) -> f32 {
    let big = t + ROUND;
    let r = big - ROUND;
    let f = t - r;
    let mut p = EXP2_POLY[7];
    for &c in EXP2_POLY[..7].iter().rev() {
        p = p * f + c;
    }
    // 2^(32 + r), r in [-32, 0]: an exact power of two, so the product is exact. r as an
    // integer is in the low bits of `big` (1.5 × 2^23 + r), read without a conversion.
    let ri = big.to_bits() as i32 - 0x4B40_0000;
    let scale = f32::from_bits(((32 + ri + 127) as u32) << 23);
    let v = p * scale;
    // floor(v): v is an integer from 2^23 on; below, round to nearest and step back if above.
    let n = (v + TWO_23) - TWO_23;
    let n = if n > v { n - 1.0 } else { n };
    if v >= TWO_23 {
        v
    } else {
        n
    }
}

/// The fixed-point weight of a token whose scaled gap is `t` (`T_MIN <= t <= 0`):
/// floor(2^t × 2^32), with 2^t computed as 2^r × P(f), r = t rounded to the nearest integer,
/// f = t - r, P = `EXP2_POLY` (the degree-7 Taylor polynomial of 2^f) by Horner's rule, every
/// operation a separately rounded `f32` add or multiply (a CUDA kernel uses
/// `__fadd_rn`/`__fmul_rn`, no fused multiply-add, and gets the same bits). Exactly
/// [`WEIGHT_ONE`] at `t = 0`, at least 1 everywhere, within 1e-6 relative of 2^(t+32)
/// elsewhere (tested).
pub fn weight(t: f32) -> u64 {
    debug_assert!((T_MIN..=0.0).contains(&t), "t = {t}");
    weight_f32(t) as u64
}

/// The total order of tokens that top-k and top-p cut: larger logit first, and among equal
/// logits (±0 equal) the lower id first. A larger key is a better token; the key is the
/// logit's bits made monotone in the top 32 bits and the complement of the id in the low 32.
pub fn rank_key(logit: f32, id: u32) -> u64 {
    let bits = (logit + 0.0).to_bits(); // -0 + 0 = +0
    let ordered = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(ordered) << 32) | u64::from(u32::MAX - id)
}

/// A request's sampler: its parameters. It holds no state between tokens: each draw is a
/// function of the request's seed and the token's position.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    /// A sampler with these parameters.
    pub fn new(params: SamplingParams) -> Self {
        Self { params }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the token at `position` (how many tokens the request generated before it) from
    /// `logits` (penalties and masks already applied): [`argmax`] when greedy, otherwise the
    /// inverse CDF, over the [`kept`](Sampler::kept) tokens in id order, of the uniform that
    /// Philox4x32-10 gives for (seed, position). NaN logits are impossible tokens; a row with
    /// nothing above -inf gives [`argmax`]'s answer (0).
    pub fn sample(&self, logits: &[f32], position: u64) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let x = philox::draw_word(self.params.seed, position);
        SCRATCH.with(|s| {
            let mut guard = s.borrow_mut();
            let w: &mut Vec<f32> = &mut guard;
            match self.cut(logits, w) {
                Cut::Nothing => argmax(logits),
                Cut::List(kept) => {
                    let total = kept.iter().map(|&(_, w)| w).sum();
                    pick(kept.into_iter(), total, x)
                }
                Cut::Threshold(th) => {
                    let w: &[f32] = w;
                    let kept = (0..logits.len() as u32)
                        .filter(|&i| th.keeps(logits, w, i))
                        .map(|i| (i, int(w[i as usize])));
                    pick(kept, th.total, x)
                }
            }
        })
    }

    /// The tokens that can be drawn (after temperature, top-k and top-p) with their fixed-point
    /// weights, in id order. Empty when nothing is above -inf.
    pub fn kept(&self, logits: &[f32]) -> Vec<(u32, u64)> {
        let mut w = Vec::new();
        match self.cut(logits, &mut w) {
            Cut::Nothing => Vec::new(),
            Cut::List(kept) => kept,
            Cut::Threshold(th) => (0..logits.len() as u32)
                .filter(|&i| th.keeps(logits, &w, i))
                .map(|i| (i, int(w[i as usize])))
                .collect(),
        }
    }

    /// Computes the weights into `w` and finds the kept set (steps 4 to 8 of
    /// docs/sampling.md), without sorting the row: the weights' histogram finds the bin where a
    /// cut falls and only that bin's tokens are ranked by quickselect.
    fn cut(&self, logits: &[f32], w: &mut Vec<f32>) -> Cut {
        let p = &self.params;
        let max = row_max(logits);
        if max == f32::NEG_INFINITY {
            return Cut::Nothing;
        }
        if max == f32::INFINITY {
            w.clear();
            w.extend(logits.iter().map(|&l| {
                if l == f32::INFINITY {
                    WEIGHT_ONE as f32
                } else {
                    0.0
                }
            }));
        } else {
            row_weights(logits, max, gap_scale(p.temperature), w);
        }
        // The histogram of the tokens of weight 2^22 and more (t >= -10) suffices when they
        // reach the cut, which is the common case; otherwise that of all of them.
        let (high, total) = Histogram::scan(w, HIGH_BIN);
        let mut th = Threshold {
            key: 0,
            full_bits: bin_floor_bits(0),
            low_bits: bin_floor_bits(0),
            total,
        };
        let k = p.top_k as u64;
        if p.top_k > 0 && k < w.iter().filter(|&&x| x != 0.0).count() as u64 {
            // The top k by rank, found by count; then top-p among just them.
            let hist = if high.count.iter().sum::<u64>() >= k {
                high
            } else {
                Histogram::scan(w, 0).0
            };
            th = cut_at(logits, w, &hist.count, k, |_| 1);
            let mut kept: Vec<(u32, u64)> = (0..logits.len() as u32)
                .filter(|&i| th.keeps(logits, w, i))
                .map(|i| (i, int(w[i as usize])))
                .collect();
            if p.top_p < 1.0 {
                let mut items: Vec<(u64, u64)> = kept
                    .iter()
                    .map(|&(i, wi)| (rank_key(logits[i as usize], i), wi))
                    .collect();
                let need = top_p_need(p.top_p, items.iter().map(|x| x.1).sum());
                let key = nucleus_cut(&mut items, need);
                kept.retain(|&(i, _)| rank_key(logits[i as usize], i) >= key);
            }
            return Cut::List(kept);
        }
        if p.top_p < 1.0 {
            let need = top_p_need(p.top_p, th.total);
            let hist = if high.mass.iter().sum::<u64>() >= need {
                high
            } else {
                Histogram::scan(w, 0).0
            };
            th = cut_at(logits, w, &hist.mass, need, int);
        }
        Cut::Threshold(th)
    }
}

thread_local! {
    /// The weights of the row being sampled, reused between calls (a vocabulary of f32).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What [`Sampler::cut`] kept.
enum Cut {
    /// Nothing above -inf.
    Nothing,
    /// The kept tokens and their weights, in id order (after a top-k).
    List(Vec<(u32, u64)>),
    /// Every token whose rank key is at least a threshold.
    Threshold(Threshold),
}

/// The kept tokens as the ones ranked at or above `key`, with shortcuts on the weight's bits:
/// a weight of at least `full_bits` is above the cut's bin, one below `low_bits` under it.
struct Threshold {
    key: u64,
    full_bits: u32,
    low_bits: u32,
    /// The sum over the kept tokens of the metric the cut counted: their weights (the sum the
    /// draw needs) when the cut was by weight or there was none; their number after a top-k
    /// cut (then unused: the kept tokens are listed).
    total: u64,
}

impl Threshold {
    #[inline]
    fn keeps(&self, logits: &[f32], w: &[f32], i: u32) -> bool {
        let b = w[i as usize].to_bits();
        b >= self.full_bits
            || (b >= self.low_bits && b != 0 && rank_key(logits[i as usize], i) >= self.key)
    }
}

/// A weight (an integer-valued `f32` below 2^33) as an integer, by the signed conversion (one
/// instruction; the unsigned one is several).
#[inline(always)]
fn int(x: f32) -> u64 {
    x as i64 as u64
}

/// Bins of the weights by their `f32` exponent and top three mantissa bits: 8 bins per octave,
/// 257 over [1, 2^32]. The weight is non-decreasing in the logit, so a higher bin holds only
/// higher-ranked tokens.
const BINS: usize = 257;

fn bin_of(bits: u32) -> usize {
    ((bits - 0x3F80_0000) >> 20) as usize
}

fn bin_floor_bits(b: usize) -> u32 {
    0x3F80_0000 + ((b as u32) << 20)
}

/// Counts and weight sums per bin.
struct Histogram {
    count: [u64; BINS],
    mass: [u64; BINS],
}

/// The bin of weight 2^22 (t = -10).
const HIGH_BIN: usize = 22 * 8;

impl Histogram {
    /// The histogram of the weights in bins `from` and above, and the sum of all the weights.
    fn scan(w: &[f32], from: usize) -> (Self, u64) {
        let floor = bin_floor_bits(from);
        let mut h = Histogram {
            count: [0; BINS],
            mass: [0; BINS],
        };
        // Weights are integers below 2^33: their sums are exact in f64 (below 2^53) in any
        // order, and the conversion is one instruction.
        let mut mass = [0f64; BINS];
        let mut total = [0f64; 4];
        let chunks = w.chunks_exact(4);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..4 {
                total[k] += f64::from(c[k]);
                if c[k].to_bits() >= floor {
                    let b = bin_of(c[k].to_bits());
                    h.count[b] += 1;
                    mass[b] += f64::from(c[k]);
                }
            }
        }
        for &x in rest {
            total[0] += f64::from(x);
            if x.to_bits() >= floor {
                let b = bin_of(x.to_bits());
                h.count[b] += 1;
                mass[b] += f64::from(x);
            }
        }
        h.mass = mass.map(|m| m as u64);
        (h, total.iter().sum::<f64>() as u64)
    }
}

/// The threshold of the shortest prefix by rank whose `metric` (per bin in `per_bin`, per token
/// by `of_weight`) sums to at least `need`: the bins from the top until the one where the sum
/// crosses, then quickselect among that bin's tokens. Requires 0 < `need` <= the total.
fn cut_at(
    logits: &[f32],
    w: &[f32],
    per_bin: &[u64; BINS],
    need: u64,
    of_weight: impl Fn(f32) -> u64,
) -> Threshold {
    let (mut above, mut b) = (0, BINS - 1);
    while b > 0 && above + per_bin[b] < need {
        above += per_bin[b];
        b -= 1;
    }
    let (low, full) = (bin_floor_bits(b), bin_floor_bits(b + 1));
    let mut items: Vec<(u64, u64)> = Vec::new();
    for (i, (&x, &l)) in w.iter().zip(logits).enumerate() {
        if (low..full).contains(&x.to_bits()) {
            items.push((rank_key(l, i as u32), of_weight(x)));
        }
    }
    let key = nucleus_cut(&mut items, need - above);
    let inside: u64 = items.iter().filter(|x| x.0 >= key).map(|x| x.1).sum();
    Threshold {
        key,
        full_bits: full,
        low_bits: low,
        total: above + inside,
    }
}

/// The largest non-NaN logit (-inf when there is none), eight lanes at a time.
fn row_max(logits: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    for (k, &x) in rest.iter().enumerate() {
        acc[k] = if x > acc[k] { x } else { acc[k] };
    }
    acc.iter()
        .copied()
        .fold(f32::NEG_INFINITY, |a, x| if x > a { x } else { a })
}

/// Steps 4 and 5 of docs/sampling.md over a whole row: `w[i]` = the weight of token i, 0 for
/// a token that is not a candidate. Compiled for AVX2 when the CPU has it: the same `f32`
/// operations eight lanes at a time, so the same bits.
fn row_weights(logits: &[f32], max: f32, scale: f32, w: &mut Vec<f32>) {
    w.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { row_weights_avx2(logits, max, scale, w) };
            return;
        }
    }
    row_weights_body(logits, max, scale, w);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_weights_avx2(logits: &[f32], max: f32, scale: f32, w: &mut [f32]) {
    row_weights_body(logits, max, scale, w);
}

/// Branch-free, so the compiler vectorizes it.
#[inline(always)]
fn row_weights_body(logits: &[f32], max: f32, scale: f32, w: &mut [f32]) {
    for (o, &l) in w.iter_mut().zip(logits) {
        let t = (l - max) * scale;
        let candidate = t >= T_MIN;
        let x = weight_f32(if candidate { t } else { 0.0 });
        *o = if candidate { x } else { 0.0 };
    }
}

/// The weight the top-p nucleus must reach out of `total`: ceil(P × total / 2^32), where
/// P = ceil(top_p × 2^32) (`top_p` rounded up to 32 fractional bits); at least 1.
pub fn top_p_need(top_p: f32, total: u64) -> u64 {
    let p32 = u128::from(top_p_fixed(top_p));
    let need = (p32 * u128::from(total)).div_ceil(u128::from(WEIGHT_ONE));
    (need as u64).max(1)
}

/// The key of the token that completes the top-p nucleus: the smallest prefix of `items`
/// (key, weight) in descending key order whose weights sum to at least `need` ends at it.
/// Quickselect on the weights (expected linear time, deterministic pivots), so nothing is
/// sorted; the sums are integers, so the answer is that of a full sort exactly.
/// Requires 0 < `need` <= the sum of the weights and distinct keys.
fn nucleus_cut(items: &mut [(u64, u64)], mut need: u64) -> u64 {
    let (mut lo, mut hi) = (0, items.len());
    loop {
        let s = &mut items[lo..hi];
        if s.len() <= 1 {
            return s.first().map_or(u64::MAX, |&(k, _)| k);
        }
        // Median of the first, middle and last keys as the pivot, moved to the front.
        let (a, b, c) = (0, s.len() / 2, s.len() - 1);
        let (ka, kb, kc) = (s[a].0, s[b].0, s[c].0);
        let m = if (ka <= kb) == (kb <= kc) {
            b
        } else if (kb <= ka) == (ka <= kc) {
            a
        } else {
            c
        };
        s.swap(0, m);
        let pivot = s[0];
        // Keys above the pivot to s[1..=above].
        let mut above = 0;
        let mut mass = 0u64;
        for j in 1..s.len() {
            if s[j].0 > pivot.0 {
                above += 1;
                mass += s[j].1;
                s.swap(j, above);
            }
        }
        if mass >= need {
            (lo, hi) = (lo + 1, lo + 1 + above);
        } else if mass + pivot.1 >= need {
            return pivot.0;
        } else {
            need -= mass + pivot.1;
            lo += 1 + above;
        }
    }
}

/// The inverse CDF: the first of the `kept` tokens (id order) whose running sum of weights
/// exceeds floor(x × total / 2^32).
fn pick(kept: impl Iterator<Item = (u32, u64)>, total: u64, x: u32) -> u32 {
    let target = ((u128::from(x) * u128::from(total)) >> 32) as u64;
    let mut cum = 0u64;
    let mut last = 0;
    for (id, w) in kept {
        cum += w;
        if cum > target {
            return id;
        }
        last = id;
    }
    // target < total, so the loop returned; the last token is the answer of a total that
    // rounding could never reach.
    last
}

/// The token `row` chooses from `logits` (docs/sampling.md, all nine steps): its edits applied
/// (penalties, then masks), then [`Sampler::sample`] at its position. This is the engine's
/// host sampling and the reference every device sampler
/// ([`crate::device::Backend::decode_sampled`]) must match token for token.
pub fn choose(logits: &[f32], row: &RowSampling) -> u32 {
    let sampler = Sampler::new(SamplingParams {
        temperature: row.temperature,
        top_k: row.top_k as usize,
        top_p: row.top_p,
        seed: row.seed,
        ..SamplingParams::default()
    });
    if row.edits.is_empty() {
        return sampler.sample(logits, row.position);
    }
    let mut edited = logits.to_vec();
    for &(id, edit) in &row.edits {
        if let Some(l) = edited.get_mut(id as usize) {
            *l = match edit {
                LogitEdit::Subtract(delta) => *l - delta,
                LogitEdit::Mask => f32::NEG_INFINITY,
            };
        }
    }
    sampler.sample(&edited, row.position)
}

/// The most likely token (the lowest id among equal maxima; NaN never wins; 0 when nothing is
/// above -inf). Defined in `device` because a backend's on-device argmax must match it exactly
/// ([`crate::device::Backend::decode_argmax`]).
pub use crate::device::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn penalties_lower_the_logits_of_generated_tokens_by_count_and_presence() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::default()
        };
        let mut logits = [1.0f32, 1.0, 1.0, 1.0];
        // Token 1 twice, token 3 once, an id outside the row ignored.
        p.apply_penalties(&mut logits, &[1, 3, 1, 99]);
        assert_eq!(logits, [1.0, 1.0 - 2.0 * 0.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25]);
        // Negative penalties favour repetition; none leave the row as it is.
        let neg = SamplingParams {
            presence_penalty: -1.0,
            ..SamplingParams::default()
        };
        let mut logits = [0.0f32, 0.5];
        neg.apply_penalties(&mut logits, &[0]);
        assert_eq!(logits, [1.0, 0.5]);
        let mut logits = [0.0f32, 0.5];
        SamplingParams::default().apply_penalties(&mut logits, &[0, 1]);
        assert_eq!(logits, [0.0, 0.5]);
        assert!(!SamplingParams::default().has_penalties() && p.has_penalties());
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
        let s = Sampler::new(params(0.0, 0, 1.0, 9));
        assert_eq!(s.sample(&[0.1, 0.2, 5.0], 0), 2);
        // top_k = 1 is greedy at any temperature.
        let s = Sampler::new(params(2.0, 1, 1.0, 9));
        assert_eq!(s.sample(&[0.1, 7.0, 5.0], 3), 1);
    }

    /// The edge cases the CUDA kernel `argmax_rows` must reproduce (tests/cuda.rs checks it
    /// against this function): rows with nothing above -inf give 0, ±0 are equal.
    #[test]
    fn argmax_edge_cases_pin_the_device_contract() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[nan, nan, nan]), 0);
        assert_eq!(argmax(&[-inf, -inf]), 0);
        assert_eq!(argmax(&[nan, -inf, nan]), 0);
        assert_eq!(argmax(&[nan, -inf, -3.0e38]), 2);
        assert_eq!(argmax(&[-inf, 2.0, inf, inf, nan]), 2);
        assert_eq!(argmax(&[1.0, -0.0, 0.0, 5.0, -0.0]), 3);
        assert_eq!(argmax(&[-1.0, -0.0, 0.0]), 1);
        assert_eq!(argmax(&[0.0, 1e-45, 1e-45]), 1);
        // A sampled row with nothing above -inf gives argmax's answer too.
        let s = Sampler::new(params(0.8, 0, 0.95, 3));
        assert_eq!(s.sample(&[nan, -inf, nan], 5), 0);
        // A +inf best: the +inf tokens share the draw, nothing else is possible.
        for pos in 0..64 {
            assert!(matches!(s.sample(&[-inf, 2.0, inf, inf, nan], pos), 2 | 3));
        }
    }

    fn rows(seed: u64, n: usize, len: usize) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..len)
                    // Quantized to tenths so that rows have ties.
                    .map(|_| (rng.gen_range(-80..80) as f32) / 10.0)
                    .collect()
            })
            .collect()
    }

    /// Greedy (temperature 0, or top_k 1) is argmax, lowest id among ties, at every position;
    /// a cold temperature (every other token below 2^-32 of the best) draws it too.
    #[test]
    fn greedy_equals_argmax() {
        for (r, row) in rows(1, 200, 300).iter().enumerate() {
            let r = r as u64;
            let best = argmax(row);
            let first = row.iter().position(|&l| l == row[best as usize]).unwrap();
            assert_eq!(best as usize, first);
            assert_eq!(Sampler::new(params(0.0, 0, 1.0, r)).sample(row, r), best);
            assert_eq!(Sampler::new(params(1.5, 1, 0.3, r)).sample(row, r), best);
            let ties = row.iter().filter(|&&l| l == row[best as usize]).count();
            if ties == 1 {
                let cold = Sampler::new(params(1e-3, 0, 1.0, r));
                assert_eq!(cold.kept(row), vec![(best, WEIGHT_ONE)]);
                assert_eq!(cold.sample(row, r), best);
            }
        }
    }

    /// `weight` is floor(2^(t + 32)) to a millionth, exactly 2^32 at 0, and never decreases.
    #[test]
    fn weight_is_a_fixed_point_exp2() {
        assert_eq!(weight(0.0), WEIGHT_ONE);
        assert_eq!(weight(-0.0), WEIGHT_ONE);
        assert_eq!(weight(-1.0), WEIGHT_ONE / 2);
        assert_eq!(weight(-32.0), 1);
        let mut last = 0u64;
        for i in 0..=(32 << 12) {
            let t = -32.0 + i as f32 / 4096.0;
            let w = weight(t);
            let exact = (f64::from(t) + 32.0).exp2();
            assert!(
                (w as f64 - exact).abs() <= exact * 1e-6 + 1.0,
                "t {t}: {w} vs {exact}"
            );
            assert!(w >= last, "t {t}: {w} < {last}");
            last = w;
        }
    }

    /// The AVX2 row pass gives the bits of the portable loop and of `weight` token by token.
    #[test]
    fn row_weights_are_the_same_bits_on_every_path() {
        for row in rows(4, 4, 1001) {
            let (max, scale) = (row_max(&row), gap_scale(0.7));
            let mut portable = vec![0.0; row.len()];
            row_weights_body(&row, max, scale, &mut portable);
            for (i, &l) in row.iter().enumerate() {
                let t = (l - max) * scale;
                let want = if t >= T_MIN { weight(t) } else { 0 };
                assert_eq!(portable[i] as u64, want, "token {i}");
            }
            let mut dispatched = Vec::new();
            row_weights(&row, max, scale, &mut dispatched);
            let ints: Vec<u64> = portable.iter().map(|&x| x as u64).collect();
            let (high, total) = Histogram::scan(&portable, HIGH_BIN);
            assert_eq!(total, ints.iter().sum::<u64>());
            let high_ints = || ints.iter().filter(|&&x| x >= 1 << 22);
            assert_eq!(high.mass.iter().sum::<u64>(), high_ints().sum::<u64>());
            assert_eq!(high.count.iter().sum::<u64>(), high_ints().count() as u64);
            assert_eq!(bits(&dispatched), bits(&portable));
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let mut fast = vec![0.0; row.len()];
                // SAFETY: the CPU has AVX2.
                unsafe { row_weights_avx2(&row, max, scale, &mut fast) };
                assert_eq!(bits(&fast), bits(&portable));
            } else {
                eprintln!("row_weights_avx2: skipped: no AVX2 on this CPU");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The key orders by logit (±0 equal, -inf lowest) and then by id, lower first.
    #[test]
    fn rank_key_is_logit_then_lower_id() {
        let inf = f32::INFINITY;
        let vals = [
            -inf, -3.0e38, -2.5, -1e-45, -0.0, 0.0, 1e-45, 0.5, 3.0e38, inf,
        ];
        for &a in &vals {
            for &b in &vals {
                for (i, j) in [(0u32, 1u32), (1, 0), (7, 7), (0, u32::MAX - 1)] {
                    let want = a > b || (a == b && i < j);
                    assert_eq!(rank_key(a, i) > rank_key(b, j), want, "{a}#{i} vs {b}#{j}");
                }
            }
        }
    }

    /// The kept set by sorting: top-k and top-p as the documentation defines them, from the
    /// same weights, for the partial selection to be compared with.
    fn kept_by_sorting(s: &Sampler, logits: &[f32]) -> Vec<(u32, u64)> {
        let p = s.params();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut c: Vec<(u32, u64)> = (0..logits.len() as u32)
            .filter_map(|i| {
                let t = (logits[i as usize] - max) * gap_scale(p.temperature);
                (t >= T_MIN).then(|| (i, weight(t)))
            })
            .collect();
        c.sort_by_key(|&(i, _)| std::cmp::Reverse(rank_key(logits[i as usize], i)));
        if p.top_k > 0 {
            c.truncate(p.top_k);
        }
        let need = top_p_need(p.top_p, c.iter().map(|x| x.1).sum());
        let mut cum = 0;
        let n = c
            .iter()
            .position(|x| {
                cum += x.1;
                cum >= need
            })
            .unwrap();
        c.truncate(n + 1);
        c.sort_by_key(|x| x.0);
        c
    }

    /// Partial selection (no sort) keeps exactly what a full sort keeps, on rows with ties, and
    /// on a vocabulary-sized row.
    #[test]
    fn partial_selection_keeps_what_a_sort_keeps() {
        let mut all = rows(2, 60, 500);
        all.extend(rows(3, 2, 49_152));
        for (r, row) in all.iter().enumerate() {
            for (t, k, p) in [
                (0.8, 0, 0.95),
                (1.0, 40, 1.0),
                (0.5, 0, 0.5),
                (2.0, 100, 0.9),
                (1.3, 3, 0.01),
            ] {
                let s = Sampler::new(params(t, k, p, 0));
                assert_eq!(
                    s.kept(row),
                    kept_by_sorting(&s, row),
                    "row {r}, {t} {k} {p}"
                );
            }
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_ties_to_the_lower_id() {
        let s = Sampler::new(params(1.0, 2, 1.0, 0));
        let ids = |v: Vec<(u32, u64)>| v.iter().map(|&(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(s.kept(&[1.0, 4.0, 3.0, 4.0])), vec![1, 3]);
        assert_eq!(ids(s.kept(&[4.0, 3.0, 4.0, 4.0])), vec![0, 2]);
        for pos in 0..200 {
            assert!(matches!(s.sample(&[1.0, 4.0, 3.0, 4.0], pos), 1 | 3));
        }
    }

    /// The nucleus is the smallest prefix reaching top_p, the token that crosses it included.
    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits: their base-2 logarithms × ln 2).
        let logits = [-1.0f32, -2.0, -3.0, -3.0].map(|x| x * std::f32::consts::LN_2);
        let ids = |top_p| {
            Sampler::new(params(1.0, 0, top_p, 0))
                .kept(&logits)
                .iter()
                .map(|&(i, _)| i)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0.3), vec![0]);
        assert_eq!(ids(0.49), vec![0]);
        assert_eq!(ids(0.51), vec![0, 1]);
        assert_eq!(ids(0.74), vec![0, 1]);
        assert_eq!(ids(0.76), vec![0, 1, 2]);
        assert_eq!(ids(0.87), vec![0, 1, 2]);
        assert_eq!(ids(0.99), vec![0, 1, 2, 3]);
        assert_eq!(ids(1.0), vec![0, 1, 2, 3]);
    }

    /// Each draw is a function of (seed, position) alone: drawing the positions backwards or
    /// skipping some gives the same tokens; another seed gives others.
    #[test]
    fn draws_depend_on_seed_and_position_only() {
        let row: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let s = Sampler::new(params(1.0, 0, 1.0, 5));
        let forward: Vec<u32> = (0..64).map(|pos| s.sample(&row, pos)).collect();
        let backward: Vec<u32> = (0..64).rev().map(|pos| s.sample(&row, pos)).collect();
        assert_eq!(forward, backward.into_iter().rev().collect::<Vec<_>>());
        assert_eq!(s.sample(&row, 40), forward[40]);
        let again = Sampler::new(params(1.0, 0, 1.0, 5));
        assert_eq!(
            (0..64).map(|p| again.sample(&row, p)).collect::<Vec<_>>(),
            forward
        );
        let other = Sampler::new(params(1.0, 0, 1.0, 6));
        assert_ne!(
            (0..64).map(|p| other.sample(&row, p)).collect::<Vec<_>>(),
            forward
        );
    }

    /// The distribution the documentation defines, computed independently in f64 with the
    /// exact exponential: order by (logit desc, id asc), keep the top k, softmax at the
    /// temperature over them, keep the smallest prefix reaching top_p (the crossing token
    /// included), renormalize. Asserts that no cumulative sum lies within 1e-4 of top_p, so that
    /// the set does not hinge on rounding.
    fn exact_distribution(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<(u32, f64)> {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .partial_cmp(&logits[a as usize])
                .unwrap()
                .then(a.cmp(&b))
        });
        if k > 0 {
            order.truncate(k);
        }
        let max = f64::from(logits[order[0] as usize]);
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - max) / t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let mut keep = order.len();
        let mut cum = 0.0;
        for (n, x) in w.iter().enumerate().take_while(|_| p < 1.0) {
            cum += x / total;
            assert!(
                (cum - p).abs() > 1e-4,
                "top_p {p} too close to a cumulative sum"
            );
            if cum >= p {
                keep = n + 1;
                break;
            }
        }
        let kept: f64 = w[..keep].iter().sum();
        let mut d: Vec<(u32, f64)> = (0..keep).map(|n| (order[n], w[n] / kept)).collect();
        d.sort_by_key(|x| x.0);
        d
    }

    /// Pearson's chi-square statistic of `counts` against `probs` over `n` draws, bins with an
    /// expected count under 5 pooled; and its degrees of freedom.
    fn chi_square(counts: &[u64], probs: &[f64], n: u64) -> (f64, usize) {
        let (mut stat, mut bins) = (0.0, 0);
        let (mut pool_o, mut pool_e) = (0.0, 0.0);
        for (&o, &p) in counts.iter().zip(probs) {
            let e = p * n as f64;
            if e < 5.0 {
                pool_o += o as f64;
                pool_e += e;
            } else {
                stat += (o as f64 - e).powi(2) / e;
                bins += 1;
            }
        }
        if pool_e > 0.0 {
            stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
            bins += 1;
        }
        (stat, bins - 1)
    }

    /// Upper 0.1% points of the chi-square distribution, degrees of freedom 1..=12.
    const CHI2_999: [f64; 12] = [
        10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588, 31.264,
        32.909,
    ];

    /// The sampler's token frequencies over many draws (8 seeds × 5,000 positions) fit the
    /// exact distribution (chi-square at the 0.1% level, deterministic seeds), for several
    /// temperature / top-k / top-p settings; and the same test rejects the distribution of a
    /// temperature 15% off, so it can fail.
    #[test]
    fn frequencies_fit_the_exact_distribution() {
        // Twelve tokens, the logits not in id order.
        let logits = [
            0.7f32, -1.0, 2.0, -6.0, 1.2, 0.0, -3.0, 1.5, -0.5, 1.0, -2.0, 0.3,
        ];
        let n: u64 = 40_000;
        for (ci, &(t, k, p)) in [
            (0.8f32, 0usize, 0.95f32),
            (1.3, 5, 1.0),
            (0.7, 8, 0.8),
            (1.0, 0, 1.0),
        ]
        .iter()
        .enumerate()
        {
            let want = exact_distribution(&logits, f64::from(t), k, f64::from(p));
            let mut counts = vec![0u64; logits.len()];
            for d in 0..n {
                let seed = 1000 * ci as u64 + d / 5000;
                let s = Sampler::new(params(t, k, p, seed));
                counts[s.sample(&logits, d % 5000) as usize] += 1;
            }
            let kept: Vec<u32> = want.iter().map(|x| x.0).collect();
            for (id, &c) in counts.iter().enumerate() {
                assert!(
                    c == 0 || kept.contains(&(id as u32)),
                    "token {id} drawn {c} times"
                );
            }
            let obs: Vec<u64> = kept.iter().map(|&i| counts[i as usize]).collect();
            let probs: Vec<f64> = want.iter().map(|x| x.1).collect();
            let (stat, df) = chi_square(&obs, &probs, n);
            assert!(
                stat < CHI2_999[df - 1],
                "T {t} k {k} p {p}: chi-square {stat:.1} with {df} df; counts {obs:?} vs {probs:?}"
            );
            if p == 1.0 {
                let off = exact_distribution(&logits, f64::from(t) * 1.15, k, 1.0);
                let probs: Vec<f64> = off.iter().map(|x| x.1).collect();
                let (stat, df) = chi_square(&obs, &probs, n);
                assert!(stat > CHI2_999[df - 1], "T {t}: a wrong temperature passed");
            }
        }
    }

    #[test]
    fn invalid_parameters_are_errors() {
        assert!(params(-1.0, 0, 1.0, 0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("top_p"));
        assert!(params(1.0, 0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
        for (f, p) in [(2.5, 0.0), (0.0, -2.1), (f32::NAN, 0.0)] {
            let bad = SamplingParams {
                frequency_penalty: f,
                presence_penalty: p,
                ..SamplingParams::default()
            };
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("penalty"), "{e}");
        }
    }
}
