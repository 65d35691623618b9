//! The serving engine: requests in, token and text events out, one iteration at a time.
//!
//! [`Engine`] owns a [`Backend`] and every request's [`Sequence`]. A caller (the CLI, later the
//! Triton engine thread) adds requests at any time, cancels them, and calls [`Engine::step`],
//! which prefills the requests admitted this step, decodes every other running sequence as one
//! batch, and returns what happened as [`Event`]s. Requests join and leave between steps
//! (continuous batching).
//!
//! The engine never touches device memory or Triton types: sequences hold KV-cache handles, the
//! backend holds the cache. Invariant: every request that was added yields exactly one
//! [`Event::Finished`], after all of its [`Event::Token`]s; concatenating the `text_delta`s of
//! its events gives its whole output text.

pub mod detok;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod text;

use std::collections::VecDeque;
use std::sync::Arc;

pub use detok::Detokenizer;
pub use request::{Request, RequestId};
pub use sampler::{Sampler, SamplingParams};
pub use sequence::{Sequence, SequenceState, StopReason};

use crate::device::{Backend, DecodeItem, DeviceError, Logits};
use crate::model::LlamaConfig;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The device failed a step.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A request the engine cannot serve (bad parameters, prompt too long, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Tokenizing, detokenizing or templating failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Something that happened to a request during a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it released (possibly empty: held back until a character
    /// is complete or a possible stop string is decided).
    Token {
        /// The request.
        id: RequestId,
        /// The token id.
        token: u32,
        /// New output text.
        text_delta: String,
    },
    /// The request ended; it produces nothing more.
    Finished {
        /// The request.
        id: RequestId,
        /// Why.
        reason: StopReason,
        /// Output text released only at the end (held-back text at an end-of-sequence token).
        text_delta: String,
    },
}

/// What a decode step brought back from the backend.
enum StepOutput {
    /// Every row's greedy token ([`Backend::decode_argmax`]): all rows were
    /// [`Sequence::argmax_suffices`].
    Tokens(Vec<u32>),
    /// Every row's logits, sampled on the host.
    Logits(Logits),
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Tokens that end a sequence.
    pub eos_token_ids: Vec<u32>,
    /// Sequences decoded together at most (also bounded by the KV-cache slots).
    pub max_batch: usize,
    /// Prompt tokens prefilled per step (the first admitted prompt always is).
    pub max_prefill_tokens: usize,
}

impl EngineOptions {
    /// Defaults for a model: its config's end-of-sequence tokens, batches of up to 32.
    pub fn for_config(cfg: &LlamaConfig) -> Self {
        Self {
            eos_token_ids: cfg.eos_token_ids.clone(),
            max_batch: 32,
            max_prefill_tokens: 4096,
        }
    }
}

/// Counters since the engine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls of [`Engine::step`] that did work.
    pub steps: u64,
    /// Prompt tokens prefilled.
    pub prefill_tokens: u64,
    /// Sequences advanced by decode steps (one token each).
    pub decode_tokens: u64,
    /// Tokens emitted as output.
    pub generated_tokens: u64,
}

/// The iteration-level engine.
pub struct Engine<B: Backend> {
    backend: B,
    detok: Option<Arc<dyn Detokenizer>>,
    opts: EngineOptions,
    next_id: u64,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    pending: Vec<Event>,
    failed: Vec<RequestId>,
    stats: Stats,
}

