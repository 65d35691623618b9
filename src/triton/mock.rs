//! Unit-test stand-ins for the server functions the entry points call, linked into the library's
//! test binary only (the shared object leaves them undefined). They follow the headers'
//! ownership rules and count what is outstanding, so tests can check that every error and
//! message the backend receives is deleted. One test at a time: [`lock`] serializes them.
//!
//! This is not the issue's test host (a separate program that loads the `.so` as Triton does);
//! it exercises the entry points and the engine thread in-process. Requests made with
//! [`new_request`] record what the backend did with them (responses, the statistics' success
//! flag, the order of FINAL, statistics, release and factory delete); reading inputs is left to
//! the host.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::sys;

/// What the mock server answers and what it has seen.
pub(super) struct Host {
    pub api: (u32, u32),
    pub config_json: String,
    pub repository: CString,
    pub model_name: CString,
    pub version: u64,
    pub instance_name: CString,
    pub kind: sys::TRITONSERVER_InstanceGroupKind,
    pub device_id: i32,
    /// `TRITONBACKEND_ModelName` fails with this code when set.
    pub fail_model_name: Option<sys::TRITONSERVER_Error_Code>,
    pub model_state: usize,
    pub instance_state: usize,
    pub backend_state: usize,
    pub backend_config_json: String,
    /// Errors created and not yet deleted.
    pub live_errors: i64,
    /// Messages handed out and not yet deleted.
    pub live_messages: i64,
    /// Requests made by [`new_request`], by handle − 1.
    pub requests: Vec<MockRequest>,
}

/// What a mock request went through, for tests of the engine thread.
#[derive(Debug, Default)]
pub(super) struct MockRequest {
    pub id: CString,
    /// `ResponseFactoryIsCancelled` answers this.
    pub cancelled: bool,
    /// Responses sent, in order (a `ResponseFactorySendFlags` FINAL is one without outputs).
    pub responses: Vec<MockSent>,
    /// The `success` flag of `ModelInstanceReportStatistics`.
    pub statistics: Option<bool>,
    /// `FINAL`, `statistics`, `release` and `factory-delete`, in the order they happened.
    pub order: Vec<&'static str>,
}

impl MockRequest {
    /// Whether the request ended (its factory was deleted, the last step of its end).
    pub fn ended(&self) -> bool {
        self.order.contains(&"factory-delete")
    }
}

/// One response a mock request got.
#[derive(Debug)]
pub(super) struct MockSent {
    pub is_final: bool,
    /// Code and message of the error it carried.
    pub error: Option<(u32, String)>,
    /// Output names, in order.
    pub outputs: Vec<String>,
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);
static TEST: Mutex<()> = Mutex::new(());

/// Serializes tests that use the mock and resets it.
pub(super) fn lock() -> MutexGuard<'static, ()> {
    let guard = TEST.lock().unwrap_or_else(|e| e.into_inner());
    *host_lock() = Some(Host {
        api: (1, 19),
        config_json: r#"{"name": "m", "model_transaction_policy": {"decoupled": true}}"#.into(),
        repository: CString::new("/models/m").unwrap(),
        model_name: CString::new("m").unwrap(),
        version: 1,
        instance_name: CString::new("m_0").unwrap(),
        kind: sys::TRITONSERVER_INSTANCEGROUPKIND_GPU,
        device_id: 0,
        fail_model_name: None,
        model_state: 0,
        instance_state: 0,
        backend_state: 0,
        backend_config_json: r#"{"cmdline": {}}"#.into(),
        live_errors: 0,
        live_messages: 0,
        requests: Vec::new(),
    });
    LOGGED.lock().unwrap_or_else(|e| e.into_inner()).clear();
    VERBOSE_OFF.store(false, Ordering::Relaxed);
    guard
}

/// A new request with id `id`, as Triton would pass it to Execute.
pub(super) fn new_request(id: &str) -> *mut sys::TRITONBACKEND_Request {
    with(|h| {
        h.requests.push(MockRequest {
            id: CString::new(id).unwrap(),
            ..MockRequest::default()
        });
        h.requests.len() as *mut sys::TRITONBACKEND_Request
    })
}

