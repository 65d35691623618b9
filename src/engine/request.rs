//! What a client asks of the engine: a tokenized prompt, sampling parameters and stop
//! conditions.

use super::sampler::SamplingParams;
use super::EngineError;

/// Identifies a request for its whole life (never reused by one engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt token ids (already templated and tokenized); at least one.
    pub prompt: Vec<u32>,
    /// How tokens are chosen.
    pub sampling: SamplingParams,
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Text at which generation stops (the stop string itself is not returned). Needs an engine
    /// with a tokenizer.
    pub stop: Vec<String>,
    /// Token ids at which generation stops, as at an end-of-sequence token (the stop token is
    /// not part of the output); honoured even with `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating through end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// End-of-sequence tokens and the request's stop tokens are never sampled before this many
    /// tokens were generated (their logits are masked), so the output has at least this many
    /// tokens unless a stop string or the context ends it first. At most `max_tokens`.
    pub min_tokens: usize,
}

impl Request {
    /// A greedy request for `max_tokens` tokens.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
        }
    }

    /// Checks the request against the model: a non-empty prompt of in-vocabulary ids that
    /// leaves room for one generated token, a positive token limit, stop tokens in the
    /// vocabulary, valid sampling parameters.
    pub fn validate(
        &self,
        vocab: usize,
        context: usize,
        has_tokenizer: bool,
    ) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if self.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if let Some(&t) = self.prompt.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!(
                "prompt token {t} is outside the vocabulary of {vocab}"
            ));
        }
        if self.prompt.len() >= context {
            return bad(format!(
                "the prompt has {} tokens; the context holds {context}, leaving no room to generate",
                self.prompt.len()
            ));
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return bad(format!(
                "min_tokens ({}) is larger than max_tokens ({})",
                self.min_tokens, self.max_tokens
            ));
        }
        if !self.stop.is_empty() && !has_tokenizer {
            return bad("stop strings need an engine with a tokenizer".into());
        }
        if let Some(&t) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!(
                "stop token {t} is outside the vocabulary of {vocab}"
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("a stop string is empty".into());
        }
        self.sampling.validate()
    }
}