impl<B: Backend> Engine<B> {
    /// An engine over a backend; without a detokenizer events carry no text and stop strings
    /// are refused.
    pub fn new(backend: B, detok: Option<Arc<dyn Detokenizer>>, opts: EngineOptions) -> Self {
        Self {
            backend,
            detok,
            opts,
            next_id: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending: Vec::new(),
            failed: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether a step would do anything.
    pub fn has_work(&self) -> bool {
        !(self.waiting.is_empty() && self.running.is_empty() && self.pending.is_empty())
    }

    /// Requests waiting and running.
    pub fn load(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// Tokens (prompt and generated) the running sequences hold: the KV cache in use, in the
    /// unit of [`KvCapacity`](crate::device::KvCapacity) (slots × tokens per slot).
    pub fn kv_tokens_in_use(&self) -> usize {
        self.running.iter().map(Sequence::total_len).sum()
    }

    fn context(&self) -> usize {
        self.backend
            .kv_capacity()
            .max_context
            .min(self.backend.config().max_position_embeddings)
    }

    /// Queues a request after validating it; it starts at a later step.
    pub fn add(&mut self, request: Request) -> Result<RequestId, EngineError> {
        request.validate(
            self.backend.config().vocab_size,
            self.context(),
            self.detok.is_some(),
        )?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.waiting.push_back(Sequence::new(id, request));
        Ok(id)
    }

    /// Cancels a request; its `Finished { reason: Cancelled }` comes with the next step. Returns
    /// false for a request that is unknown or already finished.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let mut s = self.waiting.remove(i).expect("index found above");
            s.state = SequenceState::Finished(StopReason::Cancelled);
            self.pending.push(Event::Finished {
                id,
                reason: StopReason::Cancelled,
                text_delta: String::new(),
            });
            return true;
        }
        match self
            .running
            .iter_mut()
            .find(|s| s.id == id && !s.cancel_requested)
        {
            Some(s) => {
                s.cancel_requested = true;
                true
            }
            None => false,
        }
    }

    /// The requests dropped by failed steps since the last call: each produces nothing more
    /// (no [`Event::Finished`] either), so a server must answer them with the step's error.
    pub fn take_failed(&mut self) -> Vec<RequestId> {
        std::mem::take(&mut self.failed)
    }

    /// Runs one iteration: retires cancelled requests, prefills newly admitted ones (each yields
    /// its first token), and decodes all other running ones in one batch (one token each).
    ///
    /// A device error is returned as is; the requests of the failed part of the step are
    /// dropped with their KV-cache slots freed and listed by [`Engine::take_failed`]; the others
    /// keep running, and the events of the step that did happen come with the next step.
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        let mut events = Vec::new();
        match self.step_into(&mut events) {
            Ok(()) => Ok(events),
            Err(e) => {
                events.append(&mut self.pending);
                self.pending = events;
                Err(e)
            }
        }
    }

    fn step_into(&mut self, events: &mut Vec<Event>) -> Result<(), EngineError> {
        events.append(&mut self.pending);
        let (cancelled, running): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.running)
                .into_iter()
                .partition(|s| s.cancel_requested);
        self.running = running;
        for mut s in cancelled {
            self.finish(&mut s, StopReason::Cancelled, String::new(), events);
        }
        if self.waiting.is_empty() && self.running.is_empty() {
            return Ok(());
        }
        self.stats.steps += 1;
        let cap = self.backend.kv_capacity();
        let limits = scheduler::Limits {
            max_running: self.opts.max_batch.min(cap.max_sequences).max(1),
            max_prefill_tokens: self.opts.max_prefill_tokens,
        };
        let waiting: Vec<(RequestId, usize)> = self
            .waiting
            .iter()
            .map(|s| (s.id, s.request.prompt.len()))
            .collect();
        let running: Vec<RequestId> = self.running.iter().map(|s| s.id).collect();
        let plan = scheduler::plan(&waiting, &running, limits);

        let mut admitted = Vec::with_capacity(plan.prefill.len());
        for _ in &plan.prefill {
            let mut s = self
                .waiting
                .pop_front()
                .expect("the plan admits waiting requests in order");
            let result = self.backend.new_sequence().and_then(|seq| {
                s.state = SequenceState::Running(seq);
                self.backend.prefill(seq, &s.request.prompt)
            });
            let result = result.map_err(EngineError::from).and_then(|logits| {
                self.stats.prefill_tokens += s.request.prompt.len() as u64;
                let token = self.sample(&mut s, &logits);
                self.accept(&mut s, token, events)
            });
            match result {
                Ok(true) => admitted.push(s),
                Ok(false) => {}
                Err(e) => {
                    // Drop this request; the ones admitted before it run from the next step.
                    if let Some(seq) = s.seq_id() {
                        self.backend.free_sequence(seq);
                    }
                    self.failed.push(s.id);
                    self.running.extend(admitted);
                    return Err(e);
                }
            }
        }

