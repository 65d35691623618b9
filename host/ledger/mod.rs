//! The ledger: every object the host hands to the backend, its owner and state, and the rules
//! checked on every call. Pure Rust, no FFI: `host/server/` decodes the C arguments and calls the
//! methods here under one mutex; unit tests call them directly to prove each rule can fail.
//!
//! Handles are not addresses: a handle is `(0x7A00 | kind) << 48 | (index + 1)`, a
//! non-canonical x86-64 address (dereferencing it faults) that names the object's kind and its
//! index in the ledger. Objects are never freed or reused during a run: a released request, a
//! sent response, a deleted factory or error is a tombstone, so any later call with its handle
//! is recognised and reported (`use-after-...`), and the strings and arrays handed out stay
//! valid memory. Buffers are [`GuardBuf`]s, made inaccessible when their lifetime ends.
//!
//! A violation is recorded as `"<rule>: <what>"`; the calling server function then usually
//! returns an error, as a careful server would, so the backend can go on and the run can show
//! every problem at once.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::guard::{GuardBuf, Region};
use crate::model_config::{InstanceSpec, ModelConfig};
use crate::spec::{self, EncodedInput, RequestSpec};

mod entities;
mod metrics;
mod report;
mod requests;
mod responses;

/// `TRITONSERVER_RESPONSE_COMPLETE_FINAL`.
pub const FLAG_FINAL: u32 = 1;
/// `TRITONSERVER_REQUEST_RELEASE_ALL`.
pub const RELEASE_ALL: u32 = 1;
/// `TRITONSERVER_REQUEST_RELEASE_RESCHEDULE` (iterative sequence batching only).
pub const RELEASE_RESCHEDULE: u32 = 2;

/// Error codes (`TRITONSERVER_Error_Code`), named as in the header.
#[allow(missing_docs)]
pub mod code {
    pub const UNKNOWN: u32 = 0;
    pub const INTERNAL: u32 = 1;
    pub const NOT_FOUND: u32 = 2;
    pub const INVALID_ARG: u32 = 3;
    pub const UNAVAILABLE: u32 = 4;
    pub const UNSUPPORTED: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
    pub const CANCELLED: u32 = 7;
}

/// The report name of an error code (`INVALID_ARG`, ...).
pub fn code_name(c: u32) -> String {
    const NAMES: [&str; 8] = [
        "UNKNOWN",
        "INTERNAL",
        "NOT_FOUND",
        "INVALID_ARG",
        "UNAVAILABLE",
        "UNSUPPORTED",
        "ALREADY_EXISTS",
        "CANCELLED",
    ];
    NAMES
        .get(c as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("CODE_{c}"))
}

/// `TRITONSERVER_ErrorCodeString`'s text (Triton's `Status::CodeString`).
pub fn code_string(c: u32) -> &'static std::ffi::CStr {
    match c {
        code::INTERNAL => c"Internal",
        code::NOT_FOUND => c"Not found",
        code::INVALID_ARG => c"Invalid argument",
        code::UNAVAILABLE => c"Unavailable",
        code::UNSUPPORTED => c"Unsupported",
        code::ALREADY_EXISTS => c"Already exists",
        code::CANCELLED => c"Cancelled",
        _ => c"Unknown",
    }
}

/// Kinds of handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Backend = 1,
    Model,
    Instance,
    Request,
    Input,
    Factory,
    Response,
    Output,
    Error,
    Message,
    MemoryManager,
    ResponseStats,
    BufferAttributes,
    BackendAttribute,
    Server,
    Parameter,
    MetricFamily,
    Metric,
    MetricArgs,
}

const KINDS: [Kind; 19] = [
    Kind::Backend,
    Kind::Model,
    Kind::Instance,
    Kind::Request,
    Kind::Input,
    Kind::Factory,
    Kind::Response,
    Kind::Output,
    Kind::Error,
    Kind::Message,
    Kind::MemoryManager,
    Kind::ResponseStats,
    Kind::BufferAttributes,
    Kind::BackendAttribute,
    Kind::Server,
    Kind::Parameter,
    Kind::MetricFamily,
    Kind::Metric,
    Kind::MetricArgs,
];

