//! The engine thread of one model instance: continuous batching over every live request, one
//! response per token (or one per request), cancellation, panic recovery, and a clean stop.
//!
//! `ModelInstanceExecute` (Triton's thread) only checks requests and hands the good ones over a
//! channel ([`Worker::submit`]). The thread admits them between engine steps, polls each live
//! request's cancellation flag once per step, runs each step as [`Engine::begin_step`] and
//! [`Engine::finish_step`] and turns its events into responses; step N's responses and metrics
//! go out after step N+1 was begun, so on a device that leaves the step in flight they overlap
//! it (docs/triton.md, "Host work while the device runs"). Every request leaves through [`finish_with`] or [`Pending::finish`] after exactly
//! one FINAL response. A panic during a turn is caught: every request the thread holds ends
//! with an INTERNAL error and the engine is rebuilt ([`EngineFactory`]); if it cannot be, new
//! requests get UNAVAILABLE naming the panic. A step that fails with a fatal device fault
//! ([`FaultKind::Fatal`]: the GPU context is dead, every later call in it would fail) is handled
//! the same way: every request held ends with an INTERNAL error naming the fault, and the engine
//! is rebuilt in a new context, never stepped again; after [`MAX_FATAL_REBUILDS`] fatal faults
//! with no request completed between them, the instance refuses new requests with UNAVAILABLE
//! instead. [`Worker::stop`] (from `ModelInstanceFinalize`)
//! makes the thread answer every request still queued or running with an UNAVAILABLE error and
//! joins it.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::error::{panic_message, TritonError};
use super::metrics::{InstanceMetrics, Snapshot};
use super::request::{now_ns, InstanceHandle, OutputTensor, Pending, Wanted};
use crate::device::{Backend, FaultKind};
use crate::engine::{Engine, EngineError, Event, Request, RequestId, StopReason};

/// How often an idle engine thread wakes to ask whether its device context was lost
/// ([`Serving::check_context`]): a rebuild in another instance waits for it to let go.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Fatal device faults in a row (no request completed between them) after which the instance
/// stops rebuilding its engine and refuses new requests: a device that faults again in every
/// new context is broken, and rebuilding it forever would only fail every request more slowly.
pub(super) const MAX_FATAL_REBUILDS: usize = 3;

/// Builds a fresh engine for an instance. The engine thread calls it after a panic: the
/// panicked engine may have stopped half-way through a step (KV cache and sequences out of
/// step), so it is dropped rather than reused.
pub(super) type EngineFactory =
    Box<dyn FnMut() -> Result<Engine<Box<dyn Backend>>, TritonError> + Send>;

/// A checked request on its way to the engine.
#[derive(Debug)]
pub(super) struct Job {
    /// The Triton side.
    pub pending: Pending,
    /// What the engine runs.
    pub request: Request,
    /// One response per token (`true`) or one in all.
    pub stream: bool,
    /// Which outputs to send.
    pub wanted: Wanted,
    /// Whether outputs carry the batch dimension.
    pub batched: bool,
    /// Prompt text and ids that a non-streaming response starts with (empty when the request
    /// excluded them).
    pub echo_text: String,
    /// See `echo_text`.
    pub echo_ids: Vec<u32>,
}

enum Command {
    Add(Box<Job>),
    Stop,
}

/// Handle of an instance's engine thread.
pub(super) struct Worker {
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .field("limit", &self.limit)
            .finish()
    }
}

