//! Pacing prefill against the running streams: how much prompt work a step may carry so that it
//! takes at most a set multiple of a decode-only step.
//!
//! A running stream gets one token per step, so its gap between tokens is the step's time. A
//! decode-only step is bound by reading the weights; a prompt chunk fused into it adds its rows'
//! compute, which grows with the chunk's position (attention over the prefix, see
//! [`CostModel`](super::scheduler::CostModel)). A fixed token count per step therefore either
//! stalls the streams late in a long prompt or wastes steps early in it. The [`Pacer`] measures
//! instead: the wall time of decode-only steps (the reference, the streams' plain gap) and the
//! seconds per cost unit that chunks add to a step, and gives each step with running streams a
//! budget of `(slowdown − 1) × reference` seconds of chunk work, converted to units, but at
//! least [`MIN_PACED_TOKENS`] tokens for its first chunk. With no stream running, the budget is
//! the token cap alone: a prompt prefills at full speed.
//!
//! Only long prompts are paced: a prompt of at most `EngineOptions::short_prompt_tokens` tokens
//! (by default the token cap: a prompt one step can hold) is limited by the cap alone, so a
//! burst of short requests starts together instead of a few tokens a step, one after another.
//! The engine asks for a paced budget only while a long prompt waits or is being prefilled, and
//! calibrates only on steps whose chunks were all long ones'.
//!
//! Estimates are exponentially weighted (the newest step weighs [`WEIGHT`]); the reference is
//! measured again by a step kept free of chunks once [`REFERENCE_STEPS`] steps followed the last
//! one (while prompts are prefilled every step), or [`MIN_REFERENCE_STEPS`] steps when the decode
//! batch changed size since. The pacer is deterministic given the step times it is told; the
//! engine tells it the wall time of each [`Engine::step`](super::Engine::step).

use super::scheduler::PrefillBudget;

/// Weight of the newest step in the running estimates.
pub const WEIGHT: f64 = 0.25;

/// Steps after which the decode-only reference is measured again (the next step runs without
/// chunks).
pub const REFERENCE_STEPS: u64 = 64;

/// Steps after the last reference before a decode batch of another size gets its own.
pub const MIN_REFERENCE_STEPS: u64 = 8;

/// Prompt tokens a paced step's first chunk gets at least. A chunk also has costs that do not
/// shrink with it (its prefix's keys and values are read once per tile of query rows; the
/// step's fixed overheads): where they alone exceed the budget, a smaller chunk would barely
/// shorten the step while multiplying the prompt's steps, so the floor bounds that loss (the
/// estimate of a unit's time includes those costs, so without a floor it would spiral down to
/// one-token chunks).
pub const MIN_PACED_TOKENS: usize = 8;

/// The plain decode step the budget is measured against.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Reference {
    /// Seconds of a decode-only step (weighted average).
    seconds: f64,
    /// Decode rows it had.
    rows: usize,
    /// The step count when it was last measured.
    step: u64,
}

/// The per-step prefill budget of an engine that keeps a step with running streams within
/// `slowdown` times a decode-only step.
#[derive(Clone, Debug, PartialEq)]
pub struct Pacer {
    slowdown: f64,
    reference: Option<Reference>,
    /// Weighted sums of the seconds chunks added to their steps and of the chunks' units.
    chunk_seconds: f64,
    chunk_units: f64,
    /// Whether a step with chunks and decode rows was measured; until then a chunk-only step's
    /// whole time counts as its chunks' (an overestimate: it includes reading the weights).
    marginal: bool,
    steps: u64,
}

impl Pacer {
    /// A pacer for steps of at most `slowdown` (≥ 1; below, or not a number, counts as 1) times
    /// a decode-only step.
    pub fn new(slowdown: f64) -> Self {
        Self {
            slowdown: slowdown.max(1.0),
            reference: None,
            chunk_seconds: 0.0,
            chunk_units: 0.0,
            marginal: false,
            steps: 0,
        }
    }

