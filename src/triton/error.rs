//! Errors of the Triton layer and their one mapping to Triton's error codes.
//!
//! [`TritonError`] is what every function of this layer returns. At the C ABI edge,
//! `to_server_error` turns one into a `TRITONSERVER_Error*` whose code comes from
//! [`TritonError::kind`] (bad input and bad configuration → INVALID_ARG, no capacity →
//! UNAVAILABLE, not supported → UNSUPPORTED, anything else → INTERNAL) and whose message is the
//! full chain of causes. Every `TRITONSERVER_Error*` a server call returns goes through
//! `check`, which reads its code and message and then deletes it: none is leaked.

use std::ffi::{CStr, CString};
use std::fmt;

use super::sys;

/// The class of an error, as Triton's error codes see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the configuration is wrong (`TRITONSERVER_ERROR_INVALID_ARG`).
    InvalidArg,
    /// No capacity now; retry later (`TRITONSERVER_ERROR_UNAVAILABLE`).
    Unavailable,
    /// Not supported by this backend or this server (`TRITONSERVER_ERROR_UNSUPPORTED`).
    Unsupported,
    /// Not found (`TRITONSERVER_ERROR_NOT_FOUND`), as reported by a server call.
    NotFound,
    /// Cancelled (`TRITONSERVER_ERROR_CANCELLED`), as reported by a server call.
    Cancelled,
    /// Anything else (`TRITONSERVER_ERROR_INTERNAL`).
    Internal,
}