const TAG: usize = 0x7A00;
const INDEX_MASK: usize = (1 << 48) - 1;

/// The handle of object `index` of `kind`.
pub fn handle(kind: Kind, index: usize) -> usize {
    ((TAG | kind as usize) << 48) | (index + 1)
}

/// The kind and index a handle names, if it is one.
pub fn decode(h: usize) -> Option<(Kind, usize)> {
    let hi = h >> 48;
    if hi & 0xFF00 != TAG || h & INDEX_MASK == 0 {
        return None;
    }
    let kind = *KINDS.iter().find(|k| **k as usize == hi & 0xFF)?;
    Some((kind, (h & INDEX_MASK) - 1))
}

/// A failed call: the error the server function returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Fail {
    pub code: u32,
    pub msg: String,
}

/// What every checked ledger call returns.
pub type R<T> = Result<T, Fail>;

fn fail(code: u32, msg: impl Into<String>) -> Fail {
    Fail {
        code,
        msg: msg.into(),
    }
}

/// Monotonic nanoseconds (`CLOCK_MONOTONIC`, what libstdc++'s steady_clock reads).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An error as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// Who holds an error object.
#[derive(Debug, Clone, PartialEq)]
enum ErrState {
    /// The backend owns it and must delete it.
    Live,
    Deleted,
    /// Returned from an entry point: Triton took it (and deleted it).
    TakenByHost(&'static str),
}

struct ErrorObj {
    code: u32,
    msg: CString,
    /// `TRITONSERVER_ErrorNew` or the server function that returned it.
    origin: String,
    state: ErrState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MsgOwner {
    Backend,
    Host,
}

struct MessageObj {
    json: CString,
    owner: MsgOwner,
    what: String,
    deleted: bool,
}

/// Lifecycle of the backend, model and instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Life {
    Created,
    Initializing,
    Ready,
    Failed,
    Finalizing,
    Finalized,
}

struct Entity {
    name: CString,
    life: Life,
    state: usize,
}

impl Entity {
    fn new(name: &str) -> Entity {
        Entity {
            name: cstring(name),
            life: Life::Created,
            state: 0,
        }
    }
}

struct InstanceObj {
    e: Entity,
    spec: InstanceSpec,
    host_policy: usize,
    profiles: Vec<CString>,
}

/// Where a request is.
#[derive(Debug, Clone, PartialEq)]
pub enum ReqState {
    NotSubmitted,
    /// Answered by the host without reaching the backend (core checks, unload).
    Rejected,
    /// Given to the backend by a successful Execute (or during one).
    InBackend,
    /// Execute returned an error: Triton kept it and answered it.
    HostOwned,
    Released,
}

struct ParamObj {
    key: CString,
    ty: u32,
    s: CString,
    i: Box<i64>,
    b: Box<bool>,
    d: Box<f64>,
}

struct InputObj {
    request: usize,
    name: CString,
    datatype: u32,
    shape: Vec<i64>,
    byte_size: u64,
    buffers: Vec<GuardBuf>,
    /// The `TRITONSERVER_MemoryType` its buffers are reported in.
    memory_type: u32,
}

/// Statistics reported for one request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStats {
    pub success: bool,
    pub exec_start_ns: u64,
    pub compute_start_ns: u64,
    pub compute_end_ns: u64,
    pub exec_end_ns: u64,
}

/// One output of a delivered response, decoded.
#[derive(Debug, Clone, Serialize)]
pub struct OutputRecord {
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Json,
}

/// One delivered response (or FINAL flag without a response).
#[derive(Debug, Clone, Serialize)]
pub struct ResponseRecord {
    pub t_ms: f64,
    /// `backend`, `backend-flags` (ResponseFactorySendFlags, no response object) or `host`.
    pub source: &'static str,
    pub flags: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub error: Option<ErrorInfo>,
    pub outputs: BTreeMap<String, OutputRecord>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Json>,
}

