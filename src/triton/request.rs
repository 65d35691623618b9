//! The FFI side of one request's life: reading its inputs and requested outputs, its response
//! factory, sending responses, reporting statistics and releasing it.
//!
//! Order of a request's end, as Triton requires: the FINAL response (or flag) is sent, then
//! statistics are reported, then the request is released, then its factory is deleted
//! ([`Pending::finish`] does all four, once, by consuming the value). Nothing touches the request
//! or the factory afterwards.

use std::ffi::{c_void, CStr, CString};
use std::ptr;

use super::error::{check, to_server_error, TritonError};
use super::inputs::{DataType, RawInput};
use super::sys;

/// Monotonic nanoseconds (`CLOCK_MONOTONIC`, what Triton's steady clock reads), for statistics.
pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A model instance handle that may cross to the engine thread: Triton's API may be called from
/// any thread, and the instance outlives the thread (ModelInstanceFinalize joins it).
#[derive(Clone, Copy, Debug)]
pub(super) struct InstanceHandle(pub *mut sys::TRITONBACKEND_ModelInstance);

// SAFETY: the handle is only passed back to Triton, whose functions are thread-safe for
// different requests; it stays valid until ModelInstanceFinalize, which joins every thread.
unsafe impl Send for InstanceHandle {}

/// The outputs the model declares, and which of them a request asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Wanted {
    /// `text_output`.
    pub text: bool,
    /// `output_ids`.
    pub ids: bool,
    /// `finish_reason`.
    pub reason: bool,
    /// `num_output_tokens`.
    pub count: bool,
}

/// One output tensor of a response.
#[derive(Debug)]
pub(super) struct OutputTensor {
    pub name: &'static str,
    pub datatype: sys::TRITONSERVER_DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

impl OutputTensor {
    /// A BYTES tensor of one string, shaped `[1, 1]` (batched) or `[1]`.
    pub fn string(name: &'static str, s: &str, batched: bool) -> Self {
        let mut data = Vec::with_capacity(4 + s.len());
        data.extend_from_slice(&(s.len() as u32).to_le_bytes());
        data.extend_from_slice(s.as_bytes());
        Self {
            name,
            datatype: sys::TRITONSERVER_TYPE_BYTES,
            shape: shape(1, batched),
            data,
        }
    }

