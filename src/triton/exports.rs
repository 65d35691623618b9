//! The `TRITONBACKEND_*` entry points Triton looks up with `dlsym`, and nothing else.
//!
//! Each one is a few lines: [`guard`] runs the body under `catch_unwind` (a panic must not
//! unwind into C++) and turns an error or a panic into a `TRITONSERVER_Error*` through the one
//! mapping in [`super::error`]; null means success. Triton owns the errors these functions
//! return.
//!
//! `TRITONBACKEND_ModelInstanceExecute` is not implemented yet: it answers UNSUPPORTED, which
//! leaves the requests with Triton (it sends the error responses and releases them itself).

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use super::error::{check, to_server_error, TritonError};
use super::state::{into_raw, take_box, InstanceState, ModelState};
use super::{log, sys};

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

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Whether a server reporting TRITONBACKEND API `major.minor` can load this backend (built
/// against the headers' version, 1.19).
pub(super) fn api_compatible(major: u32, minor: u32) -> bool {
    major == sys::TRITONBACKEND_API_VERSION_MAJOR && minor >= sys::TRITONBACKEND_API_VERSION_MINOR
}

/// Checks the server's backend API version.
///
/// # Safety
/// Called from Triton with a live backend handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_Initialize(
    _backend: *mut sys::TRITONBACKEND_Backend,
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
        Ok(())
    })
}

/// Nothing is held per backend.
///
/// # Safety
/// Called from Triton with a live backend handle.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_Finalize(
    _backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_Finalize", || Ok(()))
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
        log::info(
            file!(),
            line!(),
            &format!(
                "unweight: model {} version {} ({}): weights {}, up to {} sequences per instance",
                state.name,
                state.version,
                state.version_dir.display(),
                state.config.weights_dir.display(),
                state.config.max_concurrent_sequences
            ),
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
        log::info(
            file!(),
            line!(),
            &format!(
                "unweight: instance {} of model {}: {:?}, device {}",
                state.name, model_state.name, state.kind, state.device_id
            ),
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
        // SAFETY: set by ModelInstanceInitialize from into_raw::<InstanceState>; finalize runs
        // once.
        drop(unsafe { take_box::<InstanceState>(raw) });
        Ok(())
    })
}

/// Not implemented yet: answers UNSUPPORTED without touching the requests, so Triton keeps
/// ownership of them, sends the error responses and releases them.
///
/// # Safety
/// Called from Triton with a live instance handle and `request_count` request pointers.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    _instance: *mut sys::TRITONBACKEND_ModelInstance,
    _requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceExecute", || {
        Err(TritonError::Unsupported(format!(
            "inference is not implemented yet in the unweight backend ({request_count} request(s) \
             refused); the models load, but generation through Triton comes with issue 4's \
             engine thread"
        )))
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

    fn instance() -> *mut sys::TRITONBACKEND_ModelInstance {
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
                None => assert!(ok, "{api:?} accepted"),
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
    fn model_and_instance_lifecycle() {
        let _g = mock::lock();
        mock::with(|h| {
            h.config_json = r#"{"name": "m", "model_transaction_policy": {"decoupled": true},
                "parameters": {"max_concurrent_sequences": {"string_value": "8"}}}"#
                .into();
            h.version = 3;
        });
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelInitialize(model()) };
        assert_eq!(mock::take_error(err), None);
        let raw = mock::with(|h| h.model_state) as *const ModelState;
        assert!(!raw.is_null());
        {
            // SAFETY: set by ModelInitialize above and alive until ModelFinalize.
            let state = unsafe { &*raw };
            assert_eq!(state.name, "m");
            assert_eq!(state.version, 3);
            assert_eq!(state.version_dir, std::path::Path::new("/models/m/3"));
            assert_eq!(
                state.config.weights_dir,
                std::path::Path::new("/models/m/3")
            );
            assert_eq!(state.config.max_concurrent_sequences, 8);
        }
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelInstanceInitialize(instance()) };
        assert_eq!(mock::take_error(err), None);
        assert_ne!(mock::with(|h| h.instance_state), 0);

        // SAFETY: as above; Execute must not touch the (null) request array.
        let err = unsafe { TRITONBACKEND_ModelInstanceExecute(instance(), ptr::null_mut(), 2) };
        let (code, msg) = mock::take_error(err).expect("Execute refuses");
        assert_eq!(code, sys::TRITONSERVER_ERROR_UNSUPPORTED);
        assert!(msg.contains("not implemented yet"), "{msg}");

        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelInstanceFinalize(instance()) };
        assert_eq!(mock::take_error(err), None);
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelFinalize(model()) };
        assert_eq!(mock::take_error(err), None);
        mock::with(|h| {
            assert_eq!(h.live_errors, 0);
            assert_eq!(h.live_messages, 0, "the model config message was deleted");
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
    fn instance_kind_must_match_the_device_parameter() {
        let _g = mock::lock();
        mock::with(|h| {
            h.config_json = r#"{"model_transaction_policy": {"decoupled": true},
                "parameters": {"device": {"string_value": "cpu"}}}"#
                .into();
            h.kind = sys::TRITONSERVER_INSTANCEGROUPKIND_GPU;
        });
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelInitialize(model()) };
        assert_eq!(mock::take_error(err), None);
        // SAFETY: as above.
        let err = unsafe { TRITONBACKEND_ModelInstanceInitialize(instance()) };
        let (code, msg) = mock::take_error(err).expect("refused");
        assert_eq!(code, sys::TRITONSERVER_ERROR_INVALID_ARG);
        assert!(msg.contains("parameters.device"), "{msg}");
        assert_eq!(mock::with(|h| h.instance_state), 0);
        // SAFETY: the mock provides every server function called, in Triton's order.
        let err = unsafe { TRITONBACKEND_ModelFinalize(model()) };
        assert_eq!(mock::take_error(err), None);
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
