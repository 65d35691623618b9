//! One run: load the backend as Triton does, drive its entry points, submit the requests, wait
//! for the responses, unload, check that nothing is left, and build the report.
//!
//! Lifecycle, as Triton's core does it (`TritonBackend`, `TritonModel`, `TritonModelInstance`):
//! `dlopen(RTLD_NOW | RTLD_LOCAL)`, `TRITONBACKEND_Initialize`, `GetBackendAttribute` (if
//! exported), `ModelInitialize`, `ModelInstanceInitialize` for each instance in order; then
//! `ModelInstanceExecute` calls; at unload every `ModelInstanceFinalize`, `ModelFinalize`,
//! `Finalize`. A failed initialize still gets its finalize (Triton's destructors call them
//! whether or not initialization succeeded), and everything created before it is finalized too.
//! The library is not `dlclose`d (Triton keeps backends until exit).
//!
//! Requests are submitted from this thread when they become due (`delay_ms`), several per
//! Execute call when several are due, round-robin over the instances; Execute is never called
//! concurrently. Responses arrive on the backend's threads and are recorded by the ledger.

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value as Json};

use crate::guard::{self, GuardBuf, Region};
use crate::ledger::{code, handle, ErrorInfo, Kind, Ledger, Life, Options};
use crate::model_config::{Devices, ModelConfig};
use crate::server;
use crate::spec::{self, EncodedInput, RunSpec};
use crate::sys::{
    TRITONBACKEND_Backend, TRITONBACKEND_BackendAttribute, TRITONBACKEND_Model,
    TRITONBACKEND_ModelInstance, TRITONBACKEND_Request, TRITONSERVER_Error,
};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub backend: PathBuf,
    pub repository: PathBuf,
    pub model: String,
    pub version: u64,
    pub devices: Devices,
    pub backend_config: BTreeMap<String, String>,
    pub run: RunSpec,
    pub report: Option<PathBuf>,
    pub print_stream: bool,
    pub log_to_stderr: bool,
    pub log_verbose: u32,
    pub api_version: (u32, u32),
    pub timeout: Duration,
    pub max_requests_per_execute: usize,
    pub require_statistics: bool,
}

type EntryFn<T> = unsafe extern "C" fn(*mut T) -> *mut TRITONSERVER_Error;
type ExecuteFn = unsafe extern "C" fn(
    *mut TRITONBACKEND_ModelInstance,
    *mut *mut TRITONBACKEND_Request,
    u32,
) -> *mut TRITONSERVER_Error;
type AttributeFn = unsafe extern "C" fn(
    *mut TRITONBACKEND_Backend,
    *mut TRITONBACKEND_BackendAttribute,
) -> *mut TRITONSERVER_Error;

struct Entries {
    initialize: Option<EntryFn<TRITONBACKEND_Backend>>,
    finalize: Option<EntryFn<TRITONBACKEND_Backend>>,
    attribute: Option<AttributeFn>,
    model_initialize: Option<EntryFn<TRITONBACKEND_Model>>,
    model_finalize: Option<EntryFn<TRITONBACKEND_Model>>,
    instance_initialize: Option<EntryFn<TRITONBACKEND_ModelInstance>>,
    instance_finalize: Option<EntryFn<TRITONBACKEND_ModelInstance>>,
    execute: ExecuteFn,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns this thread's last error message or null.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: a NUL-terminated message owned by libdl.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The link-time stub of `libtritonserver.so` that build.rs compiled (never shipped).
const SERVER_STUB: &str = env!("UNWEIGHT_TRITONSERVER_STUB");

/// Makes a backend's `DT_NEEDED libtritonserver.so` (Triton's backends link against the server
/// library; so does ours, build.rs) resolvable in this process: the loader matches a needed
/// name against the sonames of objects already loaded, so the build's stub, loaded into a local
/// scope, satisfies it. Symbols still bind to this executable first (the global scope is
/// searched before the backend's own dependencies), so the stub's aborting bodies never run.
fn provide_server_soname() -> Result<()> {
    let c = CString::new(SERVER_STUB).context("stub path")?;
    // SAFETY: a valid path; the stub has no constructors.
    let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        bail!(
            "dlopen({SERVER_STUB}) failed: {} (the libtritonserver.so stub build.rs compiles; \
             rebuild with cargo)",
            dlerror()
        );
    }
    Ok(())
}

