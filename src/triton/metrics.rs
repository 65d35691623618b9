//! The LLM serving metrics the backend adds to Triton's `/metrics` (Prometheus text) through
//! Triton's custom metrics API (`TRITONSERVER_MetricFamilyNew`, `TRITONSERVER_MetricNew`, ...):
//! sequences active and queued, KV cache capacity and use, prompt and generated tokens, and the
//! weights' stored size next to their BF16 size, each labelled `model` and `version`. The list
//! is [`Metric::ALL`]; docs/triton.md documents each.
//!
//! Lifetimes follow Triton's rule that every metric is deleted before its family: the families
//! are created when the first model version asks for its metrics and deleted when the last
//! [`ModelMetrics`] is dropped (at `ModelFinalize`), since a family registered twice under one
//! name would be one Prometheus family that the first delete removes for both.
//!
//! Several instances of a model share its metrics: each engine thread publishes what it holds
//! as increments ([`InstanceMetrics::publish`]), so the model's gauges are the sums over its
//! instances, and an instance that stops takes its share back out.
//!
//! A server without metrics (built without them, or `--allow-metrics=false`) refuses the
//! families; the model then serves without these metrics and a WARN log says why.

use std::ptr;
use std::sync::{Arc, Mutex};

use super::error::{check, TritonError};
use super::sys;

/// One metric of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Metric {
    /// Sequences the engine is generating for now.
    ActiveSequences,
    /// Requests received and not yet generating (waiting for a KV slot or a step).
    QueuedSequences,
    /// Tokens the KV cache can hold (all sequence slots).
    KvCapacityTokens,
    /// Tokens the KV cache holds now (prompt and generated tokens of running sequences).
    KvUsedTokens,
    /// Prompt tokens prefilled (counter).
    PromptTokens,
    /// Tokens generated (counter).
    GeneratedTokens,
    /// Bytes of the model's weights as stored (compressed form).
    WeightStoredBytes,
    /// Bytes the same weights take as BF16 (the original checkpoint).
    WeightBf16Bytes,
}

impl Metric {
    /// Every metric, in the order of the handle arrays.
    pub const ALL: [Metric; 8] = [
        Metric::ActiveSequences,
        Metric::QueuedSequences,
        Metric::KvCapacityTokens,
        Metric::KvUsedTokens,
        Metric::PromptTokens,
        Metric::GeneratedTokens,
        Metric::WeightStoredBytes,
        Metric::WeightBf16Bytes,
    ];

    /// The Prometheus family name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ActiveSequences => "unweight_active_sequences",
            Metric::QueuedSequences => "unweight_queued_sequences",
            Metric::KvCapacityTokens => "unweight_kv_cache_capacity_tokens",
            Metric::KvUsedTokens => "unweight_kv_cache_used_tokens",
            Metric::PromptTokens => "unweight_prompt_tokens_total",
            Metric::GeneratedTokens => "unweight_generated_tokens_total",
            Metric::WeightStoredBytes => "unweight_weight_stored_bytes",
            Metric::WeightBf16Bytes => "unweight_weight_bf16_bytes",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Metric::ActiveSequences => "Sequences being generated, summed over instances",
            Metric::QueuedSequences => "Requests received and not yet generating",
            Metric::KvCapacityTokens => "Tokens the KV cache of all instances can hold",
            Metric::KvUsedTokens => "Tokens held in the KV cache now",
            Metric::PromptTokens => "Prompt tokens prefilled",
            Metric::GeneratedTokens => "Tokens generated",
            Metric::WeightStoredBytes => "Bytes of the model's weights as stored (compressed)",
            Metric::WeightBf16Bytes => "Bytes the model's weights take as BF16",
        }
    }

    fn is_counter(self) -> bool {
        matches!(self, Metric::PromptTokens | Metric::GeneratedTokens)
    }

    fn index(self) -> usize {
        Metric::ALL.iter().position(|m| *m == self).expect("in ALL")
    }
}

/// The families, shared by every model version that has metrics.
struct Families {
    handles: [*mut sys::TRITONSERVER_MetricFamily; 8],
    users: usize,
}

// SAFETY: family handles are plain pointers into the server, used under FAMILIES' lock.
unsafe impl Send for Families {}

static FAMILIES: Mutex<Option<Families>> = Mutex::new(None);

