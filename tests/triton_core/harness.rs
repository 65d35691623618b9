//! The genuine Triton core in-process, for the integration tests (tests/triton_core*.rs).
//!
//! The core library (`libtritonserver.so`) is found at `$TRITON_CORE_DIR` (the directory holding
//! it, or its `lib/`), else `/opt/tritonserver/lib` (Triton's container), else
//! `../shared/triton-core/lib` next to the repository. It is `dlopen`ed at run time with the
//! scope the test asks for, and the few server functions the tests call are looked up with
//! `dlsym` (hand-written signatures below, from tritonserver.h; types and constants come from the
//! bindgen output build.rs made from the same headers). When no core is found every test prints
//! a loud `skipped: no Triton core` and returns, unless `UNWEIGHT_REQUIRE_TRITON_CORE=1` (set by
//! `make test`), which makes that a failure.
//!
//! One [`Server`] at a time per process (a lock): Triton's metrics registry and backend manager
//! are process-wide. Each server gets a temporary model repository of the compressed test model
//! and a backend directory holding `unweight/libtriton_unweight.so` (a link to cargo's build).

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unused_imports,
    clippy::all
)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/triton_sys.rs"));
}
use sys::*;

type Err = *mut TRITONSERVER_Error;

macro_rules! api {
    ($($name:ident : fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The server functions the tests call, looked up in the loaded core.
        #[allow(non_snake_case)]
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }
        impl Api {
            fn load(lib: *mut c_void) -> Api {
                Api {
                    $($name: {
                        let n = CString::new(stringify!($name)).unwrap();
                        // SAFETY: a handle from a successful dlopen and a valid name.
                        let p = unsafe { libc::dlsym(lib, n.as_ptr()) };
                        assert!(!p.is_null(), "the core does not export {}", stringify!($name));
                        // SAFETY: the signature is the header's (tritonserver.h).
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p) }
                    },)*
                }
            }
        }
    };
}

