//! Choosing the next token from a row of logits: greedy, or temperature / top-k / top-p sampling
//! from a seeded RNG owned by one request, after the OpenAI-style frequency and presence
//! penalties on the tokens generated so far.
//!
//! Deterministic: the same logits, parameters and seed give the same token on every machine and
//! in any batch, because each request has its own RNG that draws exactly one number per sampled
//! token, candidates are ordered by (logit descending, id ascending), and probabilities are
//! computed in f64 in that fixed order.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

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
    /// Seed of the request's RNG.
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

/// A request's sampler: its parameters and its RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256PlusPlus,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Xoshiro256PlusPlus::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. NaN logits count as impossible tokens.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let probs = self.distribution(logits);
        let u: f64 = self.rng.gen();
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut target = u * total;
        for &(id, p) in &probs {
            if target < p {
                return id;
            }
            target -= p;
        }
        probs.last().map_or_else(|| argmax(logits), |&(id, _)| id)
    }

    /// The candidates left after temperature, top-k and top-p, with their (unnormalised)
    /// probabilities, most likely first.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if p.top_k > 0 && p.top_k < order.len() {
            order.select_nth_unstable_by(p.top_k - 1, by_logit);
            order.truncate(p.top_k);
        }
        order.sort_unstable_by(by_logit);
        let Some(&best) = order.first() else {
            return Vec::new();
        };
        let max = logits[best as usize] as f64;
        let t = p.temperature.max(f32::MIN_POSITIVE) as f64;
        let mut probs: Vec<(u32, f64)> = order
            .iter()
            .map(|&i| (i, ((logits[i as usize] as f64 - max) / t).exp()))
            .collect();
        if p.top_p < 1.0 {
            let total: f64 = probs.iter().map(|&(_, q)| q).sum();
            let (mut cum, mut keep) = (0.0, probs.len());
            for (n, &(_, q)) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 * total {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        probs
    }
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
        let mut s = Sampler::new(params(0.0, 0, 1.0, 9));
        assert_eq!(s.sample(&[0.1, 0.2, 5.0]), 2);
        // top_k = 1 is greedy at any temperature.
        let mut s = Sampler::new(params(2.0, 1, 1.0, 9));
        assert_eq!(s.sample(&[0.1, 7.0, 5.0]), 1);
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
        // Greedy sampling is this function, and draws nothing from the RNG.
        let mut s = Sampler::new(params(0.0, 0, 1.0, 3));
        let before = s.rng.clone();
        assert_eq!(s.sample(&[nan, 0.5, 0.5]), 1);
        assert_eq!(s.rng, before);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let s = Sampler::new(params(1.0, 2, 1.0, 0));
        let d = s.distribution(&[1.0, 4.0, 3.0, 4.0]);
        // Ties go to the lower id: ids 1 and 3 (logit 4) beat id 2.
        assert_eq!(d.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![1, 3]);
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3));
        for _ in 0..200 {
            assert!(matches!(s.sample(&[1.0, 4.0, 3.0, 4.0]), 1 | 3));
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits ln of them).
        let logits = [0.5f32.ln(), 0.25f32.ln(), 0.125f32.ln(), 0.125f32.ln()];
        let ids = |top_p| {
            Sampler::new(params(1.0, 0, top_p, 0))
                .distribution(&logits)
                .iter()
                .map(|&(i, _)| i)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(0.5), vec![0]);
        assert_eq!(ids(0.6), vec![0, 1]);
        assert_eq!(ids(0.75), vec![0, 1]);
        assert_eq!(ids(0.8), vec![0, 1, 2]);
        assert_eq!(ids(1.0), vec![0, 1, 2, 3]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0f32, 1.0];
        let p1 = |t: f32| {
            let d = Sampler::new(params(t, 0, 1.0, 0)).distribution(&logits);
            let total: f64 = d.iter().map(|&(_, p)| p).sum();
            d.iter().find(|&&(i, _)| i == 1).unwrap().1 / total
        };
        let e = std::f64::consts::E;
        assert!((p1(1.0) - e / (1.0 + e)).abs() < 1e-12);
        assert!(p1(0.25) > 0.98 && p1(4.0) < 0.57 && p1(4.0) > 0.5);
        // Empirical frequency at T = 1 matches e / (1 + e) ≈ 0.731.
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11));
        let ones = (0..20000).filter(|_| s.sample(&logits) == 1).count() as f64 / 20000.0;
        assert!((ones - 0.731).abs() < 0.015, "{ones}");
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