    /// An INT32 vector shaped `[1, n]` (batched) or `[n]`.
    pub fn int32s(name: &'static str, v: &[i32], batched: bool) -> Self {
        Self {
            name,
            datatype: sys::TRITONSERVER_TYPE_INT32,
            shape: shape(v.len(), batched),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

fn shape(n: usize, batched: bool) -> Vec<i64> {
    if batched {
        vec![1, n as i64]
    } else {
        vec![n as i64]
    }
}

fn datatype(t: sys::TRITONSERVER_DataType) -> DataType {
    match t {
        sys::TRITONSERVER_TYPE_BOOL => DataType::Bool,
        sys::TRITONSERVER_TYPE_INT32 => DataType::Int32,
        sys::TRITONSERVER_TYPE_INT64 => DataType::Int64,
        sys::TRITONSERVER_TYPE_UINT64 => DataType::Uint64,
        sys::TRITONSERVER_TYPE_FP32 => DataType::Fp32,
        sys::TRITONSERVER_TYPE_BYTES => DataType::Bytes,
        sys::TRITONSERVER_TYPE_UINT8 => DataType::Other("UINT8"),
        sys::TRITONSERVER_TYPE_UINT16 => DataType::Other("UINT16"),
        sys::TRITONSERVER_TYPE_UINT32 => DataType::Other("UINT32"),
        sys::TRITONSERVER_TYPE_INT8 => DataType::Other("INT8"),
        sys::TRITONSERVER_TYPE_INT16 => DataType::Other("INT16"),
        sys::TRITONSERVER_TYPE_FP16 => DataType::Other("FP16"),
        sys::TRITONSERVER_TYPE_FP64 => DataType::Other("FP64"),
        sys::TRITONSERVER_TYPE_BF16 => DataType::Other("BF16"),
        _ => DataType::Other("INVALID"),
    }
}

/// A string from Triton, copied (lossy UTF-8); null gives an empty string.
///
/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn copy_str(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated (contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A request Triton handed to Execute together with its response factory, from the moment
/// Execute took ownership until [`Pending::finish`].
#[derive(Debug)]
pub(super) struct Pending {
    request: *mut sys::TRITONBACKEND_Request,
    factory: *mut sys::TRITONBACKEND_ResponseFactory,
    /// The request's id (empty when the client gave none), for logs.
    pub id: String,
    /// When Execute received it.
    pub exec_start_ns: u64,
    /// When the engine admitted it.
    pub compute_start_ns: u64,
}

// SAFETY: Triton allows a request and its factory to be used from any one thread at a time;
// a `Pending` is owned by exactly one thread (Execute's, then the engine thread's) and is
// consumed by `finish`.
unsafe impl Send for Pending {}

impl Pending {
    /// Creates the response factory of `request`. On error nothing was created and Triton
    /// still owns the request.
    ///
    /// # Safety
    /// `request` is a live request passed to ModelInstanceExecute.
    pub unsafe fn new(
        request: *mut sys::TRITONBACKEND_Request,
        exec_start_ns: u64,
    ) -> Result<Self, TritonError> {
        let mut factory = ptr::null_mut();
        // SAFETY: live request; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ResponseFactoryNew",
                sys::TRITONBACKEND_ResponseFactoryNew(&mut factory, request),
            )?
        };
        let mut id_p = ptr::null();
        // SAFETY: live request; valid out-pointer. The id may be null or empty.
        let id = match unsafe {
            check(
                "TRITONBACKEND_RequestId",
                sys::TRITONBACKEND_RequestId(request, &mut id_p),
            )
        } {
            // SAFETY: a NUL-terminated string (or null) living as long as the request; copied.
            Ok(()) => unsafe { copy_str(id_p) },
            Err(_) => String::new(),
        };
        Ok(Self {
            request,
            factory,
            id,
            exec_start_ns,
            compute_start_ns: 0,
        })
    }

    /// The request's id for messages: `request "abc"` or `request (no id)`.
    pub fn label(&self) -> String {
        if self.id.is_empty() {
            "request (no id)".into()
        } else {
            format!("request {:?}", self.id)
        }
    }

    /// Every input tensor of the request, each buffer copied into one byte vector.
    pub fn inputs(&self) -> Result<Vec<RawInput>, TritonError> {
        let mut count = 0u32;
        // SAFETY: the request is live until `finish` (type invariant); valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_RequestInputCount",
                sys::TRITONBACKEND_RequestInputCount(self.request, &mut count),
            )?
        };
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut input = ptr::null_mut();
            // SAFETY: live request; index below the count; valid out-pointer.
            unsafe {
                check(
                    "TRITONBACKEND_RequestInputByIndex",
                    sys::TRITONBACKEND_RequestInputByIndex(self.request, index, &mut input),
                )?
            };
            let (mut name_p, mut dtype, mut shape_p, mut dims, mut byte_size, mut buffers) =
                (ptr::null(), 0, ptr::null(), 0u32, 0u64, 0u32);
            // SAFETY: `input` is live while the request is; valid out-pointers.
            unsafe {
                check(
                    "TRITONBACKEND_InputProperties",
                    sys::TRITONBACKEND_InputProperties(
                        input,
                        &mut name_p,
                        &mut dtype,
                        &mut shape_p,
                        &mut dims,
                        &mut byte_size,
                        &mut buffers,
                    ),
                )?
            };
            // SAFETY: name and shape live as long as the request; both are copied here.
            let name = unsafe { copy_str(name_p) };
            let shape = if shape_p.is_null() || dims == 0 {
                Vec::new()
            } else {
                // SAFETY: `dims` i64 values at `shape_p` (InputProperties' contract).
                unsafe { std::slice::from_raw_parts(shape_p, dims as usize) }.to_vec()
            };
            let mut data = Vec::with_capacity(usize::try_from(byte_size).unwrap_or(0).min(1 << 24));
            for b in 0..buffers {
                let (mut base, mut size, mut mem, mut mem_id) =
                    (ptr::null(), 0u64, sys::TRITONSERVER_MEMORY_CPU, 0i64);
                // SAFETY: live input; buffer index below its count; valid out-pointers;
                // `mem` in: the preferred memory type.
                unsafe {
                    check(
                        "TRITONBACKEND_InputBuffer",
                        sys::TRITONBACKEND_InputBuffer(
                            input,
                            b,
                            &mut base,
                            &mut size,
                            &mut mem,
                            &mut mem_id,
                        ),
                    )?
                };
                if mem != sys::TRITONSERVER_MEMORY_CPU && mem != sys::TRITONSERVER_MEMORY_CPU_PINNED
                {
                    // Not a malformed request but a capability this backend lacks: UNSUPPORTED,
                    // as for outputs (docs/triton.md, "Errors").
                    return Err(TritonError::Unsupported(format!(
                        "input '{name}': buffer {b} is in GPU memory; this backend reads inputs \
                         from CPU memory only"
                    )));
                }
                if size > 0 {
                    if base.is_null() {
                        return Err(TritonError::InvalidInput(format!(
                            "input '{name}': buffer {b} of {size} bytes has no data"
                        )));
                    }
                    // SAFETY: `size` bytes of CPU memory at `base`, alive until release.
                    data.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(base.cast::<u8>(), size as usize)
                    });
                }
            }
            out.push(RawInput {
                name,
                datatype: datatype(dtype),
                shape,
                data,
            });
        }
        Ok(out)
    }

    /// Which outputs the request asked for.
    pub fn wanted(&self) -> Result<Wanted, TritonError> {
        let mut count = 0u32;
        // SAFETY: live request; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_RequestOutputCount",
                sys::TRITONBACKEND_RequestOutputCount(self.request, &mut count),
            )?
        };
        let mut w = Wanted::default();
        for index in 0..count {
            let mut name_p = ptr::null();
            // SAFETY: live request; index below the count; valid out-pointer.
            unsafe {
                check(
                    "TRITONBACKEND_RequestOutputName",
                    sys::TRITONBACKEND_RequestOutputName(self.request, index, &mut name_p),
                )?
            };
            // SAFETY: a NUL-terminated name living as long as the request; copied.
            let name = unsafe { copy_str(name_p) };
            match name.as_str() {
                "text_output" => w.text = true,
                "output_ids" => w.ids = true,
                "finish_reason" => w.reason = true,
                "num_output_tokens" => w.count = true,
                other => {
                    return Err(TritonError::InvalidInput(format!(
                        "requested output '{other}' does not exist; the outputs are \
                         text_output, output_ids, finish_reason, num_output_tokens"
                    )))
                }
            }
        }
        Ok(w)
    }

    /// Whether the client cancelled the request.
    pub fn is_cancelled(&self) -> bool {
        let mut cancelled = false;
        // SAFETY: the factory is live until `finish`; valid out-pointer.
        let r = unsafe {
            check(
                "TRITONBACKEND_ResponseFactoryIsCancelled",
                sys::TRITONBACKEND_ResponseFactoryIsCancelled(self.factory, &mut cancelled),
            )
        };
        r.is_ok() && cancelled
    }

    /// Sends one response with `outputs`; `last` flags it FINAL.
    pub fn send(&self, outputs: &[OutputTensor], last: bool) -> Result<(), TritonError> {
        let mut response = ptr::null_mut();
        // SAFETY: live factory; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ResponseNewFromFactory",
                sys::TRITONBACKEND_ResponseNewFromFactory(&mut response, self.factory),
            )?
        };
        // SAFETY: `response` is the live response just created, not yet sent.
        if let Err(e) = unsafe { fill(response, outputs) } {
            // SAFETY: the response was not sent, so it is still ours to delete, once.
            let _ = unsafe {
                check(
                    "TRITONBACKEND_ResponseDelete",
                    sys::TRITONBACKEND_ResponseDelete(response),
                )
            };
            return Err(e);
        }
        let flags = if last {
            sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL
        } else {
            0
        };
        // SAFETY: live response; sending transfers it to Triton, and it is not used again.
        unsafe {
            check(
                "TRITONBACKEND_ResponseSend",
                sys::TRITONBACKEND_ResponseSend(response, flags, ptr::null_mut()),
            )
        }
    }

    /// Sends the FINAL response carrying `err`. If no response can be made, the FINAL flag is
    /// still sent so the client is not left waiting.
    pub fn send_error(&self, err: &TritonError) {
        let mut response = ptr::null_mut();
        // SAFETY: live factory; valid out-pointer.
        let made = unsafe {
            check(
                "TRITONBACKEND_ResponseNewFromFactory",
                sys::TRITONBACKEND_ResponseNewFromFactory(&mut response, self.factory),
            )
        };
        if made.is_ok() {
            let error = to_server_error(err);
            // SAFETY: live response, transferred to Triton by the send; the error stays ours
            // ("caller retains ownership") and is deleted right after.
            let sent = unsafe {
                check(
                    "TRITONBACKEND_ResponseSend",
                    sys::TRITONBACKEND_ResponseSend(
                        response,
                        sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                        error,
                    ),
                )
            };
            if !error.is_null() {
                // SAFETY: created above, ours, deleted once.
                unsafe { sys::TRITONSERVER_ErrorDelete(error) };
            }
            if sent.is_ok() {
                return;
            }
        }
        // SAFETY: live factory.
        let _ = unsafe {
            check(
                "TRITONBACKEND_ResponseFactorySendFlags",
                sys::TRITONBACKEND_ResponseFactorySendFlags(
                    self.factory,
                    sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                ),
            )
        };
    }

    /// Ends the request after its FINAL response was sent: reports its statistics, releases it
    /// and deletes its factory, in that order.
    pub fn finish(self, instance: InstanceHandle, success: bool) {
        let end = now_ns();
        let compute_start = if self.compute_start_ns == 0 {
            end
        } else {
            self.compute_start_ns
        };
        // SAFETY: live instance and request; statistics come before the release below.
        let _ = unsafe {
            check(
                "TRITONBACKEND_ModelInstanceReportStatistics",
                sys::TRITONBACKEND_ModelInstanceReportStatistics(
                    instance.0,
                    self.request,
                    success,
                    self.exec_start_ns,
                    compute_start,
                    end,
                    end,
                ),
            )
        };
        // SAFETY: live instance. One request per execution, as TensorRT-LLM's backend reports.
        let _ = unsafe {
            check(
                "TRITONBACKEND_ModelInstanceReportBatchStatistics",
                sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
                    instance.0,
                    1,
                    self.exec_start_ns,
                    compute_start,
                    end,
                    end,
                ),
            )
        };
        // SAFETY: we own the request (Execute returned success); released exactly once, here,
        // since `self` is consumed.
        let _ = unsafe {
            check(
                "TRITONBACKEND_RequestRelease",
                sys::TRITONBACKEND_RequestRelease(
                    self.request,
                    sys::TRITONSERVER_REQUEST_RELEASE_ALL,
                ),
            )
        };
        // SAFETY: our factory, deleted exactly once, after the FINAL was sent.
        let _ = unsafe {
            check(
                "TRITONBACKEND_ResponseFactoryDelete",
                sys::TRITONBACKEND_ResponseFactoryDelete(self.factory),
            )
        };
    }

    /// Ends the request with `err` as its FINAL response ([`Pending::send_error`], then
    /// [`Pending::finish`] as unsuccessful).
    pub fn fail(self, instance: InstanceHandle, err: &TritonError) {
        self.send_error(err);
        self.finish(instance, false);
    }

    /// Deletes the factory of a request whose ownership stays with Triton (Execute is about to
    /// fail); the request itself is not touched.
    pub fn abandon(self) {
        // SAFETY: our factory, never used for a response; deleted once.
        let _ = unsafe {
            check(
                "TRITONBACKEND_ResponseFactoryDelete",
                sys::TRITONBACKEND_ResponseFactoryDelete(self.factory),
            )
        };
    }
}