api! {
    TRITONSERVER_ErrorCode: fn(Err) -> u32;
    TRITONSERVER_ErrorMessage: fn(Err) -> *const c_char;
    TRITONSERVER_ErrorDelete: fn(Err);
    TRITONSERVER_ServerOptionsNew: fn(*mut *mut TRITONSERVER_ServerOptions) -> Err;
    TRITONSERVER_ServerOptionsDelete: fn(*mut TRITONSERVER_ServerOptions) -> Err;
    TRITONSERVER_ServerOptionsSetModelRepositoryPath: fn(*mut TRITONSERVER_ServerOptions, *const c_char) -> Err;
    TRITONSERVER_ServerOptionsSetBackendDirectory: fn(*mut TRITONSERVER_ServerOptions, *const c_char) -> Err;
    TRITONSERVER_ServerOptionsSetModelControlMode: fn(*mut TRITONSERVER_ServerOptions, u32) -> Err;
    TRITONSERVER_ServerOptionsSetLogInfo: fn(*mut TRITONSERVER_ServerOptions, bool) -> Err;
    TRITONSERVER_ServerOptionsSetLogWarn: fn(*mut TRITONSERVER_ServerOptions, bool) -> Err;
    TRITONSERVER_ServerOptionsSetCpuMetrics: fn(*mut TRITONSERVER_ServerOptions, bool) -> Err;
    TRITONSERVER_ServerOptionsSetExitTimeout: fn(*mut TRITONSERVER_ServerOptions, u32) -> Err;
    TRITONSERVER_ServerNew: fn(*mut *mut TRITONSERVER_Server, *mut TRITONSERVER_ServerOptions) -> Err;
    TRITONSERVER_ServerDelete: fn(*mut TRITONSERVER_Server) -> Err;
    TRITONSERVER_ServerLoadModel: fn(*mut TRITONSERVER_Server, *const c_char) -> Err;
    TRITONSERVER_ServerUnloadModel: fn(*mut TRITONSERVER_Server, *const c_char) -> Err;
    TRITONSERVER_ServerModelIsReady: fn(*mut TRITONSERVER_Server, *const c_char, i64, *mut bool) -> Err;
    TRITONSERVER_ServerModelIndex: fn(*mut TRITONSERVER_Server, u32, *mut *mut TRITONSERVER_Message) -> Err;
    TRITONSERVER_MessageSerializeToJson: fn(*mut TRITONSERVER_Message, *mut *const c_char, *mut usize) -> Err;
    TRITONSERVER_MessageDelete: fn(*mut TRITONSERVER_Message) -> Err;
    TRITONSERVER_ServerMetrics: fn(*mut TRITONSERVER_Server, *mut *mut TRITONSERVER_Metrics) -> Err;
    TRITONSERVER_MetricsFormatted: fn(*mut TRITONSERVER_Metrics, u32, *mut *const c_char, *mut usize) -> Err;
    TRITONSERVER_MetricsDelete: fn(*mut TRITONSERVER_Metrics) -> Err;
    TRITONSERVER_ResponseAllocatorNew: fn(*mut *mut TRITONSERVER_ResponseAllocator, TRITONSERVER_ResponseAllocatorAllocFn_t, TRITONSERVER_ResponseAllocatorReleaseFn_t, TRITONSERVER_ResponseAllocatorStartFn_t) -> Err;
    TRITONSERVER_ResponseAllocatorDelete: fn(*mut TRITONSERVER_ResponseAllocator) -> Err;
    TRITONSERVER_InferenceRequestNew: fn(*mut *mut TRITONSERVER_InferenceRequest, *mut TRITONSERVER_Server, *const c_char, i64) -> Err;
    TRITONSERVER_InferenceRequestDelete: fn(*mut TRITONSERVER_InferenceRequest) -> Err;
    TRITONSERVER_InferenceRequestSetId: fn(*mut TRITONSERVER_InferenceRequest, *const c_char) -> Err;
    TRITONSERVER_InferenceRequestAddInput: fn(*mut TRITONSERVER_InferenceRequest, *const c_char, u32, *const i64, u64) -> Err;
    TRITONSERVER_InferenceRequestAppendInputData: fn(*mut TRITONSERVER_InferenceRequest, *const c_char, *const c_void, usize, u32, i64) -> Err;
    TRITONSERVER_InferenceRequestSetReleaseCallback: fn(*mut TRITONSERVER_InferenceRequest, TRITONSERVER_InferenceRequestReleaseFn_t, *mut c_void) -> Err;
    TRITONSERVER_InferenceRequestSetResponseCallback: fn(*mut TRITONSERVER_InferenceRequest, *mut TRITONSERVER_ResponseAllocator, *mut c_void, TRITONSERVER_InferenceResponseCompleteFn_t, *mut c_void) -> Err;
    TRITONSERVER_InferenceRequestCancel: fn(*mut TRITONSERVER_InferenceRequest) -> Err;
    TRITONSERVER_ServerInferAsync: fn(*mut TRITONSERVER_Server, *mut TRITONSERVER_InferenceRequest, *mut TRITONSERVER_InferenceTrace) -> Err;
    TRITONSERVER_InferenceResponseError: fn(*mut TRITONSERVER_InferenceResponse) -> Err;
    TRITONSERVER_InferenceResponseOutputCount: fn(*mut TRITONSERVER_InferenceResponse, *mut u32) -> Err;
    TRITONSERVER_InferenceResponseOutput: fn(*mut TRITONSERVER_InferenceResponse, u32, *mut *const c_char, *mut u32, *mut *const i64, *mut u64, *mut *const c_void, *mut usize, *mut u32, *mut i64, *mut *mut c_void) -> Err;
    TRITONSERVER_InferenceResponseDelete: fn(*mut TRITONSERVER_InferenceResponse) -> Err;
}

/// A server error: its code name and message.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreError {
    pub code: u32,
    pub message: String,
}

impl CoreError {
    pub fn code_name(&self) -> &'static str {
        match self.code {
            TRITONSERVER_ERROR_INTERNAL => "INTERNAL",
            TRITONSERVER_ERROR_NOT_FOUND => "NOT_FOUND",
            TRITONSERVER_ERROR_INVALID_ARG => "INVALID_ARG",
            TRITONSERVER_ERROR_UNAVAILABLE => "UNAVAILABLE",
            TRITONSERVER_ERROR_UNSUPPORTED => "UNSUPPORTED",
            TRITONSERVER_ERROR_ALREADY_EXISTS => "ALREADY_EXISTS",
            TRITONSERVER_ERROR_CANCELLED => "CANCELLED",
            _ => "UNKNOWN",
        }
    }
}

