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
