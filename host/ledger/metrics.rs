//! Custom metrics and the parameter objects that label them (`TRITONSERVER_Parameter*`,
//! `TRITONSERVER_MetricFamily*`, `TRITONSERVER_Metric*`, `TRITONSERVER_MetricArgs*`): the
//! backend owns every one it creates and must delete it (a metric before its family).

#![allow(clippy::wildcard_imports)]

use super::*;

/// A `TRITONSERVER_Parameter` the backend made.
pub(crate) struct ParameterObj {
    pub(crate) name: String,
    pub(crate) value: Json,
    pub(crate) deleted: bool,
}

pub(crate) struct FamilyObj {
    pub(crate) kind: u32,
    pub(crate) name: String,
    pub(crate) deleted: bool,
}

pub(crate) struct MetricObj {
    pub(crate) family: usize,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
    pub(crate) buckets: Vec<f64>,
    pub(crate) observations: u64,
    pub(crate) deleted: bool,
}

pub(crate) struct ArgsObj {
    pub(crate) buckets: Option<Vec<f64>>,
    pub(crate) deleted: bool,
}

const KIND_NAMES: [&str; 3] = ["COUNTER", "GAUGE", "HISTOGRAM"];

impl Ledger {
    /// `TRITONSERVER_ParameterNew` / `ParameterBytesNew`: a parameter the backend must delete.
    pub fn parameter_new(&mut self, name: String, value: Json) -> usize {
        self.parameters.push(ParameterObj {
            name,
            value,
            deleted: false,
        });
        handle(Kind::Parameter, self.parameters.len() - 1)
    }

    pub(crate) fn live_parameter(&mut self, func: &str, h: usize) -> R<usize> {
        let p = self.index(func, h, Kind::Parameter)?;
        if self.parameters[p].deleted {
            let what = format!(
                "{func} on parameter '{}' after TRITONSERVER_ParameterDelete",
                self.parameters[p].name
            );
            return Err(self.reject("use-after-delete", what));
        }
        Ok(p)
    }

    /// `TRITONSERVER_ParameterDelete`.
    pub fn parameter_delete(&mut self, func: &str, h: usize) {
        if let Ok(p) = self.live_parameter(func, h) {
            self.parameters[p].deleted = true;
        }
    }

    /// `TRITONSERVER_MetricFamilyNew`.
    pub fn family_new(&mut self, kind: u32, name: String) -> R<usize> {
        if kind > 2 {
            return Err(fail(
                code::INVALID_ARG,
                format!("unknown metric kind {kind}"),
            ));
        }
        if name.is_empty() {
            return Err(fail(code::INVALID_ARG, "a metric family needs a name"));
        }
        self.families.push(FamilyObj {
            kind,
            name,
            deleted: false,
        });
        Ok(handle(Kind::MetricFamily, self.families.len() - 1))
    }

    pub(crate) fn live_family(&mut self, func: &str, h: usize) -> R<usize> {
        let f = self.index(func, h, Kind::MetricFamily)?;
        if self.families[f].deleted {
            let what = format!(
                "{func} on metric family '{}' after TRITONSERVER_MetricFamilyDelete",
                self.families[f].name
            );
            return Err(self.reject("use-after-delete", what));
        }
        Ok(f)
    }

    /// `TRITONSERVER_MetricFamilyDelete`: only once its metrics are deleted.
    pub fn family_delete(&mut self, func: &str, h: usize) -> R<()> {
        let f = self.live_family(func, h)?;
        let live = self
            .metrics
            .iter()
            .filter(|m| m.family == f && !m.deleted)
            .count();
        if live > 0 {
            let what = format!(
                "{func} on metric family '{}' while {live} of its metrics are alive (delete \
                 the metrics first)",
                self.families[f].name
            );
            return Err(self.reject("metric-order", what));
        }
        self.families[f].deleted = true;
        Ok(())
    }

    /// `TRITONSERVER_GetMetricFamilyKind`.
    pub fn family_kind(&mut self, func: &str, h: usize) -> R<u32> {
        let f = self.live_family(func, h)?;
        Ok(self.families[f].kind)
    }

    /// `TRITONSERVER_MetricArgsNew`.
    pub fn args_new(&mut self) -> usize {
        self.metric_args.push(ArgsObj {
            buckets: None,
            deleted: false,
        });
        handle(Kind::MetricArgs, self.metric_args.len() - 1)
    }

    pub(crate) fn live_args(&mut self, func: &str, h: usize) -> R<usize> {
        let a = self.index(func, h, Kind::MetricArgs)?;
        if self.metric_args[a].deleted {
            return Err(self.reject(
                "use-after-delete",
                format!("{func} on metric args after TRITONSERVER_MetricArgsDelete"),
            ));
        }
        Ok(a)
    }

    /// `TRITONSERVER_MetricArgsSetHistogram`.
    pub fn args_set_histogram(&mut self, func: &str, h: usize, buckets: Vec<f64>) -> R<()> {
        let a = self.live_args(func, h)?;
        self.metric_args[a].buckets = Some(buckets);
        Ok(())
    }

    /// `TRITONSERVER_MetricArgsDelete`.
    pub fn args_delete(&mut self, func: &str, h: usize) -> R<()> {
        let a = self.live_args(func, h)?;
        self.metric_args[a].deleted = true;
        Ok(())
    }

