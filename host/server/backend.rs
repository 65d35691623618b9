//! The backend, its memory manager, the model and its instances (statistics included).

// Signatures are fixed by the headers; the safety contract of every function is the header's.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

use super::*;

// ===== TRITONBACKEND_*: version, backend ==================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ApiVersion(
    major: *mut u32,
    minor: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ApiVersion";
    api(F, |l| {
        let (a, b) = l.opts.api_version;
        put(l, F, major, a)?;
        put(l, F, minor, b)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendName(
    backend: *mut TRITONBACKEND_Backend,
    name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendName";
    api(F, |l| {
        let p = l.backend_name(F, h(backend))?;
        put(l, F, name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendConfig(
    backend: *mut TRITONBACKEND_Backend,
    backend_config: *mut *mut TRITONSERVER_Message,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendConfig";
    api(F, |l| {
        let m = l.backend_config(F, h(backend))?;
        put(l, F, backend_config, m as *mut TRITONSERVER_Message)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendExecutionPolicy(
    backend: *mut TRITONBACKEND_Backend,
    policy: *mut TRITONBACKEND_ExecutionPolicy,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendExecutionPolicy";
    api(F, |l| {
        let p = l.backend_policy(F, h(backend))?;
        put(l, F, policy, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendSetExecutionPolicy(
    backend: *mut TRITONBACKEND_Backend,
    policy: TRITONBACKEND_ExecutionPolicy,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendSetExecutionPolicy";
    api(F, |l| l.backend_set_policy(F, h(backend), policy))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendArtifacts(
    backend: *mut TRITONBACKEND_Backend,
    artifact_type: *mut TRITONBACKEND_ArtifactType,
    location: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendArtifacts";
    api(F, |l| {
        let p = l.backend_artifacts(F, h(backend))?;
        put(l, F, artifact_type, TRITONBACKEND_ARTIFACT_FILESYSTEM)?;
        put(l, F, location, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendMemoryManager(
    backend: *mut TRITONBACKEND_Backend,
    manager: *mut *mut TRITONBACKEND_MemoryManager,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendMemoryManager";
    api(F, |l| {
        l.backend_check(F, h(backend))?;
        put(
            l,
            F,
            manager,
            handle(Kind::MemoryManager, 0) as *mut TRITONBACKEND_MemoryManager,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendState(
    backend: *mut TRITONBACKEND_Backend,
    state: *mut *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendState";
    api(F, |l| {
        let s = l.state_of(F, Kind::Backend, h(backend))?;
        put(l, F, state, s as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendSetState(
    backend: *mut TRITONBACKEND_Backend,
    state: *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendSetState";
    api(F, |l| {
        l.set_state_of(F, Kind::Backend, h(backend), state as usize)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendAttributeAddPreferredInstanceGroup(
    backend_attributes: *mut TRITONBACKEND_BackendAttribute,
    kind: TRITONSERVER_InstanceGroupKind,
    count: u64,
    device_ids: *const u64,
    id_count: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendAttributeAddPreferredInstanceGroup";
    api(F, |l| {
        l.backend_attribute(F, h(backend_attributes))?;
        let ids = if device_ids.is_null() {
            vec![]
        } else {
            // SAFETY: `id_count` ids at `device_ids` (header contract).
            unsafe { std::slice::from_raw_parts(device_ids, id_count as usize) }.to_vec()
        };
        l.add_preferred_group(kind, count, ids);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_BackendAttributeSetParallelModelInstanceLoading(
    backend_attributes: *mut TRITONBACKEND_BackendAttribute,
    enabled: bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_BackendAttributeSetParallelModelInstanceLoading";
    api(F, |l| {
        l.backend_attribute(F, h(backend_attributes))?;
        l.set_parallel_loading(enabled);
        Ok(())
    })
}

// ===== memory manager ===================================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_MemoryManagerAllocate(
    manager: *mut TRITONBACKEND_MemoryManager,
    buffer: *mut *mut c_void,
    memory_type: TRITONSERVER_MemoryType,
    _memory_type_id: i64,
    byte_size: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_MemoryManagerAllocate";
    api(F, |l| {
        if crate::ledger::decode(h(manager)) != Some((Kind::MemoryManager, 0)) {
            return Err(Fail {
                code: code::INVALID_ARG,
                msg: "not the memory manager".into(),
            });
        }
        let p = l.alloc(F, memory_type, byte_size)?;
        put(l, F, buffer, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_MemoryManagerFree(
    _manager: *mut TRITONBACKEND_MemoryManager,
    buffer: *mut c_void,
    memory_type: TRITONSERVER_MemoryType,
    _memory_type_id: i64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_MemoryManagerFree";
    api(F, |l| l.free(F, buffer as usize, memory_type))
}

// ===== model ============================================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelName(
    model: *mut TRITONBACKEND_Model,
    name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelName";
    api(F, |l| {
        let p = l.model_name(F, h(model))?;
        put(l, F, name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelVersion(
    model: *mut TRITONBACKEND_Model,
    version: *mut u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelVersion";
    api(F, |l| {
        let v = l.model_version(F, h(model))?;
        put(l, F, version, v)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelRepository(
    model: *mut TRITONBACKEND_Model,
    artifact_type: *mut TRITONBACKEND_ArtifactType,
    location: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelRepository";
    api(F, |l| {
        let p = l.model_repository(F, h(model))?;
        put(l, F, artifact_type, TRITONBACKEND_ARTIFACT_FILESYSTEM)?;
        put(l, F, location, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelConfig(
    model: *mut TRITONBACKEND_Model,
    config_version: u32,
    model_config: *mut *mut TRITONSERVER_Message,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelConfig";
    api(F, |l| {
        if model_config.is_null() {
            return put(l, F, model_config, ptr::null_mut());
        }
        let m = l.model_config(F, h(model), config_version)?;
        put(l, F, model_config, m as *mut TRITONSERVER_Message)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelAutoCompleteConfig(
    model: *mut TRITONBACKEND_Model,
    auto_complete_config: *mut bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelAutoCompleteConfig";
    api(F, |l| {
        l.model_check(F, h(model))?;
        put(l, F, auto_complete_config, true)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelSetConfig(
    model: *mut TRITONBACKEND_Model,
    config_version: u32,
    model_config: *mut TRITONSERVER_Message,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelSetConfig";
    api(F, |l| {
        l.model_set_config(F, h(model), config_version, h(model_config))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelServer(
    model: *mut TRITONBACKEND_Model,
    server: *mut *mut TRITONSERVER_Server,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelServer";
    api(F, |l| {
        l.model_check(F, h(model))?;
        put(
            l,
            F,
            server,
            handle(Kind::Server, 0) as *mut TRITONSERVER_Server,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelBackend(
    model: *mut TRITONBACKEND_Model,
    backend: *mut *mut TRITONBACKEND_Backend,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelBackend";
    api(F, |l| {
        l.model_check(F, h(model))?;
        put(
            l,
            F,
            backend,
            handle(Kind::Backend, 0) as *mut TRITONBACKEND_Backend,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelState(
    model: *mut TRITONBACKEND_Model,
    state: *mut *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelState";
    api(F, |l| {
        let s = l.state_of(F, Kind::Model, h(model))?;
        put(l, F, state, s as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelSetState(
    model: *mut TRITONBACKEND_Model,
    state: *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelSetState";
    api(F, |l| {
        l.set_state_of(F, Kind::Model, h(model), state as usize)
    })
}

fn attrs_list(usage: *mut *mut TRITONSERVER_BufferAttributes, n: u32) -> Vec<usize> {
    if usage.is_null() {
        return vec![];
    }
    // SAFETY: `n` handles at `usage` (header contract).
    unsafe { std::slice::from_raw_parts(usage, n as usize) }
        .iter()
        .map(|&p| p as usize)
        .collect()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelReportMemoryUsage(
    model: *mut TRITONBACKEND_Model,
    usage: *mut *mut TRITONSERVER_BufferAttributes,
    usage_size: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelReportMemoryUsage";
    api(F, |l| {
        l.model_check(F, h(model))?;
        l.report_memory_usage(F, attrs_list(usage, usage_size))
    })
}

// ===== model instance ===================================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceName(
    instance: *mut TRITONBACKEND_ModelInstance,
    name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceName";
    api(F, |l| {
        let p = l.instance_name_ptr(F, h(instance))?;
        put(l, F, name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceKind(
    instance: *mut TRITONBACKEND_ModelInstance,
    kind: *mut TRITONSERVER_InstanceGroupKind,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceKind";
    api(F, |l| {
        let k = l.instance_kind(F, h(instance))?;
        put(l, F, kind, k)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceDeviceId(
    instance: *mut TRITONBACKEND_ModelInstance,
    device_id: *mut i32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceDeviceId";
    api(F, |l| {
        let d = l.instance_device(F, h(instance))?;
        put(l, F, device_id, d)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceHostPolicy(
    instance: *mut TRITONBACKEND_ModelInstance,
    host_policy: *mut *mut TRITONSERVER_Message,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceHostPolicy";
    api(F, |l| {
        let m = l.instance_host_policy(F, h(instance))?;
        put(l, F, host_policy, m as *mut TRITONSERVER_Message)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceIsPassive(
    instance: *mut TRITONBACKEND_ModelInstance,
    is_passive: *mut bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceIsPassive";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        put(l, F, is_passive, false)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceProfileCount(
    instance: *mut TRITONBACKEND_ModelInstance,
    count: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceProfileCount";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        put(l, F, count, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceProfileName(
    instance: *mut TRITONBACKEND_ModelInstance,
    index: u32,
    profile_name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceProfileName";
    api(F, |l| {
        let p = l.instance_profile(F, h(instance), index)?;
        put(l, F, profile_name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceSecondaryDeviceCount(
    instance: *mut TRITONBACKEND_ModelInstance,
    count: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceSecondaryDeviceCount";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        put(l, F, count, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceSecondaryDeviceProperties(
    instance: *mut TRITONBACKEND_ModelInstance,
    index: u32,
    _kind: *mut *const c_char,
    _id: *mut i64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceSecondaryDeviceProperties";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        Err(Fail {
            code: code::INVALID_ARG,
            msg: format!("out of bounds index {index}: instance has 0 secondary devices"),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceModel(
    instance: *mut TRITONBACKEND_ModelInstance,
    model: *mut *mut TRITONBACKEND_Model,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceModel";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        put(
            l,
            F,
            model,
            handle(Kind::Model, 0) as *mut TRITONBACKEND_Model,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceState(
    instance: *mut TRITONBACKEND_ModelInstance,
    state: *mut *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceState";
    api(F, |l| {
        let s = l.state_of(F, Kind::Instance, h(instance))?;
        put(l, F, state, s as *mut c_void)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceSetState(
    instance: *mut TRITONBACKEND_ModelInstance,
    state: *mut c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceSetState";
    api(F, |l| {
        l.set_state_of(F, Kind::Instance, h(instance), state as usize)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportMemoryUsage(
    instance: *mut TRITONBACKEND_ModelInstance,
    usage: *mut *mut TRITONSERVER_BufferAttributes,
    usage_size: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceReportMemoryUsage";
    api(F, |l| {
        l.instance_index(F, h(instance))?;
        l.report_memory_usage(F, attrs_list(usage, usage_size))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportStatistics(
    instance: *mut TRITONBACKEND_ModelInstance,
    request: *mut TRITONBACKEND_Request,
    success: bool,
    exec_start_ns: u64,
    compute_start_ns: u64,
    compute_end_ns: u64,
    exec_end_ns: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceReportStatistics";
    api(F, |l| {
        l.report_statistics(
            F,
            h(instance),
            h(request),
            success,
            [exec_start_ns, compute_start_ns, compute_end_ns, exec_end_ns],
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportBatchStatistics(
    instance: *mut TRITONBACKEND_ModelInstance,
    batch_size: u64,
    exec_start_ns: u64,
    compute_start_ns: u64,
    compute_end_ns: u64,
    exec_end_ns: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceReportBatchStatistics";
    api(F, |l| {
        l.report_batch_statistics(
            F,
            h(instance),
            batch_size,
            [exec_start_ns, compute_start_ns, compute_end_ns, exec_end_ns],
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsNew(
    response_statistics: *mut *mut TRITONBACKEND_ModelInstanceResponseStatistics,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsNew";
    api(F, |l| {
        if response_statistics.is_null() {
            return put(l, F, response_statistics, ptr::null_mut());
        }
        let s = l.resp_stats_new();
        put(
            l,
            F,
            response_statistics,
            s as *mut TRITONBACKEND_ModelInstanceResponseStatistics,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsDelete(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsDelete";
    api(F, |l| l.resp_stats_delete(F, h(response_statistics)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetModelInstance(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    model_instance: *mut TRITONBACKEND_ModelInstance,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetModelInstance";
    api(F, |l| {
        l.resp_stats_set_instance(F, h(response_statistics), h(model_instance))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseFactory(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    response_factory: *mut TRITONBACKEND_ResponseFactory,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseFactory";
    api(F, |l| {
        l.resp_stats_set_factory(F, h(response_statistics), h(response_factory))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseStart(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    response_start: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseStart";
    api(F, |l| {
        l.resp_stats_set_time(F, h(response_statistics), 0, response_start)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetComputeOutputStart(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    compute_output_start: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetComputeOutputStart";
    api(F, |l| {
        l.resp_stats_set_time(F, h(response_statistics), 1, compute_output_start)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseEnd(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    response_end: u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetResponseEnd";
    api(F, |l| {
        l.resp_stats_set_time(F, h(response_statistics), 2, response_end)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceResponseStatisticsSetError(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
    error: *mut TRITONSERVER_Error,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceResponseStatisticsSetError";
    api(F, |l| {
        l.resp_stats_set_error(F, h(response_statistics), h(error))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceReportResponseStatistics(
    response_statistics: *mut TRITONBACKEND_ModelInstanceResponseStatistics,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ModelInstanceReportResponseStatistics";
    api(F, |l| l.resp_stats_report(F, h(response_statistics)))
}