struct RequestObj {
    spec: RequestSpec,
    id: CString,
    state: ReqState,
    instance: Option<usize>,
    inputs: Vec<usize>,
    requested: Vec<CString>,
    params: Vec<ParamObj>,
    cancelled: bool,
    responses: Vec<ResponseRecord>,
    finals: usize,
    stats: Option<RequestStats>,
    /// Response objects created for it, in order.
    made: Vec<usize>,
    factories: Vec<usize>,
    submitted_ms: Option<f64>,
    text: Vec<u8>,
}

impl RequestObj {
    fn label(&self) -> String {
        format!("request '{}'", self.spec.id)
    }
}

struct FactoryObj {
    request: usize,
    deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RespState {
    Building,
    Sent,
    Deleted,
}

struct ResponseObj {
    request: usize,
    /// 1-based number among the request's responses (for messages).
    ordinal: usize,
    state: RespState,
    outputs: Vec<usize>,
    params: BTreeMap<String, Json>,
}

struct OutputObj {
    response: usize,
    name: CString,
    datatype: u32,
    shape: Vec<i64>,
    buffer: Option<GuardBuf>,
    attrs: Option<usize>,
}

struct AllocObj {
    buf: GuardBuf,
    memory_type: u32,
    freed: bool,
}

#[derive(Default)]
struct RespStatsObj {
    instance: Option<usize>,
    factory: Option<usize>,
    times: [u64; 3],
    error: Option<ErrorInfo>,
    deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AttrOwner {
    Input(usize),
    Output(usize),
    Backend,
}

struct AttrObj {
    owner: AttrOwner,
    memory_type: u32,
    memory_type_id: i64,
    byte_size: usize,
    ipc: usize,
    deleted: bool,
}

/// A log line the backend sent.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    pub level: String,
    pub file: String,
    pub line: i32,
    pub message: String,
}

/// One `TRITONBACKEND_ModelInstanceExecute` call.
#[derive(Debug, Clone, Serialize)]
pub struct ExecuteRecord {
    pub t_ms: f64,
    pub instance: String,
    pub requests: Vec<String>,
    pub error: Option<ErrorInfo>,
}

/// Options that change what the host checks or answers.
#[derive(Debug, Clone)]
pub struct Options {
    pub api_version: (u32, u32),
    pub backend_cmdline: BTreeMap<String, String>,
    pub log_verbose: u32,
    pub log_to_stderr: bool,
    pub print_stream: bool,
    /// Require statistics before every release (the project's contract does).
    pub require_statistics: bool,
    pub repository: String,
    pub version: u64,
    pub backend_dir: String,
    pub backend_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            api_version: (1, 19),
            backend_cmdline: BTreeMap::new(),
            log_verbose: 0,
            log_to_stderr: false,
            print_stream: false,
            require_statistics: true,
            repository: "/models".into(),
            version: 1,
            backend_dir: "/opt/tritonserver/backends/b".into(),
            backend_name: "b".into(),
        }
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).expect("NUL replaced")
}

/// Everything the host knows; see the module documentation.
pub struct Ledger {
    pub opts: Options,
    pub config: Arc<ModelConfig>,
    start: Instant,
    start_ns: u64,
    violations: Vec<String>,
    warnings: Vec<String>,
    logs: Vec<LogRecord>,
    errors: Vec<ErrorObj>,
    messages: Vec<MessageObj>,
    backend: Entity,
    backend_config: usize,
    backend_location: CString,
    exec_policy: u32,
    preferred_groups: Vec<Json>,
    parallel_instance_loading: Option<bool>,
    attribute_open: bool,
    model: Entity,
    model_repository: CString,
    model_config_json: String,
    memory_usage: Vec<Json>,
    instances: Vec<InstanceObj>,
    requests: Vec<RequestObj>,
    inputs: Vec<InputObj>,
    factories: Vec<FactoryObj>,
    responses: Vec<ResponseObj>,
    outputs: Vec<OutputObj>,
    allocs: Vec<AllocObj>,
    resp_stats: Vec<RespStatsObj>,
    reported_resp_stats: Vec<Json>,
    attrs: Vec<AttrObj>,
    batch_stats: Vec<Json>,
    executes: Vec<ExecuteRecord>,
    parameters: Vec<metrics::ParameterObj>,
    families: Vec<metrics::FamilyObj>,
    metrics: Vec<metrics::MetricObj>,
    metric_args: Vec<metrics::ArgsObj>,
    /// The entry point the host is running now, if any.
    pub entry: Option<&'static str>,
    pub total_responses: u64,
    /// Set when something a waiter may care about changed.
    pub changed: bool,
    entry_errors: Vec<Json>,
}

