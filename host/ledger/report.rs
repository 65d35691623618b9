//! The end of a run: whether every request is answered, the checks that nothing is left once
//! everything is finalized, and the report.

#![allow(clippy::wildcard_imports)]

use super::*;

impl Ledger {
    // ----- end of run ------------------------------------------------------------------------

    /// Whether every request that was submitted has its FINAL.
    pub fn all_final(&self) -> bool {
        self.requests
            .iter()
            .all(|r| r.state == ReqState::NotSubmitted || r.finals > 0)
    }

    /// Requests given to the backend still without a FINAL.
    pub fn unfinished(&self) -> Vec<usize> {
        (0..self.requests.len())
            .filter(|&r| {
                matches!(
                    self.requests[r].state,
                    ReqState::InBackend | ReqState::Released
                ) && self.requests[r].finals == 0
            })
            .collect()
    }

    /// What must hold once everything is finalized: nothing left.
    pub fn final_checks(&mut self) {
        for r in 0..self.requests.len() {
            let label = self.request_label(r);
            let st = self.requests[r].state.clone();
            if matches!(st, ReqState::InBackend | ReqState::Released)
                && self.requests[r].finals == 0
            {
                self.violation(
                    "missing-final",
                    format!(
                        "{label} never got a response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL"
                    ),
                );
            }
            if st == ReqState::InBackend {
                self.violation(
                    "unreleased-request",
                    format!("{label} was never released (TRITONBACKEND_RequestRelease)"),
                );
            }
            if !self.config.decoupled && matches!(st, ReqState::InBackend | ReqState::Released) {
                let n = self.requests[r].responses.len();
                if n != 1 {
                    self.violation(
                        "non-decoupled",
                        format!("{label} got {n} responses; a model that is not decoupled sends exactly one"),
                    );
                }
            }
        }
        for f in 0..self.factories.len() {
            if !self.factories[f].deleted {
                let what = format!(
                    "the response factory of {} was never deleted (TRITONBACKEND_ResponseFactoryDelete)",
                    self.request_label(self.factories[f].request)
                );
                self.violation("leaked-factory", what);
            }
        }
        for i in 0..self.responses.len() {
            if self.responses[i].state == RespState::Building {
                let what = format!("{} was neither sent nor deleted", self.response_label(i));
                self.violation("leaked-response", what);
            }
        }
        for e in 0..self.errors.len() {
            if self.errors[e].state == ErrState::Live {
                let what = format!(
                    "{} was never deleted (TRITONSERVER_ErrorDelete)",
                    self.error_label(e)
                );
                self.violation("leaked-error", what);
            }
        }
        for m in 0..self.messages.len() {
            if self.messages[m].owner == MsgOwner::Backend && !self.messages[m].deleted {
                let what = format!(
                    "the {} was never deleted (TRITONSERVER_MessageDelete)",
                    self.messages[m].what
                );
                self.violation("leaked-message", what);
            }
        }
        for a in 0..self.allocs.len() {
            if !self.allocs[a].freed {
                let what = format!(
                    "memory-manager allocation #{} ({} bytes) was never freed",
                    a + 1,
                    self.allocs[a].buf.len()
                );
                self.violation("leaked-allocation", what);
            }
        }
        if self.resp_stats.iter().any(|s| !s.deleted) {
            self.violation(
                "leaked-response-statistics",
                "response statistics objects were never deleted",
            );
        }
        self.metric_leaks();
        if self
            .attrs
            .iter()
            .any(|a| a.owner == AttrOwner::Backend && !a.deleted)
        {
            self.violation(
                "leaked-buffer-attributes",
                "buffer attributes made by TRITONSERVER_BufferAttributesNew were never deleted",
            );
        }
    }

    /// The report (see docs/test-host.md).
    pub fn report(&self) -> Json {
        let requests: Vec<Json> = self
            .requests
            .iter()
            .map(|r| {
                let state = match r.state {
                    ReqState::NotSubmitted => "not-submitted",
                    ReqState::Rejected => "answered-by-host",
                    ReqState::InBackend => "held-by-backend",
                    ReqState::HostOwned => "execute-failed",
                    ReqState::Released => "released",
                };
                json!({
                    "id": r.spec.id,
                    "state": state,
                    "submitted_ms": r.submitted_ms,
                    "responses": r.responses,
                    "final_count": r.finals,
                    "text_output": String::from_utf8_lossy(&r.text),
                    "text_output_utf8": std::str::from_utf8(&r.text).is_ok(),
                    "released": r.state == ReqState::Released,
                    "cancelled": r.cancelled,
                    "statistics": r.stats,
                    "factories": r.factories.len(),
                })
            })
            .collect();
        let instances: Vec<Json> = self
            .instances
            .iter()
            .map(|i| {
                json!({"name": i.spec.name, "kind": i.spec.kind, "device_id": i.spec.device_id,
                       "life": format!("{:?}", i.e.life)})
            })
            .collect();
        json!({
            "model": self.config.name,
            "version": self.opts.version,
            "backend_config": serde_json::from_slice::<Json>(
                self.messages[self.backend_config].json.as_bytes()
            )
            .unwrap_or(Json::Null),
            "execution_policy": self.exec_policy,
            "preferred_instance_groups": self.preferred_groups,
            "parallel_instance_loading": self.parallel_instance_loading,
            "instances": instances,
            "entry_errors": self.entry_errors,
            "executes": self.executes,
            "requests": requests,
            "total_responses": self.total_responses,
            "batch_statistics": self.batch_stats,
            "response_statistics": self.reported_resp_stats,
            "memory_usage": self.memory_usage,
            "metrics": self.metrics_report(),
            "logs": self.logs,
            "warnings": self.warnings,
            "violations": self.violations,
        })
    }
}
