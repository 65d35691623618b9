//! One request's life in the engine: its state machine, its generated tokens and text, and the
//! reasons it can end.
//!
//! `Waiting → Running → Finished(reason)`, or `Waiting → Finished(Cancelled)`. A sequence holds
//! a KV-cache handle ([`SeqId`]) only while `Running`; the engine frees it on the transition to
//! `Finished`.

use std::fmt;

use super::detok::{Detokenizer, Filtered, IncrementalText, StopFilter};
use super::request::{Request, RequestId};
use super::sampler::{Sampler, TokenCounts};
use crate::device::SeqId;

/// Why a sequence stopped. Rendered to text only by [`StopReason::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The model produced an end-of-sequence token (not part of the output).
    Eos,
    /// The model produced one of the request's stop tokens (not part of the output).
    StopToken,
    /// The text reached one of the request's stop strings (cut before it).
    StopString,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The sequence filled the model's (or the KV cache's) context.
    ContextFull,
    /// The client cancelled the request.
    Cancelled,
}

impl StopReason {
    /// The one textual rendering, used in events, JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StopToken => "stop_token",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a sequence is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceState {
    /// Admitted to the queue, no KV cache yet.
    Waiting,
    /// Holding a KV-cache slot: its prompt being prefilled chunk by chunk, then producing one
    /// token per step.
    Running(SeqId),
    /// Done; holds nothing.
    Finished(StopReason),
}

/// The outcome of accepting one token.
#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Whether the token is part of the output (an end-of-sequence token is not).
    pub emitted: bool,
    /// Text released by this token.
    pub text_delta: String,
    /// Set when the sequence must stop after this token.
    pub stop: Option<StopReason>,
}

/// A request being served.
pub struct Sequence {
    /// Its id.
    pub id: RequestId,
    /// What was asked.
    pub request: Request,
    /// Its state.
    pub state: SequenceState,
    /// Its sampler (parameters and RNG).
    pub sampler: Sampler,
    /// Generated tokens, in order (no end-of-sequence token).
    pub output: Vec<u32>,
    /// Set by a cancellation; acted on at the next step.
    pub cancel_requested: bool,
    /// Tokens of [`Sequence::prefill_tokens`] already in the KV cache while its prompt is
    /// prefilled chunk by chunk (0 while waiting).
    pub prefilled: usize,
    text: IncrementalText,
    stops: StopFilter,
    /// Counts of the tokens in `output`, kept only when the request has penalties (each step
    /// needs them; recounting a long output every step would cost O(output) per row).
    counts: TokenCounts,
}

impl Sequence {
    /// A new waiting sequence.
    pub fn new(id: RequestId, request: Request) -> Self {
        let sampler = Sampler::new(request.sampling.clone());
        let stops = StopFilter::new(&request.stop);
        Self {
            id,
            request,
            state: SequenceState::Waiting,
            sampler,
            output: Vec::new(),
            cancel_requested: false,
            prefilled: 0,
            text: IncrementalText::default(),
            stops,
            counts: TokenCounts::new(),
        }
    }

    /// The KV-cache handle while running.
    pub fn seq_id(&self) -> Option<SeqId> {
        match self.state {
            SequenceState::Running(s) => Some(s),
            _ => None,
        }
    }

    /// Tokens in the KV cache once the last sampled token is fed back: prompt + output.
    pub fn total_len(&self) -> usize {
        self.request.prompt.len() + self.output.len()
    }

    /// Tokens to prefill when the sequence is admitted: its prompt, or, for a sequence
    /// preempted after it generated tokens, the prompt and every output token but the last,
    /// which the next decode step feeds (so the sequence resumes exactly where it was).
    pub fn prefill_tokens(&self) -> Vec<u32> {
        let mut t = self.request.prompt.clone();
        if let Some((_, rest)) = self.output.split_last() {
            t.extend_from_slice(rest);
        }
        t
    }

    /// Whether every token of [`Sequence::prefill_tokens`] is in the KV cache (the sequence
    /// decodes from now on).
    pub fn prefill_done(&self) -> bool {
        self.prefilled >= self.kv_len()
    }

    /// Tokens in the KV cache while running: prompt and output, less the last sampled token,
    /// which is not fed back yet.
    pub fn kv_len(&self) -> usize {
        self.total_len() - usize::from(!self.output.is_empty())
    }

    /// Whether the next token is chosen with the end-of-sequence tokens (unless ignored) and the
    /// request's stop tokens masked: fewer than the request's `min_tokens` were generated and
    /// there is something to mask.
    pub fn masks_eos(&self) -> bool {
        self.output.len() < self.request.min_tokens
            && (!self.request.ignore_eos || !self.request.stop_token_ids.is_empty())
    }

    /// The position of the next token to sample: how many tokens the sequence generated
    /// (the counter of its random draw, docs/sampling.md).
    pub fn position(&self) -> u64 {
        self.output.len() as u64
    }

    /// The penalty of each token the sequence generated, in id order
    /// ([`SamplingParams::penalties`](super::sampler::SamplingParams::penalties) of its output,
    /// from counts kept as tokens are accepted).
    pub fn penalties(&self) -> Vec<(u32, f32)> {
        self.sampler.params().penalties_of(&self.counts)
    }