/// Loads the library as Triton does and looks up the entry points.
fn load(path: &Path) -> Result<Entries> {
    provide_server_soname()?;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("backend path")?;
    // SAFETY: a valid path; the library's constructors run now. Its TRITON* references bind to
    // this executable's exported definitions (host/server/), found before its libtritonserver.so.
    let lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        bail!(
            "dlopen({}, RTLD_NOW | RTLD_LOCAL) failed: {} (an undefined TRITON* symbol means the \
             backend imports a server function this host does not provide)",
            path.display(),
            dlerror()
        );
    }
    let sym = |name: &str| -> *mut c_void {
        let n = CString::new(name).expect("no NUL");
        // SAFETY: a handle from a successful dlopen and a valid name.
        unsafe { libc::dlsym(lib, n.as_ptr()) }
    };
    macro_rules! entry {
        ($name:expr, $ty:ty) => {{
            let p = sym($name);
            // SAFETY: Triton's entry points have exactly these C signatures
            // (tritonbackend.h, TRITONBACKEND_ISPEC); a null symbol stays None.
            (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, $ty>(p) })
        }};
    }
    let execute = entry!("TRITONBACKEND_ModelInstanceExecute", ExecuteFn).with_context(|| {
        format!(
            "{} does not export TRITONBACKEND_ModelInstanceExecute (required)",
            path.display()
        )
    })?;
    Ok(Entries {
        initialize: entry!("TRITONBACKEND_Initialize", EntryFn<TRITONBACKEND_Backend>),
        finalize: entry!("TRITONBACKEND_Finalize", EntryFn<TRITONBACKEND_Backend>),
        attribute: entry!("TRITONBACKEND_GetBackendAttribute", AttributeFn),
        model_initialize: entry!(
            "TRITONBACKEND_ModelInitialize",
            EntryFn<TRITONBACKEND_Model>
        ),
        model_finalize: entry!("TRITONBACKEND_ModelFinalize", EntryFn<TRITONBACKEND_Model>),
        instance_initialize: entry!(
            "TRITONBACKEND_ModelInstanceInitialize",
            EntryFn<TRITONBACKEND_ModelInstance>
        ),
        instance_finalize: entry!(
            "TRITONBACKEND_ModelInstanceFinalize",
            EntryFn<TRITONBACKEND_ModelInstance>
        ),
        execute,
    })
}

/// Calls an entry point (no lock held) and takes the error it returns.
fn call_entry(
    name: &'static str,
    f: impl FnOnce() -> *mut TRITONSERVER_Error,
) -> Option<ErrorInfo> {
    server::with(|l| l.entry = Some(name));
    let err = f();
    server::with(|l| {
        l.entry = None;
        l.take_entry_error(name, err as usize)
    })
}

fn threads() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for e in rd.flatten() {
            let tid = e.file_name().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(e.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string();
            out.insert(tid, name);
        }
    }
    out
}

/// What happened besides the ledger's records.
#[derive(Default)]
struct Outcome {
    backend_initialize_error: Option<ErrorInfo>,
    model_initialize_error: Option<ErrorInfo>,
    instance_initialize_errors: BTreeMap<String, ErrorInfo>,
    finalize_errors: Vec<Json>,
    unloaded_after_responses: Option<u64>,
    timed_out: bool,
    lingering_threads: Vec<Json>,
    load_ms: f64,
    serve_ms: f64,
    unload_ms: f64,
}