/// Runs `f` on the request behind handle `h` (a request or its factory: the mock gives both
/// the same value).
pub(super) fn on_request<R, T>(h: *mut T, f: impl FnOnce(&mut MockRequest) -> R) -> R {
    with(|host| f(&mut host.requests[h as usize - 1]))
}

/// `TRITONSERVER_LogIsEnabled(VERBOSE)` answers false while this is set (a run-time log-level
/// change, as `/v2/logging` makes); the other levels are always on.
static VERBOSE_OFF: AtomicBool = AtomicBool::new(false);

/// Messages `TRITONSERVER_LogMessage` received since the last [`lock`].
static LOGGED: Mutex<Vec<(sys::TRITONSERVER_LogLevel, String)>> = Mutex::new(Vec::new());

/// Switches Triton's VERBOSE level on or off.
pub(super) fn set_verbose(on: bool) {
    VERBOSE_OFF.store(!on, Ordering::Relaxed);
}

/// The messages logged so far.
pub(super) fn logged() -> Vec<(sys::TRITONSERVER_LogLevel, String)> {
    LOGGED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn host_lock() -> MutexGuard<'static, Option<Host>> {
    HOST.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the mock's state.
pub(super) fn with<R>(f: impl FnOnce(&mut Host) -> R) -> R {
    f(host_lock().as_mut().expect("mock::lock() first"))
}

struct MockError {
    code: sys::TRITONSERVER_Error_Code,
    msg: CString,
}

struct MockMessage {
    json: Vec<u8>,
}

/// Reads an error the backend returned (code, message) and deletes it, as Triton does.
pub(super) fn take_error(err: *mut sys::TRITONSERVER_Error) -> Option<(u32, String)> {
    if err.is_null() {
        return None;
    }
    // SAFETY: the mock's TRITONSERVER_ErrorNew made it from a Box<MockError>.
    let e = unsafe { Box::from_raw(err.cast::<MockError>()) };
    with(|h| h.live_errors -= 1);
    Some((e.code, e.msg.to_string_lossy().into_owned()))
}

fn new_error(code: sys::TRITONSERVER_Error_Code, msg: &str) -> *mut sys::TRITONSERVER_Error {
    with(|h| h.live_errors += 1);
    Box::into_raw(Box::new(MockError {
        code,
        msg: CString::new(msg).unwrap(),
    }))
    .cast()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorNew(
    code: sys::TRITONSERVER_Error_Code,
    msg: *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: the caller passes a valid C string (header contract).
    let msg = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    new_error(code, &msg)
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorDelete(error: *mut sys::TRITONSERVER_Error) {
    take_error(error);
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorCode(
    error: *mut sys::TRITONSERVER_Error,
) -> sys::TRITONSERVER_Error_Code {
    // SAFETY: a live MockError (header contract).
    unsafe { (*error.cast::<MockError>()).code }
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorMessage(
    error: *mut sys::TRITONSERVER_Error,
) -> *const c_char {
    // SAFETY: a live MockError; the string lives as long as the error.
    unsafe { (*error.cast::<MockError>()).msg.as_ptr() }
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MessageSerializeToJson(
    message: *mut sys::TRITONSERVER_Message,
    base: *mut *const c_char,
    byte_size: *mut usize,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: a live MockMessage and valid out-pointers (header contract).
    unsafe {
        let m = &*message.cast::<MockMessage>();
        *base = m.json.as_ptr().cast();
        *byte_size = m.json.len();
    }
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MessageDelete(
    message: *mut sys::TRITONSERVER_Message,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: made by the mock's ModelConfig from a Box<MockMessage>.
    drop(unsafe { Box::from_raw(message.cast::<MockMessage>()) });
    with(|h| h.live_messages -= 1);
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_LogIsEnabled(level: sys::TRITONSERVER_LogLevel) -> bool {
    level != sys::TRITONSERVER_LOG_VERBOSE || !VERBOSE_OFF.load(Ordering::Relaxed)
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_LogMessage(
    level: sys::TRITONSERVER_LogLevel,
    _filename: *const c_char,
    _line: i32,
    msg: *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: a valid C string (header contract).
    let msg = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    LOGGED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((level, msg));
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ApiVersion(
    major: *mut u32,
    minor: *mut u32,
) -> *mut sys::TRITONSERVER_Error {
    let (a, b) = with(|h| h.api);
    // SAFETY: valid out-pointers (header contract).
    unsafe {
        *major = a;
        *minor = b;
    }
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelName(
    _model: *mut sys::TRITONBACKEND_Model,
    name: *mut *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    if let Some(code) = with(|h| h.fail_model_name) {
        return new_error(code, "no such model");
    }
    // SAFETY: valid out-pointer; the string lives in the static host until the next lock().
    unsafe { *name = with(|h| h.model_name.as_ptr()) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelVersion(
    _model: *mut sys::TRITONBACKEND_Model,
    version: *mut u64,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *version = with(|h| h.version) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelRepository(
    _model: *mut sys::TRITONBACKEND_Model,
    artifact_type: *mut sys::TRITONBACKEND_ArtifactType,
    location: *mut *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointers; the string lives in the static host.
    unsafe {
        *artifact_type = sys::TRITONBACKEND_ARTIFACT_FILESYSTEM;
        *location = with(|h| h.repository.as_ptr());
    }
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelConfig(
    _model: *mut sys::TRITONBACKEND_Model,
    config_version: u32,
    model_config: *mut *mut sys::TRITONSERVER_Message,
) -> *mut sys::TRITONSERVER_Error {
    if config_version != 1 {
        return new_error(sys::TRITONSERVER_ERROR_UNSUPPORTED, "config version");
    }
    let json = with(|h| {
        h.live_messages += 1;
        h.config_json.clone().into_bytes()
    });
    // SAFETY: valid out-pointer; the caller owns the message (MessageDelete).
    unsafe { *model_config = Box::into_raw(Box::new(MockMessage { json })).cast() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelSetState(
    _model: *mut sys::TRITONBACKEND_Model,
    state: *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    with(|h| h.model_state = state as usize);
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelState(
    _model: *mut sys::TRITONBACKEND_Model,
    state: *mut *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *state = with(|h| h.model_state) as *mut c_void };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceName(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    name: *mut *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer; the string lives in the static host.
    unsafe { *name = with(|h| h.instance_name.as_ptr()) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceKind(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    kind: *mut sys::TRITONSERVER_InstanceGroupKind,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *kind = with(|h| h.kind) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceDeviceId(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    device_id: *mut i32,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *device_id = with(|h| h.device_id) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceModel(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    model: *mut *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer; any non-null handle will do for the mock.
    unsafe { *model = ptr::NonNull::dangling().as_ptr() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceSetState(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    state: *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    with(|h| h.instance_state = state as usize);
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceState(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    state: *mut *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *state = with(|h| h.instance_state) as *mut c_void };
    ptr::null_mut()
}

/// The backend configuration message: Triton-owned, never deleted by the backend, so it is one
/// leaked static message here.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendConfig(
    _backend: *mut sys::TRITONBACKEND_Backend,
    backend_config: *mut *mut sys::TRITONSERVER_Message,
) -> *mut sys::TRITONSERVER_Error {
    let json = with(|h| h.backend_config_json.clone().into_bytes());
    // SAFETY: valid out-pointer; the message is Triton's (never freed here, as in Triton).
    unsafe { *backend_config = Box::into_raw(Box::new(MockMessage { json })).cast() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendSetState(
    _backend: *mut sys::TRITONBACKEND_Backend,
    state: *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    with(|h| h.backend_state = state as usize);
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendState(
    _backend: *mut sys::TRITONBACKEND_Backend,
    state: *mut *mut c_void,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *state = with(|h| h.backend_state) as *mut c_void };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelBackend(
    _model: *mut sys::TRITONBACKEND_Model,
    backend: *mut *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer; the mock's backend handle is never dereferenced.
    unsafe { *backend = ptr::NonNull::dangling().as_ptr() };
    ptr::null_mut()
}

/// Reading inputs: the in-process tests never reach them (requests' inputs are the test host's
/// job, tests/triton_host.rs), but the test binary must link.
macro_rules! not_in_mock {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> *mut sys::TRITONSERVER_Error {
            $(let _ = $arg;)*
            new_error(
                sys::TRITONSERVER_ERROR_UNSUPPORTED,
                concat!(stringify!($name), " is not provided by the unit-test mock"),
            )
        }
    )*};
}

not_in_mock! {
    TRITONBACKEND_InputBuffer(a: *mut sys::TRITONBACKEND_Input, b: u32, c: *mut *const c_void, d: *mut u64, e: *mut sys::TRITONSERVER_MemoryType, f: *mut i64);
    TRITONBACKEND_InputProperties(a: *mut sys::TRITONBACKEND_Input, b: *mut *const c_char, c: *mut sys::TRITONSERVER_DataType, d: *mut *const i64, e: *mut u32, f: *mut u64, g: *mut u32);
    TRITONBACKEND_RequestInputByIndex(a: *mut sys::TRITONBACKEND_Request, b: u32, c: *mut *mut sys::TRITONBACKEND_Input);
    TRITONBACKEND_RequestInputCount(a: *mut sys::TRITONBACKEND_Request, b: *mut u32);
    TRITONBACKEND_RequestOutputCount(a: *mut sys::TRITONBACKEND_Request, b: *mut u32);
    TRITONBACKEND_RequestOutputName(a: *mut sys::TRITONBACKEND_Request, b: u32, c: *mut *const c_char);
}

// Custom metrics: the mock has none (a server without metrics support), so a model serves
// without them; the genuine core and the test host check them (tests/triton_core.rs).
not_in_mock! {
    TRITONSERVER_MetricFamilyNew(a: *mut *mut sys::TRITONSERVER_MetricFamily, b: sys::TRITONSERVER_MetricKind, c: *const c_char, d: *const c_char);
    TRITONSERVER_MetricFamilyDelete(a: *mut sys::TRITONSERVER_MetricFamily);
    TRITONSERVER_MetricNew(a: *mut *mut sys::TRITONSERVER_Metric, b: *mut sys::TRITONSERVER_MetricFamily, c: *mut *const sys::TRITONSERVER_Parameter, d: u64);
    TRITONSERVER_MetricDelete(a: *mut sys::TRITONSERVER_Metric);
    TRITONSERVER_MetricIncrement(a: *mut sys::TRITONSERVER_Metric, b: f64);
    TRITONSERVER_MetricSet(a: *mut sys::TRITONSERVER_Metric, b: f64);
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterNew(
    _name: *const c_char,
    _type: sys::TRITONSERVER_ParameterType,
    _value: *const c_void,
) -> *mut sys::TRITONSERVER_Parameter {
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterDelete(_p: *mut sys::TRITONSERVER_Parameter) {}

// ----- requests, responses, statistics (for the engine thread's tests) -------------------

/// A response being built: its outputs, each boxed so the pointer handed out stays put.
struct MockResponse {
    request: usize,
    // The boxes keep each output at one address while the vector grows: the backend holds
    // pointers to them.
    #[allow(clippy::vec_box)]
    outputs: Vec<Box<MockOutput>>,
}

struct MockOutput {
    name: String,
    data: Vec<u8>,
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestId(
    request: *mut sys::TRITONBACKEND_Request,
    id: *mut *const c_char,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer; the string lives in the static host until the next lock().
    unsafe { *id = on_request(request, |r| r.id.as_ptr()) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryNew(
    factory: *mut *mut sys::TRITONBACKEND_ResponseFactory,
    request: *mut sys::TRITONBACKEND_Request,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer; the factory handle is the request's.
    unsafe { *factory = request.cast() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryIsCancelled(
    factory: *mut sys::TRITONBACKEND_ResponseFactory,
    cancelled: *mut bool,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: valid out-pointer.
    unsafe { *cancelled = on_request(factory, |r| r.cancelled) };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryDelete(
    factory: *mut sys::TRITONBACKEND_ResponseFactory,
) -> *mut sys::TRITONSERVER_Error {
    on_request(factory, |r| r.order.push("factory-delete"));
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactorySendFlags(
    factory: *mut sys::TRITONBACKEND_ResponseFactory,
    flags: u32,
) -> *mut sys::TRITONSERVER_Error {
    let is_final = flags & sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL != 0;
    on_request(factory, |r| {
        r.responses.push(MockSent {
            is_final,
            error: None,
            outputs: Vec::new(),
        });
        if is_final {
            r.order.push("FINAL");
        }
    });
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseNewFromFactory(
    response: *mut *mut sys::TRITONBACKEND_Response,
    factory: *mut sys::TRITONBACKEND_ResponseFactory,
) -> *mut sys::TRITONSERVER_Error {
    let r = Box::new(MockResponse {
        request: factory as usize,
        outputs: Vec::new(),
    });
    // SAFETY: valid out-pointer; sent or deleted exactly once by the backend.
    unsafe { *response = Box::into_raw(r).cast() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseOutput(
    response: *mut sys::TRITONBACKEND_Response,
    output: *mut *mut sys::TRITONBACKEND_Output,
    name: *const c_char,
    _datatype: sys::TRITONSERVER_DataType,
    _shape: *const i64,
    _dims_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: a live MockResponse and a valid C string (header contract).
    let (r, name) = unsafe {
        (
            &mut *response.cast::<MockResponse>(),
            CStr::from_ptr(name).to_string_lossy().into_owned(),
        )
    };
    r.outputs.push(Box::new(MockOutput {
        name,
        data: Vec::new(),
    }));
    let o: *mut MockOutput = &mut **r.outputs.last_mut().expect("pushed");
    // SAFETY: valid out-pointer; the output lives as long as its response.
    unsafe { *output = o.cast() };
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_OutputBuffer(
    output: *mut sys::TRITONBACKEND_Output,
    buffer: *mut *mut c_void,
    byte_size: u64,
    memory_type: *mut sys::TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: a live MockOutput and valid out-pointers (header contract).
    unsafe {
        let o = &mut *output.cast::<MockOutput>();
        o.data = vec![0; byte_size as usize];
        *buffer = o.data.as_mut_ptr().cast();
        *memory_type = sys::TRITONSERVER_MEMORY_CPU;
        *memory_type_id = 0;
    }
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseDelete(
    response: *mut sys::TRITONBACKEND_Response,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: made by ResponseNewFromFactory, deleted once.
    drop(unsafe { Box::from_raw(response.cast::<MockResponse>()) });
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSend(
    response: *mut sys::TRITONBACKEND_Response,
    flags: u32,
    error: *mut sys::TRITONSERVER_Error,
) -> *mut sys::TRITONSERVER_Error {
    // SAFETY: made by ResponseNewFromFactory; sending hands it over, once.
    let resp = unsafe { Box::from_raw(response.cast::<MockResponse>()) };
    let error = (!error.is_null()).then(|| {
        // SAFETY: a live error the caller keeps (and deletes); only read here.
        let e = unsafe { &*error.cast::<MockError>() };
        (e.code, e.msg.to_string_lossy().into_owned())
    });
    let is_final = flags & sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL != 0;
    on_request(resp.request as *mut u8, |r| {
        r.responses.push(MockSent {
            is_final,
            error,
            outputs: resp.outputs.iter().map(|o| o.name.clone()).collect(),
        });
        if is_final {
            r.order.push("FINAL");
        }
    });
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportStatistics(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    request: *mut sys::TRITONBACKEND_Request,
    success: bool,
    _exec_start_ns: u64,
    _compute_start_ns: u64,
    _compute_end_ns: u64,
    _exec_end_ns: u64,
) -> *mut sys::TRITONSERVER_Error {
    on_request(request, |r| {
        r.statistics = Some(success);
        r.order.push("statistics");
    });
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportBatchStatistics(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    _batch_size: u64,
    _exec_start_ns: u64,
    _compute_start_ns: u64,
    _compute_end_ns: u64,
    _exec_end_ns: u64,
) -> *mut sys::TRITONSERVER_Error {
    ptr::null_mut()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestRelease(
    request: *mut sys::TRITONBACKEND_Request,
    _release_flags: u32,
) -> *mut sys::TRITONSERVER_Error {
    on_request(request, |r| r.order.push("release"));
    ptr::null_mut()
}