    /// The step-time multiple it keeps to.
    pub fn slowdown(&self) -> f64 {
        self.slowdown
    }

    /// The budget of the next step, which decodes `decode_rows` running sequences, under a cap
    /// of `cap` prompt tokens, with prompts of at most `short` tokens to prefill never paced
    /// (the cap alone limits them): the cap alone when nothing decodes; no tokens at all when
    /// the reference is missing or due (the step measures it, so short prompts wait that one
    /// decode step too); otherwise, for long prompts' chunks, the units that fit in
    /// `(slowdown − 1) × reference` seconds (none while no chunk was ever timed), with the
    /// first long chunk's floor of [`MIN_PACED_TOKENS`].
    pub fn budget(&self, cap: usize, decode_rows: usize, short: usize) -> PrefillBudget {
        if decode_rows == 0 {
            return PrefillBudget::tokens(cap);
        }
        let Some(r) = self.reference else {
            return PrefillBudget::paced(0, 0, 0, short);
        };
        let age = self.steps - r.step;
        if age >= REFERENCE_STEPS || (r.rows != decode_rows && age >= MIN_REFERENCE_STEPS) {
            return PrefillBudget::paced(0, 0, 0, short);
        }
        let units = if self.chunk_units > 0.0 {
            let per_unit = self.chunk_seconds / self.chunk_units;
            // Saturates: a chunk that never measurably added time is limited by the cap alone.
            ((self.slowdown - 1.0) * r.seconds / per_unit) as u64
        } else {
            0
        };
        PrefillBudget::paced(cap, units, MIN_PACED_TOKENS, short)
    }

    /// Records a step whose time says nothing about long prompts' chunks (it carried a short
    /// prompt's, at another cost per unit): it only counts towards the reference's age.
    pub fn skip(&mut self) {
        self.steps += 1;
    }