impl Worker {
    /// Starts the engine thread of instance `name` over `engine` (`rebuild` makes its
    /// replacement after a panic); at most `limit` requests may be queued or running at once.
    /// The thread publishes what it holds to `metrics` after every turn.
    pub fn spawn(
        name: &str,
        engine: Engine<Box<dyn Backend>>,
        rebuild: EngineFactory,
        instance: InstanceHandle,
        limit: usize,
        mut metrics: Option<InstanceMetrics>,
    ) -> Result<Self, TritonError> {
        // The capacity is published before the instance is ready, not at the first turn.
        if let Some(m) = metrics.as_mut() {
            m.publish(snapshot(Some(&engine), 0));
        }
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&in_flight);
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("unweight-{name}"))
            .spawn(move || run(&label, engine, rebuild, instance, rx, &counter, metrics))
            .map_err(|e| TritonError::Internal {
                context: format!("starting the engine thread of instance {name}"),
                source: Box::new(e),
            })?;
        Ok(Self {
            tx,
            thread: Some(thread),
            in_flight,
            limit,
        })
    }

    /// Hands a job to the engine thread; gives it back when the queue is full or the thread is
    /// gone, with the error to answer it with.
    pub fn submit(&self, job: Job) -> Result<(), (Box<Job>, TritonError)> {
        let job = Box::new(job);
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if n >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err((
                job,
                TritonError::Unavailable(format!(
                    "the instance already holds {n} requests (its limit is {}, 4 × \
                     max_concurrent_sequences); retry later",
                    self.limit
                )),
            ));
        }
        self.tx.send(Command::Add(job)).map_err(|e| {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            let Command::Add(job) = e.0 else {
                unreachable!("only Add was sent")
            };
            (
                job,
                TritonError::Unavailable("the instance's engine thread has stopped".into()),
            )
        })
    }

    /// Stops the thread: every request still queued or running gets an UNAVAILABLE error as
    /// its FINAL response and is released; then the thread is joined.
    pub fn stop(mut self) -> Result<(), TritonError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), TritonError> {
        let _ = self.tx.send(Command::Stop);
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(TritonError::Internal {
                context: "joining the engine thread".into(),
                source: "the engine thread panicked".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl Drop for Worker {
    /// A worker dropped without [`Worker::stop`] (an error path) still stops and joins its
    /// thread: no thread outlives its instance.
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// What an instance holds now, for its metrics: `queued` requests not yet handed to `engine`
/// plus what the engine holds. The KV figures are in the engine's current units (capacity:
/// slots × tokens per slot; use: tokens of the running sequences); this is the one place to
/// re-point when the engine counts its KV cache differently.
fn snapshot(engine: Option<&Engine<Box<dyn Backend>>>, queued: usize) -> Snapshot {
    let Some(engine) = engine else {
        return Snapshot {
            queued: queued as u64,
            ..Snapshot::default()
        };
    };
    let (waiting, running) = engine.load();
    let kv = engine.kv_usage();
    let stats = engine.stats();
    Snapshot {
        active: running as u64,
        queued: (queued + waiting) as u64,
        kv_capacity: kv.capacity_tokens() as u64,
        kv_used: kv.used_tokens as u64,
        prompt_tokens: stats.prefill_tokens,
        generated_tokens: stats.generated_tokens,
    }
}

/// A request the engine is running.
struct Live {
    job: Box<Job>,
    ids: Vec<u32>,
    text: String,
}

/// Sends `err` as the FINAL response and ends the request.
fn finish_with(job: Box<Job>, err: &TritonError, instance: InstanceHandle, counter: &AtomicUsize) {
    job.pending.fail(instance, err);
    counter.fetch_sub(1, Ordering::AcqRel);
}

/// Where a request stands after one step's responses were sent.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// More responses will follow.
    Open,
    /// Its FINAL went out; `success` is what its statistics report: false when the FINAL
    /// carried an error (a cancellation), so Triton's failure counts see it.
    Final {
        /// Whether the request succeeded.
        success: bool,
    },
}

/// Everything the engine thread holds. Every request it owns is in exactly one of `queued`,
/// `admitting` and `live` at every point where a panic can be caught, so a panic never loses
/// one: [`Serving::recover`] answers them all.
struct Serving<'a> {
    name: &'a str,
    instance: InstanceHandle,
    counter: &'a AtomicUsize,
    /// `None` once the engine panicked and could not be rebuilt.
    engine: Option<Engine<Box<dyn Backend>>>,
    rebuild: EngineFactory,
    /// Why the instance cannot serve any more (set with `engine = None`).
    broken: Option<String>,
    /// Received, not yet given to the engine.
    queued: VecDeque<Box<Job>>,
    /// The job inside `Engine::add` right now.
    admitting: Option<Box<Job>>,
    live: HashMap<RequestId, Live>,
    /// A Stop arrived (or the channel closed).
    stopping: bool,
    /// Fatal device faults since a request last completed.
    fatal_streak: usize,
    /// This instance's share of the model's metrics.
    metrics: Option<InstanceMetrics>,
}

fn run(
    name: &str,
    engine: Engine<Box<dyn Backend>>,
    rebuild: EngineFactory,
    instance: InstanceHandle,
    rx: mpsc::Receiver<Command>,
    counter: &AtomicUsize,
    metrics: Option<InstanceMetrics>,
) {
    let mut s = Serving {
        name,
        instance,
        counter,
        engine: Some(engine),
        rebuild,
        broken: None,
        queued: VecDeque::new(),
        admitting: None,
        live: HashMap::new(),
        stopping: false,
        fatal_streak: 0,
        metrics,
    };
    tracing::debug!(instance = name, "engine thread started");
    while !s.stopping {
        // A panic anywhere in a turn (admission, engine step, responses) must not end the
        // thread: Triton would wait forever for the FINALs of what it holds.
        let Err(payload) = catch_unwind(AssertUnwindSafe(|| s.turn(&rx))) else {
            continue;
        };
        let message = panic_message(payload.as_ref());
        if let Err(again) = catch_unwind(AssertUnwindSafe(|| s.recover(&message))) {
            let again = panic_message(again.as_ref());
            tracing::error!(instance = name, panic = %again, "recovering from a panic panicked");
            s.engine = None;
            s.broken = Some(format!(
                "its engine thread panicked ({message}) and recovering panicked too ({again})"
            ));
        }
    }
    s.stop(&rx);
}

impl Serving<'_> {
    /// One round, pipelined with the device: take what arrived (sleeping only when there is
    /// nothing to compute); finish the step in flight (the one wait for the device); admit
    /// what arrived and poll cancellations (they change the next step's batch, so they come
    /// between the collection and the next launch); begin the next step (its decode batch or
    /// fused step left running on a device backend, [`Engine::begin_step`]); then, while it runs, publish the
    /// finished step's metrics and send its responses. A failed launch is handled after those
    /// responses went out. A step begun with nothing left running on the device (every step
    /// of a synchronous backend such as the CPU) is finished and answered in the same turn, so
    /// there the order is that of a plain `Engine::step` loop.
    fn turn(&mut self, rx: &mpsc::Receiver<Command>) {
        let idle = self.receive(rx);
        if self.stopping {
            return;
        }
        if idle {
            self.check_context();
            return;
        }
        let finished = self.finish_step();
        // Before each launch (nothing is in flight here): a context lost meanwhile, in this
        // instance or another on the device, replaces the engine before it is stepped again.
        self.check_context();
        // The finished step's metrics, taken before the next step changes anything.
        let snap = self.snapshot();
        self.admit();
        self.poll_cancellations();
        let began = self.begin_step();
        let mut responded = false;
        if let Some(events) = finished {
            // The metrics first: a client that sees a step's responses then reads metrics of
            // that step, not the one before.
            self.publish_snapshot(snap);
            self.dispatch(events);
            responded = true;
        }
        if let Err(e) = began {
            self.step_failed(e);
            responded = false;
        }
        // A step with nothing running on the device (a synchronous backend, whose launch ran
        // it: the CPU; or a step that launched nothing) is finished now, so its responses do
        // not wait for the next step.
        let waits = self.engine.as_ref().is_some_and(Engine::waits_on_device);
        if !waits {
            if let Some(events) = self.finish_step() {
                self.publish();
                self.dispatch(events);
                return;
            }
        }
        if !responded {
            // No step's responses went out: what admission (or a failure) changed.
            self.publish();
        }
    }

    fn snapshot(&self) -> Snapshot {
        snapshot(self.engine.as_ref(), self.queued.len())
    }

    fn publish(&mut self) {
        if self.metrics.is_some() {
            let now = self.snapshot();
            self.publish_snapshot(now);
        }
    }

    fn publish_snapshot(&mut self, now: Snapshot) {
        if let Some(m) = self.metrics.as_mut() {
            m.publish(now);
        }
    }

    /// Takes what arrived; with nothing to compute, sleeps until something does, waking every
    /// [`IDLE_POLL`] while there is an engine (to notice a lost device context, see
    /// [`Serving::check_context`]). Returns true when it woke with nothing new.
    fn receive(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        let busy = !self.queued.is_empty() || self.engine.as_ref().is_some_and(Engine::has_work);
        if !busy {
            let got = if self.engine.is_some() {
                rx.recv_timeout(IDLE_POLL)
            } else {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            };
            match got {
                Ok(c) => self.take(c),
                Err(mpsc::RecvTimeoutError::Timeout) => return true,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.stopping = true,
            }
        }
        while !self.stopping {
            match rx.try_recv() {
                Ok(c) => self.take(c),
                Err(_) => break,
            }
        }
        false
    }

    fn take(&mut self, c: Command) {
        match c {
            Command::Add(job) => self.queued.push_back(job),
            Command::Stop => self.stopping = true,
        }
    }

    fn admit(&mut self) {
        while let Some(mut job) = self.queued.pop_front() {
            job.pending.compute_start_ns = now_ns();
            let Some(engine) = self.engine.as_mut() else {
                let err = TritonError::Unavailable(format!(
                    "instance {} cannot serve: {}",
                    self.name,
                    self.broken.as_deref().unwrap_or("it has no engine")
                ));
                finish_with(job, &err, self.instance, self.counter);
                continue;
            };
            let request = job.request.clone();
            self.admitting = Some(job);
            let added = engine.add(request);
            let job = self.admitting.take().expect("set just above");
            match added {
                Ok(id) => {
                    tracing::debug!(
                        instance = self.name,
                        request = job.pending.id.as_str(),
                        prompt_tokens = job.request.prompt.len(),
                        max_tokens = job.request.max_tokens,
                        stream = job.stream,
                        "admitted"
                    );
                    self.live.insert(
                        id,
                        Live {
                            job,
                            ids: Vec::new(),
                            text: String::new(),
                        },
                    );
                }
                Err(e) => {
                    let err = TritonError::InvalidInput(e.to_string());
                    finish_with(job, &err, self.instance, self.counter);
                }
            }
        }
    }

    fn poll_cancellations(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        for (&id, l) in &self.live {
            if l.job.pending.is_cancelled() {
                engine.cancel(id);
            }
        }
    }

    /// Finishes the step in flight, if any: its events, or `None` (nothing was in flight, or
    /// it failed: then its requests were answered, [`Serving::step_failed`]).
    fn finish_step(&mut self) -> Option<Vec<Event>> {
        let engine = self.engine.as_mut()?;
        if !engine.step_in_flight() {
            return None;
        }
        match engine.finish_step() {
            Ok(events) => Some(events),
            Err(e) => {
                self.step_failed(e);
                self.publish();
                None
            }
        }
    }

    /// Begins the next step when the engine has work and none is in flight.
    fn begin_step(&mut self) -> Result<(), EngineError> {
        match self.engine.as_mut() {
            Some(engine) if engine.has_work() && !engine.step_in_flight() => engine.begin_step(),
            _ => Ok(()),
        }
    }

    /// A step failed: a fatal device fault replaces the engine ([`Serving::fatal`]); any other
    /// error ends the requests it dropped with it.
    fn step_failed(&mut self, e: EngineError) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        match e {
            EngineError::Device(e) if e.kind() == FaultKind::Fatal => self.fatal(e.into()),
            e => {
                let err = TritonError::Internal {
                    context: format!("instance {}: engine step", self.name),
                    source: Box::new(e),
                };
                tracing::error!(instance = self.name, error = %err.chain(), "engine step failed");
                for id in engine.take_failed() {
                    if let Some(l) = self.live.remove(&id) {
                        finish_with(l.job, &err, self.instance, self.counter);
                    }
                }
            }
        }
    }

    /// Replaces the engine, without stepping it again, when its device context was lost to a
    /// fatal fault since it was built, in this instance or another one on the same GPU
    /// ([`Backend::context_lost`]): holding on to it would keep the dead context alive and stop
    /// every instance there from getting a new one.
    fn check_context(&mut self) {
        let lost = self
            .engine
            .as_ref()
            .and_then(|e| e.backend().context_lost());
        if let Some(e) = lost {
            self.fatal(EngineError::Device(e));
        }
    }

    /// A fatal device fault: the context the engine runs in is dead, so every request held
    /// (running, admitted or queued: none of them can finish there) ends with an INTERNAL error
    /// naming the fault, and the engine is replaced by one built in a new context; after
    /// [`MAX_FATAL_REBUILDS`] in a row the instance is marked broken instead.
    fn fatal(&mut self, fault: EngineError) {
        self.fatal_streak += 1;
        let fault = fault.to_string();
        let err = TritonError::Internal {
            context: format!(
                "instance {}: fatal device fault, the instance's engine is being rebuilt",
                self.name
            ),
            source: fault.clone().into(),
        };
        let n = self.answer_all(&err);
        tracing::error!(
            instance = self.name,
            fault = fault.as_str(),
            ended = n,
            streak = self.fatal_streak,
            "fatal device fault; every request the instance held was ended with INTERNAL"
        );
        let why = format!("a fatal device fault ({fault})");
        if self.fatal_streak > MAX_FATAL_REBUILDS {
            self.drop_engine();
            self.mark_broken(format!(
                "{} fatal device faults in a row, the last: {fault}; the instance is not \
                 rebuilt again (reload the model)",
                self.fatal_streak
            ));
            return;
        }
        self.replace_engine(&why);
    }

    /// Drops the engine (a panic in its drop is logged, not fatal).
    fn drop_engine(&mut self) {
        let old = self.engine.take();
        if catch_unwind(AssertUnwindSafe(move || drop(old))).is_err() {
            tracing::error!(instance = self.name, "dropping the failed engine panicked");
        }
    }

    /// The instance cannot serve any more: new requests get UNAVAILABLE naming `why`.
    fn mark_broken(&mut self, why: String) {
        tracing::error!(instance = self.name, "{why}; new requests are refused");
        self.engine = None;
        self.broken = Some(why);
    }

    /// Drops the engine and builds a fresh one (same model, empty KV cache, a new device
    /// context: the old one's resources are all released first); `why` names what happened to
    /// the old one. If the rebuild fails the instance is marked broken.
    fn replace_engine(&mut self, why: &str) {
        self.drop_engine();
        let rebuilt = catch_unwind(AssertUnwindSafe(|| (self.rebuild)())).unwrap_or_else(|p| {
            Err(TritonError::Panic {
                entry: "rebuilding the engine",
                message: panic_message(p.as_ref()),
            })
        });
        match rebuilt {
            Ok(engine) => {
                self.engine = Some(engine);
                tracing::warn!(instance = self.name, "engine rebuilt after {why}");
            }
            Err(e) => self.mark_broken(format!(
                "its engine failed with {why} and could not be rebuilt: {}",
                e.chain()
            )),
        }
    }

    /// The events of one step, grouped per request in order. A request leaves `live` only once
    /// its FINAL is out, so a panic while responding still finds it there.
    fn dispatch(&mut self, events: Vec<Event>) {
        let mut order: Vec<RequestId> = Vec::new();
        let mut per: HashMap<RequestId, Vec<Event>> = HashMap::new();
        for ev in events {
            let id = match &ev {
                Event::Token { id, .. } | Event::Finished { id, .. } => *id,
            };
            per.entry(id)
                .or_insert_with(|| {
                    order.push(id);
                    Vec::new()
                })
                .push(ev);
        }
        for id in order {
            let evs = per.remove(&id).unwrap_or_default();
            let Some(l) = self.live.get_mut(&id) else {
                continue;
            };
            match respond(l, evs) {
                Ok(Sent::Open) => {}
                Ok(Sent::Final { success }) => {
                    if success {
                        self.fatal_streak = 0;
                    }
                    let l = self.live.remove(&id).expect("present above");
                    l.job.pending.finish(self.instance, success);
                    self.counter.fetch_sub(1, Ordering::AcqRel);
                }
                Err(err) => {
                    // Sending failed (the client may be gone): stop generating and end it.
                    if let Some(engine) = self.engine.as_mut() {
                        engine.cancel(id);
                    }
                    let l = self.live.remove(&id).expect("present above");
                    tracing::warn!(
                        request = l.job.pending.id.as_str(),
                        error = %err.chain(),
                        "response failed; request ended"
                    );
                    finish_with(l.job, &err, self.instance, self.counter);
                }
            }
        }
    }

    /// Answers every request held with `err` (FINAL, statistics, release), queued ones included.
    fn answer_all(&mut self, err: &TritonError) -> usize {
        let mut jobs: Vec<Box<Job>> = self.admitting.take().into_iter().collect();
        jobs.extend(self.live.drain().map(|(_, l)| l.job));
        jobs.extend(self.queued.drain(..));
        let n = jobs.len();
        for job in jobs {
            finish_with(job, err, self.instance, self.counter);
        }
        n
    }

    /// After a panic: the engine may have stopped half-way through a step, so every request it
    /// held ends with an INTERNAL error naming the panic, and the engine is replaced by a fresh
    /// one (same model, empty KV cache). If that fails the instance refuses new requests with
    /// UNAVAILABLE, naming the panic, rather than hang.
    fn recover(&mut self, message: &str) {
        let err = TritonError::Internal {
            context: format!("instance {}: the engine thread panicked", self.name),
            source: message.into(),
        };
        let n = self.answer_all(&err);
        tracing::error!(
            instance = self.name,
            panic = message,
            ended = n,
            "engine thread panicked; every request it held was ended with INTERNAL"
        );
        self.replace_engine(&format!("a panic ({message})"));
    }

    /// Stopping: answer everything still here, queued ones included, with UNAVAILABLE.
    fn stop(mut self, rx: &mpsc::Receiver<Command>) {
        for c in rx.try_iter() {
            if let Command::Add(job) = c {
                self.queued.push_back(job);
            }
        }
        let err = TritonError::Unavailable(format!(
            "model instance {} is being unloaded; the request was not completed",
            self.name
        ));
        let n = self.answer_all(&err);
        let engine = self.engine.take();
        // A step in flight is waited for (its events dropped: every request was answered)
        // before the engine goes.
        let finish_and_drop = move || {
            if let Some(mut e) = engine {
                if e.step_in_flight() {
                    let _ = e.finish_step();
                }
            }
        };
        if catch_unwind(AssertUnwindSafe(finish_and_drop)).is_err() {
            tracing::error!(instance = self.name, "dropping the engine panicked");
        }
        tracing::debug!(instance = self.name, answered = n, "engine thread stopped");
    }
}

