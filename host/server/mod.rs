//! The server side of Triton's C API: every `TRITONBACKEND_*` / `TRITONSERVER_*` function a
//! backend can import, defined with the exact signatures bindgen generated from the real
//! headers (a unit test checks each against the declaration), exported from the executable
//! (`-rdynamic`, build.rs) so that `dlopen(RTLD_NOW | RTLD_LOCAL)` binds the backend's
//! undefined references to them, as it binds them to `tritonserver`'s.
//!
//! Each function is a thin shim: it decodes its C arguments, then calls the [`Ledger`] under
//! the one global mutex; the ledger checks the rules and records what happened. Every body
//! runs under `catch_unwind` (a host bug must not unwind into the backend): a panic is recorded
//! as a violation `host-panic` and the function returns an INTERNAL error.
//!
//! Pointer arguments: handles are opaque (see `host/ledger/mod.rs`); out-pointers and strings
//! come from the backend, whose obligations (the header's) make them valid: the host checks what
//! it can (non-null where required) and trusts the rest, as Triton does.

// Signatures are fixed by the headers; the safety contract of every function is the header's.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::json;

use crate::ledger::{code, handle, Fail, Kind, Ledger, R};
use crate::sys::*;

mod backend;
mod core;
mod metrics;
mod request;

static LEDGER: Mutex<Option<Ledger>> = Mutex::new(None);
static CHANGED: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, Option<Ledger>> {
    LEDGER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `l` the ledger every server function uses.
pub fn install(l: Ledger) {
    *lock() = Some(l);
}

/// Runs `f` on the ledger (host side).
pub fn with<T>(f: impl FnOnce(&mut Ledger) -> T) -> T {
    let mut g = lock();
    let l = g.as_mut().expect("server::install first");
    let v = f(l);
    if std::mem::take(&mut l.changed) {
        CHANGED.notify_all();
    }
    v
}

/// Waits until `done` holds or `timeout` passes; returns whether it holds.
pub fn wait_until(timeout: Duration, mut done: impl FnMut(&Ledger) -> bool) -> bool {
    let g = lock();
    let (g, _) = CHANGED
        .wait_timeout_while(g, timeout, |l| {
            !done(l.as_ref().expect("server::install first"))
        })
        .unwrap_or_else(|e| e.into_inner());
    done(g.as_ref().expect("server::install first"))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Runs `body` on the ledger under `catch_unwind`; a panic is a `host-panic` violation and
/// `on_panic` makes the return value.
fn guarded<T>(
    func: &'static str,
    body: impl FnOnce(&mut Ledger) -> T,
    on_panic: impl FnOnce(&mut Ledger) -> T,
) -> T {
    match catch_unwind(AssertUnwindSafe(|| with(body))) {
        Ok(v) => v,
        Err(p) => {
            let msg = panic_text(p.as_ref());
            with(|l| {
                l.violation("host-panic", format!("{func}: {msg}"));
                on_panic(l)
            })
        }
    }
}

/// The shape of most functions: `Ok` → null, `Err` → a new error the backend owns.
fn api(func: &'static str, body: impl FnOnce(&mut Ledger) -> R<()>) -> *mut TRITONSERVER_Error {
    guarded(
        func,
        |l| match body(l) {
            Ok(()) => ptr::null_mut(),
            Err(f) => l.fail_to_error(func, f) as *mut TRITONSERVER_Error,
        },
        |l| {
            l.fail_to_error(
                func,
                Fail {
                    code: code::INTERNAL,
                    msg: format!("test host panicked in {func}"),
                },
            ) as *mut TRITONSERVER_Error
        },
    )
}

/// Writes `v` through the caller's out-pointer; null is a violation.
fn put<T>(l: &mut Ledger, func: &str, p: *mut T, v: T) -> R<()> {
    if p.is_null() {
        l.violation(
            "null-argument",
            format!("{func} called with a null out-pointer"),
        );
        return Err(Fail {
            code: code::INVALID_ARG,
            msg: format!("{func}: null out-pointer"),
        });
    }
    // SAFETY: non-null; the header makes it a valid, writable T (the caller's out-parameter).
    unsafe { p.write(v) };
    Ok(())
}

/// Writes `v` if the caller passed a pointer (optional outputs).
fn put_opt<T>(p: *mut T, v: T) {
    if !p.is_null() {
        // SAFETY: as in `put`.
        unsafe { p.write(v) };
    }
}

/// A string argument; null is a violation.
fn string(l: &mut Ledger, func: &str, p: *const c_char, what: &str) -> R<String> {
    if p.is_null() {
        l.violation("null-argument", format!("{func} called with a null {what}"));
        return Err(Fail {
            code: code::INVALID_ARG,
            msg: format!("{func}: null {what}"),
        });
    }
    // SAFETY: a NUL-terminated string (header contract).
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn h<T>(p: *mut T) -> usize {
    p as usize
}

#[cfg(test)]
mod tests {
    use super::backend::*;
    use super::core::*;
    use super::metrics::*;
    use super::request::*;

    /// Every function defined here has exactly the signature bindgen generated from the
    /// headers: assigning ours to a pointer of the declaration's type fails to compile
    /// otherwise.
    #[test]
    fn signatures_match_the_headers() {
        macro_rules! same {
            ($($name:ident($($a:tt)*);)*) => {$(
                #[allow(unused_assignments)]
                {
                    let mut f = crate::sys::$name as unsafe extern "C" fn($($a)*) -> _;
                    f = $name;
                    let _ = f;
                }
            )*};
        }
        same! {
            TRITONSERVER_ApiVersion(_, _);
            TRITONSERVER_DataTypeString(_);
            TRITONSERVER_StringToDataType(_);
            TRITONSERVER_DataTypeByteSize(_);
            TRITONSERVER_MemoryTypeString(_);
            TRITONSERVER_ParameterTypeString(_);
            TRITONSERVER_InstanceGroupKindString(_);
            TRITONSERVER_LogIsEnabled(_);
            TRITONSERVER_LogMessage(_, _, _, _);
            TRITONSERVER_ErrorNew(_, _);
            TRITONSERVER_ErrorDelete(_);
            TRITONSERVER_ErrorCode(_);
            TRITONSERVER_ErrorCodeString(_);
            TRITONSERVER_ErrorMessage(_);
            TRITONSERVER_MessageNewFromSerializedJson(_, _, _);
            TRITONSERVER_MessageDelete(_);
            TRITONSERVER_MessageSerializeToJson(_, _, _);
            TRITONSERVER_BufferAttributesNew(_);
            TRITONSERVER_BufferAttributesDelete(_);
            TRITONSERVER_BufferAttributesSetMemoryTypeId(_, _);
            TRITONSERVER_BufferAttributesSetMemoryType(_, _);
            TRITONSERVER_BufferAttributesSetCudaIpcHandle(_, _);
            TRITONSERVER_BufferAttributesSetByteSize(_, _);
            TRITONSERVER_BufferAttributesMemoryTypeId(_, _);
            TRITONSERVER_BufferAttributesMemoryType(_, _);
            TRITONSERVER_BufferAttributesCudaIpcHandle(_, _);
            TRITONSERVER_BufferAttributesByteSize(_, _);
            TRITONBACKEND_ApiVersion(_, _);
            TRITONBACKEND_BackendName(_, _);
            TRITONBACKEND_BackendConfig(_, _);
            TRITONBACKEND_BackendExecutionPolicy(_, _);
            TRITONBACKEND_BackendSetExecutionPolicy(_, _);
            TRITONBACKEND_BackendArtifacts(_, _, _);
            TRITONBACKEND_BackendMemoryManager(_, _);
            TRITONBACKEND_BackendState(_, _);
            TRITONBACKEND_BackendSetState(_, _);
            TRITONBACKEND_BackendAttributeAddPreferredInstanceGroup(_, _, _, _, _);
            TRITONBACKEND_BackendAttributeSetParallelModelInstanceLoading(_, _);
            TRITONBACKEND_MemoryManagerAllocate(_, _, _, _, _);
            TRITONBACKEND_MemoryManagerFree(_, _, _, _);
            TRITONBACKEND_ModelName(_, _);
            TRITONBACKEND_ModelVersion(_, _);
            TRITONBACKEND_ModelRepository(_, _, _);
            TRITONBACKEND_ModelConfig(_, _, _);
            TRITONBACKEND_ModelAutoCompleteConfig(_, _);
            TRITONBACKEND_ModelSetConfig(_, _, _);
            TRITONBACKEND_ModelServer(_, _);
            TRITONBACKEND_ModelBackend(_, _);
            TRITONBACKEND_ModelState(_, _);
            TRITONBACKEND_ModelSetState(_, _);
            TRITONBACKEND_ModelReportMemoryUsage(_, _, _);
            TRITONBACKEND_ModelInstanceName(_, _);
            TRITONBACKEND_ModelInstanceKind(_, _);
            TRITONBACKEND_ModelInstanceDeviceId(_, _);
            TRITONBACKEND_ModelInstanceHostPolicy(_, _);
            TRITONBACKEND_ModelInstanceIsPassive(_, _);
            TRITONBACKEND_ModelInstanceProfileCount(_, _);
            TRITONBACKEND_ModelInstanceProfileName(_, _, _);
            TRITONBACKEND_ModelInstanceSecondaryDeviceCount(_, _);
            TRITONBACKEND_ModelInstanceSecondaryDeviceProperties(_, _, _, _);
            TRITONBACKEND_ModelInstanceModel(_, _);
            TRITONBACKEND_ModelInstanceState(_, _);
            TRITONBACKEND_ModelInstanceSetState(_, _);
            TRITONBACKEND_ModelInstanceReportMemoryUsage(_, _, _);
            TRITONBACKEND_ModelInstanceReportStatistics(_, _, _, _, _, _, _);
            TRITONBACKEND_ModelInstanceReportBatchStatistics(_, _, _, _, _, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsNew(_);
            TRITONBACKEND_ModelInstanceResponseStatisticsDelete(_);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetModelInstance(_, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseFactory(_, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseStart(_, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetComputeOutputStart(_, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseEnd(_, _);
            TRITONBACKEND_ModelInstanceResponseStatisticsSetError(_, _);
            TRITONBACKEND_ModelInstanceReportResponseStatistics(_);
            TRITONBACKEND_RequestId(_, _);
            TRITONBACKEND_RequestIsCancelled(_, _);
            TRITONBACKEND_ResponseFactoryIsCancelled(_, _);
            TRITONBACKEND_RequestCorrelationId(_, _);
            TRITONBACKEND_InferenceRequestTimeoutMicroseconds(_, _);
            TRITONBACKEND_RequestCorrelationIdString(_, _);
            TRITONBACKEND_RequestFlags(_, _);
            TRITONBACKEND_RequestParameterCount(_, _);
            TRITONBACKEND_RequestParameter(_, _, _, _, _);
            TRITONBACKEND_RequestInputCount(_, _);
            TRITONBACKEND_RequestInputName(_, _, _);
            TRITONBACKEND_RequestInput(_, _, _);
            TRITONBACKEND_RequestInputByIndex(_, _, _);
            TRITONBACKEND_RequestOutputCount(_, _);
            TRITONBACKEND_RequestOutputName(_, _, _);
            TRITONBACKEND_RequestOutputBufferProperties(_, _, _, _, _);
            TRITONBACKEND_RequestRelease(_, _);
            TRITONBACKEND_RequestTrace(_, _);
            TRITONBACKEND_InputProperties(_, _, _, _, _, _, _);
            TRITONBACKEND_InputPropertiesForHostPolicy(_, _, _, _, _, _, _, _);
            TRITONBACKEND_InputBuffer(_, _, _, _, _, _);
            TRITONBACKEND_InputBufferForHostPolicy(_, _, _, _, _, _, _);
            TRITONBACKEND_InputBufferAttributes(_, _, _, _);
            TRITONBACKEND_OutputBuffer(_, _, _, _, _);
            TRITONBACKEND_OutputBufferAttributes(_, _);
            TRITONBACKEND_StateNew(_, _, _, _, _, _);
            TRITONBACKEND_StateUpdate(_);
            TRITONBACKEND_StateBuffer(_, _, _, _, _);
            TRITONBACKEND_StateBufferAttributes(_, _);
            TRITONBACKEND_ResponseFactoryNew(_, _);
            TRITONBACKEND_ResponseFactoryDelete(_);
            TRITONBACKEND_ResponseFactorySendFlags(_, _);
            TRITONBACKEND_ResponseNew(_, _);
            TRITONBACKEND_ResponseNewFromFactory(_, _);
            TRITONBACKEND_ResponseDelete(_);
            TRITONBACKEND_ResponseSetStringParameter(_, _, _);
            TRITONBACKEND_ResponseSetIntParameter(_, _, _);
            TRITONBACKEND_ResponseSetBoolParameter(_, _, _);
            TRITONBACKEND_ResponseSetDoubleParameter(_, _, _);
            TRITONBACKEND_ResponseOutput(_, _, _, _, _, _);
            TRITONBACKEND_ResponseSend(_, _, _);
            TRITONBACKEND_InferenceResponseOutputByName(_, _, _, _, _);
            TRITONBACKEND_InferenceResponseOutput(_, _, _, _, _, _);
            TRITONSERVER_ParameterNew(_, _, _);
            TRITONSERVER_ParameterBytesNew(_, _, _);
            TRITONSERVER_ParameterDelete(_);
            TRITONSERVER_MetricFamilyNew(_, _, _, _);
            TRITONSERVER_MetricFamilyDelete(_);
            TRITONSERVER_GetMetricFamilyKind(_, _);
            TRITONSERVER_MetricArgsNew(_);
            TRITONSERVER_MetricArgsSetHistogram(_, _, _);
            TRITONSERVER_MetricArgsDelete(_);
            TRITONSERVER_MetricNew(_, _, _, _);
            TRITONSERVER_MetricNewWithArgs(_, _, _, _, _);
            TRITONSERVER_MetricDelete(_);
            TRITONSERVER_MetricValue(_, _);
            TRITONSERVER_MetricIncrement(_, _);
            TRITONSERVER_MetricSet(_, _);
            TRITONSERVER_MetricObserve(_, _);
            TRITONSERVER_GetMetricKind(_, _);
        }
    }
}