    /// Records a step that ran `units` of prompt chunks and `decode_rows` decode rows in
    /// `seconds`.
    pub fn observe(&mut self, units: u64, decode_rows: usize, seconds: f64) {
        self.steps += 1;
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            return;
        };
        match (units, decode_rows) {
            (0, 0) => {}
            (0, rows) => {
                let seconds = match self.reference {
                    Some(r) if r.rows == rows => r.seconds + WEIGHT * (seconds - r.seconds),
                    _ => seconds,
                };
                self.reference = Some(Reference {
                    seconds,
                    rows,
                    step: self.steps,
                });
            }
            (u, 0) => {
                if !self.marginal {
                    self.add_chunk(seconds, u);
                }
            }
            (u, _) => {
                if let Some(r) = self.reference {
                    self.marginal = true;
                    self.add_chunk((seconds - r.seconds).max(0.0), u);
                }
            }
        }
    }

    fn add_chunk(&mut self, seconds: f64, units: u64) {
        self.chunk_seconds = (1.0 - WEIGHT) * self.chunk_seconds + seconds;
        self.chunk_units = (1.0 - WEIGHT) * self.chunk_units + units as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::scheduler::CostModel;

    /// Roughly SmolLM2-135M: 2.1e8 units a row, 69,120 per position, 5.7e7 for `lm_head`.
    const MODEL: CostModel = CostModel {
        row: 212_336_640,
        per_context: 69_120,
        head: 56_623_104,
    };

    /// A machine whose decode-only step of 4 rows takes `decode` seconds and whose chunks add
    /// `overhead` seconds a step and `per_unit` seconds a unit, the latter slower by
    /// `slower_after` × from step `change` of the prompt.
    struct Machine {
        decode: f64,
        overhead: f64,
        per_unit: f64,
        change: usize,
        slower_after: f64,
    }

    /// Four streams decode (8 decode-only steps after their own prefill of 4 × 16 tokens in one
    /// chunk-only step), then a `len`-token prompt is prefilled under the pacer with a cap of
    /// 256 tokens. Returns each step's chunk tokens and time, from the prompt's arrival.
    fn simulate(p: &mut Pacer, m: &Machine, len: usize) -> Vec<(usize, f64)> {
        let seed = MODEL.chunk(0, 16) * 4;
        p.observe(seed, 0, 0.030 + m.per_unit * seed as f64);
        for _ in 0..8 {
            p.observe(0, 4, m.decode);
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < len {
            let b = p.budget(256, 4, 0);
            let k = b.fit(&MODEL, at, len);
            let units = MODEL.chunk(at, k);
            let per_unit = if out.len() >= m.change {
                m.per_unit * m.slower_after
            } else {
                m.per_unit
            };
            let overhead = if k > 0 { m.overhead } else { 0.0 };
            let t = m.decode + overhead + per_unit * units as f64;
            p.observe(units, 4, t);
            out.push((k, t));
            at += k;
            assert!(out.len() < 100_000, "the prompt must progress");
        }
        out
    }

    #[test]
    fn a_paced_step_converges_to_the_target_multiple_of_a_decode_step() {
        let m = Machine {
            decode: 0.040,
            overhead: 0.0,
            per_unit: 1.0 / 200e9,
            change: usize::MAX,
            slower_after: 1.0,
        };
        let mut p = Pacer::new(2.0);
        let steps = simulate(&mut p, &m, 4096);
        // The first chunks are cautious (the seed counts the weight reads as chunk work), then
        // every chunk step lands within 10% under the target: 2 × 40 ms.
        let target = 2.0 * m.decode;
        for (i, &(k, t)) in steps.iter().enumerate() {
            assert!(t <= target * 1.0001, "step {i}: {t} s over {target} s");
            // A whole token less than the budget is at most 2.5 ms here.
            if i >= 12 && k > 0 && i + 1 < steps.len() {
                assert!(t >= 0.9 * target, "step {i}: {t} s wastes the budget");
            }
        }
        // Chunks shrink as the prompt's attention grows.
        let chunked: Vec<usize> = steps.iter().map(|s| s.0).filter(|&k| k > 0).collect();
        let late = chunked[chunked.len() - 2];
        assert!(chunked[12] as f64 > 1.8 * late as f64, "{chunked:?}");
        // After every REFERENCE_STEPS steps one step stays decode-only, at the decode time.
        let refs: Vec<usize> = (0..steps.len()).filter(|&i| steps[i].0 == 0).collect();
        assert!(!refs.is_empty());
        for w in refs.windows(2) {
            assert_eq!(w[1] - w[0], REFERENCE_STEPS as usize + 1);
        }
        for &i in &refs {
            assert_eq!(steps[i].1, m.decode);
        }
    }

    #[test]
    fn a_machine_that_slows_down_is_followed() {
        let m = Machine {
            decode: 0.100,
            overhead: 0.0,
            per_unit: 1.0 / 200e9,
            change: 100,
            slower_after: 1.5,
        };
        let mut p = Pacer::new(1.5);
        let steps = simulate(&mut p, &m, 4096);
        // The step after the change overshoots (its chunk was sized for the faster machine);
        // the estimate catches up within a few steps and the target holds again.
        let target = 1.5 * m.decode;
        assert!(steps[100].1 > target * 1.05);
        for (i, &(_, t)) in steps.iter().enumerate().skip(110) {
            assert!(t <= target * 1.01, "step {i}: {t} s over {target} s");
        }
    }

    #[test]
    fn a_target_out_of_reach_keeps_chunks_at_the_floor_not_below() {
        // Every chunk step costs 30 ms more than a decode step before its first token: 1.5 ×
        // 40 ms cannot be met. Once the estimate caught up (the seed is a step without that
        // overhead), the chunks stay at MIN_PACED_TOKENS: no spiral down to one token.
        let m = Machine {
            decode: 0.040,
            overhead: 0.030,
            per_unit: 1.0 / 200e9,
            change: usize::MAX,
            slower_after: 1.0,
        };
        let mut p = Pacer::new(1.5);
        let steps = simulate(&mut p, &m, 4096);
        let chunks: Vec<usize> = steps.iter().map(|s| s.0).filter(|&k| k > 0).collect();
        let (last, most) = chunks.split_last().expect("chunks ran");
        assert!(
            *last <= MIN_PACED_TOKENS,
            "the remainder {last}: {chunks:?}"
        );
        assert!(most.iter().all(|&k| k >= MIN_PACED_TOKENS), "{chunks:?}");
        assert!(
            most[10..].iter().all(|&k| k == MIN_PACED_TOKENS),
            "{chunks:?}"
        );
    }

    #[test]
    fn without_running_streams_the_cap_alone_limits_a_step() {
        let mut p = Pacer::new(1.5);
        assert_eq!(p.budget(256, 0, 0), PrefillBudget::tokens(256));
        p.observe(MODEL.chunk(0, 256), 0, 1.0);
        p.observe(0, 4, 0.04);
        assert_eq!(p.budget(256, 0, 0), PrefillBudget::tokens(256));
        assert!(p.budget(256, 4, 0).units.is_some());
    }

    #[test]
    fn the_reference_is_measured_before_pacing_and_again_for_another_batch() {
        let mut p = Pacer::new(2.0);
        // Streams decode but no decode-only step was timed: this step measures one.
        assert_eq!(p.budget(256, 4, 0).fit(&MODEL, 0, 4096), 0);
        p.observe(0, 4, 0.040);
        // Without a chunk ever timed: no units, so the step's first chunk gets the floor.
        let b = p.budget(256, 4, 0);
        assert_eq!((b.tokens, b.units), (256, Some(0)));
        assert_eq!(b.fit(&MODEL, 0, 4096), MIN_PACED_TOKENS);
        p.observe(MODEL.chunk(0, 8), 4, 0.040 + 0.0025);
        // 2.5 ms for 8 rows' units: (2 − 1) × 40 ms holds 16 times them.
        let units = p.budget(256, 4, 0).units.expect("paced");
        let want = 16.0 * MODEL.chunk(0, 8) as f64;
        assert!(
            (units as f64 - want).abs() <= 1.0 + want * 1e-9,
            "{units} vs {want}"
        );
        // A batch of another size uses the old reference for a while, then measures its own.
        for _ in 1..MIN_REFERENCE_STEPS {
            assert_ne!(p.budget(256, 3, 0).tokens, 0);
            p.observe(MODEL.chunk(0, 8), 3, 0.060);
        }
        assert_eq!(p.budget(256, 3, 0).tokens, 0);
        p.observe(0, 3, 0.030);
        assert_ne!(p.budget(256, 3, 0).tokens, 0);
    }

    #[test]
    fn a_slowdown_below_one_counts_as_one() {
        assert_eq!(Pacer::new(0.5).slowdown(), 1.0);
        assert_eq!(Pacer::new(f64::NAN).slowdown(), 1.0);
        assert_eq!(Pacer::new(2.5).slowdown(), 2.5);
    }

    #[test]
    fn short_prompts_ignore_the_units_but_wait_for_a_reference_step() {
        let mut p = Pacer::new(2.0);
        // No reference yet: a decode-only step, short prompts included.
        assert_eq!(p.budget(256, 4, 256).fit(&MODEL, 0, 100), 0);
        p.observe(0, 4, 0.040);
        // No chunk timed yet, so no units: a long prompt gets the floor, a short one all of it.
        let b = p.budget(256, 4, 256);
        assert_eq!(b.units, Some(0));
        assert_eq!(b.fit(&MODEL, 0, 4096), MIN_PACED_TOKENS);
        assert_eq!(b.fit(&MODEL, 0, 256), 256);
        assert_eq!(b.fit(&MODEL, 200, 256), 56);
        // Steps that carried short prompts calibrate nothing but age the reference.
        for _ in 0..REFERENCE_STEPS {
            assert_ne!(p.budget(256, 4, 256).tokens, 0);
            p.skip();
        }
        assert_eq!(p.chunk_units, 0.0);
        assert_eq!(p.budget(256, 4, 256).tokens, 0);
    }
}
