//! The engine thread of one model instance: continuous batching over every live request, one
//! response per token (or one per request), cancellation, and a clean stop.
//!
//! `ModelInstanceExecute` (Triton's thread) only checks requests and hands the good ones over a
//! channel ([`Worker::submit`]). The thread admits them between engine steps, polls each live
//! request's cancellation flag once per step, runs [`Engine::step`] and turns its events into
//! responses. Every request leaves through [`finish_with`] or [`Pending::finish`] after exactly
//! one FINAL response. [`Worker::stop`] (from `ModelInstanceFinalize`) makes the thread answer
//! every request still queued or running with an UNAVAILABLE error and joins it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use super::error::TritonError;
use super::request::{now_ns, InstanceHandle, OutputTensor, Pending, Wanted};
use crate::device::Backend;
use crate::engine::{Engine, Event, Request, RequestId, StopReason};

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
    /// Starts the engine thread of instance `name`; at most `limit` requests may be queued or
    /// running at once.
    pub fn spawn(
        name: &str,
        engine: Engine<Box<dyn Backend>>,
        instance: InstanceHandle,
        limit: usize,
    ) -> Result<Self, TritonError> {
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&in_flight);
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("unweight-{name}"))
            .spawn(move || run(&label, engine, instance, rx, &counter))
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

fn run(
    name: &str,
    mut engine: Engine<Box<dyn Backend>>,
    instance: InstanceHandle,
    rx: mpsc::Receiver<Command>,
    counter: &AtomicUsize,
) {
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let mut leftover: Vec<Command> = Vec::new();
    tracing::debug!(instance = name, "engine thread started");
    'serve: loop {
        // Admit what arrived; sleep only when there is nothing to compute.
        let mut commands = Vec::new();
        if !engine.has_work() {
            match rx.recv() {
                Ok(c) => commands.push(c),
                Err(_) => break 'serve,
            }
        }
        commands.extend(rx.try_iter());
        let mut commands = commands.into_iter();
        while let Some(c) = commands.next() {
            match c {
                Command::Stop => {
                    leftover.extend(commands);
                    break 'serve;
                }
                Command::Add(mut job) => {
                    job.pending.compute_start_ns = now_ns();
                    match engine.add(job.request.clone()) {
                        Ok(id) => {
                            tracing::debug!(
                                instance = name,
                                request = job.pending.id.as_str(),
                                prompt_tokens = job.request.prompt.len(),
                                max_tokens = job.request.max_tokens,
                                stream = job.stream,
                                "admitted"
                            );
                            live.insert(
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
                            finish_with(job, &err, instance, counter);
                        }
                    }
                }
            }
        }

        for (&id, l) in &live {
            if l.job.pending.is_cancelled() {
                engine.cancel(id);
            }
        }

        match engine.step() {
            Ok(events) => dispatch(events, &mut live, &mut engine, instance, counter),
            Err(e) => {
                let err = TritonError::Internal {
                    context: format!("instance {name}: engine step"),
                    source: Box::new(e),
                };
                tracing::error!(instance = name, error = %err.chain(), "engine step failed");
                for id in engine.take_failed() {
                    if let Some(l) = live.remove(&id) {
                        finish_with(l.job, &err, instance, counter);
                    }
                }
            }
        }
    }

    // Stopping: answer everything still here, queued ones included.
    let err = TritonError::Unavailable(format!(
        "model instance {name} is being unloaded; the request was not completed"
    ));
    let queued: Vec<Box<Job>> = leftover
        .into_iter()
        .chain(rx.try_iter())
        .filter_map(|c| match c {
            Command::Add(job) => Some(job),
            Command::Stop => None,
        })
        .collect();
    let n = live.len() + queued.len();
    for (_, l) in live.drain() {
        finish_with(l.job, &err, instance, counter);
    }
    for job in queued {
        finish_with(job, &err, instance, counter);
    }
    tracing::debug!(instance = name, answered = n, "engine thread stopped");
}

/// The events of one step, grouped per request in order.
fn dispatch(
    events: Vec<Event>,
    live: &mut HashMap<RequestId, Live>,
    engine: &mut Engine<Box<dyn Backend>>,
    instance: InstanceHandle,
    counter: &AtomicUsize,
) {
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
        let Some(l) = live.get_mut(&id) else {
            continue;
        };
        match respond(l, evs) {
            Ok(false) => {}
            Ok(true) => {
                let l = live.remove(&id).expect("present above");
                l.job.pending.finish(instance, true);
                counter.fetch_sub(1, Ordering::AcqRel);
            }
            Err(err) => {
                // Sending failed (the client may be gone): stop generating and end it.
                engine.cancel(id);
                let l = live.remove(&id).expect("present above");
                tracing::warn!(
                    request = l.job.pending.id.as_str(),
                    error = %err.chain(),
                    "response failed; request ended"
                );
                finish_with(l.job, &err, instance, counter);
            }
        }
    }
}

/// The OpenAI-style finish reason.
fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopString => "stop",
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

/// Sends the responses for one request's events of a step; `Ok(true)` when its FINAL was sent
/// (cancellation included: then the FINAL is a CANCELLED error).
fn respond(l: &mut Live, events: Vec<Event>) -> Result<bool, TritonError> {
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
        return Ok(true);
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
        return Ok(finished.is_some());
    }
    for (token, text) in tokens {
        l.ids.push(token);
        l.text.push_str(&text);
    }
    let Some((r, tail)) = finished else {
        return Ok(false);
    };
    l.text.push_str(&tail);
    let text = format!("{}{}", l.job.echo_text, l.text);
    let ids: Vec<u32> = l.job.echo_ids.iter().chain(&l.ids).copied().collect();
    l.job.pending.send(
        &outputs(w, batched, &text, &ids, finish_reason(r), l.ids.len()),
        true,
    )?;
    Ok(true)
}
