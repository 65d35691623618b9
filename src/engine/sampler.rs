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

    /// Applies the penalties to `logits` for the tokens in `generated` (ids outside the row
    /// are ignored): token t loses `frequency_penalty × count(t) + presence_penalty` when it
    /// occurs.
    pub fn apply_penalties(&self, logits: &mut [f32], generated: &[u32]) {
        if !self.has_penalties() {
            return;
        }
        let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= self.frequency_penalty * n as f32 + self.presence_penalty;
            }
        }
    }
}

/// The fixed-point weight of the most likely token: a token's weight is its probability
/// relative to the most likely token's, times 2^32, rounded down ([`weight`]).
pub const WEIGHT_ONE: u64 = 1 << 32;

/// The least scaled logit gap `t = (logit - max) / temperature × log2(e)` of a candidate: a
/// token further below the best (relative probability under 2^-32, a weight of at most 1) is
/// not a candidate. Half the 64-bit uniform's resolution would not see it either.
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

/// The fixed-point weight of a token whose scaled gap is `t` (`T_MIN <= t <= 0`):
/// floor(2^t × 2^32), with 2^t computed as 2^r × P(f), r = t rounded to the nearest integer,
/// f = t - r, P = `EXP2_POLY` (the degree-7 Taylor polynomial of 2^f) by Horner's rule, every
/// operation a separately rounded `f32` add or multiply (a CUDA kernel uses
/// `__fadd_rn`/`__fmul_rn`, no fused multiply-add, and gets the same bits). Exactly [`WEIGHT_ONE`] at `t = 0`; within 1e-6 relative of 2^(t+32)
/// elsewhere (tested).
pub fn weight(t: f32) -> u64 {
    debug_assert!((T_MIN..=0.0).contains(&t), "t = {t}");
    let r = (t + ROUND) - ROUND;
    let f = t - r;
    let mut p = EXP2_POLY[7];
    for &c in EXP2_POLY[..7].iter().rev() {
        p = p * f + c;
    }
    // 2^(32 + r), r in [-32, 0]: an exact power of two, so the product is exact.
    let scale = f32::from_bits(((32 + r as i32 + 127) as u32) << 23);
    (p * scale) as u64
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
        let kept = self.kept(logits);
        let total: u64 = kept.iter().map(|&(_, w)| w).sum();
        if total == 0 {
            return argmax(logits);
        }
        let x = philox::draw_word(self.params.seed, position);
        pick(&kept, total, x)
    }

    /// The tokens that can be drawn (after temperature, top-k and top-p) with their fixed-point
    /// weights, in id order. Empty when nothing is above -inf.
    pub fn kept(&self, logits: &[f32]) -> Vec<(u32, u64)> {
        let p = &self.params;
        let mut cands = candidates(logits, p.temperature);
        let key = |&(i, _): &(u32, u64)| rank_key(logits[i as usize], i);
        let mut threshold = 0u64;
        if p.top_k > 0 && p.top_k < cands.len() {
            let mut keys: Vec<u64> = cands.iter().map(key).collect();
            let (_, kth, _) = keys.select_nth_unstable_by(p.top_k - 1, |a, b| b.cmp(a));
            threshold = *kth;
        }
        if p.top_p < 1.0 {
            let mut items: Vec<(u64, u64)> = cands
                .iter()
                .map(|c| (key(c), c.1))
                .filter(|&(k, _)| k >= threshold)
                .collect();
            let total: u64 = items.iter().map(|&(_, w)| w).sum();
            if total > 0 {
                threshold = nucleus_cut(&mut items, top_p_need(p.top_p, total));
            }
        }
        if threshold > 0 {
            cands.retain(|c| key(c) >= threshold);
        }
        cands
    }
}

/// The weight the top-p nucleus must reach out of `total`: ceil(P × total / 2^32), where
/// P = ceil(top_p × 2^32) (`top_p` rounded up to 32 fractional bits); at least 1.
pub fn top_p_need(top_p: f32, total: u64) -> u64 {
    let p32 = (f64::from(top_p) * WEIGHT_ONE as f64).ceil() as u128;
    let need = (p32 * u128::from(total)).div_ceil(u128::from(WEIGHT_ONE));
    (need as u64).max(1)
}

/// The candidates of a row at a temperature > 0: every token whose scaled gap to the best
/// logit `t = ((logit - max) / temperature) × log2(e)` (`f32`, in that order) is at least
/// [`T_MIN`], with its [`weight`], in id order. A row whose best logit is +inf has the +inf
/// tokens as its candidates, each of weight [`WEIGHT_ONE`].
fn candidates(logits: &[f32], temperature: f32) -> Vec<(u32, u64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Vec::new();
    }
    if max == f32::INFINITY {
        return (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] == f32::INFINITY)
            .map(|i| (i, WEIGHT_ONE))
            .collect();
    }
    let mut out = Vec::new();
    for (i, &l) in logits.iter().enumerate() {
        let t = (l - max) / temperature * std::f32::consts::LOG2_E;
        if t >= T_MIN {
            out.push((i as u32, weight(t)));
        }
    }
    out
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

/// The inverse CDF: the first token of `kept` (id order) whose running sum of weights exceeds
/// floor(x × total / 2^32).
fn pick(kept: &[(u32, u64)], total: u64, x: u32) -> u32 {
    let target = ((u128::from(x) * u128::from(total)) >> 32) as u64;
    let mut cum = 0u64;
    for &(id, w) in kept {
        cum += w;
        if cum > target {
            return id;
        }
    }
    // target < total, so the loop returned; the last token is the answer of a total that
    // rounding could never reach.
    kept.last().map_or(0, |&(id, _)| id)
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
                let t = (logits[i as usize] - max) / p.temperature * std::f32::consts::LOG2_E;
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
