//! The `TRITONBACKEND_*` entry points Triton looks up with `dlsym`, and nothing else.
//!
//! Each one is a few lines: [`guard`] runs the body under `catch_unwind` (a panic must not
//! unwind into C++) and turns an error or a panic into a `TRITONSERVER_Error*` through the one
//! mapping in [`super::error`]; null means success. Triton owns the errors these functions
//! return.
//!
//! `TRITONBACKEND_ModelInstanceExecute` only checks requests and hands them to the instance's
//! engine thread (`worker`); it returns an error only before it has taken any request over.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use super::backend_config::BackendSettings;
use super::error::{check, panic_message, to_server_error, TritonError};
use super::request::{now_ns, Pending};
use super::state::{into_raw, take_box, InstanceState, ModelState};
use super::worker::Job;
use super::{log, sys, threads};

/// Runs `body`, catching panics; `Ok` → null, otherwise a new Triton error.
fn guard(
    entry: &'static str,
    body: impl FnOnce() -> Result<(), TritonError>,
) -> *mut sys::TRITONSERVER_Error {
    let result = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        Err(TritonError::Panic {
            entry,
            message: panic_message(payload.as_ref()),
        })
    });
    match result {
        Ok(()) => ptr::null_mut(),
        Err(err) => to_server_error(&err),
    }
}

/// Whether a server reporting TRITONBACKEND API `major.minor` can load this backend (built
/// against the headers' version, 1.19).
pub(super) fn api_compatible(major: u32, minor: u32) -> bool {
    major == sys::TRITONBACKEND_API_VERSION_MAJOR && minor >= sys::TRITONBACKEND_API_VERSION_MINOR
}

/// Checks the server's backend API version, installs the log bridge and reads the backend
/// configuration (`--backend-config=unweight,k=v`) into the backend state.
///
/// # Safety
/// Called from Triton with a live backend handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_Initialize(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_Initialize", || {
        let (mut major, mut minor) = (0u32, 0u32);
        // SAFETY: valid out-pointers; callable at any time.
        unsafe {
            check(
                "TRITONBACKEND_ApiVersion",
                sys::TRITONBACKEND_ApiVersion(&mut major, &mut minor),
            )?
        };
        if !api_compatible(major, minor) {
            return Err(TritonError::Unsupported(format!(
                "Triton backend API version {major}.{minor} does not support this backend, \
                 which needs {}.{} or a later 1.x",
                sys::TRITONBACKEND_API_VERSION_MAJOR,
                sys::TRITONBACKEND_API_VERSION_MINOR
            )));
        }
        log::install();
        threads::name_global_pool();
        // SAFETY: `backend` is the live handle Triton passed in.
        let json = unsafe { backend_config_json(backend)? };
        let (settings, ignored) = BackendSettings::from_json(&json)?;
        if !ignored.is_empty() {
            tracing::debug!(
                "backend config keys not used by this backend: {}",
                ignored.join(", ")
            );
        }
        tracing::info!(
            default_max_tokens = settings.default_max_tokens,
            "backend initialized (backend API {major}.{minor})"
        );
        let raw = into_raw(settings);
        // SAFETY: live handle; `raw` stays valid until TRITONBACKEND_Finalize takes it back.
        let set = unsafe {
            check(
                "TRITONBACKEND_BackendSetState",
                sys::TRITONBACKEND_BackendSetState(backend, raw),
            )
        };
        if set.is_err() {
            // SAFETY: `raw` came from into_raw above and was not stored.
            drop(unsafe { take_box::<BackendSettings>(raw) });
        }
        set
    })
}