impl Ledger {
    /// A ledger for `config` and the requests of `specs` (none submitted yet).
    pub fn new(config: Arc<ModelConfig>, specs: Vec<RequestSpec>, opts: Options) -> Ledger {
        let mut backend_cmdline = BTreeMap::new();
        // What Triton puts into every backend's cmdline (global settings and defaults).
        backend_cmdline.insert("auto-complete-config".to_string(), "true".to_string());
        backend_cmdline.insert(
            "backend-directory".to_string(),
            std::path::Path::new(&opts.backend_dir)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        backend_cmdline.insert("min-compute-capability".into(), "6.000000".into());
        backend_cmdline.insert("default-max-batch-size".into(), "4".into());
        backend_cmdline.extend(opts.backend_cmdline.clone());
        let model_config_json = config.json.to_string();
        let mut l = Ledger {
            config: config.clone(),
            start: Instant::now(),
            start_ns: now_ns(),
            violations: vec![],
            warnings: vec![],
            logs: vec![],
            errors: vec![],
            messages: vec![],
            backend: Entity::new(&opts.backend_name),
            backend_config: 0,
            backend_location: cstring(&opts.backend_dir),
            exec_policy: 0,
            preferred_groups: vec![],
            parallel_instance_loading: None,
            attribute_open: false,
            model: Entity::new(&config.name),
            model_repository: cstring(&format!("{}/{}", opts.repository, config.name)),
            model_config_json,
            memory_usage: vec![],
            instances: vec![],
            requests: vec![],
            inputs: vec![],
            factories: vec![],
            responses: vec![],
            outputs: vec![],
            allocs: vec![],
            resp_stats: vec![],
            reported_resp_stats: vec![],
            attrs: vec![],
            batch_stats: vec![],
            executes: vec![],
            parameters: vec![],
            families: vec![],
            metrics: vec![],
            metric_args: vec![],
            entry: None,
            total_responses: 0,
            changed: false,
            entry_errors: vec![],
            opts,
        };
        l.backend_config = l.new_message(
            json!({ "cmdline": backend_cmdline }).to_string(),
            MsgOwner::Host,
            "backend configuration (TRITONBACKEND_BackendConfig)",
        );
        for spec in config.instances.clone() {
            let policy = l.new_message(
                json!({ spec.host_policy.clone(): {} }).to_string(),
                MsgOwner::Host,
                &format!("host policy of instance {}", spec.name),
            );
            l.instances.push(InstanceObj {
                e: Entity::new(&spec.name),
                spec,
                host_policy: policy,
                profiles: vec![],
            });
        }
        for spec in specs {
            let requested = spec
                .outputs
                .clone()
                .unwrap_or_else(|| config.outputs.iter().map(|o| o.name.clone()).collect());
            l.requests.push(RequestObj {
                id: cstring(&spec.id),
                state: ReqState::NotSubmitted,
                instance: None,
                inputs: vec![],
                requested: requested.iter().map(|s| cstring(s)).collect(),
                params: vec![],
                cancelled: false,
                responses: vec![],
                finals: 0,
                stats: None,
                made: vec![],
                factories: vec![],
                submitted_ms: None,
                text: vec![],
                spec,
            });
        }
        l
    }

    /// Milliseconds since the run started (report timestamps).
    pub fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    // ----- violations ---------------------------------------------------------------------

    /// Records a broken rule.
    pub fn violation(&mut self, rule: &str, what: impl Into<String>) {
        let v = format!("{rule}: {}", what.into());
        if self.opts.log_to_stderr {
            eprintln!("unweight-triton-host: VIOLATION {v}");
        }
        self.violations.push(v);
    }

    /// Records a fact that breaks no rule but is worth a look (report `warnings`).
    pub fn warning(&mut self, what: impl Into<String>) {
        self.warnings.push(what.into());
    }

    /// The violations so far.
    #[cfg(test)]
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// A violation that also fails the call with INVALID_ARG.
    fn reject(&mut self, rule: &str, what: String) -> Fail {
        self.violation(rule, what.clone());
        fail(code::INVALID_ARG, format!("test host: {rule}: {what}"))
    }

    /// The object index of handle `h`, which must be of `kind`.
    fn index(&mut self, func: &str, h: usize, kind: Kind) -> R<usize> {
        if h == 0 {
            return Err(self.reject(
                "null-handle",
                format!("{func} called with a null {kind:?} handle"),
            ));
        }
        let len = match kind {
            Kind::Backend | Kind::Model | Kind::MemoryManager | Kind::Server => 1,
            Kind::BackendAttribute => 1,
            Kind::Instance => self.instances.len(),
            Kind::Request => self.requests.len(),
            Kind::Input => self.inputs.len(),
            Kind::Factory => self.factories.len(),
            Kind::Response => self.responses.len(),
            Kind::Output => self.outputs.len(),
            Kind::Error => self.errors.len(),
            Kind::Message => self.messages.len(),
            Kind::ResponseStats => self.resp_stats.len(),
            Kind::BufferAttributes => self.attrs.len(),
            Kind::Parameter => self.parameters.len(),
            Kind::MetricFamily => self.families.len(),
            Kind::Metric => self.metrics.len(),
            Kind::MetricArgs => self.metric_args.len(),
        };
        match decode(h) {
            Some((k, i)) if k == kind && i < len => Ok(i),
            Some((k, _)) if k != kind => Err(self.reject(
                "wrong-handle",
                format!("{func} was given a {k:?} handle where a {kind:?} is expected"),
            )),
            _ => Err(self.reject(
                "wrong-handle",
                format!(
                    "{func} was given {h:#x}, which is not a {kind:?} handle the host gave out"
                ),
            )),
        }
    }

    // ----- errors ---------------------------------------------------------------------------

    /// A new error owned by the backend; returns its handle.
    pub fn new_error(&mut self, code: u32, msg: &str, origin: String) -> usize {
        self.errors.push(ErrorObj {
            code,
            msg: cstring(msg),
            origin,
            state: ErrState::Live,
        });
        handle(Kind::Error, self.errors.len() - 1)
    }

    /// The error a failed server function returns (the backend must delete it).
    pub fn fail_to_error(&mut self, func: &str, f: Fail) -> usize {
        self.new_error(f.code, &f.msg, format!("returned by {func}"))
    }

    fn error_label(&self, i: usize) -> String {
        let e = &self.errors[i];
        format!(
            "error {} '{}' ({})",
            code_name(e.code),
            e.msg.to_string_lossy(),
            e.origin
        )
    }

    /// A live, backend-owned error.
    fn live_error(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::Error)?;
        match self.errors[i].state.clone() {
            ErrState::Live => Ok(i),
            ErrState::Deleted => {
                let what = format!(
                    "{func} on {} after TRITONSERVER_ErrorDelete",
                    self.error_label(i)
                );
                Err(self.reject("use-after-delete", what))
            }
            ErrState::TakenByHost(entry) => {
                let what = format!(
                    "{func} on {}, which {entry} returned (Triton owns and deletes it)",
                    self.error_label(i)
                );
                Err(self.reject("error-ownership", what))
            }
        }
    }