/// Takes ownership of `e` (deletes it); `Ok` for null.
fn check(api: &Api, e: Err) -> Result<(), CoreError> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a live error from the core; deleted once, after reading.
    let out = unsafe {
        CoreError {
            code: (api.TRITONSERVER_ErrorCode)(e),
            message: CStr::from_ptr((api.TRITONSERVER_ErrorMessage)(e))
                .to_string_lossy()
                .into_owned(),
        }
    };
    // SAFETY: as above.
    unsafe { (api.TRITONSERVER_ErrorDelete)(e) };
    Err(out)
}

fn ok(api: &Api, e: Err, what: &str) {
    if let Err(e) = check(api, e) {
        panic!("{what}: {} {}", e.code_name(), e.message);
    }
}

// ----- finding and loading the core ---------------------------------------------------------

/// Where the core library is, in the documented order.
pub fn core_library() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("TRITON_CORE_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        dirs.push(d.join("lib"));
        dirs.push(d);
    }
    dirs.push(PathBuf::from("/opt/tritonserver/lib"));
    dirs.push(root.join("../shared/triton-core/lib"));
    dirs.into_iter()
        .map(|d| d.join("libtritonserver.so"))
        .find(|p| p.is_file())
}

/// How the core is loaded into this process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scope {
    /// `RTLD_GLOBAL`: as the `tritonserver` executable has it (linked at start-up).
    Global,
    /// `RTLD_LOCAL`: as Python's in-process `tritonserver` module has it.
    Local,
}

static LOADED: OnceLock<Option<(Scope, Api)>> = OnceLock::new();

/// Loads the core once per process with `scope`; `None` (after a loud skip line) when there is
/// none and it is not required.
pub fn core(scope: Scope) -> Option<&'static Api> {
    let loaded = LOADED.get_or_init(|| {
        let Some(lib) = core_library() else {
            if std::env::var_os("UNWEIGHT_REQUIRE_TRITON_CORE").is_some_and(|v| v == "1") {
                panic!(
                    "the genuine Triton core is required (UNWEIGHT_REQUIRE_TRITON_CORE=1) but \
                     libtritonserver.so is in none of $TRITON_CORE_DIR, /opt/tritonserver/lib, \
                     ../shared/triton-core/lib"
                );
            }
            return None;
        };
        let c = CString::new(lib.to_str().unwrap()).unwrap();
        let flags = libc::RTLD_NOW
            | match scope {
                Scope::Global => libc::RTLD_GLOBAL,
                Scope::Local => libc::RTLD_LOCAL,
            };
        // SAFETY: a valid path; the core's constructors run now.
        let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
        if h.is_null() {
            // SAFETY: this thread's message about the failed dlopen.
            let msg = unsafe { CStr::from_ptr(libc::dlerror()) }.to_string_lossy();
            panic!(
                "dlopen({}) failed: {msg} (its README lists the Debian packages it needs; \
                 scripts/setup installs them)",
                lib.display()
            );
        }
        Some((scope, Api::load(h)))
    });
    match loaded {
        None => {
            println!(
                "\n*** skipped: no Triton core (set TRITON_CORE_DIR, or see \
                 ../shared/triton-core) ***\n"
            );
            None
        }
        Some((s, api)) => {
            assert_eq!(*s, scope, "one scope per test process");
            Some(api)
        }
    }
}

// ----- output buffers: counted so that a leak shows ------------------------------------------

static BUFFERS_LIVE: AtomicI64 = AtomicI64::new(0);

/// Output buffers the core allocated through our allocator and has not released yet.
pub fn live_buffers() -> i64 {
    BUFFERS_LIVE.load(Ordering::SeqCst)
}

unsafe extern "C" fn alloc_fn(
    _allocator: *mut TRITONSERVER_ResponseAllocator,
    _name: *const c_char,
    byte_size: usize,
    _memory_type: TRITONSERVER_MemoryType,
    _memory_type_id: i64,
    _userp: *mut c_void,
    buffer: *mut *mut c_void,
    buffer_userp: *mut *mut c_void,
    actual_memory_type: *mut TRITONSERVER_MemoryType,
    actual_memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    // SAFETY: out-pointers from the core; malloc of at least one byte.
    unsafe {
        *buffer = libc::malloc(byte_size.max(1));
        *buffer_userp = std::ptr::null_mut();
        *actual_memory_type = TRITONSERVER_MEMORY_CPU;
        *actual_memory_type_id = 0;
    }
    BUFFERS_LIVE.fetch_add(1, Ordering::SeqCst);
    std::ptr::null_mut()
}

