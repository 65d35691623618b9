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
    LogitEdit, Logits, RowSampling, StepChoice,
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

/// What a step's decode rows brought back from the backend.
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
    /// Its launched step (a decode batch, or a fused step); `None` when it has none.
    launched: Option<PendingStep>,
}

/// A step launched by [`Backend::launch_decode`] or [`Backend::launch_step`], to be finished.
/// Nothing of it touches a sequence before it is finished: its prompts stay in `prefilling`,
/// its decode rows in `running`, and only cancellations (which mark them) come in between.
struct PendingStep {
    launched: Launched,
    /// The synchronous call the launch stands for (for errors).
    what: &'static str,
    /// A fused step's prompt chunks, in order (none for a decode step).
    chunks: Vec<QueuedChunk>,
    /// Its decode rows: the running sequences, in order (the last rows of its output).
    rows: usize,
    /// Prompts whose last chunk ran before the launch (a backend that does not fuse steps):
    /// they join `running` after the decode.
    admitted: Vec<Sequence>,
}

/// A prompt chunk of a fused step: the sequence `id` (in `prefilling`) is prefilled up to `to`
/// once the step is back; `wants`: its last row yields the prompt's first token.
struct QueuedChunk {
    id: RequestId,
    to: usize,
    wants: bool,
}