fn report(o: &Outcome, args: &RunArgs) -> Json {
    let mut r = server::with(|l| l.report());
    let obj = r.as_object_mut().expect("report is an object");
    obj.insert(
        "backend_library".into(),
        json!(args.backend.display().to_string()),
    );
    obj.insert(
        "backend_initialize_error".into(),
        json!(o.backend_initialize_error),
    );
    obj.insert(
        "model_initialize_error".into(),
        json!(o.model_initialize_error),
    );
    obj.insert(
        "instance_initialize_errors".into(),
        json!(o.instance_initialize_errors),
    );
    obj.insert("finalize_errors".into(), json!(o.finalize_errors));
    obj.insert(
        "unloaded_after_responses".into(),
        json!(o.unloaded_after_responses),
    );
    obj.insert("timed_out".into(), json!(o.timed_out));
    obj.insert("lingering_threads".into(), json!(o.lingering_threads));
    obj.insert(
        "timing_ms".into(),
        json!({"load": o.load_ms, "serve": o.serve_ms, "unload": o.unload_ms}),
    );
    r
}

fn write_report(path: Option<&Path>, r: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(r).expect("JSON");
    match path {
        Some(p) => {
            std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))
        }
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

/// Runs everything; returns the report and whether it has violations.
pub fn run(args: RunArgs) -> Result<(Json, bool)> {
    let model_dir = args.repository.join(&args.model);
    let config_path = model_dir.join("config.pbtxt");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config = Arc::new(
        ModelConfig::from_pbtxt(&text, &args.model, &args.devices)
            .with_context(|| format!("{}", config_path.display()))?,
    );
    let version_dir = model_dir.join(args.version.to_string());
    if !version_dir.is_dir() {
        bail!(
            "{} does not exist: Triton loads version {} from it",
            version_dir.display(),
            args.version
        );
    }
    // Encode every request first: a malformed spec is a usage error before anything loads.
    let mut encoded: Vec<Vec<EncodedInput>> = Vec::new();
    for r in &args.run.requests {
        encoded.push(spec::encode_inputs(r, &config)?);
    }
    let backend_dir = args
        .backend
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let backend_name = args
        .backend
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("libtriton_"))
        .and_then(|f| f.strip_suffix(".so"))
        .map(str::to_string)
        .unwrap_or_else(|| config.backend.clone());
    if backend_name != config.backend {
        bail!(
            "the model config asks for backend '{}' (libtriton_{}.so) but --backend is {}",
            config.backend,
            config.backend,
            args.backend.display()
        );
    }
    let repository = std::fs::canonicalize(&args.repository)
        .unwrap_or_else(|_| args.repository.clone())
        .display()
        .to_string();
    let opts = Options {
        api_version: args.api_version,
        backend_cmdline: args.backend_config.clone(),
        log_verbose: args.log_verbose,
        log_to_stderr: args.log_to_stderr,
        print_stream: args.print_stream,
        require_statistics: args.require_statistics,
        repository,
        version: args.version,
        backend_dir,
        backend_name,
    };
    server::install(Ledger::new(config.clone(), args.run.requests.clone(), opts));
    guard::install_fault_handler();

    // The watchdog: if the whole run (including a hung entry point) overruns, report and exit.
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = finished.clone();
        let args = args.clone();
        let limit = args.timeout + Duration::from_secs(120);
        std::thread::Builder::new()
            .name("host-watchdog".into())
            .spawn(move || {
                let t0 = Instant::now();
                while t0.elapsed() < limit {
                    std::thread::sleep(Duration::from_millis(200));
                    if finished.load(Ordering::Acquire) {
                        return;
                    }
                }
                server::with(|l| {
                    let running = l
                        .entry
                        .map_or("no entry point is running".to_string(), |e| {
                            format!("{e} has not returned")
                        });
                    l.violation(
                        "hung",
                        format!("the run did not finish within {limit:?} ({running})"),
                    );
                });
                let o = Outcome {
                    timed_out: true,
                    ..Outcome::default()
                };
                let r = report(&o, &args);
                let _ = write_report(args.report.as_deref(), &r);
                eprintln!(
                    "unweight-triton-host: the run hung; report written, exiting with status 1"
                );
                // SAFETY: ends the process without running destructors or joining the
                // backend's (possibly deadlocked) threads.
                unsafe { libc::_exit(1) };
            })
            .context("spawning the watchdog")?;
    }

    let threads_before = threads();
    let mut o = Outcome::default();
    let t_load = Instant::now();
    let entries = load(&args.backend)?;
    let backend_h = handle(Kind::Backend, 0) as *mut TRITONBACKEND_Backend;
    let model_h = handle(Kind::Model, 0) as *mut TRITONBACKEND_Model;
    let inst_h = |i: usize| handle(Kind::Instance, i) as *mut TRITONBACKEND_ModelInstance;
    let n_inst = server::with(|l| l.instance_count());

    // --- load -----------------------------------------------------------------------------
    server::with(|l| l.set_life_backend(Life::Initializing));
    if let Some(f) = entries.initialize {
        // SAFETY: Triton's entry point called with the backend handle.
        o.backend_initialize_error =
            call_entry("TRITONBACKEND_Initialize", || unsafe { f(backend_h) });
    }
    if o.backend_initialize_error.is_none() {
        if let Some(f) = entries.attribute {
            server::with(|l| l.open_backend_attribute(true));
            let attr = handle(Kind::BackendAttribute, 0) as *mut TRITONBACKEND_BackendAttribute;
            // SAFETY: Triton's optional entry point with the backend and an attribute handle.
            o.backend_initialize_error =
                call_entry("TRITONBACKEND_GetBackendAttribute", || unsafe {
                    f(backend_h, attr)
                });
            server::with(|l| l.open_backend_attribute(false));
        }
    }
    let backend_ok = o.backend_initialize_error.is_none();
    server::with(|l| {
        l.set_life_backend(if backend_ok {
            Life::Ready
        } else {
            Life::Failed
        })
    });
    let mut model_ok = false;
    let mut created = 0usize;
    let mut all_instances_ok = false;
    if backend_ok {
        server::with(|l| l.set_life_model(Life::Initializing));
        if let Some(f) = entries.model_initialize {
            // SAFETY: Triton's entry point called with the model handle.
            o.model_initialize_error =
                call_entry("TRITONBACKEND_ModelInitialize", || unsafe { f(model_h) });
        }
        model_ok = o.model_initialize_error.is_none();
        server::with(|l| l.set_life_model(if model_ok { Life::Ready } else { Life::Failed }));
        if model_ok {
            all_instances_ok = true;
            for i in 0..n_inst {
                server::with(|l| l.set_life_instance(i, Life::Initializing));
                created = i + 1;
                let mut err = None;
                if let Some(f) = entries.instance_initialize {
                    // SAFETY: Triton's entry point called with an instance handle.
                    err = call_entry("TRITONBACKEND_ModelInstanceInitialize", || unsafe {
                        f(inst_h(i))
                    });
                }
                let ok = err.is_none();
                server::with(|l| {
                    l.set_life_instance(i, if ok { Life::Ready } else { Life::Failed })
                });
                if let Some(e) = err {
                    let name = server::with(|l| l.instance_name(i).to_string());
                    o.instance_initialize_errors.insert(name, e);
                    all_instances_ok = false;
                    break;
                }
            }
        }
    }
    o.load_ms = t_load.elapsed().as_secs_f64() * 1000.0;

    // --- serve ----------------------------------------------------------------------------
    let t_serve = Instant::now();
    let n = args.run.requests.len();
    if all_instances_ok {
        let unload_at = args.run.unload_after_responses;
        o.timed_out = serve(&args, &entries, &config, &encoded, n_inst, unload_at);
        if unload_at.is_some_and(|u| server::with(|l| l.total_responses) >= u) {
            o.unloaded_after_responses = unload_at;
        }
    }
    o.serve_ms = t_serve.elapsed().as_secs_f64() * 1000.0;

    // --- unload -----------------------------------------------------------------------------
    let t_unload = Instant::now();
    if backend_ok {
        if model_ok {
            for i in 0..created {
                server::with(|l| l.set_life_instance(i, Life::Finalizing));
                if let Some(f) = entries.instance_finalize {
                    // SAFETY: Triton's entry point called with an instance handle, once.
                    let e = call_entry("TRITONBACKEND_ModelInstanceFinalize", || unsafe {
                        f(inst_h(i))
                    });
                    if let Some(e) = e {
                        o.finalize_errors.push(
                            json!({"entry": "TRITONBACKEND_ModelInstanceFinalize", "error": e}),
                        );
                    }
                }
                server::with(|l| l.set_life_instance(i, Life::Finalized));
            }
        }
        server::with(|l| l.set_life_model(Life::Finalizing));
        if let Some(f) = entries.model_finalize {
            // SAFETY: Triton's entry point called with the model handle, once.
            if let Some(e) = call_entry("TRITONBACKEND_ModelFinalize", || unsafe { f(model_h) }) {
                o.finalize_errors
                    .push(json!({"entry": "TRITONBACKEND_ModelFinalize", "error": e}));
            }
        }
        server::with(|l| l.set_life_model(Life::Finalized));
    }
    server::with(|l| l.set_life_backend(Life::Finalizing));
    if let Some(f) = entries.finalize {
        // SAFETY: Triton's entry point called with the backend handle, once.
        if let Some(e) = call_entry("TRITONBACKEND_Finalize", || unsafe { f(backend_h) }) {
            o.finalize_errors
                .push(json!({"entry": "TRITONBACKEND_Finalize", "error": e}));
        }
    }
    server::with(|l| l.set_life_backend(Life::Finalized));
    o.unload_ms = t_unload.elapsed().as_secs_f64() * 1000.0;

    // Requests never delivered: the model is gone, Triton answers them.
    server::with(|l| {
        for r in 0..n {
            if *l.request_state(r) == crate::ledger::ReqState::NotSubmitted {
                let msg = format!(
                    "[request id: {}] Request for unknown model: '{}' is not ready",
                    l.request_spec(r).id,
                    config.name
                );
                l.host_answer(r, code::UNAVAILABLE, &msg);
            }
        }
        l.final_checks();
    });
    let after = threads();
    for (tid, name) in &after {
        if !threads_before.contains_key(tid) {
            o.lingering_threads.push(json!({"tid": tid, "name": name}));
        }
    }
    finished.store(true, Ordering::Release);
    let r = report(&o, &args);
    write_report(args.report.as_deref(), &r)?;
    let bad = r["violations"].as_array().is_some_and(|v| !v.is_empty());
    Ok((r, bad))
}

