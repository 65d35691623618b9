//! The backend side of token choice: what a decode row needs for its token to be chosen where
//! its logits are ([`RowSampling`], [`Backend::decode_sampled`](super::Backend::decode_sampled)),
//! and the two conversions of a request's parameters to the fixed-point form the choice uses
//! ([`gap_scale`], [`top_p_fixed`]).
//!
//! They live here, not in the engine's sampler (`engine::sampler`, which re-exports them and
//! holds the reference implementation, `engine::sampler::choose`), because they are part of the
//! backend contract: a device sampler (the CUDA kernel `sample_rows`) receives these values and
//! must reach the reference's token from the same logits, bit for bit (docs/sampling.md).

/// One change to a row's logits before its token is chosen (docs/sampling.md steps 1 and 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LogitEdit {
    /// `l = l - delta`, one correctly rounded `f32` subtraction: a frequency/presence penalty,
    /// `delta = frequency_penalty × count + presence_penalty` computed by the engine in `f32`.
    /// Always finite.
    Subtract(f32),
    /// `l = -inf`: an end-of-sequence or stop token while the request is under its
    /// `min_tokens`. Applies after (and wins over) a penalty of the same token.
    Mask,
}

/// How one decode row's token is chosen (docs/sampling.md): the edits of its logits, then
/// greedy or temperature / top-k / top-p sampling with the Philox draw of (seed, position).
///
/// Why a backend sees this at all: a device backend that chooses tokens itself sends 4 bytes
/// per row back to the host instead of a row of logits (Llama 3: 0.5 MB per row, 65 MB at batch
/// 128), and the host never scans them.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSampling {
    /// 0 for greedy; otherwise the logits are divided by it (as [`gap_scale`]).
    pub temperature: f32,
    /// Keep only the `top_k` best-ranked candidates; 0 keeps all. (A value at or above the
    /// vocabulary keeps all as well.)
    pub top_k: u32,
    /// The nucleus, in (0, 1]; 1 keeps all.
    pub top_p: f32,
    /// The request's key of its draws.
    pub seed: u64,
    /// Tokens the request generated before this one: the draw's counter.
    pub position: u64,
    /// Edits of the row's logits, at most one per token id, in increasing id order (ids beyond
    /// the row are ignored).
    pub edits: Vec<(u32, LogitEdit)>,
}

impl RowSampling {
    /// Whether the token is the arg-max of the edited logits (no draw): temperature 0 or
    /// top-k 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Whether every part of the choice is in range: temperature finite and ≥ 0, `top_p` in
    /// (0, 1], penalty deltas finite, edit ids strictly increasing. The engine only builds rows
    /// that pass; a backend checks before it launches anything.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature {} is not finite and >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} is not in (0, 1]", self.top_p));
        }
        for w in self.edits.windows(2) {
            if w[0].0 >= w[1].0 {
                return Err(format!(
                    "logit edits are not in strictly increasing id order ({} then {})",
                    w[0].0, w[1].0
                ));
            }
        }
        if let Some((id, _)) = self
            .edits
            .iter()
            .find(|(_, e)| matches!(e, LogitEdit::Subtract(d) if !d.is_finite()))
        {
            return Err(format!("the penalty of token {id} is not finite"));
        }
        Ok(())
    }
}

/// The factor of the logit gaps: a token's scaled gap is `t = (logit - max) × gap_scale`, with
/// `gap_scale = min(log2(e) / temperature, f32::MAX)` (one correctly rounded `f32` division;
/// the minimum keeps a subnormal temperature from making 0 × inf). Computed on the host and
/// handed to a device sampler as it is, so both use the same bits.
pub fn gap_scale(temperature: f32) -> f32 {
    (std::f32::consts::LOG2_E / temperature).min(f32::MAX)
}

/// `top_p` rounded up to 32 fractional bits: `ceil(top_p × 2^32)` (exact in `f64`), in
/// [1, 2^32] for a `top_p` in (0, 1]; 2^32 means no nucleus cut. The top-p cut needs
/// `ceil(top_p_fixed × W / 2^32)` of the kept weight `W` (docs/sampling.md step 8).
pub fn top_p_fixed(top_p: f32) -> u64 {
    (f64::from(top_p) * (1u64 << 32) as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RowSampling {
        RowSampling {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: 7,
            position: 3,
            edits: vec![(2, LogitEdit::Subtract(0.5)), (9, LogitEdit::Mask)],
        }
    }

    #[test]
    fn validation_names_what_is_out_of_range() {
        assert!(row().validate().is_ok());
        let bad = |f: fn(&mut RowSampling)| {
            let mut r = row();
            f(&mut r);
            r.validate().unwrap_err()
        };
        assert!(bad(|r| r.temperature = -1.0).contains("temperature"));
        assert!(bad(|r| r.temperature = f32::NAN).contains("temperature"));
        assert!(bad(|r| r.top_p = 0.0).contains("top_p"));
        assert!(bad(|r| r.top_p = 1.5).contains("top_p"));
        assert!(bad(|r| r.edits.reverse()).contains("increasing"));
        assert!(bad(|r| r.edits.push((9, LogitEdit::Mask))).contains("increasing"));
        assert!(bad(|r| r.edits[0].1 = LogitEdit::Subtract(f32::INFINITY)).contains("token 2"));
    }

    #[test]
    fn greedy_is_temperature_zero_or_top_k_one() {
        let mut r = row();
        assert!(!r.is_greedy());
        r.top_k = 1;
        assert!(r.is_greedy());
        r.top_k = 0;
        r.temperature = 0.0;
        assert!(r.is_greedy());
    }

    #[test]
    fn top_p_fixed_rounds_up_to_32_fractional_bits() {
        assert_eq!(top_p_fixed(1.0), 1 << 32);
        assert_eq!(top_p_fixed(0.5), 1 << 31);
        // 0.95f32 × 2^32 is an integer (4,080,218,880); 0.001f32 × 2^32 = 4,294,967.5 is not,
        // and rounds up.
        assert_eq!(top_p_fixed(0.95), 4_080_218_880);
        assert_eq!(top_p_fixed(0.001), 4_294_968);
        assert_eq!(top_p_fixed(f32::MIN_POSITIVE), 1);
    }
}
