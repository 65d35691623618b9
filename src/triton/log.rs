//! Logs into Triton's log (`TRITONSERVER_LogMessage`), so they appear with the server's own,
//! at its levels and under its `--log-verbose` / `--log-info` / `--log-warning` /
//! `--log-error` switches.
//!
//! The backend logs with `tracing`; [`TritonLog`] is the subscriber `TRITONBACKEND_Initialize`
//! installs for the shared object (its `tracing` statics are its own: Triton loads it with
//! `RTLD_LOCAL`). Levels map ERROR → ERROR, WARN → WARN, INFO → INFO, DEBUG and TRACE → VERBOSE;
//! an event is formatted only when Triton has its level enabled. Spans are not recorded: the
//! events carry their context as fields (`instance=...`, `request=...`).
//!
//! Triton's levels change at run time (`/v2/logging`, `--log-verbose` through the API), so the
//! subscriber never lets `tracing` cache a callsite's answer: [`TritonLog::register_callsite`]
//! says "sometimes", and `enabled` asks `TRITONSERVER_LogIsEnabled` at every event.

use std::ffi::CString;
use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

use super::error::check;
use super::sys;

fn triton_level(level: &Level) -> sys::TRITONSERVER_LogLevel {
    match *level {
        Level::ERROR => sys::TRITONSERVER_LOG_ERROR,
        Level::WARN => sys::TRITONSERVER_LOG_WARN,
        Level::INFO => sys::TRITONSERVER_LOG_INFO,
        _ => sys::TRITONSERVER_LOG_VERBOSE,
    }
}

/// Writes `msg` to Triton's log at `level`, attributed to `file:line`. A failure to log is
/// dropped (its error object is still read and deleted).
fn write(level: sys::TRITONSERVER_LogLevel, file: &str, line: u32, msg: &str) {
    let (Ok(file), Ok(msg)) = (
        CString::new(file.replace('\0', "?")),
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
            sys::TRITONSERVER_LogMessage(level, file.as_ptr(), line, msg.as_ptr()),
        )
    };
}

/// The `tracing` subscriber that forwards events to Triton's log.
pub(super) struct TritonLog;

/// Formats an event's fields: the message first, then `key=value` pairs.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for TritonLog {
    /// Always "sometimes": the default would cache `enabled`'s first answer per callsite
    /// ("never" or "always"), and a level switched on or off later in Triton would never be
    /// seen by an event already hit once.
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }

    /// Every level: Triton may enable any of them at run time, so no event may be filtered out
    /// before `enabled` asks it.
    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // SAFETY: a plain query, callable at any time while the server runs.
        unsafe { sys::TRITONSERVER_LogIsEnabled(triton_level(metadata.level())) }
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let msg = format!("unweight: {}{}", fields.message, fields.rest);
        write(
            triton_level(meta.level()),
            meta.file().unwrap_or("unweight"),
            meta.line().unwrap_or(0),
            &msg,
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Makes [`TritonLog`] the subscriber of this shared object (once; later calls do nothing).
pub(super) fn install() {
    let _ = tracing::subscriber::set_global_default(TritonLog);
}

#[cfg(test)]
mod tests {
    use super::super::mock;
    use super::*;

    /// One callsite hit three times while Triton's VERBOSE level goes off, on, off: only the
    /// event of the middle round reaches the log. With `tracing`'s default callsite caching the
    /// first answer ("never") would stick and the middle event would be lost.
    #[test]
    fn a_log_level_changed_at_run_time_is_seen_by_callsites_already_hit() {
        let _g = mock::lock();
        let dispatch = tracing::Dispatch::new(TritonLog);
        tracing::dispatcher::with_default(&dispatch, || {
            for round in 0..3 {
                mock::set_verbose(round == 1);
                tracing::debug!(round, "log-level probe");
            }
        });
        let probes: Vec<String> = mock::logged()
            .into_iter()
            .filter(|(_, m)| m.contains("log-level probe"))
            .map(|(level, m)| {
                assert_eq!(level, sys::TRITONSERVER_LOG_VERBOSE);
                m
            })
            .collect();
        assert_eq!(probes, ["unweight: log-level probe round=1"]);
    }
}
