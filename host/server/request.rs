//! Requests, their inputs, response factories, responses and outputs, sequence state.

// Signatures are fixed by the headers; the safety contract of every function is the header's.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

use super::*;

// ===== request ==========================================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestId(
    request: *mut TRITONBACKEND_Request,
    id: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestId";
    api(F, |l| {
        let p = l.request_id(F, h(request))?;
        put(l, F, id, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestIsCancelled(
    request: *mut TRITONBACKEND_Request,
    is_cancelled: *mut bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestIsCancelled";
    api(F, |l| {
        let c = l.request_is_cancelled(F, h(request))?;
        put(l, F, is_cancelled, c)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryIsCancelled(
    factory: *mut TRITONBACKEND_ResponseFactory,
    is_cancelled: *mut bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseFactoryIsCancelled";
    api(F, |l| {
        let c = l.factory_is_cancelled(F, h(factory))?;
        put(l, F, is_cancelled, c)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestCorrelationId(
    request: *mut TRITONBACKEND_Request,
    id: *mut u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestCorrelationId";
    api(F, |l| {
        let c = l.request_correlation_id(F, h(request))?;
        put(l, F, id, c)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InferenceRequestTimeoutMicroseconds(
    request: *mut TRITONBACKEND_Request,
    timeout: *mut u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_InferenceRequestTimeoutMicroseconds";
    api(F, |l| {
        l.request_touch(F, h(request))?;
        put(l, F, timeout, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestCorrelationIdString(
    request: *mut TRITONBACKEND_Request,
    id: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestCorrelationIdString";
    api(F, |l| {
        let p = l.request_correlation_string(F, h(request))?;
        put(l, F, id, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestFlags(
    request: *mut TRITONBACKEND_Request,
    flags: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestFlags";
    api(F, |l| {
        let v = l.request_flags(F, h(request))?;
        put(l, F, flags, v)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestParameterCount(
    request: *mut TRITONBACKEND_Request,
    count: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestParameterCount";
    api(F, |l| {
        let n = l.request_parameter_count(F, h(request))?;
        put(l, F, count, n)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestParameter(
    request: *mut TRITONBACKEND_Request,
    index: u32,
    key: *mut *const c_char,
    type_: *mut TRITONSERVER_ParameterType,
    vvalue: *mut *const c_void,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestParameter";
    api(F, |l| {
        let (k, t, v) = l.request_parameter(F, h(request), index)?;
        put(l, F, key, k)?;
        put(l, F, type_, t)?;
        put(l, F, vvalue, v)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestInputCount(
    request: *mut TRITONBACKEND_Request,
    count: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestInputCount";
    api(F, |l| {
        let n = l.request_input_count(F, h(request))?;
        put(l, F, count, n)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestInputName(
    request: *mut TRITONBACKEND_Request,
    index: u32,
    input_name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestInputName";
    api(F, |l| {
        put_opt(input_name, ptr::null());
        let p = l.request_input_name(F, h(request), index)?;
        put(l, F, input_name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestInput(
    request: *mut TRITONBACKEND_Request,
    name: *const c_char,
    input: *mut *mut TRITONBACKEND_Input,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestInput";
    api(F, |l| {
        put_opt(input, ptr::null_mut());
        let n = string(l, F, name, "input name")?;
        let i = l.request_input(F, h(request), &n)?;
        put(l, F, input, i as *mut TRITONBACKEND_Input)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestInputByIndex(
    request: *mut TRITONBACKEND_Request,
    index: u32,
    input: *mut *mut TRITONBACKEND_Input,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestInputByIndex";
    api(F, |l| {
        let i = l.request_input_by_index(F, h(request), index)?;
        put(
            l,
            F,
            input,
            handle(Kind::Input, i) as *mut TRITONBACKEND_Input,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestOutputCount(
    request: *mut TRITONBACKEND_Request,
    count: *mut u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestOutputCount";
    api(F, |l| {
        let n = l.request_output_count(F, h(request))?;
        put(l, F, count, n)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestOutputName(
    request: *mut TRITONBACKEND_Request,
    index: u32,
    output_name: *mut *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestOutputName";
    api(F, |l| {
        put_opt(output_name, ptr::null());
        let p = l.request_output_name(F, h(request), index)?;
        put(l, F, output_name, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestOutputBufferProperties(
    request: *mut TRITONBACKEND_Request,
    _name: *const c_char,
    _byte_size: *mut usize,
    memory_type: *mut TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestOutputBufferProperties";
    api(F, |l| {
        l.request_touch(F, h(request))?;
        put(l, F, memory_type, TRITONSERVER_MEMORY_CPU)?;
        put(l, F, memory_type_id, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestRelease(
    request: *mut TRITONBACKEND_Request,
    release_flags: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestRelease";
    api(F, |l| l.request_release(F, h(request), release_flags))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_RequestTrace(
    request: *mut TRITONBACKEND_Request,
    trace: *mut *mut TRITONSERVER_InferenceTrace,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_RequestTrace";
    api(F, |l| {
        l.request_touch(F, h(request))?;
        put(l, F, trace, ptr::null_mut())
    })
}

// ===== input ============================================================================

fn input_properties(
    func: &'static str,
    input: *mut TRITONBACKEND_Input,
    name: *mut *const c_char,
    datatype: *mut TRITONSERVER_DataType,
    shape: *mut *const i64,
    dims_count: *mut u32,
    byte_size: *mut u64,
    buffer_count: *mut u32,
) -> *mut TRITONSERVER_Error {
    api(func, |l| {
        let (n, dt, sh, dims, bytes, bufs) = l.input_properties(func, h(input))?;
        put_opt(name, n);
        put_opt(datatype, dt);
        put_opt(shape, sh);
        put_opt(dims_count, dims);
        put_opt(byte_size, bytes);
        put_opt(buffer_count, bufs);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InputProperties(
    input: *mut TRITONBACKEND_Input,
    name: *mut *const c_char,
    datatype: *mut TRITONSERVER_DataType,
    shape: *mut *const i64,
    dims_count: *mut u32,
    byte_size: *mut u64,
    buffer_count: *mut u32,
) -> *mut TRITONSERVER_Error {
    input_properties(
        "TRITONBACKEND_InputProperties",
        input,
        name,
        datatype,
        shape,
        dims_count,
        byte_size,
        buffer_count,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InputPropertiesForHostPolicy(
    input: *mut TRITONBACKEND_Input,
    _host_policy_name: *const c_char,
    name: *mut *const c_char,
    datatype: *mut TRITONSERVER_DataType,
    shape: *mut *const i64,
    dims_count: *mut u32,
    byte_size: *mut u64,
    buffer_count: *mut u32,
) -> *mut TRITONSERVER_Error {
    input_properties(
        "TRITONBACKEND_InputPropertiesForHostPolicy",
        input,
        name,
        datatype,
        shape,
        dims_count,
        byte_size,
        buffer_count,
    )
}

fn input_buffer(
    func: &'static str,
    input: *mut TRITONBACKEND_Input,
    index: u32,
    buffer: *mut *const c_void,
    buffer_byte_size: *mut u64,
    memory_type: *mut TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    api(func, |l| {
        let got = l.input_buffer(func, h(input), index);
        let (p, n, mem) = match got {
            Ok(v) => v,
            Err(f) => {
                put_opt(buffer, ptr::null());
                put_opt(buffer_byte_size, 0);
                return Err(f);
            }
        };
        // In: the caller's preference; out: where the data is (the request's `memory_type`,
        // CPU by default), whatever the caller preferred, as Triton does.
        put(l, func, buffer, p)?;
        put(l, func, buffer_byte_size, n)?;
        put(l, func, memory_type, mem)?;
        put(l, func, memory_type_id, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InputBuffer(
    input: *mut TRITONBACKEND_Input,
    index: u32,
    buffer: *mut *const c_void,
    buffer_byte_size: *mut u64,
    memory_type: *mut TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    input_buffer(
        "TRITONBACKEND_InputBuffer",
        input,
        index,
        buffer,
        buffer_byte_size,
        memory_type,
        memory_type_id,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InputBufferForHostPolicy(
    input: *mut TRITONBACKEND_Input,
    _host_policy_name: *const c_char,
    index: u32,
    buffer: *mut *const c_void,
    buffer_byte_size: *mut u64,
    memory_type: *mut TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    input_buffer(
        "TRITONBACKEND_InputBufferForHostPolicy",
        input,
        index,
        buffer,
        buffer_byte_size,
        memory_type,
        memory_type_id,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InputBufferAttributes(
    input: *mut TRITONBACKEND_Input,
    index: u32,
    buffer: *mut *const c_void,
    buffer_attributes: *mut *mut TRITONSERVER_BufferAttributes,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_InputBufferAttributes";
    api(F, |l| {
        let (p, a) = l.input_buffer_attributes(F, h(input), index)?;
        put(l, F, buffer, p)?;
        put(
            l,
            F,
            buffer_attributes,
            a as *mut TRITONSERVER_BufferAttributes,
        )
    })
}

// ===== output ===========================================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_OutputBuffer(
    output: *mut TRITONBACKEND_Output,
    buffer: *mut *mut c_void,
    buffer_byte_size: u64,
    memory_type: *mut TRITONSERVER_MemoryType,
    memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_OutputBuffer";
    api(F, |l| {
        let p = match l.output_buffer(F, h(output), buffer_byte_size) {
            Ok(p) => p,
            Err(f) => {
                put_opt(buffer, ptr::null_mut());
                return Err(f);
            }
        };
        put(l, F, buffer, p)?;
        put(l, F, memory_type, TRITONSERVER_MEMORY_CPU)?;
        put(l, F, memory_type_id, 0)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_OutputBufferAttributes(
    output: *mut TRITONBACKEND_Output,
    buffer_attributes: *mut *mut TRITONSERVER_BufferAttributes,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_OutputBufferAttributes";
    api(F, |l| {
        let a = l.output_buffer_attributes(F, h(output))?;
        put(
            l,
            F,
            buffer_attributes,
            a as *mut TRITONSERVER_BufferAttributes,
        )
    })
}

// ===== state (implicit sequence state: not configured) ==================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_StateNew(
    _state: *mut *mut TRITONBACKEND_State,
    request: *mut TRITONBACKEND_Request,
    name: *const c_char,
    _datatype: TRITONSERVER_DataType,
    _shape: *const i64,
    _dims_count: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_StateNew";
    api(F, |l| {
        l.request_touch(F, h(request))?;
        let n = string(l, F, name, "state name")?;
        Err(Fail {
            code: code::INVALID_ARG,
            msg: format!(
                "unable to add state '{n}'. State configuration is missing for model '{}'.",
                l.config.name
            ),
        })
    })
}

/// The state functions: no state object exists (the model has no sequence state).
fn no_state(func: &'static str) -> *mut TRITONSERVER_Error {
    api(func, |l| {
        l.violation(
            "wrong-handle",
            format!(
                "{func} on a state object the host never created (the model has no sequence state)"
            ),
        );
        Err(Fail {
            code: code::INVALID_ARG,
            msg: format!("{func}: no such state"),
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_StateUpdate(
    _state: *mut TRITONBACKEND_State,
) -> *mut TRITONSERVER_Error {
    no_state("TRITONBACKEND_StateUpdate")
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_StateBuffer(
    _state: *mut TRITONBACKEND_State,
    _buffer: *mut *mut c_void,
    _buffer_byte_size: u64,
    _memory_type: *mut TRITONSERVER_MemoryType,
    _memory_type_id: *mut i64,
) -> *mut TRITONSERVER_Error {
    no_state("TRITONBACKEND_StateBuffer")
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_StateBufferAttributes(
    _state: *mut TRITONBACKEND_State,
    _buffer_attributes: *mut *mut TRITONSERVER_BufferAttributes,
) -> *mut TRITONSERVER_Error {
    no_state("TRITONBACKEND_StateBufferAttributes")
}

// ===== response factory and responses ===================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryNew(
    factory: *mut *mut TRITONBACKEND_ResponseFactory,
    request: *mut TRITONBACKEND_Request,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseFactoryNew";
    api(F, |l| {
        if factory.is_null() {
            return put(l, F, factory, ptr::null_mut());
        }
        let f = l.factory_new(F, h(request))?;
        put(l, F, factory, f as *mut TRITONBACKEND_ResponseFactory)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactoryDelete(
    factory: *mut TRITONBACKEND_ResponseFactory,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseFactoryDelete";
    api(F, |l| l.factory_delete(F, h(factory)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseFactorySendFlags(
    factory: *mut TRITONBACKEND_ResponseFactory,
    send_flags: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseFactorySendFlags";
    api(F, |l| l.factory_send_flags(F, h(factory), send_flags))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseNew(
    response: *mut *mut TRITONBACKEND_Response,
    request: *mut TRITONBACKEND_Request,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseNew";
    api(F, |l| {
        put(l, F, response, ptr::null_mut())?;
        let r = l.response_new(F, h(request), false)?;
        put(l, F, response, r as *mut TRITONBACKEND_Response)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseNewFromFactory(
    response: *mut *mut TRITONBACKEND_Response,
    factory: *mut TRITONBACKEND_ResponseFactory,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseNewFromFactory";
    api(F, |l| {
        put(l, F, response, ptr::null_mut())?;
        let r = l.response_new(F, h(factory), true)?;
        put(l, F, response, r as *mut TRITONBACKEND_Response)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseDelete(
    response: *mut TRITONBACKEND_Response,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseDelete";
    api(F, |l| l.response_delete(F, h(response)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSetStringParameter(
    response: *mut TRITONBACKEND_Response,
    name: *const c_char,
    value: *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseSetStringParameter";
    api(F, |l| {
        let n = string(l, F, name, "name")?;
        let v = string(l, F, value, "value")?;
        l.response_set_parameter(F, h(response), n, json!(v))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSetIntParameter(
    response: *mut TRITONBACKEND_Response,
    name: *const c_char,
    value: i64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseSetIntParameter";
    api(F, |l| {
        let n = string(l, F, name, "name")?;
        l.response_set_parameter(F, h(response), n, json!(value))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSetBoolParameter(
    response: *mut TRITONBACKEND_Response,
    name: *const c_char,
    value: bool,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseSetBoolParameter";
    api(F, |l| {
        let n = string(l, F, name, "name")?;
        l.response_set_parameter(F, h(response), n, json!(value))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSetDoubleParameter(
    response: *mut TRITONBACKEND_Response,
    name: *const c_char,
    value: f64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseSetDoubleParameter";
    api(F, |l| {
        let n = string(l, F, name, "name")?;
        l.response_set_parameter(F, h(response), n, json!(value))
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseOutput(
    response: *mut TRITONBACKEND_Response,
    output: *mut *mut TRITONBACKEND_Output,
    name: *const c_char,
    datatype: TRITONSERVER_DataType,
    shape: *const i64,
    dims_count: u32,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseOutput";
    api(F, |l| {
        put(l, F, output, ptr::null_mut())?;
        let n = string(l, F, name, "output name")?;
        let dims = if dims_count == 0 {
            vec![]
        } else if shape.is_null() {
            l.violation(
                "null-argument",
                format!("{F}: null shape with {dims_count} dims"),
            );
            return Err(Fail {
                code: code::INVALID_ARG,
                msg: "null shape".into(),
            });
        } else {
            // SAFETY: `dims_count` dims at `shape` (header contract).
            unsafe { std::slice::from_raw_parts(shape, dims_count as usize) }.to_vec()
        };
        let o = l.response_output(F, h(response), &n, datatype, dims)?;
        put(l, F, output, o as *mut TRITONBACKEND_Output)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ResponseSend(
    response: *mut TRITONBACKEND_Response,
    send_flags: u32,
    error: *mut TRITONSERVER_Error,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_ResponseSend";
    api(F, |l| l.response_send(F, h(response), send_flags, h(error)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InferenceResponseOutputByName(
    response: *mut TRITONBACKEND_Response,
    name: *const c_char,
    datatype: *mut TRITONSERVER_DataType,
    shape: *mut *const i64,
    dim_count: *mut u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_InferenceResponseOutputByName";
    api(F, |l| {
        let n = string(l, F, name, "output name")?;
        let (_, dt, sh, dims) = l.response_output_info(F, h(response), None, Some(&n))?;
        put(l, F, datatype, dt)?;
        put(l, F, shape, sh)?;
        put(l, F, dim_count, dims)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_InferenceResponseOutput(
    response: *mut TRITONBACKEND_Response,
    index: u32,
    name: *mut *const c_char,
    datatype: *mut TRITONSERVER_DataType,
    shape: *mut *const i64,
    dim_count: *mut u64,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONBACKEND_InferenceResponseOutput";
    api(F, |l| {
        let (n, dt, sh, dims) = l.response_output_info(F, h(response), Some(index), None)?;
        put(l, F, name, n)?;
        put(l, F, datatype, dt)?;
        put(l, F, shape, sh)?;
        put(l, F, dim_count, dims)
    })
}
