//! `TRITONSERVER_*`: versions, enum names, logging, errors, messages, buffer attributes.

// Signatures are fixed by the headers; the safety contract of every function is the header's.
#![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]

use super::*;

// ===== TRITONSERVER_* helpers =============================================================

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ApiVersion(
    major: *mut u32,
    minor: *mut u32,
) -> *mut TRITONSERVER_Error {
    api("TRITONSERVER_ApiVersion", |l| {
        put(
            l,
            "TRITONSERVER_ApiVersion",
            major,
            TRITONSERVER_API_VERSION_MAJOR,
        )?;
        put(
            l,
            "TRITONSERVER_ApiVersion",
            minor,
            TRITONSERVER_API_VERSION_MINOR,
        )
    })
}

const DATATYPE_STRINGS: [&CStr; 15] = [
    c"<invalid>",
    c"BOOL",
    c"UINT8",
    c"UINT16",
    c"UINT32",
    c"UINT64",
    c"INT8",
    c"INT16",
    c"INT32",
    c"INT64",
    c"FP16",
    c"FP32",
    c"FP64",
    c"BYTES",
    c"BF16",
];

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_DataTypeString(
    datatype: TRITONSERVER_DataType,
) -> *const c_char {
    DATATYPE_STRINGS
        .get(datatype as usize)
        .copied()
        .unwrap_or(c"<invalid>")
        .as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_StringToDataType(
    dtype: *const c_char,
) -> TRITONSERVER_DataType {
    if dtype.is_null() {
        return TRITONSERVER_TYPE_INVALID;
    }
    // SAFETY: a NUL-terminated string (header contract).
    let s = unsafe { CStr::from_ptr(dtype) };
    DATATYPE_STRINGS
        .iter()
        .skip(1)
        .position(|d| *d == s)
        .map_or(TRITONSERVER_TYPE_INVALID, |i| (i + 1) as u32)
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_DataTypeByteSize(datatype: TRITONSERVER_DataType) -> u32 {
    crate::spec::element_size(datatype) as u32
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MemoryTypeString(
    memtype: TRITONSERVER_MemoryType,
) -> *const c_char {
    match memtype {
        TRITONSERVER_MEMORY_CPU => c"CPU",
        TRITONSERVER_MEMORY_CPU_PINNED => c"CPU_PINNED",
        TRITONSERVER_MEMORY_GPU => c"GPU",
        _ => c"<invalid>",
    }
    .as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ParameterTypeString(
    paramtype: TRITONSERVER_ParameterType,
) -> *const c_char {
    match paramtype {
        TRITONSERVER_PARAMETER_STRING => c"STRING",
        TRITONSERVER_PARAMETER_INT => c"INT",
        TRITONSERVER_PARAMETER_BOOL => c"BOOL",
        TRITONSERVER_PARAMETER_DOUBLE => c"DOUBLE",
        TRITONSERVER_PARAMETER_BYTES => c"BYTES",
        _ => c"<invalid>",
    }
    .as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_InstanceGroupKindString(
    kind: TRITONSERVER_InstanceGroupKind,
) -> *const c_char {
    match kind {
        TRITONSERVER_INSTANCEGROUPKIND_AUTO => c"AUTO",
        TRITONSERVER_INSTANCEGROUPKIND_CPU => c"CPU",
        TRITONSERVER_INSTANCEGROUPKIND_GPU => c"GPU",
        TRITONSERVER_INSTANCEGROUPKIND_MODEL => c"MODEL",
        _ => c"<invalid>",
    }
    .as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_LogIsEnabled(level: TRITONSERVER_LogLevel) -> bool {
    guarded(
        "TRITONSERVER_LogIsEnabled",
        |l| l.log_enabled(level),
        |_| false,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_LogMessage(
    level: TRITONSERVER_LogLevel,
    filename: *const c_char,
    line: ::std::os::raw::c_int,
    msg: *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_LogMessage";
    api(F, |l| {
        let file = string(l, F, filename, "filename")?;
        let msg = string(l, F, msg, "message")?;
        l.log(level, file, line, msg);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorNew(
    code: TRITONSERVER_Error_Code,
    msg: *const c_char,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_ErrorNew";
    guarded(
        F,
        |l| {
            let m = string(l, F, msg, "message").unwrap_or_default();
            l.new_error(code, &m, F.into()) as *mut TRITONSERVER_Error
        },
        |l| l.new_error(code::INTERNAL, "test host panicked", F.into()) as *mut TRITONSERVER_Error,
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorDelete(error: *mut TRITONSERVER_Error) {
    const F: &str = "TRITONSERVER_ErrorDelete";
    guarded(F, |l| l.error_delete(F, h(error)), |_| ())
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorCode(
    error: *mut TRITONSERVER_Error,
) -> TRITONSERVER_Error_Code {
    const F: &str = "TRITONSERVER_ErrorCode";
    guarded(F, |l| l.error_code(F, h(error)), |_| code::UNKNOWN)
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorCodeString(
    error: *mut TRITONSERVER_Error,
) -> *const c_char {
    const F: &str = "TRITONSERVER_ErrorCodeString";
    guarded(
        F,
        |l| crate::ledger::code_string(l.error_code(F, h(error))).as_ptr(),
        |_| c"Unknown".as_ptr(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_ErrorMessage(
    error: *mut TRITONSERVER_Error,
) -> *const c_char {
    const F: &str = "TRITONSERVER_ErrorMessage";
    guarded(
        F,
        |l| l.error_message(F, h(error)),
        |_| c"(test host panicked)".as_ptr(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MessageNewFromSerializedJson(
    message: *mut *mut TRITONSERVER_Message,
    base: *const c_char,
    byte_size: usize,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MessageNewFromSerializedJson";
    api(F, |l| {
        if base.is_null() && byte_size > 0 {
            return Err(Fail {
                code: code::INVALID_ARG,
                msg: "null base".into(),
            });
        }
        let bytes = if byte_size == 0 {
            &[][..]
        } else {
            // SAFETY: `byte_size` readable bytes at `base` (header contract).
            unsafe { std::slice::from_raw_parts(base.cast::<u8>(), byte_size) }
        };
        let m = l.message_from_json(bytes)?;
        put(l, F, message, m as *mut TRITONSERVER_Message)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MessageDelete(
    message: *mut TRITONSERVER_Message,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MessageDelete";
    api(F, |l| l.message_delete(F, h(message)))
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_MessageSerializeToJson(
    message: *mut TRITONSERVER_Message,
    base: *mut *const c_char,
    byte_size: *mut usize,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_MessageSerializeToJson";
    api(F, |l| {
        let (p, n) = l.message_json(F, h(message))?;
        put(l, F, base, p)?;
        put(l, F, byte_size, n)
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_BufferAttributesNew(
    buffer_attributes: *mut *mut TRITONSERVER_BufferAttributes,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_BufferAttributesNew";
    api(F, |l| {
        if buffer_attributes.is_null() {
            return put(l, F, buffer_attributes, ptr::null_mut());
        }
        let a = l.attr_new();
        put(
            l,
            F,
            buffer_attributes,
            a as *mut TRITONSERVER_BufferAttributes,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn TRITONSERVER_BufferAttributesDelete(
    buffer_attributes: *mut TRITONSERVER_BufferAttributes,
) -> *mut TRITONSERVER_Error {
    const F: &str = "TRITONSERVER_BufferAttributesDelete";
    api(F, |l| l.attr_delete(F, h(buffer_attributes)))
}

macro_rules! attr_setter {
    ($name:ident, $field:expr, $arg:ident: $ty:ty) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            buffer_attributes: *mut TRITONSERVER_BufferAttributes,
            $arg: $ty,
        ) -> *mut TRITONSERVER_Error {
            api(stringify!($name), |l| {
                l.attr_field(
                    stringify!($name),
                    h(buffer_attributes),
                    $field,
                    Some($arg as i64),
                )
                .map(|_| ())
            })
        }
    };
}

macro_rules! attr_getter {
    ($name:ident, $field:expr, $arg:ident: $ty:ty) => {
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            buffer_attributes: *mut TRITONSERVER_BufferAttributes,
            $arg: *mut $ty,
        ) -> *mut TRITONSERVER_Error {
            api(stringify!($name), |l| {
                let v = l.attr_field(stringify!($name), h(buffer_attributes), $field, None)?;
                put(l, stringify!($name), $arg, v as $ty)
            })
        }
    };
}

attr_setter!(TRITONSERVER_BufferAttributesSetMemoryTypeId, 1, memory_type_id: i64);
attr_setter!(TRITONSERVER_BufferAttributesSetMemoryType, 0, memory_type: TRITONSERVER_MemoryType);
attr_setter!(TRITONSERVER_BufferAttributesSetCudaIpcHandle, 3, cuda_ipc_handle: *mut c_void);
attr_setter!(TRITONSERVER_BufferAttributesSetByteSize, 2, byte_size: usize);
attr_getter!(TRITONSERVER_BufferAttributesMemoryTypeId, 1, memory_type_id: i64);
attr_getter!(TRITONSERVER_BufferAttributesMemoryType, 0, memory_type: TRITONSERVER_MemoryType);
attr_getter!(TRITONSERVER_BufferAttributesCudaIpcHandle, 3, cuda_ipc_handle: *mut c_void);
attr_getter!(TRITONSERVER_BufferAttributesByteSize, 2, byte_size: usize);