    /// Whether the next token is exactly [`argmax`](crate::device::argmax) of the raw logits:
    /// greedy parameters (which never draw from the RNG) and no end-of-sequence masking. Only
    /// then may the engine take the backend's greedy ids ([`crate::device::Backend::
    /// decode_argmax`]) instead of the logits; anything that reads or changes the logits
    /// (temperature, top-k, top-p, penalties, `min_tokens` masking) needs the whole row.
    pub fn argmax_suffices(&self) -> bool {
        let p = self.sampler.params();
        p.is_greedy() && !p.has_penalties() && !self.masks_eos()
    }

    /// Takes a sampled token: checks end-of-sequence and stop tokens, decodes text, applies stop strings and
    /// the token limit. `context` is the most tokens the sequence may hold.
    pub fn accept(
        &mut self,
        token: u32,
        eos: &[u32],
        detok: Option<&dyn Detokenizer>,
        context: usize,
    ) -> Result<Accepted, String> {
        let end = if self.request.stop_token_ids.contains(&token) {
            Some(StopReason::StopToken)
        } else if !self.request.ignore_eos && eos.contains(&token) {
            Some(StopReason::Eos)
        } else {
            None
        };
        if let Some(reason) = end {
            let text_delta = self.finish_text(detok)?;
            return Ok(Accepted {
                emitted: false,
                text_delta,
                stop: Some(reason),
            });
        }
        self.output.push(token);
        if self.sampler.params().has_penalties() {
            *self.counts.entry(token).or_default() += 1;
        }
        let mut stop = None;
        let raw = match detok {
            Some(d) => self.text.push(d, token)?,
            None => String::new(),
        };
        let mut text_delta = match self.stops.push(&raw) {
            Filtered::Text(t) => t,
            Filtered::Stop(t) => {
                stop = Some(StopReason::StopString);
                t
            }
        };
        if stop.is_none() {
            if self.output.len() >= self.request.max_tokens {
                stop = Some(StopReason::MaxTokens);
            } else if self.total_len() > context {
                // Feeding this token back would need position `context`, one past the end.
                stop = Some(StopReason::ContextFull);
            }
            if stop.is_some() {
                text_delta.push_str(&self.finish_text(detok)?);
            }
        }
        Ok(Accepted {
            emitted: true,
            text_delta,
            stop,
        })
    }

    /// Releases all text still held (pending characters and possible stop-string prefixes), at
    /// the end of a sequence that did not stop on a stop string.
    pub fn finish_text(&mut self, detok: Option<&dyn Detokenizer>) -> Result<String, String> {
        let tail = match detok {
            Some(d) => self.text.finish(d)?,
            None => String::new(),
        };
        Ok(match self.stops.push(&tail) {
            Filtered::Text(mut t) => {
                t.push_str(&self.stops.finish());
                t
            }
            Filtered::Stop(t) => t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::SamplingParams;

    fn seq(sampling: SamplingParams, min_tokens: usize, ignore_eos: bool) -> Sequence {
        Sequence::new(
            RequestId(0),
            Request {
                sampling,
                min_tokens,
                ignore_eos,
                ..Request::greedy(vec![1, 2], 8)
            },
        )
    }

    fn sampled(temperature: f32, top_k: usize) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p: 0.9,
            seed: 1,
            ..SamplingParams::default()
        }
    }

    /// Which rows may take the backend's greedy ids instead of logits.
    #[test]
    fn penalties_from_kept_counts_equal_those_of_the_whole_output() {
        let params = SamplingParams {
            temperature: 0.8,
            frequency_penalty: 0.6,
            presence_penalty: -0.25,
            ..SamplingParams::default()
        };
        let mut s = Sequence::new(
            RequestId(0),
            Request {
                sampling: params.clone(),
                ..Request::greedy(vec![1, 2], 32)
            },
        );
        assert!(s.penalties().is_empty());
        for t in [7u32, 3, 7, 900, 3, 7, 42] {
            s.accept(t, &[], None, 1024).unwrap();
            assert_eq!(s.penalties(), params.penalties(&s.output));
        }
        assert_eq!(s.penalties()[1], (7, 0.6f32 * 3.0 + -0.25f32));
        // Without penalties nothing is counted or charged.
        let mut g = seq(SamplingParams::default(), 0, false);
        g.accept(7, &[], None, 1024).unwrap();
        assert!(g.penalties().is_empty() && g.counts.is_empty());
    }

    #[test]
    fn argmax_suffices_only_for_greedy_rows_without_eos_masking() {
        // Plain greedy; greedy through top_k = 1 at any temperature.
        assert!(seq(SamplingParams::default(), 0, false).argmax_suffices());
        assert!(seq(sampled(0.0, 0), 0, false).argmax_suffices());
        assert!(seq(sampled(1.5, 1), 0, false).argmax_suffices());
        // Sampling reads the whole row.
        assert!(!seq(sampled(0.7, 0), 0, false).argmax_suffices());
        assert!(!seq(sampled(0.7, 40), 0, false).argmax_suffices());
        // min_tokens masks end-of-sequence logits until reached, unless EOS is ignored.
        let mut s = seq(SamplingParams::default(), 2, false);
        assert!(s.masks_eos() && !s.argmax_suffices());
        s.output.push(5);
        assert!(s.masks_eos() && !s.argmax_suffices());
        s.output.push(6);
        assert!(!s.masks_eos() && s.argmax_suffices());
        let s = seq(SamplingParams::default(), 2, true);
        assert!(!s.masks_eos() && s.argmax_suffices());
    }
}
