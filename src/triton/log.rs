//! Messages into Triton's log (`TRITONSERVER_LogMessage`), so they appear with the server's own,
//! at its levels and under its `--log-verbose` / `--log-info` switches. Only what the lifecycle
//! needs so far; routing `tracing` here comes with the engine thread.

use std::ffi::CString;

use super::error::check;
use super::sys;

/// Logs `msg` at INFO level, attributed to `file:line`. A failure to log is dropped (its error
/// object is still read and deleted).
pub(super) fn info(file: &'static str, line: u32, msg: &str) {
    // SAFETY: a plain query, callable at any time while the server runs.
    if !unsafe { sys::TRITONSERVER_LogIsEnabled(sys::TRITONSERVER_LOG_INFO) } {
        return;
    }
    let (Ok(file), Ok(msg)) = (
        CString::new(file),
        CString::new(msg.replace('\0', "\u{FFFD}")),
    ) else {
        return;
    };
    let line = i32::try_from(line).unwrap_or(i32::MAX);
    // SAFETY: both strings are valid and NUL-terminated for the call, which copies them; the
    // returned error (if any) is ours and `check` deletes it.
    let _ = unsafe {
        check(
            "TRITONSERVER_LogMessage",
            sys::TRITONSERVER_LogMessage(
                sys::TRITONSERVER_LOG_INFO,
                file.as_ptr(),
                line,
                msg.as_ptr(),
            ),
        )
    };
}