/// Submits requests as they become due and waits for their FINALs, the unload threshold or
/// the timeout (returns true on timeout).
fn serve(
    args: &RunArgs,
    entries: &Entries,
    config: &ModelConfig,
    encoded: &[Vec<EncodedInput>],
    n_inst: usize,
    unload_at: Option<u64>,
) -> bool {
    let t0 = Instant::now();
    let deadline = t0 + args.timeout;
    let reqs = &args.run.requests;
    // Not yet submitted, in `delay_ms` order.
    let mut waiting: Vec<usize> = (0..reqs.len()).collect();
    waiting.sort_by_key(|&r| reqs[r].delay_ms);
    let mut cancels: Vec<(Instant, usize)> = Vec::new();
    let mut rr = 0usize;
    let unload_due = |l: &Ledger| unload_at.is_some_and(|u| l.total_responses >= u);
    let index: std::collections::HashMap<&str, usize> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    // Whether request `r`'s `after` condition holds (parse_run checked that it names one).
    let gate_open = |l: &Ledger, r: usize| {
        reqs[r]
            .after
            .as_ref()
            .is_none_or(|a| l.response_count(index[a.id.as_str()]) >= a.responses)
    };
    loop {
        let now = Instant::now();
        cancels.retain(|&(at, r)| {
            if at <= now {
                server::with(|l| l.cancel(r));
                false
            } else {
                true
            }
        });
        if server::with(|l| unload_due(l)) {
            return false;
        }
        let elapsed = now - t0;
        let mut due = Vec::new();
        // Every request whose delay passed and whose `after` holds; one still waiting for its
        // `after` holds back nothing.
        let mut k = 0;
        while k < waiting.len()
            && Duration::from_millis(reqs[waiting[k]].delay_ms) <= elapsed
            && (args.max_requests_per_execute == 0 || due.len() < args.max_requests_per_execute)
        {
            let r = waiting[k];
            if !server::with(|l| gate_open(l, r)) {
                k += 1;
                continue;
            }
            if let Some(v) = reqs[r].log_verbose {
                server::with(|l| l.opts.log_verbose = v);
            }
            due.push(waiting.remove(k));
        }
        if !due.is_empty() {
            let mut batch = Vec::new();
            for r in due {
                let rejected = if reqs[r].skip_core_checks {
                    None
                } else {
                    spec::core_check(&reqs[r], &encoded[r], config)
                };
                match rejected {
                    Some((_, msg)) => server::with(|l| l.host_answer(r, code::INVALID_ARG, &msg)),
                    None => batch.push(r),
                }
            }
            if !batch.is_empty() {
                let inst = rr % n_inst;
                rr += 1;
                execute(entries, inst, &batch, encoded);
                let at = Instant::now();
                for &r in &batch {
                    if let Some(ms) = reqs[r].cancel_after_ms {
                        cancels.push((at + Duration::from_millis(ms), r));
                    }
                }
            }
            continue;
        }
        let all_in = waiting.is_empty();
        if all_in && server::with(|l| l.all_final()) {
            return false;
        }
        if now >= deadline {
            server::with(|l| {
                for r in l.unfinished() {
                    let id = l.request_spec(r).id.clone();
                    l.violation(
                        "timeout",
                        format!(
                            "request '{id}' has no FINAL response after {:?}",
                            args.timeout
                        ),
                    );
                }
            });
            return true;
        }
        let mut wake = deadline;
        // Requests whose delay passed wait for their `after`: the ledger wakes the loop.
        let (gated, later): (Vec<usize>, Vec<usize>) = waiting
            .iter()
            .partition(|&&r| Duration::from_millis(reqs[r].delay_ms) <= elapsed);
        if let Some(&r) = later.first() {
            wake = wake.min(t0 + Duration::from_millis(reqs[r].delay_ms));
        }
        if let Some(c) = cancels.iter().map(|c| c.0).min() {
            wake = wake.min(c);
        }
        let wait = wake.saturating_duration_since(Instant::now());
        server::wait_until(wait, |l| {
            unload_due(l) || (all_in && l.all_final()) || gated.iter().any(|&r| gate_open(l, r))
        });
    }
}