    /// `TRITONSERVER_ErrorDelete`: the error must be live and the backend's.
    pub fn error_delete(&mut self, func: &str, h: usize) {
        if let Ok(i) = self.live_error(func, h) {
            self.errors[i].state = ErrState::Deleted;
        }
    }

    /// `TRITONSERVER_ErrorCode`.
    pub fn error_code(&mut self, func: &str, h: usize) -> u32 {
        match self.live_error(func, h) {
            Ok(i) => self.errors[i].code,
            Err(_) => code::UNKNOWN,
        }
    }

    /// `TRITONSERVER_ErrorMessage`: valid as long as the error (forever, here).
    pub fn error_message(&mut self, func: &str, h: usize) -> *const libc::c_char {
        match self.live_error(func, h) {
            Ok(i) => self.errors[i].msg.as_ptr(),
            Err(_) => c"(invalid error object)".as_ptr(),
        }
    }

    /// Takes an error an entry point returned (Triton owns it from now on).
    pub fn take_entry_error(&mut self, entry: &'static str, h: usize) -> Option<ErrorInfo> {
        if h == 0 {
            return None;
        }
        let func = format!("the error returned by {entry}");
        let info = match self.live_error(&func, h) {
            Ok(i) => {
                self.errors[i].state = ErrState::TakenByHost(entry);
                ErrorInfo {
                    code: code_name(self.errors[i].code),
                    message: self.errors[i].msg.to_string_lossy().into_owned(),
                }
            }
            Err(f) => ErrorInfo {
                code: "INVALID_HANDLE".into(),
                message: f.msg,
            },
        };
        self.entry_errors
            .push(json!({"entry": entry, "code": info.code, "message": info.message}));
        Some(info)
    }

