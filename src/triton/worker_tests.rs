//! The engine thread against the mock server functions (`mock.rs`), with a fake backend that
//! panics or faults on demand: what Triton sees when the engine panics or the device faults
//! fatally, and the success flag of the statistics of a cancelled request.

use std::ptr;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::super::{log, mock, sys};
use super::*;
use crate::device::{DecodeItem, DeviceError, KvCapacity, Logits, SeqId};
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
}

impl Fake {
    /// Fails (and counts the call) once the backend is dead.
    fn alive(&self) -> Result<(), DeviceError> {
        if self.dead {
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
}

fn engine(faults: &Arc<Faults>) -> Engine<Box<dyn Backend>> {
    let cfg = LlamaConfig::tiny_for_tests(VOCAB);
    let backend: Box<dyn Backend> = Box::new(Fake {
        cfg,
        lens: HashMap::new(),
        next: 0,
        faults: Arc::clone(faults),
        dead: false,
    });
    let opts = EngineOptions {
        eos_token_ids: Vec::new(),
        max_batch: 8,
        max_prefill_tokens: 4096,
        max_step_slowdown: None,
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