/// Submits `batch` to instance `inst` in one Execute call.
fn execute(entries: &Entries, inst: usize, batch: &[usize], encoded: &[Vec<EncodedInput>]) {
    const ENTRY: &str = "TRITONBACKEND_ModelInstanceExecute";
    let handles: Vec<usize> = server::with(|l| {
        let hs = batch
            .iter()
            .map(|&r| l.submit(r, encoded[r].clone(), inst))
            .collect();
        l.begin_execute(inst, batch);
        l.entry = Some(ENTRY);
        hs
    });
    let bytes: Vec<u8> = handles.iter().flat_map(|h| h.to_ne_bytes()).collect();
    let mut array = GuardBuf::from_bytes(&bytes, "the request array of an Execute call");
    let inst_h = handle(Kind::Instance, inst) as *mut TRITONBACKEND_ModelInstance;
    // SAFETY: Triton's entry point with a live instance, an array of `batch.len()` request
    // handles (8-byte aligned: GuardBuf aligns to 16) and its length; no host lock is held.
    let err = unsafe {
        (entries.execute)(
            inst_h,
            array.ptr().cast::<*mut TRITONBACKEND_Request>(),
            batch.len() as u32,
        )
    };
    array.retire(Region::ExecuteArray, "the request array of an Execute call");
    server::with(|l| {
        l.entry = None;
        l.end_execute(batch, err as usize);
    });
}