    // ----- messages -------------------------------------------------------------------------

    fn new_message(&mut self, json: String, owner: MsgOwner, what: &str) -> usize {
        self.messages.push(MessageObj {
            json: cstring(&json),
            owner,
            what: what.into(),
            deleted: false,
        });
        self.messages.len() - 1
    }

    fn live_message(&mut self, func: &str, h: usize) -> R<usize> {
        let i = self.index(func, h, Kind::Message)?;
        if self.messages[i].deleted {
            let what = format!(
                "{func} on the {} after TRITONSERVER_MessageDelete",
                self.messages[i].what
            );
            return Err(self.reject("use-after-delete", what));
        }
        Ok(i)
    }

    /// `TRITONSERVER_MessageSerializeToJson`: base and size.
    pub fn message_json(&mut self, func: &str, h: usize) -> R<(*const libc::c_char, usize)> {
        let i = self.live_message(func, h)?;
        let j = &self.messages[i].json;
        Ok((j.as_ptr(), j.as_bytes().len()))
    }

    /// `TRITONSERVER_MessageDelete`: only messages the backend owns.
    pub fn message_delete(&mut self, func: &str, h: usize) -> R<()> {
        let i = self.live_message(func, h)?;
        if self.messages[i].owner == MsgOwner::Host {
            let what = format!(
                "{func} on the {}, which Triton owns (must not be deleted)",
                self.messages[i].what
            );
            self.violation("message-ownership", what);
            // Not deleted: Triton would now hold a dangling pointer; keep it usable.
            return Ok(());
        }
        self.messages[i].deleted = true;
        Ok(())
    }

    /// `TRITONSERVER_MessageNewFromSerializedJson`: a message the backend owns.
    pub fn message_from_json(&mut self, bytes: &[u8]) -> R<usize> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| fail(code::INVALID_ARG, "message JSON is not UTF-8"))?;
        serde_json::from_str::<Json>(text)
            .map_err(|e| fail(code::INVALID_ARG, format!("failed to parse the JSON: {e}")))?;
        let i = self.new_message(
            text.to_string(),
            MsgOwner::Backend,
            "message made by TRITONSERVER_MessageNewFromSerializedJson",
        );
        Ok(handle(Kind::Message, i))
    }

    // ----- logging ----------------------------------------------------------------------------

    /// `TRITONSERVER_LogIsEnabled`: INFO, WARN, ERROR; VERBOSE with `--log-verbose`.
    pub fn log_enabled(&self, level: u32) -> bool {
        level != 3 || self.opts.log_verbose > 0
    }

    /// `TRITONSERVER_LogMessage`: recorded for the report (and echoed with `--log`).
    pub fn log(&mut self, level: u32, file: String, line: i32, message: String) {
        let lvl = match level {
            0 => "INFO",
            1 => "WARN",
            2 => "ERROR",
            3 => "VERBOSE",
            _ => "UNKNOWN",
        };
        if self.opts.log_to_stderr {
            eprintln!("{} {file}:{line}] {message}", &lvl[..1]);
        }
        self.logs.push(LogRecord {
            level: lvl.into(),
            file,
            line,
            message,
        });
    }
}

#[cfg(test)]
mod tests;