unsafe extern "C" fn release_fn(
    _allocator: *mut TRITONSERVER_ResponseAllocator,
    buffer: *mut c_void,
    _buffer_userp: *mut c_void,
    _byte_size: usize,
    _memory_type: TRITONSERVER_MemoryType,
    _memory_type_id: i64,
) -> *mut TRITONSERVER_Error {
    // SAFETY: a buffer alloc_fn malloc'ed, released once by the core.
    unsafe { libc::free(buffer) };
    BUFFERS_LIVE.fetch_sub(1, Ordering::SeqCst);
    std::ptr::null_mut()
}

// ----- requests -------------------------------------------------------------------------------

/// One input tensor: name, shape (batch dimension included) and data.
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub datatype: u32,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

impl Input {
    /// A `[1, 1]` BYTES tensor holding `s`.
    pub fn text(name: &str, s: &str) -> Input {
        Input::texts(name, &[s])
    }
    /// A `[1, n]` BYTES tensor.
    pub fn texts(name: &str, items: &[&str]) -> Input {
        let mut bytes = Vec::new();
        for s in items {
            bytes.extend_from_slice(&(s.len() as u32).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        Input {
            name: name.into(),
            datatype: TRITONSERVER_TYPE_BYTES,
            shape: vec![1, items.len() as i64],
            bytes,
        }
    }
    pub fn i32(name: &str, v: i32) -> Input {
        Input::raw(name, TRITONSERVER_TYPE_INT32, v.to_le_bytes().to_vec())
    }
    pub fn u64(name: &str, v: u64) -> Input {
        Input::raw(name, TRITONSERVER_TYPE_UINT64, v.to_le_bytes().to_vec())
    }
    pub fn f32(name: &str, v: f32) -> Input {
        Input::raw(name, TRITONSERVER_TYPE_FP32, v.to_le_bytes().to_vec())
    }
    pub fn bool(name: &str, v: bool) -> Input {
        Input::raw(name, TRITONSERVER_TYPE_BOOL, vec![v as u8])
    }
    /// A `[1, 1]` tensor of one element.
    pub fn raw(name: &str, datatype: u32, bytes: Vec<u8>) -> Input {
        Input {
            name: name.into(),
            datatype,
            shape: vec![1, 1],
            bytes,
        }
    }
}

/// One output tensor of a response, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    Strings(Vec<String>),
    I32(Vec<i32>),
    Other(u32),
}

/// One response.
#[derive(Clone, Debug)]
pub struct Response {
    pub error: Option<CoreError>,
    pub outputs: HashMap<String, (Vec<i64>, Tensor)>,
    pub is_final: bool,
    /// When the callback got it.
    pub at: Instant,
}

impl Response {
    pub fn text(&self) -> String {
        match self.outputs.get("text_output") {
            Some((_, Tensor::Strings(s))) => s.concat(),
            o => panic!("text_output: {o:?}"),
        }
    }
    pub fn ids(&self) -> Vec<i32> {
        match self.outputs.get("output_ids") {
            Some((_, Tensor::I32(v))) => v.clone(),
            o => panic!("output_ids: {o:?}"),
        }
    }
    pub fn finish_reason(&self) -> String {
        match self.outputs.get("finish_reason") {
            Some((_, Tensor::Strings(s))) if s.len() == 1 => s[0].clone(),
            o => panic!("finish_reason: {o:?}"),
        }
    }
}

/// What happened to one request, filled by the core's callbacks.
#[derive(Debug, Default)]
pub struct Outcome {
    pub responses: Vec<Response>,
    /// Callbacks with the FINAL flag (exactly one is the rule).
    pub finals: u32,
    /// Release callbacks (exactly one is the rule).
    pub releases: u32,
}

impl Outcome {
    /// Every response's error, if any.
    pub fn errors(&self) -> Vec<&CoreError> {
        self.responses
            .iter()
            .filter_map(|r| r.error.as_ref())
            .collect()
    }
    /// The text of all responses, in order.
    pub fn text(&self) -> String {
        self.responses
            .iter()
            .filter(|r| r.error.is_none() && r.outputs.contains_key("text_output"))
            .map(Response::text)
            .collect()
    }
    pub fn ids(&self) -> Vec<i32> {
        self.responses
            .iter()
            .filter(|r| r.error.is_none() && r.outputs.contains_key("output_ids"))
            .flat_map(Response::ids)
            .collect()
    }
    /// The finish reason of the last response that carries one.
    pub fn finish_reason(&self) -> Option<String> {
        self.responses
            .iter()
            .rev()
            .find(|r| r.outputs.contains_key("finish_reason"))
            .map(Response::finish_reason)
    }
}

struct Shared {
    api: &'static Api,
    state: Mutex<Outcome>,
    cv: Condvar,
    // The input data must stay valid until the request is released: the reference the callbacks
    // hold (reclaimed only after the release) keeps it, even when a test fails midway.
    _inputs: Vec<Input>,
    _names: Vec<CString>,
}

/// A request in flight. Dropping it waits for its release and deletes it.
pub struct InFlight {
    api: &'static Api,
    req: *mut TRITONSERVER_InferenceRequest,
    shared: Arc<Shared>,
}

// SAFETY: the request handle is used from one thread at a time (cancel, then delete after the
// release); the core's callbacks only touch `shared`.
unsafe impl Send for InFlight {}

unsafe extern "C" fn on_response(
    resp: *mut TRITONSERVER_InferenceResponse,
    flags: u32,
    userp: *mut c_void,
) {
    // SAFETY: userp is the Arc<Shared> pointer the request holds (alive until the release, which
    // comes after the last response).
    let shared = unsafe { &*(userp as *const Shared) };
    let api = shared.api;
    let mut r = Response {
        error: None,
        outputs: HashMap::new(),
        is_final: flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL != 0,
        at: Instant::now(),
    };
    let has_response = !resp.is_null();
    if has_response {
        // SAFETY: a live response the core hands over; deleted below.
        r.error = check(api, unsafe {
            (api.TRITONSERVER_InferenceResponseError)(resp)
        })
        .err();
        let mut n = 0u32;
        // SAFETY: as above.
        ok(
            api,
            unsafe { (api.TRITONSERVER_InferenceResponseOutputCount)(resp, &mut n) },
            "OutputCount",
        );
        for i in 0..n {
            let (mut name, mut dt, mut shape, mut dims, mut base, mut size) = (
                std::ptr::null(),
                0u32,
                std::ptr::null(),
                0u64,
                std::ptr::null(),
                0usize,
            );
            let (mut mt, mut mid, mut up) = (0u32, 0i64, std::ptr::null_mut());
            // SAFETY: out-pointers to locals; the output stays valid until the response is deleted.
            ok(
                api,
                unsafe {
                    (api.TRITONSERVER_InferenceResponseOutput)(
                        resp, i, &mut name, &mut dt, &mut shape, &mut dims, &mut base, &mut size,
                        &mut mt, &mut mid, &mut up,
                    )
                },
                "Output",
            );
            // SAFETY: the core's name string and shape array, valid here.
            let name = unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: as above.
            let shape = unsafe { std::slice::from_raw_parts(shape, dims as usize) }.to_vec();
            let data: &[u8] = if size == 0 {
                &[]
            } else {
                // SAFETY: a CPU buffer of `size` bytes from our allocator.
                unsafe { std::slice::from_raw_parts(base as *const u8, size) }
            };
            let t = match dt {
                TRITONSERVER_TYPE_BYTES => {
                    let mut v = Vec::new();
                    let mut p = 0;
                    while p + 4 <= data.len() {
                        let l = u32::from_le_bytes(data[p..p + 4].try_into().unwrap()) as usize;
                        v.push(String::from_utf8_lossy(&data[p + 4..p + 4 + l]).into_owned());
                        p += 4 + l;
                    }
                    Tensor::Strings(v)
                }
                TRITONSERVER_TYPE_INT32 => Tensor::I32(
                    data.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => Tensor::Other(other),
            };
            r.outputs.insert(name, (shape, t));
        }
        // SAFETY: the response is ours to delete, once.
        ok(
            api,
            unsafe { (api.TRITONSERVER_InferenceResponseDelete)(resp) },
            "ResponseDelete",
        );
    }
    let mut st = shared.state.lock().unwrap();
    if r.is_final {
        st.finals += 1;
    }
    if has_response {
        st.responses.push(r);
    }
    shared.cv.notify_all();
}

unsafe extern "C" fn on_release(
    _req: *mut TRITONSERVER_InferenceRequest,
    flags: u32,
    userp: *mut c_void,
) {
    // SAFETY: as in on_response.
    let shared = unsafe { &*(userp as *const Shared) };
    if flags & TRITONSERVER_REQUEST_RELEASE_ALL != 0 {
        shared.state.lock().unwrap().releases += 1;
        shared.cv.notify_all();
    }
}

impl InFlight {
    /// Waits (up to `timeout`) until `pred` holds for the outcome so far.
    pub fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&Outcome) -> bool,
    ) -> MutexGuard<'_, Outcome> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        while !pred(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?}; so far: {:?}",
                *st
            );
            st = self.shared.cv.wait_timeout(st, left).unwrap().0;
        }
        st
    }

    /// Asks the core to cancel the request.
    pub fn cancel(&self) {
        // SAFETY: the request is alive (deleted only in finish).
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_InferenceRequestCancel)(self.req) },
            "Cancel",
        );
    }

    /// Waits for the FINAL and the release, deletes the request, returns what happened.
    pub fn finish(self) -> Outcome {
        self.finish_within(Duration::from_secs(300))
    }

    pub fn finish_within(self, timeout: Duration) -> Outcome {
        drop(self.wait_until(timeout, |o| o.finals >= 1 && o.releases >= 1));
        // A late duplicate FINAL or release would show in the counters.
        std::thread::sleep(Duration::from_millis(20));
        let InFlight { api, req, shared } = self;
        let out = std::mem::take(&mut *shared.state.lock().unwrap());
        // SAFETY: released back to us; deleted once.
        ok(
            api,
            unsafe { (api.TRITONSERVER_InferenceRequestDelete)(req) },
            "RequestDelete",
        );
        // The reference the callbacks used (Arc::into_raw in `submit`): no callback follows the
        // release, so reclaim it.
        // SAFETY: that pointer came from Arc::into_raw of this Arc.
        unsafe { drop(Arc::from_raw(Arc::as_ptr(&shared))) };
        out
    }
}

