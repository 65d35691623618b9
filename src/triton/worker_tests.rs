//! The engine thread against the mock server functions (`mock.rs`), with a fake backend that
//! panics or faults on demand: what Triton sees when the engine panics or the device faults
//! fatally, and the success flag of the statistics of a cancelled request.

use std::ptr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::super::{log, mock, sys};
use super::*;
use crate::device::shared::{ContextEpochs, ContextLease};
use crate::device::{
    argmax, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, KvCapacity, Launched, Logits,
    SeqId,
};
use crate::engine::EngineOptions;
use crate::model::LlamaConfig;

const VOCAB: usize = 16;

/// Where the fake backend panics, and the injected fatal device fault.
#[derive(Default)]
struct Faults {
    prefill: AtomicBool,
    decode: AtomicBool,
    /// The next decode of any fake dies with a sticky fault: it and every later call on that
    /// backend fail with a [`FaultKind::Fatal`] error, as a CUDA context after an illegal
    /// address does.
    fatal_decode: AtomicBool,
    /// Calls made on a dead backend (a worker that keeps stepping a dead context shows here).
    calls_after_death: AtomicUsize,
    /// Decode steps are left in flight, as a device's: `launch_decode` holds the batch and
    /// `collect_step` runs it (faults and panics surface there, at the synchronisation).
    pipelined: AtomicBool,
    /// Each launch and collection of a pipelined step (each decode step of a synchronous one),
    /// with the number of responses the mock server had received from every request then.
    order: std::sync::Mutex<Vec<(&'static str, usize)>>,
}

/// Responses the mock server received so far, from every request.
fn responses_sent() -> usize {
    mock::with(|h| h.requests.iter().map(|r| r.responses.len()).sum())
}

/// The error a dead context gives, as the driver wrapper words it.
fn illegal_address() -> DeviceError {
    DeviceError::Cuda(crate::device::cuda::driver::GpuError {
        message: "cuStreamSynchronize failed: CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory \
                  access was encountered)"
            .into(),
        kind: FaultKind::Fatal,
    })
}

/// A model that always predicts token 5, one millisecond per decode step (so a test can act
/// while requests stream), and panics where [`Faults`] says.
struct Fake {
    cfg: LlamaConfig,
    lens: HashMap<SeqId, usize>,
    next: u32,
    faults: Arc<Faults>,
    /// A fatal fault happened: every call fails.
    dead: bool,
    /// Its hold on the (fake) device context shared with other instances, if any: a fatal
    /// fault ends its generation for all of them.
    lease: Option<ContextLease>,
    /// Where its drop is recorded (`dropped <name>`), if anywhere.
    journal: Option<(String, Journal)>,
    /// The decode batch in flight (`Faults::pipelined`).
    held: Option<Vec<DecodeItem>>,
}

/// What happened, in order, across instances.
type Journal = Arc<std::sync::Mutex<Vec<String>>>;

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some((name, journal)) = &self.journal {
            journal.lock().unwrap().push(format!("dropped {name}"));
        }
    }
}

impl Fake {
    /// Fails (and counts the call) once the backend is dead, or its shared context is.
    fn alive(&self) -> Result<(), DeviceError> {
        if self.dead || self.lease.as_ref().is_some_and(ContextLease::lost) {
            self.faults.calls_after_death.fetch_add(1, Ordering::SeqCst);
            return Err(illegal_address());
        }
        Ok(())
    }
}

fn logits_row() -> Vec<f32> {
    let mut row = vec![0.0; VOCAB];
    row[5] = 1.0;
    row
}

impl Backend for Fake {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn context_lost(&self) -> Option<DeviceError> {
        let lost = self.lease.as_ref().is_some_and(ContextLease::lost) && !self.dead;
        lost.then(|| {
            DeviceError::Cuda(crate::device::cuda::driver::GpuError {
                message: "device 0's context was lost to a fatal fault".into(),
                kind: FaultKind::Fatal,
            })
        })
    }

    fn kv_capacity(&self) -> crate::device::KvCapacity {
        KvCapacity {
            max_sequences: 8,
            max_context: 4096,
        }
    }

    fn weight_memory(&self) -> crate::device::WeightMemory {
        crate::device::WeightMemory {
            bytes: 0,
            bf16_bytes: 0,
        }
    }