fn delete_families(handles: &[*mut sys::TRITONSERVER_MetricFamily]) {
    for &f in handles.iter().filter(|f| !f.is_null()) {
        // SAFETY: a family this module created, deleted once, after its metrics.
        let r = unsafe {
            check(
                "TRITONSERVER_MetricFamilyDelete",
                sys::TRITONSERVER_MetricFamilyDelete(f),
            )
        };
        if let Err(e) = r {
            tracing::warn!(error = %e.chain(), "deleting a metric family failed");
        }
    }
}

/// The families' handles, creating them for the first user.
fn acquire_families() -> Result<[*mut sys::TRITONSERVER_MetricFamily; 8], TritonError> {
    let mut g = FAMILIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = g.as_mut() {
        f.users += 1;
        return Ok(f.handles);
    }
    let mut handles = [ptr::null_mut(); 8];
    for m in Metric::ALL {
        let kind = if m.is_counter() {
            sys::TRITONSERVER_METRIC_KIND_COUNTER
        } else {
            sys::TRITONSERVER_METRIC_KIND_GAUGE
        };
        let name = std::ffi::CString::new(m.name()).expect("no NUL");
        let help = std::ffi::CString::new(m.help()).expect("no NUL");
        let mut f = ptr::null_mut();
        // SAFETY: valid strings (copied by the server) and out-pointer.
        let r = unsafe {
            check(
                "TRITONSERVER_MetricFamilyNew",
                sys::TRITONSERVER_MetricFamilyNew(&mut f, kind, name.as_ptr(), help.as_ptr()),
            )
        };
        if let Err(e) = r {
            delete_families(&handles);
            return Err(e);
        }
        handles[m.index()] = f;
    }
    *g = Some(Families { handles, users: 1 });
    Ok(handles)
}

fn release_families() {
    let mut g = FAMILIES.lock().unwrap_or_else(|e| e.into_inner());
    let last = g.as_mut().is_some_and(|f| {
        f.users -= 1;
        f.users == 0
    });
    if last {
        if let Some(f) = g.take() {
            delete_families(&f.handles);
        }
    }
}

/// Makes a string parameter (a metric label).
fn label(key: &str, value: &str) -> Result<*mut sys::TRITONSERVER_Parameter, TritonError> {
    let k = std::ffi::CString::new(key).expect("no NUL");
    let v = std::ffi::CString::new(value).map_err(|_| TritonError::Internal {
        context: format!("metric label {key}"),
        source: "the value holds a NUL byte".into(),
    })?;
    // SAFETY: valid strings; the server copies them.
    let p = unsafe {
        sys::TRITONSERVER_ParameterNew(
            k.as_ptr(),
            sys::TRITONSERVER_PARAMETER_STRING,
            v.as_ptr().cast(),
        )
    };
    if p.is_null() {
        return Err(TritonError::Internal {
            context: format!("metric label {key}"),
            source: "TRITONSERVER_ParameterNew returned null".into(),
        });
    }
    Ok(p)
}

/// The metrics of one model version (labels `model`, `version`). Dropping it deletes them.
pub(super) struct ModelMetrics {
    handles: [*mut sys::TRITONSERVER_Metric; 8],
}

// SAFETY: metric handles point into the server, whose metric updates are thread-safe (atomic
// Prometheus values); they are deleted only by Drop, when no instance holds them any more.
unsafe impl Send for ModelMetrics {}
// SAFETY: as above.
unsafe impl Sync for ModelMetrics {}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelMetrics")
    }
}

impl ModelMetrics {
    /// Creates the metrics of `model` version `version`.
    pub fn new(model: &str, version: u64) -> Result<Self, TritonError> {
        let families = acquire_families()?;
        let mut me = ModelMetrics {
            handles: [ptr::null_mut(); 8],
        };
        let labels: [*const sys::TRITONSERVER_Parameter; 2] = [
            label("model", model)?,
            label("version", &version.to_string())?,
        ];
        let mut result = Ok(());
        for m in Metric::ALL {
            let mut h = ptr::null_mut();
            // SAFETY: a live family, labels that live through the call (the server copies
            // them), a valid out-pointer.
            result = unsafe {
                check(
                    "TRITONSERVER_MetricNew",
                    sys::TRITONSERVER_MetricNew(
                        &mut h,
                        families[m.index()],
                        labels.as_ptr().cast_mut(),
                        labels.len() as u64,
                    ),
                )
            };
            if result.is_err() {
                break;
            }
            me.handles[m.index()] = h;
        }
        for p in labels {
            // SAFETY: parameters made by `label`, deleted once.
            unsafe { sys::TRITONSERVER_ParameterDelete(p.cast_mut()) };
        }
        // On error `me` is dropped: it deletes what was made and releases the families.
        result.map(|()| me)
    }