// ----- the server ---------------------------------------------------------------------------

static ONE_SERVER: Mutex<()> = Mutex::new(());

/// A model for the repository: its name and config.pbtxt text (the `name:` line is rewritten).
pub struct ModelSpec {
    pub name: String,
    pub config: String,
}

/// A running in-process server with its repository.
pub struct Server {
    pub api: &'static Api,
    ptr: *mut TRITONSERVER_Server,
    alloc: *mut TRITONSERVER_ResponseAllocator,
    pub repo: tempfile::TempDir,
    _backends: tempfile::TempDir,
    _one: MutexGuard<'static, ()>,
}

// SAFETY: the core's server API is thread-safe.
unsafe impl Sync for Server {}
// SAFETY: as above.
unsafe impl Send for Server {}

impl Server {
    /// Starts a server (explicit model control) over a repository of `models`, each linked to
    /// the files in `weights`, and loads them.
    pub fn start(api: &'static Api, models: &[ModelSpec], weights: &Path) -> Server {
        let one = ONE_SERVER.lock().unwrap_or_else(|p| p.into_inner());
        let weights = &weights
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
        let repo = tempfile::tempdir().unwrap();
        for m in models {
            let dir = repo.path().join(&m.name);
            std::fs::create_dir_all(dir.join("1")).unwrap();
            let config: String = m
                .config
                .lines()
                .map(|l| {
                    if l.starts_with("name:") {
                        format!("name: \"{}\"", m.name)
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(dir.join("config.pbtxt"), config).unwrap();
            for e in std::fs::read_dir(weights).unwrap() {
                let e = e.unwrap();
                std::os::unix::fs::symlink(e.path(), dir.join("1").join(e.file_name())).unwrap();
            }
        }
        let backends = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(backends.path().join("unweight")).unwrap();
        std::os::unix::fs::symlink(
            crate::backend_so::shared_object(),
            backends.path().join("unweight/libtriton_unweight.so"),
        )
        .unwrap();

        let c = |p: &Path| CString::new(p.to_str().unwrap()).unwrap();
        let mut opts = std::ptr::null_mut();
        // SAFETY: the calls follow the core's README; every string outlives its call.
        unsafe {
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsNew)(&mut opts),
                "OptionsNew",
            );
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetModelRepositoryPath)(
                    opts,
                    c(repo.path()).as_ptr(),
                ),
                "repo",
            );
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetBackendDirectory)(
                    opts,
                    c(backends.path()).as_ptr(),
                ),
                "backends",
            );
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetModelControlMode)(
                    opts,
                    TRITONSERVER_MODEL_CONTROL_EXPLICIT,
                ),
                "control",
            );
            // INFO goes to stdout; the test output stays readable without it.
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetLogInfo)(opts, false),
                "log",
            );
            // No CPU-metrics poller: it delays process exit by up to a second.
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetCpuMetrics)(opts, false),
                "cpu metrics",
            );
            ok(
                api,
                (api.TRITONSERVER_ServerOptionsSetExitTimeout)(opts, 60),
                "exit timeout",
            );
        }
        let mut server = std::ptr::null_mut();
        // SAFETY: as above.
        let e = unsafe { (api.TRITONSERVER_ServerNew)(&mut server, opts) };
        // SAFETY: as above.
        ok(
            api,
            unsafe { (api.TRITONSERVER_ServerOptionsDelete)(opts) },
            "OptionsDelete",
        );
        ok(api, e, "ServerNew");
        let mut alloc = std::ptr::null_mut();
        // SAFETY: as above.
        ok(
            api,
            unsafe {
                (api.TRITONSERVER_ResponseAllocatorNew)(
                    &mut alloc,
                    Some(alloc_fn),
                    Some(release_fn),
                    None,
                )
            },
            "AllocatorNew",
        );
        let s = Server {
            api,
            ptr: server,
            alloc,
            repo,
            _backends: backends,
            _one: one,
        };
        for m in models {
            s.load(&m.name)
                .unwrap_or_else(|e| panic!("loading {}: {} {}", m.name, e.code_name(), e.message));
        }
        s
    }

    pub fn load(&self, model: &str) -> Result<(), CoreError> {
        let n = CString::new(model).unwrap();
        // SAFETY: a live server and a valid name.
        check(self.api, unsafe {
            (self.api.TRITONSERVER_ServerLoadModel)(self.ptr, n.as_ptr())
        })?;
        let mut ready = false;
        // SAFETY: as above.
        check(self.api, unsafe {
            (self.api.TRITONSERVER_ServerModelIsReady)(self.ptr, n.as_ptr(), -1, &mut ready)
        })?;
        assert!(ready, "{model} loaded but not ready");
        Ok(())
    }

    /// Starts unloading (does not wait).
    pub fn unload(&self, model: &str) {
        let n = CString::new(model).unwrap();
        // SAFETY: a live server and a valid name.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_ServerUnloadModel)(self.ptr, n.as_ptr()) },
            "Unload",
        );
    }

    /// The repository index: model name → state (READY, UNLOADING, UNAVAILABLE, ...).
    pub fn model_states(&self) -> HashMap<String, String> {
        let mut msg = std::ptr::null_mut();
        // SAFETY: a live server; the message is deleted below.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_ServerModelIndex)(self.ptr, 0, &mut msg) },
            "ModelIndex",
        );
        let (mut base, mut size) = (std::ptr::null(), 0usize);
        // SAFETY: as above; the JSON is copied before the delete.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_MessageSerializeToJson)(msg, &mut base, &mut size) },
            "json",
        );
        // SAFETY: as above.
        let text = unsafe { std::slice::from_raw_parts(base as *const u8, size) }.to_vec();
        // SAFETY: as above.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_MessageDelete)(msg) },
            "MessageDelete",
        );
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Polls until `model` is in `state` (up to `timeout`).
    pub fn wait_for_state(&self, model: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.model_states();
            if s.get(model).map(String::as_str) == Some(state) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{model} never reached {state}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's Prometheus text.
    pub fn metrics(&self) -> String {
        let mut m = std::ptr::null_mut();
        // SAFETY: a live server; the text is copied before the delete.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_ServerMetrics)(self.ptr, &mut m) },
            "Metrics",
        );
        let (mut base, mut size) = (std::ptr::null(), 0usize);
        // SAFETY: as above.
        ok(
            self.api,
            unsafe {
                (self.api.TRITONSERVER_MetricsFormatted)(
                    m,
                    TRITONSERVER_METRIC_PROMETHEUS,
                    &mut base,
                    &mut size,
                )
            },
            "MetricsFormatted",
        );
        // SAFETY: as above.
        let text =
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(base as *const u8, size) })
                .into_owned();
        // SAFETY: as above.
        ok(
            self.api,
            unsafe { (self.api.TRITONSERVER_MetricsDelete)(m) },
            "MetricsDelete",
        );
        text
    }

    /// Builds and submits a request. `Err` when the core refuses it before anything runs
    /// (`TRITONSERVER_ServerInferAsync` itself fails; the request is deleted here).
    pub fn submit(&self, model: &str, id: &str, inputs: Vec<Input>) -> Result<InFlight, CoreError> {
        let api = self.api;
        let mut req = std::ptr::null_mut();
        let n = CString::new(model).unwrap();
        // SAFETY: a live server and a valid name.
        check(api, unsafe {
            (api.TRITONSERVER_InferenceRequestNew)(&mut req, self.ptr, n.as_ptr(), -1)
        })?;
        let idc = CString::new(id).unwrap();
        // SAFETY: a live request.
        ok(
            api,
            unsafe { (api.TRITONSERVER_InferenceRequestSetId)(req, idc.as_ptr()) },
            "SetId",
        );
        let mut names = Vec::new();
        for i in &inputs {
            let name = CString::new(i.name.as_str()).unwrap();
            // SAFETY: a live request; the shape and data outlive the request (kept in InFlight).
            let r = unsafe {
                check(
                    api,
                    (api.TRITONSERVER_InferenceRequestAddInput)(
                        req,
                        name.as_ptr(),
                        i.datatype,
                        i.shape.as_ptr(),
                        i.shape.len() as u64,
                    ),
                )
                .and_then(|_| {
                    check(
                        api,
                        (api.TRITONSERVER_InferenceRequestAppendInputData)(
                            req,
                            name.as_ptr(),
                            i.bytes.as_ptr() as *const c_void,
                            i.bytes.len(),
                            TRITONSERVER_MEMORY_CPU,
                            0,
                        ),
                    )
                })
            };
            if let Err(e) = r {
                // SAFETY: never submitted: ours to delete.
                ok(
                    api,
                    unsafe { (api.TRITONSERVER_InferenceRequestDelete)(req) },
                    "RequestDelete",
                );
                return Err(e);
            }
            names.push(name);
        }
        let shared = Arc::new(Shared {
            api,
            state: Mutex::new(Outcome::default()),
            cv: Condvar::new(),
            _inputs: inputs,
            _names: names,
        });
        let userp = Arc::into_raw(shared.clone()) as *mut c_void;
        // SAFETY: a live request; userp stays valid until reclaimed after the release.
        unsafe {
            ok(
                api,
                (api.TRITONSERVER_InferenceRequestSetReleaseCallback)(req, Some(on_release), userp),
                "SetRelease",
            );
            ok(
                api,
                (api.TRITONSERVER_InferenceRequestSetResponseCallback)(
                    req,
                    self.alloc,
                    std::ptr::null_mut(),
                    Some(on_response),
                    userp,
                ),
                "SetResponse",
            );
        }
        // SAFETY: as above.
        if let Err(e) = check(api, unsafe {
            (api.TRITONSERVER_ServerInferAsync)(self.ptr, req, std::ptr::null_mut())
        }) {
            // No callback follows a refused request; it is still ours.
            // SAFETY: as above; the reference given to userp is reclaimed.
            unsafe {
                ok(
                    api,
                    (api.TRITONSERVER_InferenceRequestDelete)(req),
                    "RequestDelete",
                );
                drop(Arc::from_raw(userp as *const Shared));
            }
            return Err(e);
        }
        Ok(InFlight { api, req, shared })
    }

    /// Submits and waits for the whole outcome.
    pub fn infer(&self, model: &str, id: &str, inputs: Vec<Input>) -> Result<Outcome, CoreError> {
        Ok(self.submit(model, id, inputs)?.finish())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: every request was deleted by its InFlight; the server and allocator are ours.
        unsafe {
            let e = (self.api.TRITONSERVER_ServerDelete)(self.ptr);
            let e2 = (self.api.TRITONSERVER_ResponseAllocatorDelete)(self.alloc);
            if !std::thread::panicking() {
                ok(self.api, e, "ServerDelete");
                ok(self.api, e2, "AllocatorDelete");
            }
        }
    }
}

// ----- the model ----------------------------------------------------------------------------

/// The committed config.pbtxt with every instance group on the CPU (the core is CPU-only).
pub fn cpu_config() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("model_repository/unweight_llama/config.pbtxt");
    let text = std::fs::read_to_string(&p).unwrap();
    text.lines()
        .map(|l| {
            if l.starts_with("instance_group") {
                "instance_group [ { count: 1 kind: KIND_CPU } ]".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