/// Adds `outputs` to `response`, in order, copying their bytes into Triton's buffers.
///
/// # Safety
/// `response` is live and not yet sent.
unsafe fn fill(
    response: *mut sys::TRITONBACKEND_Response,
    outputs: &[OutputTensor],
) -> Result<(), TritonError> {
    for o in outputs {
        let name = CString::new(o.name).expect("output names have no NUL");
        let mut output = ptr::null_mut();
        // SAFETY: live response; name and shape valid for the call (copied by Triton).
        unsafe {
            check(
                "TRITONBACKEND_ResponseOutput",
                sys::TRITONBACKEND_ResponseOutput(
                    response,
                    &mut output,
                    name.as_ptr(),
                    o.datatype,
                    o.shape.as_ptr(),
                    o.shape.len() as u32,
                ),
            )?
        };
        let mut buffer: *mut c_void = ptr::null_mut();
        let (mut mem, mut mem_id) = (sys::TRITONSERVER_MEMORY_CPU, 0i64);
        // SAFETY: live output; valid out-pointers; `mem` in: the preferred memory type.
        unsafe {
            check(
                "TRITONBACKEND_OutputBuffer",
                sys::TRITONBACKEND_OutputBuffer(
                    output,
                    &mut buffer,
                    o.data.len() as u64,
                    &mut mem,
                    &mut mem_id,
                ),
            )?
        };
        if o.data.is_empty() {
            continue;
        }
        if mem != sys::TRITONSERVER_MEMORY_CPU && mem != sys::TRITONSERVER_MEMORY_CPU_PINNED {
            return Err(TritonError::Unsupported(format!(
                "output '{}': Triton offered GPU memory; this backend writes outputs to CPU memory",
                o.name
            )));
        }
        if buffer.is_null() {
            return Err(TritonError::Internal {
                context: format!("output '{}'", o.name),
                source: "TRITONBACKEND_OutputBuffer gave a null buffer".into(),
            });
        }
        // SAFETY: Triton gave `o.data.len()` writable CPU bytes at `buffer`, alive until the
        // response is sent or deleted; the regions do not overlap.
        unsafe {
            ptr::copy_nonoverlapping(o.data.as_ptr(), buffer.cast::<u8>(), o.data.len());
        }
    }
    Ok(())
}
