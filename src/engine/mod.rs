//! The serving engine: requests in, token and text events out, one iteration at a time.
//!
//! [`Engine`] owns a [`Backend`] and every request's [`Sequence`]. A caller (the CLI, the Triton
//! engine thread) adds requests at any time, cancels them, and calls [`Engine::step`], which
//! prefills the next chunks of prompts under a per-step budget (chunked prefill: a long prompt
//! is spread over several steps; while streams run, a long prompt's chunks are paced so a step
//! stays within a multiple of a decode-only step, [`pacing`], and short prompts are admitted
//! whole under the token cap), decodes every other running sequence as one batch, and
//! returns what happened as [`Event`]s. Requests join and leave between steps (continuous
//! batching).
//!
//! The engine never touches device memory or Triton types: sequences hold KV-cache handles, the
//! backend holds the cache. Invariant: every request that was added yields exactly one
//! [`Event::Finished`], after all of its [`Event::Token`]s; concatenating the `text_delta`s of
//! its events gives its whole output text.

pub mod detok;
pub mod pacing;
#[cfg(test)]
mod paging_tests;
pub mod philox;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod text;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub use detok::Detokenizer;
pub use pacing::Pacer;
pub use request::{Request, RequestId};
pub use sampler::{Sampler, SamplingParams};
pub use sequence::{Sequence, SequenceState, StopReason};

use crate::device::{
    Backend, ChunkItem, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, KvUsage, Launched,
    LogitEdit, Logits, RowSampling,
};
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
    /// [`Engine::begin_step`] with a step already begun, or [`Engine::finish_step`] with none.
    #[error("engine step order: {0}")]
    StepOrder(&'static str),
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
    /// Every row's token, chosen by the backend: the greedy ids ([`Backend::decode_argmax`],
    /// all rows [`Sequence::argmax_suffices`]) or the device sampler's
    /// ([`Backend::decode_sampled`]).
    Tokens(Vec<u32>),
    /// Every row's logits, sampled on the host.
    Logits(Logits),
}

/// A step between [`Engine::begin_step`] and [`Engine::finish_step`].
struct Staged {
    /// Its events so far (cancellations, first tokens of prompts, earlier pending events).
    events: Vec<Event>,
    /// When it began (the pacer's step time).
    start: Instant,
    /// Its decode batch, launched; `None` when it has none (or ran it fused).
    decode: Option<PendingDecode>,
}

/// A decode batch launched by [`Backend::launch_decode`], to be finished.
struct PendingDecode {
    launched: Launched,
    /// Rows of the batch: the running sequences, in order.
    rows: usize,
    /// The synchronous call the launch stands for (for errors).
    what: &'static str,
    /// Prompts whose last chunk ran in this step: they join `running` after the decode.
    admitted: Vec<Sequence>,
}