    fn kv_usage(&self) -> crate::device::KvUsage {
        crate::device::KvUsage {
            block_tokens: 4096,
            total_blocks: 8,
            free_blocks: 8 - self.lens.len(),
            used_tokens: self.lens.values().sum(),
            sequences: self.lens.len(),
        }
    }

    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        self.alive()?;
        let id = SeqId(self.next);
        self.next += 1;
        self.lens.insert(id, 0);
        Ok(id)
    }

    fn free_sequence(&mut self, seq: SeqId) {
        self.lens.remove(&seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.lens
            .get(&seq)
            .copied()
            .ok_or(DeviceError::UnknownSequence(seq))
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        if self.faults.prefill.load(Ordering::SeqCst) {
            panic!("fake backend: prefill panicked");
        }
        self.alive()?;
        *self
            .lens
            .get_mut(&seq)
            .ok_or(DeviceError::UnknownSequence(seq))? += tokens.len();
        Ok(logits_row())
    }

    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        std::thread::sleep(Duration::from_millis(1));
        if self.faults.decode.load(Ordering::SeqCst) {
            panic!("fake backend: decode panicked");
        }
        self.alive()?;
        if self.faults.fatal_decode.load(Ordering::SeqCst) {
            self.dead = true;
            if let Some(lease) = &self.lease {
                lease.mark_lost();
            }
            return Err(illegal_address());
        }
        for item in batch {
            *self
                .lens
                .get_mut(&item.seq)
                .ok_or(DeviceError::UnknownSequence(item.seq))? += 1;
        }
        Ok(Logits {
            vocab: VOCAB,
            data: batch.iter().flat_map(|_| logits_row()).collect(),
        })
    }

    fn launch_decode(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        if !self.faults.pipelined.load(Ordering::SeqCst) {
            self.faults
                .order
                .lock()
                .unwrap()
                .push(("step", responses_sent()));
            let logits = self.decode(batch)?;
            let out = match choice {
                DecodeChoice::Logits => DecodeOutput::Logits(logits),
                _ => DecodeOutput::Ids((0..batch.len()).map(|i| argmax(logits.row(i))).collect()),
            };
            return Ok(Launched::Done(out));
        }
        assert!(self.held.is_none(), "launched while a step is in flight");
        assert!(
            matches!(choice, DecodeChoice::Argmax),
            "greedy requests only"
        );
        self.alive()?;
        self.faults
            .order
            .lock()
            .unwrap()
            .push(("launch", responses_sent()));
        self.held = Some(batch.to_vec());
        Ok(Launched::InFlight)
    }

    fn collect_step(&mut self) -> Result<DecodeOutput, DeviceError> {
        let batch = self.held.take().expect("a step in flight");
        self.faults
            .order
            .lock()
            .unwrap()
            .push(("collect", responses_sent()));
        let logits = self.decode(&batch)?;
        Ok(DecodeOutput::Ids(
            (0..batch.len()).map(|i| argmax(logits.row(i))).collect(),
        ))
    }
}

fn engine(faults: &Arc<Faults>) -> Engine<Box<dyn Backend>> {
    engine_on(faults, None, None)
}

/// An engine over a fake holding `lease` on a shared context, recording its drop in `journal`.
fn engine_on(
    faults: &Arc<Faults>,
    lease: Option<ContextLease>,
    journal: Option<(String, Journal)>,
) -> Engine<Box<dyn Backend>> {
    let cfg = LlamaConfig::tiny_for_tests(VOCAB);
    let backend: Box<dyn Backend> = Box::new(Fake {
        cfg,
        lens: HashMap::new(),
        next: 0,
        faults: Arc::clone(faults),
        dead: false,
        lease,
        journal,
        held: None,
    });
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        max_batch: 8,
        max_prefill_tokens: 4096,
        max_step_slowdown: None,
        short_prompt_tokens: 0,
    };
    Engine::new(backend, None, opts)
}

/// The mock's instance handle (never dereferenced).
fn instance() -> InstanceHandle {
    InstanceHandle(ptr::NonNull::dangling().as_ptr())
}