/// A step's output if it holds what the step of `chunks` and `rows` decode rows should bring
/// back: one id per chunk that wants one and per decode row, or one row of logits per chunk
/// and per decode row; an error naming the call (`what`) otherwise.
fn checked(
    out: DecodeOutput,
    chunks: &[QueuedChunk],
    rows: usize,
    what: &str,
) -> Result<DecodeOutput, DeviceError> {
    let (got, want, kind) = match &out {
        DecodeOutput::Ids(ids) => (
            ids.len(),
            chunks.iter().filter(|c| c.wants).count() + rows,
            "ids",
        ),
        DecodeOutput::Logits(logits) => (logits.rows(), chunks.len() + rows, "rows of logits"),
    };
    if got == want {
        Ok(out)
    } else {
        Err(DeviceError::Invalid(format!(
            "{what} returned {got} {kind} for a batch of {want}"
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
                launched: Some(p), ..
            }) => &mut p.admitted[..],
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
    /// (one token each); on a backend that [`fuses_steps`](Backend::fuses_steps), a step with
    /// prompt chunks runs them and the decode batch as one fused step. The step's wall time
    /// calibrates the pacing. It is [`Engine::begin_step`] then [`Engine::finish_step`]: a
    /// caller that has host work to do while the device runs the step calls the two itself.
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
    /// ([`Backend::launch_decode`]) or of the fused step of prompt chunks and decode rows
    /// ([`Backend::launch_step`]), which a device backend leaves running. No sequence is touched
    /// again until [`Engine::finish_step`] collected it. The caller may then do host work
    /// ([`Engine::add`], [`Engine::cancel`], reading [`Engine::stats`] and [`Engine::load`],
    /// sending the previous step's responses) and must call `finish_step` before the next
    /// `begin_step`. A cancellation made in between takes effect at the next step, as one made
    /// before it: the step's tokens (a running request's, a prompt's first) are still
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
            Ok(launched) => {
                self.staged = Some(Staged {
                    events,
                    start,
                    launched,
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

    /// The second half of [`Engine::step`]: waits for the step [`Engine::begin_step`] launched
    /// (a decode batch or a fused step), applies its prompt chunks, accepts its tokens and
    /// returns the step's events. The time from `begin_step` calibrates the pacing. Errors as
    /// `step`'s: on an error at the collection every request of the step is dropped, as on one
    /// at the launch.
    pub fn finish_step(&mut self) -> Result<Vec<Event>, EngineError> {
        let Some(Staged {
            mut events,
            start,
            launched,
        }) = self.staged.take()
        else {
            return Err(EngineError::StepOrder(
                "finish_step without a step begun: begin_step first",
            ));
        };
        let result = match launched {
            Some(p) => self.finish_launched(p, &mut events),
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
    /// synchronous backend) or it launched nothing: then finishing it costs only host work,
    /// and a caller with responses to send gains nothing by waiting.
    pub fn waits_on_device(&self) -> bool {
        matches!(
            &self.staged,
            Some(Staged {
                launched: Some(PendingStep {
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
                launched: Some(p), ..
            }) => &p.admitted,
            _ => &[],
        }
    }

    fn step_into(&mut self, events: &mut Vec<Event>) -> Result<Option<PendingStep>, EngineError> {
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
        // fusing; only a step with chunks needs the fused pass (launched too).
        if fused && !queued.is_empty() {
            return self.launch_fused(queued).map(Some);
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
        let launched = self.backend.launch_decode(&batch, choice);
        self.pending_or_fail(launched, what, Vec::new(), batch.len(), admitted)
            .map(Some)
    }

    /// A launch's result as the step to finish, or, on an error at the launch, the step's
    /// sequences dropped ([`Engine::fail_step`]) and the error.
    fn pending_or_fail(
        &mut self,
        launched: Result<Launched, DeviceError>,
        what: &'static str,
        chunks: Vec<QueuedChunk>,
        rows: usize,
        admitted: Vec<Sequence>,
    ) -> Result<PendingStep, EngineError> {
        match launched {
            Ok(launched) => Ok(PendingStep {
                launched,
                what,
                chunks,
                rows,
                admitted,
            }),
            Err(e) => {
                self.fail_step(&chunks, admitted);
                Err(e.into())
            }
        }
    }

    /// A step failed (at its launch or its collection): every sequence in it is dropped (its
    /// slot freed, its id listed for [`Engine::take_failed`]): the running ones and the prompts
    /// of its `chunks`; the prompts admitted before its launch run from the next step, and the
    /// prompts not in it keep their place.
    fn fail_step(&mut self, chunks: &[QueuedChunk], admitted: Vec<Sequence>) {
        let (dropped, kept): (Vec<Sequence>, Vec<Sequence>) = std::mem::take(&mut self.prefilling)
            .into_iter()
            .partition(|s| chunks.iter().any(|c| c.id == s.id));
        self.prefilling = kept;
        for s in dropped.into_iter().chain(std::mem::take(&mut self.running)) {
            self.backend
                .free_sequence(s.seq_id().expect("holds a slot"));
            self.failed.push(s.id);
        }
        self.running = admitted;
    }

    /// The end of a launched step: its output (collected from the device when it was left in
    /// flight), then, for a fused step, its prompts' chunks applied (a prompt now complete
    /// yields its first token and decodes from the next step), then each running sequence's
    /// token accepted, and the prompts admitted in the step joining the running ones. On an
    /// error the step's sequences are dropped ([`Engine::fail_step`]).
    fn finish_launched(
        &mut self,
        p: PendingStep,
        events: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        let PendingStep {
            launched,
            what,
            chunks,
            rows,
            mut admitted,
        } = p;
        let out = match launched {
            Launched::Done(out) => Ok(out),
            Launched::InFlight => self.backend.collect_step(),
        };
        let out = match out.and_then(|out| checked(out, &chunks, rows, what)) {
            Ok(out) => out,
            Err(e) => {
                self.fail_step(&chunks, admitted);
                return Err(e.into());
            }
        };
        // Where each chunk's prompt is in `prefilling` (nothing moved it while the step ran).
        let at: Vec<usize> = chunks
            .iter()
            .map(|c| {
                self.prefilling
                    .iter()
                    .position(|s| s.id == c.id)
                    .expect("a fused step's prompts stay in prefilling until it is finished")
            })
            .collect();
        // The first tokens of the prompts now complete (`first[i]` for `prefilling[i]`), and the
        // decode rows' output: the last `rows` rows.
        let mut first: Vec<Option<u32>> = vec![None; self.prefilling.len()];
        let decode = match out {
            DecodeOutput::Ids(mut ids) => {
                let decode = ids.split_off(ids.len() - rows);
                let mut ids = ids.into_iter();
                for (_, &i) in chunks.iter().zip(&at).filter(|(c, _)| c.wants) {
                    first[i] = ids.next();
                }
                StepOutput::Tokens(decode)
            }
            DecodeOutput::Logits(mut logits) => {
                let vocab = logits.vocab;
                let decode = Logits {
                    vocab,
                    data: logits.data.split_off(chunks.len() * vocab),
                };
                for (row, (c, &i)) in chunks.iter().zip(&at).enumerate() {
                    if c.wants {
                        first[i] = Some(self.sample(&self.prefilling[i], logits.row(row)));
                    }
                }
                StepOutput::Logits(decode)
            }
        };
        let mut failure = None;
        if !chunks.is_empty() {
            // The prompts' chunks: advance them.
            for (c, &i) in chunks.iter().zip(&at) {
                let s = &mut self.prefilling[i];
                self.stats.prefill_tokens += (c.to - s.prefilled) as u64;
                s.prefilled = c.to;
            }
            let mut still = Vec::with_capacity(self.prefilling.len());
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
        }
        self.stats.decode_tokens += rows as u64;
        let result = self.accept_decoded(decode, events);
        self.running.extend(admitted);
        match failure {
            Some(e) => Err(e),
            None => result,
        }
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
    /// the device as one [`Backend::launch_step`], left in flight where the backend can, and
    /// are finished by [`Engine::finish_launched`] (a prompt whose last chunk ran yields its
    /// first token and decodes from the next step, every running sequence its next token). On
    /// an error at the launch every sequence of the step is dropped ([`Engine::fail_step`]).
    fn launch_fused(
        &mut self,
        queued: Vec<(RequestId, usize)>,
    ) -> Result<PendingStep, EngineError> {
        let mut parts: Vec<(usize, Vec<u32>, QueuedChunk)> = Vec::with_capacity(queued.len());
        for (id, chunk) in queued {
            let i = self
                .prefilling
                .iter()
                .position(|s| s.id == id)
                .expect("queued chunks belong to prompts being prefilled");
            let s = &self.prefilling[i];
            let tokens = s.prefill_tokens();
            let to = s.prefilled + chunk;
            // A token for each chunk that ends its prompt (not for one recomputed after a
            // preemption).
            let wants = to == tokens.len() && s.output.is_empty();
            parts.push((i, tokens, QueuedChunk { id, to, wants }));
        }
        let chunks: Vec<ChunkItem<'_>> = parts
            .iter()
            .map(|(i, tokens, c)| {
                let s = &self.prefilling[*i];
                ChunkItem {
                    seq: s
                        .seq_id()
                        .expect("a sequence being prefilled holds a handle"),
                    tokens: &tokens[s.prefilled..c.to],
                }
            })
            .collect();
        let batch = self.decode_batch();
        self.step_work.0 = parts
            .iter()
            .map(|(i, _, c)| {
                let from = self.prefilling[*i].prefilled;
                self.cost.chunk(from, c.to - from)
            })
            .sum();
        self.step_work.1 = batch.len();
        // Only the ids come back from a backend that samples where the logits are: one for
        // each chunk that wants a token, and one per decode row.
        let chunk_rows: Vec<Option<RowSampling>>;
        let rows: Vec<RowSampling>;
        let (choice, what) = if self.backend.samples_on_device() {
            chunk_rows = parts
                .iter()
                .map(|(i, _, c)| c.wants.then(|| self.row_sampling(&self.prefilling[*i])))
                .collect();
            rows = self.running.iter().map(|s| self.row_sampling(s)).collect();
            let choice = StepChoice::Sampled {
                chunks: &chunk_rows,
                rows: &rows,
            };
            (choice, "step_sampled")
        } else {
            (StepChoice::Logits, "step")
        };
        let launched = self.backend.launch_step(&chunks, &batch, choice);
        drop(chunks);
        let chunks: Vec<QueuedChunk> = parts.into_iter().map(|(_, _, c)| c).collect();
        self.pending_or_fail(launched, what, chunks, batch.len(), Vec::new())
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