/// A backend's ids for a decode batch of `rows`, or an error naming the call (`what`) when it
/// returned another number of them.
fn checked_ids(ids: Vec<u32>, rows: usize, what: &str) -> Result<StepOutput, DeviceError> {
    if ids.len() == rows {
        Ok(StepOutput::Tokens(ids))
    } else {
        Err(DeviceError::Invalid(format!(
            "{what} returned {} ids for a batch of {rows}",
            ids.len()
        )))
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Tokens that end a sequence.
    pub eos_token_ids: Vec<u32>,
    /// Sequences decoded together at most (also bounded by the KV-cache slots).
    pub max_batch: usize,
    /// Prompt tokens prefilled per step at most, over every prompt: a longer prompt is
    /// prefilled in chunks over several steps while the running sequences keep decoding, so a
    /// step (and a running stream's gap between tokens) takes at most one chunk's prefill more
    /// than a plain decode step. With no sequence decoding, the only limit of a step's prompt
    /// work.
    pub max_prefill_tokens: usize,
    /// While sequences decode, a step carrying a long prompt's chunk is planned to take at most
    /// this many times a decode-only step (≥ 1), so the running streams' gaps between tokens
    /// stay within about this multiple of their plain decode gap while a long prompt is
    /// admitted: each step's chunks are sized by their predicted cost (attention over the
    /// prompt's prefix included) against measured step times ([`pacing`]). Prompts of at most
    /// `short_prompt_tokens` are not paced. `None`: only `max_prefill_tokens` limits any prompt.
    /// Default: `Some(DEFAULT_STEP_SLOWDOWN)`.
    pub max_step_slowdown: Option<f64>,
    /// Prompts with at most this many tokens to prefill are short: `max_step_slowdown` does not
    /// apply to them, only `max_prefill_tokens`, so a burst of short requests is admitted
    /// together (whole prompts in one step while the cap has room) at the cost of one such step
    /// for the running streams. Default: `DEFAULT_PREFILL_CHUNK`, a prompt one step can hold.
    /// 0 paces every prompt.
    pub short_prompt_tokens: usize,
}

/// The default of [`EngineOptions::max_prefill_tokens`]: long enough that a prompt's products
/// run as matrix products (bench decode --prefill), short enough that running streams wait for
/// a chunk, not a whole long prompt (bench decode --interference).
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// The default of [`EngineOptions::max_step_slowdown`]: a step carrying a long prompt's chunk
/// takes about 2× a decode-only step, so a running stream's worst gap between tokens stays
/// within 2× its median while a 4k-token prompt is admitted (bench decode --interference;
/// README, "Chunked prefill"), at the price of a longer time to first token for that prompt.
pub const DEFAULT_STEP_SLOWDOWN: f64 = 2.0;

impl EngineOptions {
    /// Defaults for a model: its config's end-of-sequence tokens, batches of up to 32, chunks of
    /// up to [`DEFAULT_PREFILL_CHUNK`] prompt tokens a step, long prompts paced to
    /// [`DEFAULT_STEP_SLOWDOWN`].
    pub fn for_config(cfg: &LlamaConfig) -> Self {
        Self {
            eos_token_ids: cfg.eos_token_ids.clone(),
            max_batch: 32,
            max_prefill_tokens: DEFAULT_PREFILL_CHUNK,
            max_step_slowdown: Some(DEFAULT_STEP_SLOWDOWN),
            short_prompt_tokens: DEFAULT_PREFILL_CHUNK,
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
    /// Running sequences preempted because the KV cache had no block for their next token
    /// (each is recomputed later, see [`Engine::step`]).
    pub preemptions: u64,
}

/// The iteration-level engine.
pub struct Engine<B: Backend> {
    backend: B,
    detok: Option<Arc<dyn Detokenizer>>,
    opts: EngineOptions,
    next_id: u64,
    waiting: VecDeque<Sequence>,
    /// Admitted, holding a KV-cache handle, prompt partly prefilled (in admission order).
    prefilling: Vec<Sequence>,
    running: Vec<Sequence>,
    pending: Vec<Event>,
    failed: Vec<RequestId>,
    stats: Stats,
    /// The cost of prompt rows, for the paced budget.
    cost: scheduler::CostModel,
    /// Sizes the chunks of steps with running streams (`max_step_slowdown`).
    pacer: Option<Pacer>,
    /// Cost units of the chunks that ran in the current step, its decode rows, and whether a
    /// short prompt's chunk was among them.
    step_work: (u64, usize, bool),
    /// The step begun and not finished yet.
    staged: Option<Staged>,
}

impl<B: Backend> Engine<B> {
    /// An engine over a backend; without a detokenizer events carry no text and stop strings
    /// are refused.
    pub fn new(backend: B, detok: Option<Arc<dyn Detokenizer>>, opts: EngineOptions) -> Self {
        let cost = scheduler::CostModel::for_config(backend.config());
        let pacer = opts.max_step_slowdown.map(Pacer::new);
        Self {
            cost,
            pacer,
            step_work: (0, 0, false),
            staged: None,
            backend,
            detok,
            opts,
            next_id: 0,
            waiting: VecDeque::new(),
            prefilling: Vec::new(),
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
        self.staged.is_some()
            || !(self.waiting.is_empty()
                && self.prefilling.is_empty()
                && self.running.is_empty()
                && self.pending.is_empty())
    }

    /// Requests waiting, and running (prompts being prefilled included).
    pub fn load(&self) -> (usize, usize) {
        (
            self.waiting.len(),
            self.running.len() + self.prefilling.len() + self.admitted_in_flight().len(),
        )
    }

    /// The KV cache's capacity and use, in blocks and tokens (for metrics and logs).
    pub fn kv_usage(&self) -> KvUsage {
        self.backend.kv_usage()
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
        // The most the request can hold: every token but the last generated one is fed back.
        // It must fit in the whole cache, or it could only run until the cache filled.
        let kv = self.backend.kv_usage();
        let most = (request.prompt.len() + request.max_tokens - 1).min(self.context());
        if kv.blocks_for(most) > kv.total_blocks {
            return Err(EngineError::InvalidRequest(format!(
                "the request may hold {most} tokens (prompt {} + max_tokens {}), more than the \
                 KV cache's {} tokens; lower max_tokens",
                request.prompt.len(),
                request.max_tokens,
                kv.capacity_tokens()
            )));
        }
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
        let admitted = match &mut self.staged {
            Some(Staged {
                decode: Some(d), ..
            }) => &mut d.admitted[..],
            _ => &mut [],
        };
        match self
            .running
            .iter_mut()
            .chain(self.prefilling.iter_mut())
            .chain(admitted.iter_mut())
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

    /// Runs one iteration: retires cancelled requests; prefills, under the step's budget of
    /// [`EngineOptions::max_prefill_tokens`] prompt tokens (and, for prompts longer than
    /// [`EngineOptions::short_prompt_tokens`] while sequences decode, of the cost
    /// [`EngineOptions::max_step_slowdown`] allows, [`pacing`]), the next chunks of the
    /// prompts being prefilled, then the first chunks of newly admitted ones (a prompt whose
    /// last chunk ran yields its first token); and decodes all other running ones in one batch
    /// (one token each). The step's wall time calibrates the pacing. It is
    /// [`Engine::begin_step`] then [`Engine::finish_step`]: a caller that has host work to do
    /// while the device runs the decode batch calls the two itself.
    ///
    /// KV-cache policy: a request is admitted only when the cache has free blocks for its prompt
    /// above a reserve for the running sequences ([`scheduler`]). When the running sequences
    /// still need more blocks for this step's tokens than are free, the newest of them (the
    /// latest request) is preempted: its blocks are freed and it goes back to the head of the
    /// queue with the tokens it generated, to be recomputed (prefilled again) when blocks are
    /// free, and to continue with exactly the tokens it would have produced. Its events already
    /// sent stand; no text is repeated or lost. [`Engine::add`] refuses a request that could not
    /// fit in the whole cache on its own, so the oldest running sequence always progresses.
    ///
    /// A device error is returned as is; the requests of the failed part of the step are
    /// dropped with their KV-cache slots freed and listed by [`Engine::take_failed`]; the others
    /// keep running, and the events of the step that did happen come with the next step.
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        self.begin_step()?;
        self.finish_step()
    }

    /// The first half of [`Engine::step`]: everything up to the launch of the decode batch
    /// ([`Backend::launch_decode`]), which a device backend leaves running. The caller may then
    /// do host work ([`Engine::add`], [`Engine::cancel`], reading [`Engine::stats`] and
    /// [`Engine::load`], sending the previous step's responses) and must call
    /// [`Engine::finish_step`] before the next `begin_step`. A cancellation made in between
    /// takes effect at the next step, as one made before it: the step's token is still
    /// produced. Errors as `step`'s (the prefill's, or the launch's); then there is nothing to
    /// finish.
    pub fn begin_step(&mut self) -> Result<(), EngineError> {
        if self.staged.is_some() {
            return Err(EngineError::StepOrder(
                "begin_step while a step is in flight: finish_step first",
            ));
        }
        let mut events = Vec::new();
        let start = Instant::now();
        self.step_work = (0, 0, false);
        match self.step_into(&mut events) {
            Ok(decode) => {
                self.staged = Some(Staged {
                    events,
                    start,
                    decode,
                });
                Ok(())
            }
            Err(e) => {
                events.append(&mut self.pending);
                self.pending = events;
                Err(e)
            }
        }
    }

    /// The second half of [`Engine::step`]: waits for the decode batch [`Engine::begin_step`]
    /// launched, accepts its tokens and returns the step's events. The time from `begin_step`
    /// calibrates the pacing. Errors as `step`'s.
    pub fn finish_step(&mut self) -> Result<Vec<Event>, EngineError> {
        let Some(Staged {
            mut events,
            start,
            decode,
        }) = self.staged.take()
        else {
            return Err(EngineError::StepOrder(
                "finish_step without a step begun: begin_step first",
            ));
        };
        let result = match decode {
            Some(d) => self.finish_decode(d, &mut events),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                let (units, rows, short) = self.step_work;
                if let Some(p) = &mut self.pacer {
                    if short {
                        p.skip();
                    } else if units > 0 || rows > 0 {
                        p.observe(units, rows, start.elapsed().as_secs_f64());
                    }
                }
                Ok(events)
            }
            Err(e) => {
                events.append(&mut self.pending);
                self.pending = events;
                Err(e)
            }
        }
    }

    /// Whether a step was begun and not finished.
    pub fn step_in_flight(&self) -> bool {
        self.staged.is_some()
    }

    /// Whether the step begun is still running on the device ([`Launched::InFlight`]), so that
    /// [`Engine::finish_step`] would wait for it; false when its launch ran it whole (a
    /// synchronous backend) or it has no decode batch: then finishing it costs only host work,
    /// and a caller with responses to send gains nothing by waiting.
    pub fn waits_on_device(&self) -> bool {
        matches!(
            &self.staged,
            Some(Staged {
                decode: Some(PendingDecode {
                    launched: Launched::InFlight,
                    ..
                }),
                ..
            })
        )
    }

    /// The prompts admitted by the step in flight (they join the running ones when it
    /// finishes).
    fn admitted_in_flight(&self) -> &[Sequence] {
        match &self.staged {
            Some(Staged {
                decode: Some(d), ..
            }) => &d.admitted,
            _ => &[],
        }
    }

    fn step_into(&mut self, events: &mut Vec<Event>) -> Result<Option<PendingDecode>, EngineError> {
        events.append(&mut self.pending);
        let (cancelled, running): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.running)
                .into_iter()
                .partition(|s| s.cancel_requested);
        self.running = running;
        let (cancelled_prefill, prefilling): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.prefilling)
                .into_iter()
                .partition(|s| s.cancel_requested);
        self.prefilling = prefilling;
        for mut s in cancelled.into_iter().chain(cancelled_prefill) {
            self.finish(&mut s, StopReason::Cancelled, String::new(), events);
        }
        if self.waiting.is_empty() && self.running.is_empty() && self.prefilling.is_empty() {
            return Ok(None);
        }
        self.stats.steps += 1;
        // Prompts being prefilled continue first, in admission order.
        let cap = self.opts.max_prefill_tokens.max(1);
        // Long prompts are paced while a stream decodes; with none waiting or being prefilled,
        // the cap alone (no step is kept decode-only for the pacer's reference).
        let short = self.opts.short_prompt_tokens;
        let long = |s: &Sequence| s.kv_len() > short;
        let mut budget = match &self.pacer {
            Some(p) if self.prefilling.iter().chain(&self.waiting).any(long) => {
                p.budget(cap, self.running.len(), short)
            }
            _ => scheduler::PrefillBudget::tokens(cap),
        };
        // A backend that fuses steps gets this step's chunks together with the decode batch
        // (below); they are queued here, their sequences staying in `prefilling` until it ran.
        let fused = self.backend.fuses_steps();
        let mut queued: Vec<(RequestId, usize)> = Vec::new();
        let mut admitted = Vec::new();
        let mut still = Vec::with_capacity(self.prefilling.len());
        let mut queue = std::mem::take(&mut self.prefilling).into_iter();
        while let Some(s) = queue.next() {
            let chunk = budget.fit(&self.cost, s.prefilled, s.kv_len());
            if chunk == 0 {
                still.push(s);
                continue;
            }
            budget.take(&self.cost, s.prefilled, s.kv_len(), chunk);
            self.step_work.2 |= s.kv_len() <= short;
            if fused {
                queued.push((s.id, chunk));
                still.push(s);
                continue;
            }
            match self.prefill_chunk(s, chunk, events) {
                Ok(Some(s)) if !s.prefill_done() => still.push(s),
                Ok(Some(s)) => admitted.push(s),
                Ok(None) => {}
                Err(e) => {
                    still.extend(queue);
                    self.prefilling = still;
                    self.running.extend(admitted);
                    return Err(e);
                }
            }
        }
        self.prefilling = still;

        let slots = self.backend.kv_capacity();
        let kv = self.backend.kv_usage();
        let pending_blocks = self
            .prefilling
            .iter()
            .map(|s| {
                let len = s.kv_len();
                kv.blocks_for(len) - kv.blocks_for(s.prefilled.min(len))
            })
            .sum();
        let limits = scheduler::Limits {
            max_running: self.opts.max_batch.min(slots.max_sequences).max(1),
            prefill: budget,
            cost: self.cost,
            free_blocks: kv.free_blocks,
            block_tokens: kv.block_tokens,
            decode_blocks: self.decode_blocks(kv.block_tokens),
            // A cache whose block holds a whole context (the CUDA slots) never needs a block
            // for a running sequence to grow: no watermark, every slot usable.
            watermark_blocks: if kv.block_tokens >= self.context() {
                0
            } else {
                scheduler::watermark(kv.total_blocks)
            },
            pending_blocks,
        };
        let waiting: Vec<(RequestId, usize)> =
            self.waiting.iter().map(|s| (s.id, s.kv_len())).collect();
        let running: Vec<RequestId> = self
            .running
            .iter()
            .chain(&self.prefilling)
            .chain(&admitted)
            .map(|s| s.id)
            .collect();
        let plan = scheduler::plan(&waiting, &running, limits);

        for &chunk in &plan.chunks {
            let mut s = self
                .waiting
                .pop_front()
                .expect("the plan admits waiting requests in order");
            self.step_work.2 |= s.kv_len() <= short;
            let result = match self.backend.new_sequence() {
                Ok(seq) if fused => {
                    s.state = SequenceState::Running(seq);
                    queued.push((s.id, chunk));
                    self.prefilling.push(s);
                    continue;
                }
                Ok(seq) => {
                    s.state = SequenceState::Running(seq);
                    self.prefill_chunk(s, chunk, events)
                }
                Err(e) => {
                    self.failed.push(s.id);
                    Err(e.into())
                }
            };
            match result {
                Ok(Some(s)) if !s.prefill_done() => self.prefilling.push(s),
                Ok(Some(s)) => admitted.push(s),
                Ok(None) => {}
                Err(e) => {
                    // This request was dropped; the ones admitted before it run from the next
                    // step.
                    self.running.extend(admitted);
                    return Err(e);
                }
            }
        }

        self.preempt_for_decode(&mut admitted, &mut queued);
        // A step with no prompt chunk is a plain decode step on every backend: launched (left
        // in flight on a device, its CUDA graph replayed) and collected below, as without
        // fusing; only a step with chunks needs the fused pass.
        if fused && !queued.is_empty() {
            return self.fused_step(queued, events).map(|()| None);
        }
        if self.running.is_empty() {
            self.running.extend(admitted);
            return Ok(None);
        }
        let batch = self.decode_batch();
        self.step_work.1 = batch.len();
        // Only what the step needs comes back: the greedy ids when every row's choice is the
        // plain argmax; the chosen ids when the backend samples where the logits are; the
        // logits otherwise (the same tokens every way).
        let rows: Vec<RowSampling>;
        let (choice, what) = if self.running.iter().all(Sequence::argmax_suffices) {
            (DecodeChoice::Argmax, "decode_argmax")
        } else if self.backend.samples_on_device() {
            rows = self.running.iter().map(|s| self.row_sampling(s)).collect();
            (DecodeChoice::Sampled(&rows), "decode_sampled")
        } else {
            (DecodeChoice::Logits, "decode")
        };
        match self.backend.launch_decode(&batch, choice) {
            Ok(launched) => Ok(Some(PendingDecode {
                launched,
                rows: batch.len(),
                what,
                admitted,
            })),
            Err(e) => {
                self.fail_decode(admitted);
                Err(e.into())
            }
        }
    }

    /// A decode step failed: every running sequence is dropped (its slot freed, its id listed
    /// for [`Engine::take_failed`]); the prompts admitted in this step run from the next one.
    fn fail_decode(&mut self, admitted: Vec<Sequence>) {
        for s in std::mem::take(&mut self.running) {
            self.backend.free_sequence(s.seq_id().expect("running"));
            self.failed.push(s.id);
        }
        self.running = admitted;
    }

    /// The end of a step's decode: its output (collected from the device when it was left in
    /// flight), each running sequence's token accepted, and the prompts admitted in the step
    /// joining the running ones.
    fn finish_decode(
        &mut self,
        d: PendingDecode,
        events: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        let out = match d.launched {
            Launched::Done(out) => Ok(out),
            Launched::InFlight => self.backend.collect_decode(),
        };
        let out = out.and_then(|out| match out {
            DecodeOutput::Ids(ids) => checked_ids(ids, d.rows, d.what),
            DecodeOutput::Logits(logits) if logits.rows() == d.rows => {
                Ok(StepOutput::Logits(logits))
            }
            DecodeOutput::Logits(logits) => Err(DeviceError::Invalid(format!(
                "{} returned {} rows of logits for a batch of {}",
                d.what,
                logits.rows(),
                d.rows
            ))),
        });
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                self.fail_decode(d.admitted);
                return Err(e.into());
            }
        };
        self.stats.decode_tokens += d.rows as u64;
        let result = self.accept_decoded(out, events);
        self.running.extend(d.admitted);
        result
    }

    /// The decode rows of the running sequences, in order.
    fn decode_batch(&self) -> Vec<DecodeItem> {
        self.running
            .iter()
            .map(|s| DecodeItem {
                seq: s.seq_id().expect("running sequences hold a slot"),
                token: *s
                    .output
                    .last()
                    .expect("a running sequence has sampled a token"),
                pos: s.total_len() - 1,
            })
            .collect()
    }

    /// Samples and accepts every running sequence's token of a decode step (row `i` for
    /// running sequence `i`); the ones that end leave `running`.
    fn accept_decoded(
        &mut self,
        out: StepOutput,
        events: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        let mut still = Vec::with_capacity(self.running.len());
        let mut failure = None;
        for (i, mut s) in std::mem::take(&mut self.running).into_iter().enumerate() {
            let token = match &out {
                StepOutput::Tokens(ids) => ids[i],
                StepOutput::Logits(logits) => self.sample(&s, logits.row(i)),
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
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The rest of a step on a backend that [`fuses_steps`](Backend::fuses_steps): the queued
    /// prompt chunks (sequences in `prefilling`) and the running sequences' decode rows go to
    /// the device as one [`Backend::step`]; a prompt whose last chunk ran yields its first
    /// token (it decodes from the next step), then every running sequence its next one. On an
    /// error every sequence of the step is dropped (its slot freed, its id listed for
    /// [`Engine::take_failed`]); the prompts not in it keep their place.
    fn fused_step(
        &mut self,
        queued: Vec<(RequestId, usize)>,
        events: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        let mut parts: Vec<(usize, Vec<u32>, usize, usize)> = Vec::with_capacity(queued.len());
        for (id, chunk) in &queued {
            let i = self
                .prefilling
                .iter()
                .position(|s| s.id == *id)
                .expect("queued chunks belong to prompts being prefilled");
            let s = &self.prefilling[i];
            parts.push((i, s.prefill_tokens(), s.prefilled, s.prefilled + chunk));
        }
        let chunks: Vec<ChunkItem<'_>> = parts
            .iter()
            .map(|(i, tokens, from, to)| ChunkItem {
                seq: self.prefilling[*i]
                    .seq_id()
                    .expect("a sequence being prefilled holds a handle"),
                tokens: &tokens[*from..*to],
            })
            .collect();
        let batch = self.decode_batch();
        if chunks.is_empty() && batch.is_empty() {
            return Ok(());
        }
        self.step_work.0 = parts
            .iter()
            .map(|(_, _, from, to)| self.cost.chunk(*from, to - from))
            .sum();
        self.step_work.1 = batch.len();
        // Only the ids come back from a backend that samples where the logits are: a token for
        // each chunk that ends its prompt (not for one recomputed after a preemption), and one
        // per decode row.
        let wants: Vec<bool> = parts
            .iter()
            .map(|(i, tokens, _, to)| *to == tokens.len() && self.prefilling[*i].output.is_empty())
            .collect();
        let result = if self.backend.samples_on_device() {
            let chunk_rows: Vec<Option<RowSampling>> = parts
                .iter()
                .zip(&wants)
                .map(|((i, ..), &w)| w.then(|| self.row_sampling(&self.prefilling[*i])))
                .collect();
            let rows: Vec<RowSampling> =
                self.running.iter().map(|s| self.row_sampling(s)).collect();
            let wanted = wants.iter().filter(|&&w| w).count();
            self.backend
                .step_sampled(&chunks, &chunk_rows, &batch, &rows)
                .and_then(|ids| checked_ids(ids, wanted + batch.len(), "step_sampled"))
        } else {
            self.backend.step(&chunks, &batch).map(StepOutput::Logits)
        };
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let ids: Vec<RequestId> = queued.iter().map(|q| q.0).collect();
                let (dropped, kept): (Vec<Sequence>, Vec<Sequence>) =
                    std::mem::take(&mut self.prefilling)
                        .into_iter()
                        .partition(|s| ids.contains(&s.id));
                self.prefilling = kept;
                for s in dropped.into_iter().chain(std::mem::take(&mut self.running)) {
                    self.backend
                        .free_sequence(s.seq_id().expect("holds a slot"));
                    self.failed.push(s.id);
                }
                return Err(e.into());
            }
        };
        drop(chunks);
        // The first tokens of the prompts now complete (`first[i]` for `prefilling[i]`), and the
        // decode rows' output.
        let mut first: Vec<Option<u32>> = vec![None; self.prefilling.len()];
        let decode = match out {
            StepOutput::Tokens(mut ids) => {
                let decode = ids.split_off(ids.len() - batch.len());
                let mut ids = ids.into_iter();
                for ((i, ..), _) in parts.iter().zip(&wants).filter(|(_, &w)| w) {
                    first[*i] = ids.next();
                }
                StepOutput::Tokens(decode)
            }
            StepOutput::Logits(mut logits) => {
                let vocab = logits.vocab;
                let decode = Logits {
                    vocab,
                    data: logits.data.split_off(parts.len() * vocab),
                };
                for (row, ((i, ..), _)) in parts.iter().zip(&wants).enumerate() {
                    if wants[row] {
                        let token = self.sample(
                            &self.prefilling[*i],
                            &logits.data[row * vocab..(row + 1) * vocab],
                        );
                        first[*i] = Some(token);
                    }
                }
                StepOutput::Logits(decode)
            }
        };
        // The prompts' chunks: advance them.
        for (i, _, _, to) in parts {
            let s = &mut self.prefilling[i];
            self.stats.prefill_tokens += (to - s.prefilled) as u64;
            s.prefilled = to;
        }
        let mut admitted = Vec::new();
        let mut still = Vec::with_capacity(self.prefilling.len());
        let mut failure = None;
        for (i, mut s) in std::mem::take(&mut self.prefilling).into_iter().enumerate() {
            if !s.prefill_done() {
                still.push(s);
                continue;
            }
            if !s.output.is_empty() {
                // Recomputed after a preemption: its last token is fed by the next decode.
                admitted.push(s);
                continue;
            }
            let token = first[i].expect("a prompt completes only in a step that ran its chunk");
            match self.accept(&mut s, token, events) {
                Ok(true) => admitted.push(s),
                Ok(false) => {}
                Err(e) => {
                    self.backend
                        .free_sequence(s.seq_id().expect("holds a slot"));
                    self.failed.push(s.id);
                    failure.get_or_insert(e);
                }
            }
        }
        self.prefilling = still;
        if !batch.is_empty() {
            self.stats.decode_tokens += batch.len() as u64;
        }
        let result = self.accept_decoded(decode, events);
        self.running.extend(admitted);
        match failure {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// Prefills the next `chunk` tokens of `s`'s [`Sequence::prefill_tokens`] into its KV cache.
    /// Returns the sequence unless it ended: when the chunk was the prompt's last, its first
    /// token was sampled and accepted (a sequence recomputed after a preemption samples nothing:
    /// its last token is fed by the next decode). On an error the sequence is dropped, its
    /// handle freed and its id listed for [`Engine::take_failed`].
    fn prefill_chunk(
        &mut self,
        mut s: Sequence,
        chunk: usize,
        events: &mut Vec<Event>,
    ) -> Result<Option<Sequence>, EngineError> {
        let seq = s
            .seq_id()
            .expect("a sequence being prefilled holds a handle");
        let tokens = s.prefill_tokens();
        let (from, to) = (s.prefilled, s.prefilled + chunk);
        self.step_work.0 += self.cost.chunk(from, chunk);
        // No token when more chunks are to come, or recomputed after a preemption.
        let wants_token = to == tokens.len() && s.output.is_empty();
        let result = if wants_token && self.backend.samples_on_device() {
            // Chosen where the logits are: only the id comes back.
            let row = self.row_sampling(&s);
            self.backend
                .prefill_sampled(seq, &tokens[from..to], &row)
                .map(Some)
        } else {
            self.backend
                .prefill(seq, &tokens[from..to])
                .map(|logits| wants_token.then(|| sampler::choose(&logits, &self.row_sampling(&s))))
        };
        let result = result.map_err(EngineError::from).and_then(|token| {
            self.stats.prefill_tokens += chunk as u64;
            s.prefilled = to;
            match token {
                Some(token) => self.accept(&mut s, token, events),
                None => Ok(true),
            }
        });
        match result {
            Ok(true) => Ok(Some(s)),
            Ok(false) => Ok(None),
            Err(e) => {
                self.backend.free_sequence(seq);
                self.failed.push(s.id);
                Err(e)
            }
        }
    }

    /// Blocks the running sequences' decode takes this step: one for each whose cached tokens
    /// fill their blocks exactly.
    fn decode_blocks(&self, block_tokens: usize) -> usize {
        self.running
            .iter()
            .filter(|s| s.kv_len() % block_tokens.max(1) == 0)
            .count()
    }

    /// Preempts the newest sequences (running or admitted this step) until the running ones'
    /// decode has the blocks it needs (the policy in [`Engine::step`]). When nothing is left
    /// to preempt the decode runs anyway and its [`DeviceError::KvFull`] fails the step.
    fn preempt_for_decode(
        &mut self,
        admitted: &mut Vec<Sequence>,
        queued: &mut Vec<(RequestId, usize)>,
    ) {
        loop {
            let kv = self.backend.kv_usage();
            // Blocks the queued chunks of a fused step will take (none otherwise).
            queued.retain(|(id, _)| self.prefilling.iter().any(|s| s.id == *id));
            let chunk_blocks: usize = queued
                .iter()
                .map(|(id, chunk)| {
                    let s = self.prefilling.iter().find(|s| s.id == *id).expect("kept");
                    kv.blocks_for(s.prefilled + chunk) - kv.blocks_for(s.prefilled)
                })
                .sum();
            if self.decode_blocks(kv.block_tokens) + chunk_blocks <= kv.free_blocks {
                return;
            }
            if self.running.len() + admitted.len() + self.prefilling.len() < 2 {
                return;
            }
            // The newest of the running, the just admitted and the still prefilling sequences.
            let newest = |v: &[Sequence]| (0..v.len()).max_by_key(|&i| v[i].id);
            let candidates = [
                newest(&self.running).map(|i| (self.running[i].id, 0, i)),
                newest(admitted).map(|i| (admitted[i].id, 1, i)),
                newest(&self.prefilling).map(|i| (self.prefilling[i].id, 2, i)),
            ];
            let mut s = match candidates.into_iter().flatten().max() {
                Some((_, 0, i)) => self.running.remove(i),
                Some((_, 1, i)) => admitted.remove(i),
                Some((_, _, i)) => self.prefilling.remove(i),
                None => return,
            };
            if let Some(seq) = s.seq_id() {
                self.backend.free_sequence(seq);
            }
            s.state = SequenceState::Waiting;
            s.prefilled = 0;
            self.stats.preemptions += 1;
            tracing::debug!(
                request = s.id.0,
                "KV cache full: preempted, to be recomputed"
            );
            let at = self
                .waiting
                .iter()
                .position(|w| w.id > s.id)
                .unwrap_or(self.waiting.len());
            self.waiting.insert(at, s);
        }
    }

    /// How the next token of `s` is chosen (docs/sampling.md): its penalties on the tokens it
    /// generated, end-of-sequence tokens (unless ignored) and its stop tokens masked while it
    /// has fewer than its `min_tokens`, then its sampler at its position. One description for
    /// both places a token is chosen: the host ([`sampler::choose`]) and a device that samples
    /// itself ([`Backend::decode_sampled`]).
    fn row_sampling(&self, s: &Sequence) -> RowSampling {
        let p = s.sampler.params();
        let mut edits: std::collections::BTreeMap<u32, LogitEdit> = s
            .penalties()
            .into_iter()
            .map(|(t, delta)| (t, LogitEdit::Subtract(delta)))
            .collect();
        if s.masks_eos() {
            let eos: &[u32] = if s.request.ignore_eos {
                &[]
            } else {
                &self.opts.eos_token_ids
            };
            for &t in eos.iter().chain(&s.request.stop_token_ids) {
                edits.insert(t, LogitEdit::Mask);
            }
        }
        RowSampling {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            seed: p.seed,
            position: s.position(),
            edits: edits.into_iter().collect(),
        }
    }

    /// Samples the next token of `s` on the host from its row of `logits`
    /// ([`Engine::row_sampling`]).
    fn sample(&self, s: &Sequence, logits: &[f32]) -> u32 {
        sampler::choose(logits, &self.row_sampling(s))
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
