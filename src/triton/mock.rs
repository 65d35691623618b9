//! Unit-test stand-ins for the server functions the entry points call, linked into the library's
//! test binary only (the shared object leaves them undefined). They follow the headers'
//! ownership rules and count what is outstanding, so tests can check that every error and
//! message the backend receives is deleted. One test at a time: [`lock`] serializes them.
//!
//! This is not the issue's test host (a separate program that loads the `.so` as Triton does);
//! it exercises the entry points in-process.

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr;
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
    });
    guard
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
pub unsafe extern "C" fn TRITONSERVER_LogIsEnabled(_level: sys::TRITONSERVER_LogLevel) -> bool {
    true
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_LogMessage(
    _level: sys::TRITONSERVER_LogLevel,
    _filename: *const c_char,
    _line: i32,
    _msg: *const c_char,
) -> *mut sys::TRITONSERVER_Error {
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

/// Request and response functions: the in-process tests never reach them (requests are the
/// test host's job, tests/triton_host.rs), but the test binary must link.
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
    TRITONBACKEND_ModelInstanceReportBatchStatistics(a: *mut sys::TRITONBACKEND_ModelInstance, b: u64, c: u64, d: u64, e: u64, f: u64);
    TRITONBACKEND_ModelInstanceReportStatistics(a: *mut sys::TRITONBACKEND_ModelInstance, b: *mut sys::TRITONBACKEND_Request, c: bool, d: u64, e: u64, f: u64, g: u64);
    TRITONBACKEND_OutputBuffer(a: *mut sys::TRITONBACKEND_Output, b: *mut *mut c_void, c: u64, d: *mut sys::TRITONSERVER_MemoryType, e: *mut i64);
    TRITONBACKEND_RequestId(a: *mut sys::TRITONBACKEND_Request, b: *mut *const c_char);
    TRITONBACKEND_RequestInputByIndex(a: *mut sys::TRITONBACKEND_Request, b: u32, c: *mut *mut sys::TRITONBACKEND_Input);
    TRITONBACKEND_RequestInputCount(a: *mut sys::TRITONBACKEND_Request, b: *mut u32);
    TRITONBACKEND_RequestOutputCount(a: *mut sys::TRITONBACKEND_Request, b: *mut u32);
    TRITONBACKEND_RequestOutputName(a: *mut sys::TRITONBACKEND_Request, b: u32, c: *mut *const c_char);
    TRITONBACKEND_RequestRelease(a: *mut sys::TRITONBACKEND_Request, b: u32);
    TRITONBACKEND_ResponseDelete(a: *mut sys::TRITONBACKEND_Response);
    TRITONBACKEND_ResponseFactoryDelete(a: *mut sys::TRITONBACKEND_ResponseFactory);
    TRITONBACKEND_ResponseFactoryIsCancelled(a: *mut sys::TRITONBACKEND_ResponseFactory, b: *mut bool);
    TRITONBACKEND_ResponseFactoryNew(a: *mut *mut sys::TRITONBACKEND_ResponseFactory, b: *mut sys::TRITONBACKEND_Request);
    TRITONBACKEND_ResponseFactorySendFlags(a: *mut sys::TRITONBACKEND_ResponseFactory, b: u32);
    TRITONBACKEND_ResponseNewFromFactory(a: *mut *mut sys::TRITONBACKEND_Response, b: *mut sys::TRITONBACKEND_ResponseFactory);
    TRITONBACKEND_ResponseOutput(a: *mut sys::TRITONBACKEND_Response, b: *mut *mut sys::TRITONBACKEND_Output, c: *const c_char, d: sys::TRITONSERVER_DataType, e: *const i64, f: u32);
    TRITONBACKEND_ResponseSend(a: *mut sys::TRITONBACKEND_Response, b: u32, c: *mut sys::TRITONSERVER_Error);
}