    /// `TRITONSERVER_MetricNew[WithArgs]`: labels must be live string parameters; a histogram
    /// needs args with buckets.
    pub fn metric_new(
        &mut self,
        func: &str,
        family: usize,
        labels: Vec<usize>,
        args: usize,
    ) -> R<usize> {
        let f = self.live_family(func, family)?;
        let mut map = BTreeMap::new();
        for l in labels {
            let p = self.live_parameter(func, l)?;
            let param = &self.parameters[p];
            let Json::String(v) = &param.value else {
                return Err(fail(
                    code::INVALID_ARG,
                    format!("metric label '{}' is not a string parameter", param.name),
                ));
            };
            map.insert(param.name.clone(), v.clone());
        }
        let buckets = if args == 0 {
            None
        } else {
            let a = self.live_args(func, args)?;
            self.metric_args[a].buckets.clone()
        };
        let kind = self.families[f].kind;
        let buckets = match (kind, buckets) {
            (2, Some(b)) => b,
            (2, None) => {
                return Err(fail(
                    code::INVALID_ARG,
                    "a histogram metric needs TRITONSERVER_MetricArgsSetHistogram buckets",
                ))
            }
            (_, Some(_)) => {
                return Err(fail(
                    code::INVALID_ARG,
                    "histogram buckets given for a metric that is not a histogram",
                ))
            }
            (_, None) => vec![],
        };
        self.metrics.push(MetricObj {
            family: f,
            labels: map,
            value: 0.0,
            buckets,
            observations: 0,
            deleted: false,
        });
        Ok(handle(Kind::Metric, self.metrics.len() - 1))
    }

    pub(crate) fn live_metric(&mut self, func: &str, h: usize) -> R<usize> {
        let m = self.index(func, h, Kind::Metric)?;
        if self.metrics[m].deleted {
            let what = format!(
                "{func} on a metric of family '{}' after TRITONSERVER_MetricDelete",
                self.families[self.metrics[m].family].name
            );
            return Err(self.reject("use-after-delete", what));
        }
        Ok(m)
    }

    /// `TRITONSERVER_MetricDelete`: before its family.
    pub fn metric_delete(&mut self, func: &str, h: usize) -> R<()> {
        let m = self.live_metric(func, h)?;
        let f = self.metrics[m].family;
        if self.families[f].deleted {
            let what = format!(
                "{func}: the family '{}' of this metric was deleted first",
                self.families[f].name
            );
            return Err(self.reject("metric-order", what));
        }
        self.metrics[m].deleted = true;
        Ok(())
    }

    /// `TRITONSERVER_GetMetricKind`.
    pub fn metric_kind(&mut self, func: &str, h: usize) -> R<u32> {
        let m = self.live_metric(func, h)?;
        Ok(self.families[self.metrics[m].family].kind)
    }

    /// `TRITONSERVER_MetricValue` (0), `MetricIncrement` (1), `MetricSet` (2),
    /// `MetricObserve` (3), with the kinds each supports.
    pub fn metric_op(&mut self, func: &str, h: usize, op: u8, v: f64) -> R<f64> {
        let m = self.live_metric(func, h)?;
        let kind = self.families[self.metrics[m].family].kind;
        let unsupported = || {
            fail(
                code::UNSUPPORTED,
                format!(
                    "{func} is not supported for a {} metric",
                    KIND_NAMES[kind as usize]
                ),
            )
        };
        let metric = &mut self.metrics[m];
        match (op, kind) {
            (0, 0 | 1) => {}
            (1, 0) if v < 0.0 => {
                return Err(fail(
                    code::INVALID_ARG,
                    "a counter can only be incremented by a non-negative value",
                ))
            }
            (1, 0 | 1) => metric.value += v,
            (2, 1) => metric.value = v,
            (3, 2) => {
                metric.value += v;
                metric.observations += 1;
            }
            _ => return Err(unsupported()),
        }
        Ok(metric.value)
    }

    /// The metrics for the report: family, kind, labels, value.
    pub(crate) fn metrics_report(&self) -> Json {
        let list: Vec<Json> = self
            .metrics
            .iter()
            .map(|m| {
                let f = &self.families[m.family];
                let mut j = json!({"family": f.name, "kind": KIND_NAMES[f.kind as usize],
                                   "labels": m.labels, "value": m.value});
                if f.kind == 2 {
                    j["observations"] = json!(m.observations);
                    j["buckets"] = json!(m.buckets);
                }
                j
            })
            .collect();
        Json::Array(list)
    }

    /// Metric objects the backend never deleted.
    pub(crate) fn metric_leaks(&mut self) {
        let mut leaks = vec![];
        for p in &self.parameters {
            if !p.deleted {
                leaks.push((
                    "leaked-parameter",
                    format!(
                        "parameter '{}' was never deleted (TRITONSERVER_ParameterDelete)",
                        p.name
                    ),
                ));
            }
        }
        for m in &self.metrics {
            if !m.deleted {
                let name = &self.families[m.family].name;
                leaks.push((
                    "leaked-metric",
                    format!(
                        "a metric of family '{name}' was never deleted (TRITONSERVER_MetricDelete)"
                    ),
                ));
            }
        }
        for f in &self.families {
            if !f.deleted {
                leaks.push((
                    "leaked-metric",
                    format!(
                        "metric family '{}' was never deleted (TRITONSERVER_MetricFamilyDelete)",
                        f.name
                    ),
                ));
            }
        }
        if self.metric_args.iter().any(|a| !a.deleted) {
            leaks.push((
                "leaked-metric",
                "metric args were never deleted (TRITONSERVER_MetricArgsDelete)".to_string(),
            ));
        }
        for (rule, what) in leaks {
            self.violation(rule, what);
        }
    }
}