/// The backend configuration JSON. The message belongs to Triton and is not deleted.
///
/// # Safety
/// `backend` is a live backend handle.
unsafe fn backend_config_json(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> Result<String, TritonError> {
    let mut message = ptr::null_mut();
    // SAFETY: live handle; valid out-pointer.
    unsafe {
        check(
            "TRITONBACKEND_BackendConfig",
            sys::TRITONBACKEND_BackendConfig(backend, &mut message),
        )?
    };
    let (mut base, mut len) = (ptr::null(), 0usize);
    // SAFETY: the message Triton just returned, alive while the backend is; valid out-pointers.
    unsafe {
        check(
            "TRITONSERVER_MessageSerializeToJson",
            sys::TRITONSERVER_MessageSerializeToJson(message, &mut base, &mut len),
        )?
    };
    if base.is_null() {
        return Ok("{}".into());
    }
    // SAFETY: `len` bytes at `base`, owned by the message, copied here.
    let bytes = unsafe { std::slice::from_raw_parts(base.cast::<u8>(), len) };
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Frees the backend state.
///
/// # Safety
/// Called from Triton with a live backend handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_Finalize(
    backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_Finalize", || {
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_BackendState",
                sys::TRITONBACKEND_BackendState(backend, &mut raw),
            )?
        };
        // SAFETY: null, or set by Initialize from into_raw::<BackendSettings>; taken once.
        drop(unsafe { take_box::<BackendSettings>(raw) });
        Ok(())
    })
}

/// Reads and validates the model configuration and stores a [`ModelState`].
///
/// # Safety
/// Called from Triton with a live model handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInitialize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInitialize", || {
        // SAFETY: `model` is the live handle Triton passed in.
        let state = unsafe { ModelState::from_triton(model)? };
        tracing::info!(
            "model {} version {} ({}): weights {}, context {} tokens, up to {} sequences per \
             instance",
            state.name,
            state.version,
            state.version_dir.display(),
            state.config.weights_dir.display(),
            state.served.context,
            state.served.max_sequences
        );
        let raw = into_raw(state);
        // SAFETY: live handle; `raw` stays valid until ModelFinalize takes it back.
        let set = unsafe {
            check(
                "TRITONBACKEND_ModelSetState",
                sys::TRITONBACKEND_ModelSetState(model, raw),
            )
        };
        if set.is_err() {
            // SAFETY: Triton did not take the pointer; reclaimed once, here.
            drop(unsafe { take_box::<ModelState>(raw) });
        }
        set
    })
}

/// Drops the [`ModelState`].
///
/// # Safety
/// Called from Triton with a live model handle, after every instance was finalized.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelFinalize(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelFinalize", || {
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelState",
                sys::TRITONBACKEND_ModelState(model, &mut raw),
            )?
        };
        // SAFETY: set by ModelInitialize from into_raw::<ModelState>; finalize runs once.
        drop(unsafe { take_box::<ModelState>(raw) });
        Ok(())
    })
}

/// Reads the instance's kind and device and stores an [`InstanceState`].
///
/// # Safety
/// Called from Triton with a live instance handle of an initialized model.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceInitialize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceInitialize", || {
        let mut model: *mut sys::TRITONBACKEND_Model = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceModel",
                sys::TRITONBACKEND_ModelInstanceModel(instance, &mut model),
            )?
        };
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: `model` is the live model of this instance; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelState",
                sys::TRITONBACKEND_ModelState(model, &mut raw),
            )?
        };
        if raw.is_null() {
            return Err(TritonError::Internal {
                context: "TRITONBACKEND_ModelInstanceInitialize".into(),
                source: "the model has no state".into(),
            });
        }
        // SAFETY: set by ModelInitialize from a Box<ModelState>; the model outlives its
        // instances and nothing mutates the state, so a shared borrow is sound here.
        let model_state = unsafe { &*raw.cast::<ModelState>() };
        // SAFETY: `instance` is the live handle Triton passed in.
        let state = unsafe { InstanceState::from_triton(instance, model_state)? };
        tracing::info!(
            "instance {} of model {}: {:?}, device {}, engine thread started",
            state.name,
            model_state.name,
            state.kind,
            state.device_id
        );
        let raw = into_raw(state);
        // SAFETY: live handle; `raw` stays valid until ModelInstanceFinalize takes it back.
        let set = unsafe {
            check(
                "TRITONBACKEND_ModelInstanceSetState",
                sys::TRITONBACKEND_ModelInstanceSetState(instance, raw),
            )
        };
        if set.is_err() {
            // SAFETY: Triton did not take the pointer; reclaimed once, here.
            drop(unsafe { take_box::<InstanceState>(raw) });
        }
        set
    })
}