/// The OpenAI-style finish reason.
fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopToken | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Cancelled => "cancelled",
    }
}

fn outputs(
    w: Wanted,
    batched: bool,
    text: &str,
    ids: &[u32],
    reason: &str,
    count: usize,
) -> Vec<OutputTensor> {
    let mut out = Vec::with_capacity(4);
    if w.text {
        out.push(OutputTensor::string("text_output", text, batched));
    }
    if w.ids {
        let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        out.push(OutputTensor::int32s("output_ids", &ids, batched));
    }
    if w.reason {
        out.push(OutputTensor::string("finish_reason", reason, batched));
    }
    if w.count {
        out.push(OutputTensor::int32s(
            "num_output_tokens",
            &[count as i32],
            batched,
        ));
    }
    out
}

/// Sends the responses for one request's events of a step; [`Sent::Final`] once its FINAL was
/// sent (a cancellation's FINAL is a CANCELLED error, reported as unsuccessful).
fn respond(l: &mut Live, events: Vec<Event>) -> Result<Sent, TritonError> {
    let mut tokens: Vec<(u32, String)> = Vec::new();
    let mut finished: Option<(StopReason, String)> = None;
    for ev in events {
        match ev {
            Event::Token {
                token, text_delta, ..
            } => tokens.push((token, text_delta)),
            Event::Finished {
                reason, text_delta, ..
            } => finished = Some((reason, text_delta)),
        }
    }
    if let Some((StopReason::Cancelled, _)) = finished {
        l.job.pending.send_error(&TritonError::Cancelled(format!(
            "{} was cancelled after {} generated tokens",
            l.job.pending.label(),
            l.ids.len() + tokens.len()
        )));
        return Ok(Sent::Final { success: false });
    }
    let (w, batched) = (l.job.wanted, l.job.batched);
    if l.job.stream {
        let n = tokens.len();
        for (k, (token, mut text)) in tokens.into_iter().enumerate() {
            l.ids.push(token);
            let last = k + 1 == n && finished.is_some();
            let reason = match &finished {
                Some((r, tail)) if last => {
                    text.push_str(tail);
                    finish_reason(*r)
                }
                _ => "",
            };
            l.job
                .pending
                .send(&outputs(w, batched, &text, &[token], reason, 1), last)?;
        }
        if n == 0 {
            if let Some((r, tail)) = &finished {
                l.job
                    .pending
                    .send(&outputs(w, batched, tail, &[], finish_reason(*r), 0), true)?;
            }
        }
        return Ok(if finished.is_some() {
            Sent::Final { success: true }
        } else {
            Sent::Open
        });
    }
    for (token, text) in tokens {
        l.ids.push(token);
        l.text.push_str(&text);
    }
    let Some((r, tail)) = finished else {
        return Ok(Sent::Open);
    };
    l.text.push_str(&tail);
    let text = format!("{}{}", l.job.echo_text, l.text);
    let ids: Vec<u32> = l.job.echo_ids.iter().chain(&l.ids).copied().collect();
    l.job.pending.send(
        &outputs(w, batched, &text, &ids, finish_reason(r), l.ids.len()),
        true,
    )?;
    Ok(Sent::Final { success: true })
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