/// Submits request `id` for `max_tokens` tokens; returns its mock handle.
fn submit(
    w: &Worker,
    id: &str,
    max_tokens: usize,
    stream: bool,
) -> *mut sys::TRITONBACKEND_Request {
    let r = mock::new_request(id);
    // SAFETY: a mock request; the mock provides every server function `Pending` calls.
    let pending = unsafe { Pending::new(r, now_ns()) }.expect("factory");
    let job = Job {
        pending,
        request: Request::greedy(vec![1, 2, 3], max_tokens),
        stream,
        wanted: Wanted {
            text: true,
            ids: true,
            reason: true,
            count: true,
        },
        batched: true,
        echo_text: String::new(),
        echo_ids: Vec::new(),
    };
    w.submit(job).map_err(|(_, e)| e).expect("queued");
    r
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ended(r: *mut sys::TRITONBACKEND_Request) -> bool {
    mock::on_request(r, |m| m.ended())
}

/// The request ended as Triton requires (one FINAL, last; then statistics, release, factory
/// delete) with `success` reported; returns the FINAL's error.
fn ended_once(r: *mut sys::TRITONBACKEND_Request, success: bool) -> Option<(u32, String)> {
    mock::on_request(r, |m| {
        let id = m.id.to_string_lossy().into_owned();
        assert_eq!(
            m.order,
            ["FINAL", "statistics", "release", "factory-delete"],
            "{id}: the order of its end"
        );
        assert_eq!(
            m.statistics,
            Some(success),
            "{id}: statistics' success flag"
        );
        let finals = m.responses.iter().filter(|s| s.is_final).count();
        assert_eq!(finals, 1, "{id}: one FINAL");
        let last = m.responses.last().expect("a response");
        assert!(last.is_final, "{id}: the FINAL comes last");
        last.error.clone()
    })
}

/// An engine factory over `faults` that counts the engines it builds.
fn counting_rebuild(faults: &Arc<Faults>) -> (EngineFactory, Arc<AtomicUsize>) {
    let builds = Arc::new(AtomicUsize::new(0));
    let rebuild: EngineFactory = {
        let (faults, builds) = (Arc::clone(faults), Arc::clone(&builds));
        Box::new(move || {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok(engine(&faults))
        })
    };
    (rebuild, builds)
}

#[test]
fn a_panicking_engine_ends_every_request_with_internal_and_is_rebuilt() {
    let _g = mock::lock();
    log::install();
    let faults = Arc::new(Faults::default());
    let (rebuild, builds) = counting_rebuild(&faults);
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let streaming = submit(&w, "streaming", 100_000, true);
    let whole = submit(&w, "non-streaming", 100_000, false);
    wait_for("the stream has 3 responses", || {
        mock::on_request(streaming, |m| m.responses.len() >= 3)
    });
    faults.decode.store(true, Ordering::SeqCst);
    wait_for("both requests ended", || ended(streaming) && ended(whole));
    for r in [streaming, whole] {
        let (code, msg) = ended_once(r, false).expect("an error FINAL");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
        assert!(
            msg.contains("instance m_0: the engine thread panicked: fake backend: decode panicked"),
            "{msg}"
        );
    }
    assert!(
        mock::logged()
            .iter()
            .any(|(level, m)| *level == sys::TRITONSERVER_LOG_ERROR
                && m.contains("engine thread panicked")
                && m.contains("decode panicked")),
        "the panic is logged at ERROR: {:?}",
        mock::logged()
    );
    wait_for("the engine was rebuilt", || {
        builds.load(Ordering::SeqCst) == 1
    });

    // The rebuilt engine serves.
    faults.decode.store(false, Ordering::SeqCst);
    let after = submit(&w, "after", 3, true);
    wait_for("the request after the panic ended", || ended(after));
    assert_eq!(ended_once(after, true), None);
    mock::on_request(after, |m| {
        assert_eq!(m.responses.len(), 3);
        for s in &m.responses {
            assert_eq!(
                s.outputs,
                [
                    "text_output",
                    "output_ids",
                    "finish_reason",
                    "num_output_tokens"
                ]
            );
        }
    });
    w.stop().unwrap();
    assert_eq!(mock::with(|h| h.live_errors), 0);
}

#[test]
fn an_engine_that_cannot_be_rebuilt_refuses_new_requests_naming_the_panic() {
    let _g = mock::lock();
    let faults = Arc::new(Faults::default());
    faults.prefill.store(true, Ordering::SeqCst);
    let rebuild: EngineFactory =
        Box::new(|| Err(TritonError::Unavailable("the GPU is gone".into())));
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let first = submit(&w, "first", 4, true);
    wait_for("the first request ended", || ended(first));
    let (code, msg) = ended_once(first, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
    assert!(msg.contains("prefill panicked"), "{msg}");

    let next = submit(&w, "next", 4, true);
    wait_for("the next request ended", || ended(next));
    let (code, msg) = ended_once(next, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_UNAVAILABLE, "{msg}");
    for part in ["instance m_0", "prefill panicked", "the GPU is gone"] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
    w.stop().unwrap();
    assert_eq!(mock::with(|h| h.live_errors), 0);
}

#[test]
fn a_cancelled_request_is_reported_as_unsuccessful() {
    let _g = mock::lock();
    let faults = Arc::new(Faults::default());
    let rebuild: EngineFactory = Box::new(|| Err(TritonError::Unavailable("unused".into())));
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let victim = submit(&w, "victim", 100_000, true);
    let done = submit(&w, "done", 2, true);
    wait_for("the victim has 2 responses", || {
        mock::on_request(victim, |m| m.responses.len() >= 2)
    });
    mock::on_request(victim, |m| m.cancelled = true);
    wait_for("both requests ended", || ended(victim) && ended(done));
    let (code, msg) = ended_once(victim, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_CANCELLED, "{msg}");
    assert_eq!(ended_once(done, true), None);
    w.stop().unwrap();
}

#[test]
fn a_fatal_device_fault_ends_every_request_and_rebuilds_the_engine_without_stepping_it_again() {
    fatal_fault_case(false);
}

/// The same with decode steps left in flight: the fault surfaces at a collection, while the
/// thread has the previous step's responses to send.
#[test]
fn a_fatal_fault_at_the_collection_of_a_step_in_flight_is_handled_the_same_way() {
    fatal_fault_case(true);
}

fn fatal_fault_case(pipelined: bool) {
    let _g = mock::lock();
    log::install();
    let faults = Arc::new(Faults::default());
    faults.pipelined.store(pipelined, Ordering::SeqCst);
    let (rebuild, builds) = counting_rebuild(&faults);
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let streaming = submit(&w, "streaming", 100_000, true);
    let whole = submit(&w, "non-streaming", 100_000, false);
    wait_for("the stream has 3 responses", || {
        mock::on_request(streaming, |m| m.responses.len() >= 3)
    });
    faults.fatal_decode.store(true, Ordering::SeqCst);
    wait_for("both requests ended", || ended(streaming) && ended(whole));
    for r in [streaming, whole] {
        let (code, msg) = ended_once(r, false).expect("an error FINAL");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
        for part in [
            "instance m_0",
            "fatal device fault",
            "CUDA_ERROR_ILLEGAL_ADDRESS",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
    }
    wait_for("the engine was rebuilt", || {
        builds.load(Ordering::SeqCst) == 1
    });
    assert!(
        mock::logged()
            .iter()
            .any(|(level, m)| *level == sys::TRITONSERVER_LOG_ERROR
                && m.contains("fatal device fault")
                && m.contains("CUDA_ERROR_ILLEGAL_ADDRESS")),
        "the fault is logged at ERROR: {:?}",
        mock::logged()
    );
    // The dead backend was dropped, never stepped again.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(faults.calls_after_death.load(Ordering::SeqCst), 0);

    // The rebuilt engine (a new context) serves.
    faults.fatal_decode.store(false, Ordering::SeqCst);
    let after = submit(&w, "after", 3, true);
    wait_for("the request after the fault ended", || ended(after));
    assert_eq!(ended_once(after, true), None);
    w.stop().unwrap();
    assert_eq!(faults.calls_after_death.load(Ordering::SeqCst), 0);
    assert_eq!(mock::with(|h| h.live_errors), 0);
}

#[test]
fn a_fatal_fault_in_one_instance_makes_every_instance_on_the_device_let_go_before_any_rebuilds() {
    lost_context_case(false);
}

/// The same with decode steps left in flight (a serving instance has a step in flight at the
/// start of each turn): every instance still lets go before any rebuild, the serving one
/// touching the dead context at most once.
#[test]
fn instances_with_steps_in_flight_let_go_of_a_lost_context_too() {
    lost_context_case(true);
}

fn lost_context_case(pipelined: bool) {
    let _g = mock::lock();
    let epochs = ContextEpochs::new();
    let journal: Journal = Arc::default();
    // Three instances on one device: a faults, b is serving, c is idle.
    let names = ["a", "b", "c"];
    let faults: Vec<Arc<Faults>> = names.iter().map(|_| Arc::default()).collect();
    for f in &faults {
        f.pipelined.store(pipelined, Ordering::SeqCst);
    }
    let builds = Arc::new(AtomicUsize::new(0));
    let workers: Vec<Worker> = names
        .iter()
        .zip(&faults)
        .map(|(&name, f)| {
            let lease = epochs.acquire(0, Duration::ZERO).unwrap();
            let first = engine_on(f, Some(lease), Some((name.into(), Arc::clone(&journal))));
            let rebuild: EngineFactory = {
                let (f, epochs, journal, builds) = (
                    Arc::clone(f),
                    Arc::clone(&epochs),
                    Arc::clone(&journal),
                    Arc::clone(&builds),
                );
                Box::new(move || {
                    // As `driver::Context::new`: wait for the dead context's holders.
                    let lease = epochs
                        .acquire(0, Duration::from_secs(10))
                        .map_err(TritonError::Unavailable)?;
                    journal.lock().unwrap().push(format!("built {name}"));
                    builds.fetch_add(1, Ordering::SeqCst);
                    Ok(engine_on(
                        &f,
                        Some(lease),
                        Some((name.into(), Arc::clone(&journal))),
                    ))
                })
            };
            Worker::spawn(&format!("m_{name}"), first, rebuild, instance(), 16, None).unwrap()
        })
        .collect();
    let ra = submit(&workers[0], "ra", 100_000, true);
    let rb = submit(&workers[1], "rb", 100_000, true);
    wait_for("both streams have 3 responses", || {
        [ra, rb]
            .iter()
            .all(|&r| mock::on_request(r, |m| m.responses.len() >= 3))
    });
    faults[0].fatal_decode.store(true, Ordering::SeqCst);
    wait_for("both requests ended", || ended(ra) && ended(rb));
    let (code, msg) = ended_once(ra, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
    assert!(msg.contains("ILLEGAL_ADDRESS"), "{msg}");
    let (code, msg) = ended_once(rb, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
    // b learns it from its own step in flight (the sticky error) or before its next one.
    assert!(msg.contains("instance m_b"), "{msg}");
    assert!(
        msg.contains("context was lost") || msg.contains("ILLEGAL_ADDRESS"),
        "{msg}"
    );
    // Every instance, the idle one too, let go and was rebuilt, and no rebuild happened while
    // any of them still held the dead context.
    wait_for("three rebuilds", || builds.load(Ordering::SeqCst) == 3);
    let events = journal.lock().unwrap().clone();
    let last_drop = events
        .iter()
        .rposition(|e| e.starts_with("dropped"))
        .unwrap();
    let first_build = events.iter().position(|e| e.starts_with("built")).unwrap();
    assert!(last_drop < first_build, "{events:?}");
    assert_eq!(
        events.iter().filter(|e| e.starts_with("dropped")).count(),
        3,
        "{events:?}"
    );
    // b stepped the dead context at most once (the step in flight when it died); c never.
    assert!(faults[1].calls_after_death.load(Ordering::SeqCst) <= 1);
    assert_eq!(faults[2].calls_after_death.load(Ordering::SeqCst), 0);
    // All three serve again, in the new context.
    faults[0].fatal_decode.store(false, Ordering::SeqCst);
    let after: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| submit(w, &format!("after{i}"), 3, true))
        .collect();
    wait_for("the requests after the fault ended", || {
        after.iter().all(|&r| ended(r))
    });
    for r in after {
        assert_eq!(ended_once(r, true), None);
    }
    for w in workers {
        w.stop().unwrap();
    }
    assert_eq!(mock::with(|h| h.live_errors), 0);
}

#[test]
fn a_device_that_faults_in_every_new_context_is_marked_broken_not_rebuilt_forever() {
    let _g = mock::lock();
    let faults = Arc::new(Faults::default());
    faults.fatal_decode.store(true, Ordering::SeqCst);
    let (rebuild, builds) = counting_rebuild(&faults);
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    // One request per fault: each reaches a decode, which kills that engine's context.
    for k in 0..=MAX_FATAL_REBUILDS {
        let r = submit(&w, &format!("r{k}"), 8, true);
        wait_for("the request ended", || ended(r));
        let (code, msg) = ended_once(r, false).expect("an error FINAL");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL, "{msg}");
        assert!(msg.contains("CUDA_ERROR_ILLEGAL_ADDRESS"), "{msg}");
    }
    assert_eq!(builds.load(Ordering::SeqCst), MAX_FATAL_REBUILDS);
    let next = submit(&w, "next", 4, true);
    wait_for("the next request ended", || ended(next));
    let (code, msg) = ended_once(next, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_UNAVAILABLE, "{msg}");
    for part in [
        "instance m_0",
        "fatal device faults in a row",
        "ILLEGAL_ADDRESS",
    ] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
    assert_eq!(builds.load(Ordering::SeqCst), MAX_FATAL_REBUILDS);
    w.stop().unwrap();
    assert_eq!(faults.calls_after_death.load(Ordering::SeqCst), 0);
    assert_eq!(mock::with(|h| h.live_errors), 0);
}

/// With a backend that leaves each decode step in flight, the engine thread sends a step's
/// responses while the next step runs: between some launch and its collection, the mock server
/// received responses (a worker doing its host work only between steps shows none there).
/// Every request still gets all its tokens and one FINAL, and a cancellation arriving while
/// steps are in flight ends its request as CANCELLED.
#[test]
fn the_engine_thread_sends_responses_while_the_next_step_runs() {
    let _g = mock::lock();
    let faults = Arc::new(Faults::default());
    faults.pipelined.store(true, Ordering::SeqCst);
    let rebuild: EngineFactory = Box::new(|| Err(TritonError::Unavailable("unused".into())));
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let a = submit(&w, "a", 12, true);
    let b = submit(&w, "b", 9, true);
    let victim = submit(&w, "victim", 100_000, true);
    wait_for("the victim has 3 responses", || {
        mock::on_request(victim, |m| m.responses.len() >= 3)
    });
    mock::on_request(victim, |m| m.cancelled = true);
    wait_for("every request ended", || {
        ended(a) && ended(b) && ended(victim)
    });
    assert_eq!(ended_once(a, true), None);
    assert_eq!(ended_once(b, true), None);
    // One response per token, the FINAL with the last one.
    assert_eq!(mock::on_request(a, |m| m.responses.len()), 12);
    assert_eq!(mock::on_request(b, |m| m.responses.len()), 9);
    let (code, msg) = ended_once(victim, false).expect("an error FINAL");
    assert_eq!(code, sys::TRITONSERVER_ERROR_CANCELLED, "{msg}");
    w.stop().unwrap();
    let order = faults.order.lock().unwrap().clone();
    assert!(order.len() >= 4, "{order:?}");
    for pair in order.chunks(2) {
        assert_eq!((pair[0].0, pair[1].0), ("launch", "collect"), "{order:?}");
    }
    let overlapped = order.chunks(2).filter(|pair| pair[1].1 > pair[0].1).count();
    assert!(
        overlapped > 0,
        "responses were sent while a step was in flight: {order:?}"
    );
}

/// With a synchronous backend (its launch runs the whole step, as the CPU's), the engine thread
/// sends each step's responses before it runs the next step, as a plain step loop does: the
/// j-th decode step of a lone stream starts with j + 1 responses out (its first token came from
/// its prefill), never one step behind.
#[test]
fn with_a_synchronous_backend_each_steps_responses_go_out_before_the_next_step() {
    let _g = mock::lock();
    let faults = Arc::new(Faults::default());
    let rebuild: EngineFactory = Box::new(|| Err(TritonError::Unavailable("unused".into())));
    let w = Worker::spawn("m_0", engine(&faults), rebuild, instance(), 16, None).unwrap();
    let r = submit(&w, "r", 6, true);
    wait_for("the request ended", || ended(r));
    assert_eq!(ended_once(r, true), None);
    w.stop().unwrap();
    let order = faults.order.lock().unwrap().clone();
    let want: Vec<(&str, usize)> = (1..=5).map(|j| ("step", j)).collect();
    assert_eq!(order, want);
}