/// Drops the [`InstanceState`].
///
/// # Safety
/// Called from Triton with a live instance handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceFinalize(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceFinalize", || {
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceState",
                sys::TRITONBACKEND_ModelInstanceState(instance, &mut raw),
            )?
        };
        // SAFETY: null, or set by ModelInstanceInitialize from into_raw::<InstanceState>;
        // taken back exactly once, here.
        let Some(mut state) = (unsafe { take_box::<InstanceState>(raw) }) else {
            return Ok(());
        };
        // Requests still queued or running get their FINAL error here, before the thread is
        // joined and the instance handle goes away.
        match state.worker.take() {
            Some(w) => w.stop(),
            None => Ok(()),
        }
    })
}

/// Checks each request and hands the good ones to the instance's engine thread; a bad one is
/// answered at once with an INVALID_ARG error as its FINAL response. Returns an error only
/// when no request was taken over (then Triton answers and releases them all).
///
/// # Safety
/// Called from Triton with a live instance handle and `request_count` live requests.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceExecute", || {
        let start = now_ns();
        let mut raw: *mut c_void = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceState",
                sys::TRITONBACKEND_ModelInstanceState(instance, &mut raw),
            )?
        };
        if raw.is_null() || (requests.is_null() && request_count > 0) {
            return Err(TritonError::Internal {
                context: "TRITONBACKEND_ModelInstanceExecute".into(),
                source: "no instance state or no request array".into(),
            });
        }
        // SAFETY: set by ModelInstanceInitialize; Triton does not finalize an instance while it
        // executes, and never runs Execute twice at once for one instance.
        let state = unsafe { &*raw.cast::<InstanceState>() };
        let requests: Vec<*mut sys::TRITONBACKEND_Request> = if request_count == 0 {
            Vec::new()
        } else {
            // SAFETY: Triton passes `request_count` request pointers; the array is Triton's,
            // so the pointers are copied out now.
            unsafe { std::slice::from_raw_parts(requests, request_count as usize) }.to_vec()
        };

        // Phase 1: a response factory for every request. Until all exist, nothing is ours.
        let mut pending = Vec::with_capacity(requests.len());
        for &r in &requests {
            // SAFETY: a live request of this call.
            match unsafe { Pending::new(r, start) } {
                Ok(p) => pending.push(p),
                Err(e) => {
                    pending.into_iter().for_each(Pending::abandon);
                    return Err(e);
                }
            }
        }
        // Phase 2: every request is ours; each ends with exactly one FINAL, here or on the
        // engine thread. A panic while checking one request answers that request.
        for p in pending {
            let prepared = catch_unwind(AssertUnwindSafe(|| {
                let wanted = p.wanted()?;
                let inputs = p.inputs()?;
                Ok::<_, TritonError>((wanted, state.served.prepare(&inputs)?))
            }))
            .unwrap_or_else(|payload| {
                Err(TritonError::Panic {
                    entry: "TRITONBACKEND_ModelInstanceExecute",
                    message: panic_message(payload.as_ref()),
                })
            });
            let (wanted, prepared) = match prepared {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(request = p.id.as_str(), error = %e.chain(), "bad request");
                    p.fail(state.handle, &e);
                    continue;
                }
            };
            let job = Job {
                pending: p,
                request: prepared.request,
                stream: prepared.stream,
                wanted,
                batched: state.served.batched,
                echo_text: prepared.echo_text,
                echo_ids: prepared.echo_ids,
            };
            let Some(worker) = state.worker.as_ref() else {
                let e = TritonError::Unavailable("the instance is stopping".into());
                job.pending.fail(state.handle, &e);
                continue;
            };
            if let Err((job, e)) = worker.submit(job) {
                job.pending.fail(state.handle, &e);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_rule() {
        assert!(api_compatible(1, 19));
        assert!(api_compatible(1, 25));
        assert!(!api_compatible(1, 18));
        assert!(!api_compatible(0, 19));
        assert!(!api_compatible(2, 19));
    }

    #[test]
    fn panic_payloads_become_messages() {
        let p = catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom 7");
        let p = catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "static");
        let p = catch_unwind(|| std::panic::panic_any(5u8)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "(non-string panic payload)");
    }

    use super::super::mock;

    fn model() -> *mut sys::TRITONBACKEND_Model {
        ptr::NonNull::dangling().as_ptr()
    }

    #[test]
    fn initialize_checks_the_api_version() {
        let _g = mock::lock();
        for (api, ok) in [
            ((1, 19), true),
            ((1, 30), true),
            ((1, 18), false),
            ((2, 19), false),
        ] {
            mock::with(|h| h.api = api);
            // SAFETY: the mock provides every server function the entry point calls.
            let err = unsafe { TRITONBACKEND_Initialize(ptr::null_mut()) };
            match mock::take_error(err) {
                None => {
                    assert!(ok, "{api:?} accepted");
                    assert_ne!(mock::with(|h| h.backend_state), 0, "settings stored");
                    // SAFETY: the mock provides every server function called.
                    let err = unsafe { TRITONBACKEND_Finalize(ptr::null_mut()) };
                    assert_eq!(mock::take_error(err), None);
                }
                Some((code, msg)) => {
                    assert!(!ok, "{api:?} refused: {msg}");
                    assert_eq!(code, sys::TRITONSERVER_ERROR_UNSUPPORTED);
                    assert!(msg.contains(&format!("{}.{}", api.0, api.1)), "{msg}");
                }
            }
        }
        assert_eq!(mock::with(|h| h.live_errors), 0);
    }

    #[test]
    fn bad_backend_config_fails_initialize_naming_the_key() {
        let _g = mock::lock();
        mock::with(|h| {
            h.backend_config_json = r#"{"cmdline": {"default-max-tokens": "0"}}"#.into()
        });
        // SAFETY: the mock provides every server function called.
        let err = unsafe { TRITONBACKEND_Initialize(ptr::null_mut()) };
        let (code, msg) = mock::take_error(err).expect("refused");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INVALID_ARG);
        assert!(msg.contains("unweight,default-max-tokens"), "{msg}");
        assert_eq!(mock::with(|h| h.backend_state), 0);
        assert_eq!(mock::with(|h| h.live_errors), 0);
    }

    #[test]
    fn missing_model_files_fail_model_initialize_naming_them() {
        let _g = mock::lock();
        mock::with(|h| h.version = 3);
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelInitialize(model()) };
        let (code, msg) = mock::take_error(err).expect("refused");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INVALID_ARG);
        assert!(msg.contains("/models/m/3"), "{msg}");
        assert!(msg.contains("config.json"), "{msg}");
        mock::with(|h| {
            assert_eq!(h.model_state, 0, "no state on failure");
            assert_eq!(h.live_messages, 0, "the model config message was deleted");
            assert_eq!(h.live_errors, 0);
        });
    }

    #[test]
    fn invalid_config_fails_model_initialize_naming_the_field() {
        let _g = mock::lock();
        mock::with(|h| {
            h.config_json = r#"{"model_transaction_policy": {"decoupled": true},
                "parameters": {"max_sequence_length": {"string_value": "-5"}}}"#
                .into()
        });
        // SAFETY: the mock provides every server function called.
        let err = unsafe { TRITONBACKEND_ModelInitialize(model()) };
        let (code, msg) = mock::take_error(err).expect("refused");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INVALID_ARG);
        assert!(msg.contains("parameters.max_sequence_length"), "{msg}");
        mock::with(|h| {
            assert_eq!(h.model_state, 0, "no state on failure");
            assert_eq!(h.live_messages, 0, "message deleted on the error path too");
            assert_eq!(h.live_errors, 0);
        });
    }

    #[test]
    fn server_errors_are_read_deleted_and_passed_on() {
        let _g = mock::lock();
        mock::with(|h| h.fail_model_name = Some(sys::TRITONSERVER_ERROR_NOT_FOUND));
        // SAFETY: the mock provides every server function called.
        let err = unsafe { TRITONBACKEND_ModelInitialize(model()) };
        let (code, msg) = mock::take_error(err).expect("refused");
        assert_eq!(code, sys::TRITONSERVER_ERROR_NOT_FOUND);
        assert!(
            msg.contains("TRITONBACKEND_ModelName failed: no such model"),
            "{msg}"
        );
        assert_eq!(
            mock::with(|h| h.live_errors),
            0,
            "the server's error was deleted"
        );
    }

    #[test]
    fn panics_become_internal_errors() {
        let _g = mock::lock();
        let err = guard("TRITONBACKEND_Test", || panic!("boom"));
        let (code, msg) = mock::take_error(err).expect("an error");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INTERNAL);
        assert_eq!(msg, "panic in TRITONBACKEND_Test: boom");
    }
}
