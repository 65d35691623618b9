//! `TRITONSERVER_Parameter*` and the custom-metrics API (`TRITONSERVER_Metric*`).

// Signatures are fixed by the headers; the safety contract of every function is the header's.
#![allow(clippy::missing_safety_doc)]

use super::*;

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterNew(
    name: *const c_char,
    type_: TRITONSERVER_ParameterType,
    value: *const c_void,
) -> *mut TRITONSERVER_Parameter {
    const F: &str = "TRITONSERVER_ParameterNew";
    guarded(
        F,
        |l| {
            let Ok(n) = string(l, F, name, "name") else {
                return ptr::null_mut();
            };
            if value.is_null() {
                l.violation("null-argument", format!("{F}: null value for '{n}'"));
                return ptr::null_mut();
            }
            // SAFETY: `value` points to a value of `type_` (header contract); the object keeps
            // its own copy.
            let v = unsafe {
                match type_ {
                    TRITONSERVER_PARAMETER_STRING => {
                        json!(CStr::from_ptr(value.cast()).to_string_lossy())
                    }
                    TRITONSERVER_PARAMETER_INT => json!(value.cast::<i64>().read_unaligned()),
                    TRITONSERVER_PARAMETER_BOOL => json!(value.cast::<bool>().read()),
                    TRITONSERVER_PARAMETER_DOUBLE => json!(value.cast::<f64>().read_unaligned()),
                    // BYTES needs TRITONSERVER_ParameterBytesNew: null, as the header says.
                    _ => return ptr::null_mut(),
                }
            };
            l.parameter_new(n, v) as *mut TRITONSERVER_Parameter
        },
        |_| ptr::null_mut(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterBytesNew(
    name: *const c_char,
    _byte_ptr: *const c_void,
    size: u64,
) -> *mut TRITONSERVER_Parameter {
    const F: &str = "TRITONSERVER_ParameterBytesNew";
    guarded(
        F,
        |l| {
            let Ok(n) = string(l, F, name, "name") else {
                return ptr::null_mut();
            };
            // A shallow copy in Triton: only the size is recorded here.
            l.parameter_new(n, json!({ "bytes": size })) as *mut TRITONSERVER_Parameter
        },
        |_| ptr::null_mut(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterDelete(parameter: *mut TRITONSERVER_Parameter) {
    const F: &str = "TRITONSERVER_ParameterDelete";
    guarded(F, |l| l.parameter_delete(F, h(parameter)), |_| ())
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricFamilyNew(
    family: *mut *mut TRITONSERVER_MetricFamily,
    kind: TRITONSERVER_MetricKind,
    name: *const c_char,
    description: *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricFamilyNew";
    api(F, |l| {
        let n = string(l, F, name, "name")?;
        string(l, F, description, "description")?;
        if family.is_null() {
            return put(l, F, family, ptr::null_mut());
        }
        let f = l.family_new(kind, n)?;
        put(l, F, family, f as *mut TRITONSERVER_MetricFamily)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricFamilyDelete(
    family: *mut TRITONSERVER_MetricFamily,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricFamilyDelete";
    api(F, |l| l.family_delete(F, h(family)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_GetMetricFamilyKind(
    family: *mut TRITONSERVER_MetricFamily,
    kind: *mut TRITONSERVER_MetricKind,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_GetMetricFamilyKind";
    api(F, |l| {
        let k = l.family_kind(F, h(family))?;
        put(l, F, kind, k)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricArgsNew(
    args: *mut *mut TRITONSERVER_MetricArgs,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricArgsNew";
    api(F, |l| {
        if args.is_null() {
            return put(l, F, args, ptr::null_mut());
        }
        let a = l.args_new();
        put(l, F, args, a as *mut TRITONSERVER_MetricArgs)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricArgsSetHistogram(
    args: *mut TRITONSERVER_MetricArgs,
    buckets: *const f64,
    buckets_count: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricArgsSetHistogram";
    api(F, |l| {
        let b = if buckets.is_null() || buckets_count == 0 {
            vec![]
        } else {
            // SAFETY: `buckets_count` doubles at `buckets` (header contract).
            unsafe { std::slice::from_raw_parts(buckets, buckets_count as usize) }.to_vec()
        };
        l.args_set_histogram(F, h(args), b)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricArgsDelete(
    args: *mut TRITONSERVER_MetricArgs,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricArgsDelete";
    api(F, |l| l.args_delete(F, h(args)))
}

fn metric_new(
    func: &'static str,
    metric: *mut *mut TRITONSERVER_Metric,
    family: *mut TRITONSERVER_MetricFamily,
    labels: *mut *const TRITONSERVER_Parameter,
    label_count: u64,
    args: usize,
) -> *mut TRITONSERVER_Error {
    api(func, |l| {
        let ls: Vec<usize> = if labels.is_null() || label_count == 0 {
            vec![]
        } else {
            // SAFETY: `label_count` parameter handles at `labels` (header contract).
            unsafe { std::slice::from_raw_parts(labels, label_count as usize) }
                .iter()
                .map(|&p| p as usize)
                .collect()
        };
        if metric.is_null() {
            return put(l, func, metric, ptr::null_mut());
        }
        let m = l.metric_new(func, h(family), ls, args)?;
        put(l, func, metric, m as *mut TRITONSERVER_Metric)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricNew(
    metric: *mut *mut TRITONSERVER_Metric,
    family: *mut TRITONSERVER_MetricFamily,
    labels: *mut *const TRITONSERVER_Parameter,
    label_count: u64,
) -> *mut TRITONSERVER_Error {
    metric_new(
        "TRITONSERVER_MetricNew",
        metric,
        family,
        labels,
        label_count,
        0,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricNewWithArgs(
    metric: *mut *mut TRITONSERVER_Metric,
    family: *mut TRITONSERVER_MetricFamily,
    labels: *mut *const TRITONSERVER_Parameter,
    label_count: u64,
    args: *const TRITONSERVER_MetricArgs,
) -> *mut TRITONSERVER_Error {
    metric_new(
        "TRITONSERVER_MetricNewWithArgs",
        metric,
        family,
        labels,
        label_count,
        args as usize,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricDelete(
    metric: *mut TRITONSERVER_Metric,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricDelete";
    api(F, |l| l.metric_delete(F, h(metric)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricValue(
    metric: *mut TRITONSERVER_Metric,
    value: *mut f64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricValue";
    api(F, |l| {
        let v = l.metric_op(F, h(metric), 0, 0.0)?;
        put(l, F, value, v)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricIncrement(
    metric: *mut TRITONSERVER_Metric,
    value: f64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricIncrement";
    api(F, |l| l.metric_op(F, h(metric), 1, value).map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricSet(
    metric: *mut TRITONSERVER_Metric,
    value: f64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricSet";
    api(F, |l| l.metric_op(F, h(metric), 2, value).map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MetricObserve(
    metric: *mut TRITONSERVER_Metric,
    value: f64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MetricObserve";
    api(F, |l| l.metric_op(F, h(metric), 3, value).map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_GetMetricKind(
    metric: *mut TRITONSERVER_Metric,
    kind: *mut TRITONSERVER_MetricKind,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_GetMetricKind";
    api(F, |l| {
        let k = l.metric_kind(F, h(metric))?;
        put(l, F, kind, k)
    })
}