        if !self.running.is_empty() {
            let batch: Vec<DecodeItem> = self
                .running
                .iter()
                .map(|s| DecodeItem {
                    seq: s.seq_id().expect("running sequences hold a slot"),
                    token: *s
                        .output
                        .last()
                        .expect("a running sequence has sampled a token"),
                    pos: s.total_len() - 1,
                })
                .collect();
            // Only what the step needs comes back: the greedy ids when every row's choice is the
            // plain argmax, the logits otherwise (the same tokens either way).
            let result = if self.running.iter().all(Sequence::argmax_suffices) {
                self.backend.decode_argmax(&batch).and_then(|ids| {
                    if ids.len() == batch.len() {
                        Ok(StepOutput::Tokens(ids))
                    } else {
                        Err(DeviceError::Invalid(format!(
                            "decode_argmax returned {} ids for a batch of {}",
                            ids.len(),
                            batch.len()
                        )))
                    }
                })
            } else {
                self.backend.decode(&batch).map(StepOutput::Logits)
            };
            let out = match result {
                Ok(out) => out,
                Err(e) => {
                    for s in std::mem::take(&mut self.running) {
                        self.backend.free_sequence(s.seq_id().expect("running"));
                        self.failed.push(s.id);
                    }
                    self.running = admitted;
                    return Err(e.into());
                }
            };
            self.stats.decode_tokens += batch.len() as u64;
            let mut still = Vec::with_capacity(self.running.len());
            let mut failure = None;
            for (i, mut s) in std::mem::take(&mut self.running).into_iter().enumerate() {
                let token = match &out {
                    StepOutput::Tokens(ids) => ids[i],
                    StepOutput::Logits(logits) => self.sample(&mut s, logits.row(i)),
                };
                match self.accept(&mut s, token, events) {
                    Ok(true) => still.push(s),
                    Ok(false) => {}
                    Err(e) => {
                        self.backend.free_sequence(s.seq_id().expect("running"));
                        self.failed.push(s.id);
                        failure.get_or_insert(e);
                    }
                }
            }
            self.running = still;
            if let Some(e) = failure {
                self.running.extend(admitted);
                return Err(e);
            }
        }
        self.running.extend(admitted);
        Ok(())
    }

    /// Samples the next token of `s`, with end-of-sequence tokens masked while the sequence has
    /// fewer than its `min_tokens`.
    fn sample(&self, s: &mut Sequence, logits: &[f32]) -> u32 {
        let penalized;
        let logits = if s.sampler.params().has_penalties() {
            let mut row = logits.to_vec();
            s.sampler.params().apply_penalties(&mut row, &s.output);
            penalized = row;
            &penalized[..]
        } else {
            logits
        };
        if s.masks_eos() {
            let mut masked = logits.to_vec();
            for &t in &self.opts.eos_token_ids {
                if let Some(l) = masked.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return s.sampler.sample(&masked);
        }
        s.sampler.sample(logits)
    }

    /// Takes a sampled token for a running sequence; returns whether it keeps running.
    fn accept(
        &mut self,
        s: &mut Sequence,
        token: u32,
        events: &mut Vec<Event>,
    ) -> Result<bool, EngineError> {
        let context = self.context();
        let acc = s
            .accept(
                token,
                &self.opts.eos_token_ids,
                self.detok.as_deref(),
                context,
            )
            .map_err(EngineError::Tokenizer)?;
        let mut tail = acc.text_delta;
        if acc.emitted {
            self.stats.generated_tokens += 1;
            events.push(Event::Token {
                id: s.id,
                token,
                text_delta: std::mem::take(&mut tail),
            });
        }
        match acc.stop {
            Some(reason) => {
                self.finish(s, reason, tail, events);
                Ok(false)
            }
            None => Ok(true),
        }
    }

    fn finish(
        &mut self,
        s: &mut Sequence,
        reason: StopReason,
        text_delta: String,
        events: &mut Vec<Event>,
    ) {
        if let Some(seq) = s.seq_id() {
            self.backend.free_sequence(seq);
        }
        s.state = SequenceState::Finished(reason);
        events.push(Event::Finished {
            id: s.id,
            reason,
            text_delta,
        });
    }
}