/// An error of the Triton layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TritonError {
    /// A field of the model configuration is missing or invalid; `field` is its JSON path.
    #[error("model configuration: {field}: {reason}")]
    Config {
        /// JSON path of the field, e.g. `parameters.max_sequence_length`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request is malformed.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// No capacity for the request now, or the instance is going away.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The client cancelled the request.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The model's files (config.json, tokenizer, weights) are missing or invalid.
    #[error("model files in {dir}")]
    ModelFiles {
        /// The weights directory.
        dir: String,
        /// What is wrong, naming the file or tensor.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Something this backend does not do (yet), or a server too old for it.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A server call failed; `kind` is the code Triton gave it.
    #[error("{call} failed: {message}")]
    Server {
        /// The server function.
        call: &'static str,
        /// Its error code.
        kind: ErrorKind,
        /// Its error message.
        message: String,
    },
    /// An entry point panicked; the panic was caught at the C ABI edge.
    #[error("panic in {entry}: {message}")]
    Panic {
        /// The entry point.
        entry: &'static str,
        /// The panic payload, when it is a string.
        message: String,
    },
    /// An internal failure, with its cause.
    #[error("{context}")]
    Internal {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl TritonError {
    /// Shorthand for a configuration error.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TritonError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The class of the error: the one place that decides which Triton code it gets.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TritonError::Config { .. }
            | TritonError::InvalidInput(_)
            | TritonError::ModelFiles { .. } => ErrorKind::InvalidArg,
            TritonError::Unavailable(_) => ErrorKind::Unavailable,
            TritonError::Cancelled(_) => ErrorKind::Cancelled,
            TritonError::Unsupported(_) => ErrorKind::Unsupported,
            TritonError::Server { kind, .. } => *kind,
            TritonError::Panic { .. } | TritonError::Internal { .. } => ErrorKind::Internal,
        }
    }

    /// The error and all its causes, outermost first, joined by `": "` (anyhow's `{:#}`).
    pub fn chain(&self) -> String {
        Chain(self).to_string()
    }
}

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`), for the
/// INTERNAL error that answers it: entry points and the engine thread both catch panics and
/// must say what happened.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Displays an error followed by its `source()` chain.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// The Triton code of a kind.
fn code_of(kind: ErrorKind) -> sys::TRITONSERVER_Error_Code {
    match kind {
        ErrorKind::InvalidArg => sys::TRITONSERVER_ERROR_INVALID_ARG,
        ErrorKind::Unavailable => sys::TRITONSERVER_ERROR_UNAVAILABLE,
        ErrorKind::Unsupported => sys::TRITONSERVER_ERROR_UNSUPPORTED,
        ErrorKind::NotFound => sys::TRITONSERVER_ERROR_NOT_FOUND,
        ErrorKind::Cancelled => sys::TRITONSERVER_ERROR_CANCELLED,
        ErrorKind::Internal => sys::TRITONSERVER_ERROR_INTERNAL,
    }
}

/// The kind of a Triton code; codes this backend does not distinguish are internal.
fn kind_of(code: sys::TRITONSERVER_Error_Code) -> ErrorKind {
    match code {
        sys::TRITONSERVER_ERROR_INVALID_ARG => ErrorKind::InvalidArg,
        sys::TRITONSERVER_ERROR_UNAVAILABLE => ErrorKind::Unavailable,
        sys::TRITONSERVER_ERROR_UNSUPPORTED => ErrorKind::Unsupported,
        sys::TRITONSERVER_ERROR_NOT_FOUND => ErrorKind::NotFound,
        sys::TRITONSERVER_ERROR_CANCELLED => ErrorKind::Cancelled,
        _ => ErrorKind::Internal,
    }
}

/// A message as a C string: interior NUL bytes (which C cannot carry) become U+FFFD.
fn c_message(msg: &str) -> CString {
    CString::new(msg.replace('\0', "\u{FFFD}")).expect("NUL bytes were replaced")
}

/// A new `TRITONSERVER_Error` for `err`, owned by the caller (Triton, once returned).
pub(super) fn to_server_error(err: &TritonError) -> *mut sys::TRITONSERVER_Error {
    let msg = c_message(&err.chain());
    // SAFETY: `msg` is a valid NUL-terminated string for the duration of the call; Triton copies
    // it into the new error object.
    unsafe { sys::TRITONSERVER_ErrorNew(code_of(err.kind()), msg.as_ptr()) }
}

/// Turns the result of the server call `call` into a `Result`, reading and then deleting the
/// error object when there is one.
///
/// # Safety
/// `err` is null or a `TRITONSERVER_Error*` just returned by a server call, owned by the caller
/// and not used again after this call.
pub(super) unsafe fn check(
    call: &'static str,
    err: *mut sys::TRITONSERVER_Error,
) -> Result<(), TritonError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: `err` is a live error object (contract above).
    let code = unsafe { sys::TRITONSERVER_ErrorCode(err) };
    // SAFETY: as above; the message pointer lives as long as `err`, and is copied before the
    // delete below.
    let message = unsafe {
        let p = sys::TRITONSERVER_ErrorMessage(err);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    // SAFETY: the caller owns `err` and hands it over; it is deleted exactly once, here.
    unsafe { sys::TRITONSERVER_ErrorDelete(err) };
    Err(TritonError::Server {
        call,
        kind: kind_of(code),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_documented_codes() {
        let cases = [
            (
                TritonError::config("parameters.x", "bad"),
                sys::TRITONSERVER_ERROR_INVALID_ARG,
            ),
            (
                TritonError::InvalidInput("x".into()),
                sys::TRITONSERVER_ERROR_INVALID_ARG,
            ),
            (
                TritonError::Unavailable("x".into()),
                sys::TRITONSERVER_ERROR_UNAVAILABLE,
            ),
            (
                TritonError::Unsupported("x".into()),
                sys::TRITONSERVER_ERROR_UNSUPPORTED,
            ),
            (
                TritonError::Cancelled("x".into()),
                sys::TRITONSERVER_ERROR_CANCELLED,
            ),
            (
                TritonError::ModelFiles {
                    dir: "/m".into(),
                    source: "tensor t: checksum mismatch".into(),
                },
                sys::TRITONSERVER_ERROR_INVALID_ARG,
            ),
            (
                TritonError::Panic {
                    entry: "e",
                    message: "m".into(),
                },
                sys::TRITONSERVER_ERROR_INTERNAL,
            ),
            (
                TritonError::Internal {
                    context: "c".into(),
                    source: "s".into(),
                },
                sys::TRITONSERVER_ERROR_INTERNAL,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(code_of(err.kind()), code, "{err:?}");
        }
    }

    #[test]
    fn server_codes_round_trip_and_unknown_is_internal() {
        for code in [
            sys::TRITONSERVER_ERROR_INVALID_ARG,
            sys::TRITONSERVER_ERROR_UNAVAILABLE,
            sys::TRITONSERVER_ERROR_UNSUPPORTED,
            sys::TRITONSERVER_ERROR_NOT_FOUND,
            sys::TRITONSERVER_ERROR_CANCELLED,
            sys::TRITONSERVER_ERROR_INTERNAL,
        ] {
            assert_eq!(code_of(kind_of(code)), code);
        }
        assert_eq!(
            kind_of(sys::TRITONSERVER_ERROR_UNKNOWN),
            ErrorKind::Internal
        );
        assert_eq!(kind_of(1000), ErrorKind::Internal);
    }

    #[test]
    fn message_is_the_whole_chain() {
        let inner = std::io::Error::other("disk on fire");
        let err = TritonError::Internal {
            context: "loading weights from /m/1".into(),
            source: Box::new(inner),
        };
        assert_eq!(err.chain(), "loading weights from /m/1: disk on fire");
        let cfg = TritonError::config("parameters.device", "expected cpu, gpu or auto");
        assert_eq!(
            cfg.chain(),
            "model configuration: parameters.device: expected cpu, gpu or auto"
        );
    }

    #[test]
    fn nul_bytes_do_not_lose_the_message() {
        assert_eq!(c_message("a\0b").to_str().unwrap(), "a\u{FFFD}b");
    }
}