    /// Adds `delta` to a gauge, or to a counter when `delta` is positive.
    pub fn add(&self, m: Metric, delta: f64) {
        if delta == 0.0 || (m.is_counter() && delta < 0.0) {
            return;
        }
        // SAFETY: a live metric of this object.
        let r = unsafe {
            check(
                "TRITONSERVER_MetricIncrement",
                sys::TRITONSERVER_MetricIncrement(self.handles[m.index()], delta),
            )
        };
        if let Err(e) = r {
            tracing::debug!(metric = m.name(), error = %e.chain(), "metric update failed");
        }
    }

    /// Sets a gauge.
    pub fn set(&self, m: Metric, value: f64) {
        // SAFETY: a live metric of this object.
        let r = unsafe {
            check(
                "TRITONSERVER_MetricSet",
                sys::TRITONSERVER_MetricSet(self.handles[m.index()], value),
            )
        };
        if let Err(e) = r {
            tracing::debug!(metric = m.name(), error = %e.chain(), "metric update failed");
        }
    }
}

impl Drop for ModelMetrics {
    fn drop(&mut self) {
        for &h in self.handles.iter().filter(|h| !h.is_null()) {
            // SAFETY: a metric this object created, deleted once, before its family.
            let r = unsafe {
                check(
                    "TRITONSERVER_MetricDelete",
                    sys::TRITONSERVER_MetricDelete(h),
                )
            };
            if let Err(e) = r {
                tracing::warn!(error = %e.chain(), "deleting a metric failed");
            }
        }
        release_families();
    }
}

/// What one instance holds at a moment, in the engine's current units (KV in tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Snapshot {
    /// Sequences generating.
    pub active: u64,
    /// Requests received, not generating yet.
    pub queued: u64,
    /// KV cache capacity, tokens.
    pub kv_capacity: u64,
    /// KV cache in use, tokens.
    pub kv_used: u64,
    /// Prompt tokens prefilled since the engine started.
    pub prompt_tokens: u64,
    /// Tokens generated since the engine started.
    pub generated_tokens: u64,
}

/// One instance's share of its model's metrics: [`publish`](Self::publish) sends the change
/// since the last call, so the instances of a model add up; dropping it takes its gauges back
/// out (its counted tokens stay counted).
pub(super) struct InstanceMetrics {
    metrics: Arc<ModelMetrics>,
    last: Snapshot,
}

impl InstanceMetrics {
    /// A share that has published nothing yet.
    pub fn new(metrics: Arc<ModelMetrics>) -> Self {
        Self {
            metrics,
            last: Snapshot::default(),
        }
    }

    /// Publishes `now`. Counters that went down (a rebuilt engine starts from zero) count
    /// from zero again.
    pub fn publish(&mut self, now: Snapshot) {
        if now == self.last {
            return;
        }
        let gauge = |m, new: u64, old: u64| self.metrics.add(m, new as f64 - old as f64);
        gauge(Metric::ActiveSequences, now.active, self.last.active);
        gauge(Metric::QueuedSequences, now.queued, self.last.queued);
        gauge(
            Metric::KvCapacityTokens,
            now.kv_capacity,
            self.last.kv_capacity,
        );
        gauge(Metric::KvUsedTokens, now.kv_used, self.last.kv_used);
        let counter = |new: u64, old: u64| if new >= old { new - old } else { new };
        self.metrics.add(
            Metric::PromptTokens,
            counter(now.prompt_tokens, self.last.prompt_tokens) as f64,
        );
        self.metrics.add(
            Metric::GeneratedTokens,
            counter(now.generated_tokens, self.last.generated_tokens) as f64,
        );
        self.last = now;
    }
}

impl Drop for InstanceMetrics {
    fn drop(&mut self) {
        let counters = Snapshot {
            prompt_tokens: self.last.prompt_tokens,
            generated_tokens: self.last.generated_tokens,
            ..Snapshot::default()
        };
        self.publish(counters);
    }
}
