//! Owned wrappers over the few CUDA driver and cuBLAS calls the backend makes, through cudarc's
//! dynamically loaded bindings (so a binary built here starts on a machine without a driver and
//! fails with an error instead of a loader error).
//!
//! Every call's status is checked and turned into a [`GpuError`] naming the call. Resources hold
//! an `Arc<Context>`, so the primary context outlives every buffer, module, graph and handle made
//! in it. This module and [`super::kernels`] are the only places with `unsafe` in the backend.

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result as cu, sys};

use crate::device::shared::{ContextEpochs, ContextLease};
pub use crate::device::FaultKind;

/// A failed CUDA call, with the call's name and the driver's or cuBLAS's message, and what the
/// failure means for the context ([`FaultKind`], from the driver's or cuBLAS's result code; our
/// own checks are [`FaultKind::Invalid`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GpuError {
    /// What failed, and the driver's words for it.
    pub message: String,
    /// Whether the context survives it.
    pub kind: FaultKind,
}

impl GpuError {
    /// An error our own checks raise (sizes, limits, a missing kernel): nothing on the device
    /// went wrong, so the context is fine.
    pub fn invalid(message: String) -> Self {
        Self {
            message,
            kind: FaultKind::Invalid,
        }
    }

    /// The same error, its message prefixed by `what` ("allocating 4096 bytes: ..."); the kind
    /// is kept, so a fatal fault stays fatal however many layers describe it.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Self {
            message: format!("{what}: {}", self.message),
            kind: self.kind,
        }
    }
}

/// Result of a CUDA call.
pub type GpuResult<T> = Result<T, GpuError>;

/// What a CUDA driver result code (`CUresult`, as its number) means for the context that
/// returned it. Pure, so the table is unit-tested without a GPU.
///
/// Fatal: the "sticky" errors the CUDA documentation says leave the context unusable until the
/// process ends or the context is destroyed (a kernel's illegal address or instruction,
/// misaligned or invalid address space, invalid PC, hardware stack error, device assert, launch
/// failure or timeout, a contained exception, leaked tensor memory), an uncorrectable ECC or
/// NVLink error, a destroyed or deinitialized
/// context, a device gone (`CUDA_ERROR_DEVICE_UNAVAILABLE`, `SYSTEM_NOT_READY`) and
/// `CUDA_ERROR_UNKNOWN` (stepping again into an unknown state is what must never happen).
/// Resource: out of device memory or of launch resources; the context is fine, a smaller or
/// later request may succeed. Everything else (invalid value, handle, image, ...) is the call's
/// own fault.
pub fn fault_kind_of_code(code: u32) -> FaultKind {
    match code {
        // DEINITIALIZED, DEVICE_UNAVAILABLE, ECC_UNCORRECTABLE, NVLINK_UNCORRECTABLE, CONTAINED
        4 | 46 | 214 | 220 | 226 => FaultKind::Fatal,
        // ILLEGAL_ADDRESS, LAUNCH_TIMEOUT, LAUNCH_INCOMPATIBLE_TEXTURING
        700 | 702 | 703 => FaultKind::Fatal,
        // CONTEXT_IS_DESTROYED, ASSERT
        709 | 710 => FaultKind::Fatal,
        // HARDWARE_STACK_ERROR, ILLEGAL_INSTRUCTION, MISALIGNED_ADDRESS,
        // INVALID_ADDRESS_SPACE, INVALID_PC, LAUNCH_FAILED; TENSOR_MEMORY_LEAK
        714..=719 | 721 => FaultKind::Fatal,
        // SYSTEM_NOT_READY, EXTERNAL_DEVICE, UNKNOWN
        802 | 911 | 999 => FaultKind::Fatal,
        // OUT_OF_MEMORY, LAUNCH_OUT_OF_RESOURCES
        2 | 701 => FaultKind::Resource,
        _ => FaultKind::Invalid,
    }
}

/// What a cuBLAS status (`cublasStatus_t`, as its number) means for the context: allocation
/// failures are [`FaultKind::Resource`]; an execution failure or an internal error is taken as
/// [`FaultKind::Fatal`] (cuBLAS reports a kernel that faulted that way, and a wrong guess costs
/// a rebuild, where the other guess would step a dead context); the rest are the call's own.
pub fn fault_kind_of_cublas_status(status: u32) -> FaultKind {
    match status {
        // CUBLAS_STATUS_ALLOC_FAILED
        3 => FaultKind::Resource,
        // CUBLAS_STATUS_EXECUTION_FAILED, CUBLAS_STATUS_INTERNAL_ERROR
        13 | 14 => FaultKind::Fatal,
        _ => FaultKind::Invalid,
    }
}

pub(crate) fn ck<T>(r: Result<T, cu::DriverError>, call: &str) -> GpuResult<T> {
    r.map_err(|e| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        GpuError {
            message: format!("{call} failed: {name} ({text})"),
            kind: fault_kind_of_code(e.0 as u32),
        }
    })
}

fn ckb<T>(r: Result<T, blas::CublasError>, call: &str) -> GpuResult<T> {
    r.map_err(|e| GpuError {
        message: format!("{call} failed: {e:?}"),
        kind: fault_kind_of_cublas_status(e.0 as u32),
    })
}

/// How long making a context waits for the holders of a dead one to let go
/// ([`ContextEpochs::acquire`]): they notice within a step, or within the Triton worker's idle
/// poll, so this only runs out when one of them is stuck.
pub const CONTEXT_RELEASE_WAIT: Duration = Duration::from_secs(60);

/// The process's context generations, one sequence per device (see [`ContextEpochs`]).
pub fn context_epochs() -> &'static Arc<ContextEpochs> {
    static EPOCHS: OnceLock<Arc<ContextEpochs>> = OnceLock::new();
    EPOCHS.get_or_init(ContextEpochs::new)
}

/// The retained primary context of one device and the stream all work goes to.
pub struct Context {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    /// The one stream of the backend (non-blocking, so it can be captured into graphs).
    pub stream: sys::CUstream,
    /// This context's generation on its device: released after the retain (field drop order
    /// follows `Drop::drop`), so a new context is only made once this one is let go.
    lease: ContextLease,
}

// SAFETY: a CUDA context and stream may be used from any thread once made current there; every
// entry point calls `bind` first, and the backend is used by one thread at a time (`&mut self`).
unsafe impl Send for Context {}
// SAFETY: as above; shared references only read the handles.
unsafe impl Sync for Context {}

impl Context {
    /// Initialises the driver, retains device `ordinal`'s primary context, makes it current and
    /// creates a stream. When a fatal fault killed the device's context, first waits (at most
    /// [`CONTEXT_RELEASE_WAIT`]) until every holder of the dead one has let go, so that the
    /// retain makes a fresh context instead of joining the dead one.
    pub fn new(ordinal: usize) -> GpuResult<Arc<Self>> {
        // cudarc's loader panics when the library is missing: look first.
        if !driver_present() {
            return Err(GpuError::invalid(
                "no NVIDIA driver: libcuda.so could not be loaded".into(),
            ));
        }
        let lease = context_epochs()
            .acquire(ordinal, CONTEXT_RELEASE_WAIT)
            .map_err(|message| GpuError {
                message,
                kind: FaultKind::Resource,
            })?;
        ck(cu::init(), "cuInit")?;
        let dev = ck(cu::device::get(ordinal as i32), "cuDeviceGet")?;
        // SAFETY: `dev` is a valid device handle returned by cuDeviceGet.
        let ctx = ck(
            unsafe { cu::primary_ctx::retain(dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        // SAFETY: `ctx` was just retained and is valid.
        ck(unsafe { cu::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
        let stream = match ck(
            cu::stream::create(cu::stream::StreamKind::NonBlocking),
            "cuStreamCreate",
        ) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: balances the retain above; nothing was made in the context.
                let _ = unsafe { cu::primary_ctx::release(dev) };
                return Err(e);
            }
        };
        Ok(Arc::new(Self {
            dev,
            ctx,
            stream,
            lease,
        }))
    }

    /// Makes the context current on the calling thread.
    pub fn bind(&self) -> GpuResult<()> {
        // SAFETY: the context is retained for the lifetime of `self`.
        ck(unsafe { cu::ctx::set_current(self.ctx) }, "cuCtxSetCurrent")
    }

    /// Waits for all work on the stream and reports any asynchronous error.
    pub fn sync(&self) -> GpuResult<()> {
        // SAFETY: the stream belongs to this live context.
        ck(
            unsafe { cu::stream::synchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }

    /// Device attribute.
    pub fn attribute(&self, a: sys::CUdevice_attribute) -> GpuResult<i32> {
        // SAFETY: `dev` is a valid device handle.
        ck(
            unsafe { cu::device::get_attribute(self.dev, a) },
            "cuDeviceGetAttribute",
        )
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> GpuResult<(usize, usize)> {
        self.bind()?;
        ck(cu::mem_get_info(), "cuMemGetInfo")
    }

    /// The device handle.
    pub fn device(&self) -> sys::CUdevice {
        self.dev
    }

    /// Whether this context is dead: a fatal fault in it, here or in another instance on the
    /// same device ([`Context::mark_lost`]).
    pub fn lost(&self) -> bool {
        self.lease.lost()
    }

    /// A fatal fault happened in this context: every holder is to let go of it. Returns whether
    /// this call ended it (false when another holder already had).
    pub fn mark_lost(&self) -> bool {
        self.lease.mark_lost()
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.lease.ordinal()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every resource of the context holds an Arc to it, so none is left; the stream
        // and the retain are ours to release.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            let _ = cu::stream::synchronize(self.stream);
            let _ = cu::stream::destroy(self.stream);
            let _ = cu::primary_ctx::release(self.dev);
        }
    }
}

/// A device allocation.
pub struct DevBuf {
    ctx: Arc<Context>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DevBuf {
    /// Allocates `bytes` (at least 1) of device memory; running out is an error, not a crash.
    pub fn new(ctx: &Arc<Context>, bytes: usize) -> GpuResult<Self> {
        ctx.bind()?;
        // SAFETY: plain allocation in the current context; the memory is uninitialised and only
        // written by kernels or copies before being read.
        let ptr = ck(unsafe { cu::malloc_sync(bytes.max(1)) }, "cuMemAlloc")
            .map_err(|e| e.context(format_args!("allocating {bytes} bytes")))?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Allocates and uploads `data`.
    pub fn from_host<T: Copy>(ctx: &Arc<Context>, data: &[T]) -> GpuResult<Self> {
        let b = Self::new(ctx, std::mem::size_of_val(data))?;
        b.upload(0, data)?;
        Ok(b)
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The device address `bytes` into the buffer.
    pub fn at(&self, bytes: usize) -> u64 {
        debug_assert!(bytes <= self.bytes);
        self.ptr + bytes as u64
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `data` to byte offset `offset` (synchronous: returns when the copy is done).
    ///
    /// The copy is queued on the backend's stream and the stream is then synchronised. A plain
    /// `cuMemcpyHtoD` would run on the legacy default stream, which a non-blocking stream does
    /// not wait for, and from pageable memory it may return before the DMA has landed: a kernel
    /// queued right after could read stale tokens, positions or slots.
    pub fn upload<T: Copy>(&self, offset: usize, data: &[T]) -> GpuResult<()> {
        let n = std::mem::size_of_val(data);
        if offset + n > self.bytes {
            return Err(GpuError::invalid(format!(
                "upload of {n} bytes at {offset} overruns a buffer of {}",
                self.bytes
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the range [offset, offset + n) lies inside the allocation (checked above); the
        // copy is stream-ordered after the stream's earlier work, and the stream is synchronised
        // before returning, so `data` outlives it.
        unsafe {
            ck(
                cu::memcpy_htod_async(self.ptr + offset as u64, data, self.ctx.stream),
                "cuMemcpyHtoDAsync",
            )?;
        }
        self.ctx.sync()
    }

    /// Copies the start of the buffer into `out` (waits for the stream first).
    pub fn download<T: Copy>(&self, out: &mut [T]) -> GpuResult<()> {
        let n = std::mem::size_of_val(out);
        if n > self.bytes {
            return Err(GpuError::invalid(format!(
                "download of {n} bytes from a buffer of {}",
                self.bytes
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: `n` bytes lie inside the allocation; `out` is a valid host slice of `n` bytes
        // that outlives the copy (the stream is synchronised before returning); T is Copy plain
        // data written bytewise. Stream-ordered after the kernels that wrote the buffer.
        unsafe {
            ck(
                cu::memcpy_dtoh_async(out, self.ptr, self.ctx.stream),
                "cuMemcpyDtoHAsync",
            )?;
        }
        self.ctx.sync()
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from cuMemAlloc in this context and is freed once; the stream
        // is synchronised first so no queued kernel still uses it.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::free_sync(self.ptr);
        }
    }
}

/// Page-locked host memory, for fast asynchronous copies of logits.
pub struct PinnedBuf {
    ctx: Arc<Context>,
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the buffer is owned memory like a Box<[f32]>; access goes through &self / &mut self.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    /// `len` f32 of pinned host memory.
    pub fn new(ctx: &Arc<Context>, len: usize) -> GpuResult<Self> {
        ctx.bind()?;
        // SAFETY: allocation of len * 4 bytes of host memory; zero-initialised below before any
        // read.
        let ptr = ck(
            unsafe { cu::malloc_host(4 * len.max(1), 0) },
            "cuMemAllocHost",
        )? as *mut f32;
        // SAFETY: `ptr` points at len.max(1) f32 just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// The first `n` values (after [`PinnedBuf::copy_from`] and a sync).
    pub fn slice(&self, n: usize) -> &[f32] {
        // SAFETY: `ptr` holds `len` initialised f32 and n is clamped to it.
        unsafe { std::slice::from_raw_parts(self.ptr, n.min(self.len)) }
    }

    /// Queues a copy of `n` f32 from device address `src` into the buffer, then waits for it.
    pub fn copy_from(&mut self, src: u64, n: usize) -> GpuResult<()> {
        if n > self.len {
            return Err(GpuError::invalid(format!(
                "copy of {n} values into a pinned buffer of {}",
                self.len
            )));
        }
        // SAFETY: `n` f32 fit in the buffer; `src` is a device address the caller owns with at
        // least n f32; the stream is synchronised before the slice can be read.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.ptr, n);
            ck(
                cu::memcpy_dtoh_async(dst, src, self.ctx.stream),
                "cuMemcpyDtoHAsync",
            )?;
        }
        self.ctx.sync()
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocHost and freed once, after pending copies finish.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::free_host(self.ptr as *mut c_void);
        }
    }
}

/// A step's token ids on their way back: page-locked host memory the ids are copied into
/// asynchronously, queued on the stream right after the kernel that chose them, and an event
/// recorded after the copy. [`IdsDownload::wait`] waits for that event only (not the whole
/// stream), so a step left in flight costs one synchronisation, at its collection, and the host
/// never reads the memory while the copy may still write it.
pub struct IdsDownload {
    ctx: Arc<Context>,
    ptr: *mut i32,
    len: usize,
    done: Event,
    /// Ids a queued copy brings (0: none queued since the last wait).
    queued: usize,
}

// SAFETY: owned page-locked memory like a Box<[i32]>; written by the device only between a
// `queue` and the `wait` after it, read by the host only after that wait (both &mut self).
unsafe impl Send for IdsDownload {}

impl IdsDownload {
    /// Room for `len` ids.
    pub fn new(ctx: &Arc<Context>, len: usize) -> GpuResult<Self> {
        ctx.bind()?;
        let done = Event::new(ctx)?;
        // SAFETY: allocation of 4 len bytes of host memory, zeroed below before any read.
        let ptr = ck(
            unsafe { cu::malloc_host(4 * len.max(1), 0) },
            "cuMemAllocHost",
        )? as *mut i32;
        // SAFETY: `ptr` points at len.max(1) i32 just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            len,
            done,
            queued: 0,
        })
    }

    /// Queues the copy of `n` i32 from device address `src` (which holds them once the stream's
    /// earlier work is done) and the event after it; returns without waiting. With `n` = 0 only
    /// the event is recorded: `wait(0)` then waits for the work queued before it (a fused step
    /// that brings back no id).
    pub fn queue(&mut self, src: u64, n: usize) -> GpuResult<()> {
        if n > self.len {
            return Err(GpuError::invalid(format!(
                "download of {n} ids into room for {}",
                self.len
            )));
        }
        self.ctx.bind()?;
        // A copy still queued writes the same memory: never two at once (the backend waits for
        // each step's ids before the next step; this only guards a misuse).
        if self.queued > 0 {
            self.wait_event()?;
        }
        self.queued = 0;
        if n > 0 {
            // SAFETY: `n` i32 fit the allocation; `src` holds n i32 (the caller's); the host
            // reads the memory only after `wait`, which waits for the event recorded below,
            // after this copy on the same stream; Drop waits for the stream before freeing.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(self.ptr, n);
                ck(
                    cu::memcpy_dtoh_async(dst, src, self.ctx.stream),
                    "cuMemcpyDtoHAsync",
                )?;
            }
        }
        self.done.record()?;
        self.queued = n;
        Ok(())
    }

    fn wait_event(&self) -> GpuResult<()> {
        // SAFETY: the event is live and was recorded on this context's stream.
        ck(
            unsafe { cu::event::synchronize(self.done.ev) },
            "cuEventSynchronize",
        )
    }

    /// Waits for the last queued copy (its event: the work queued before it, not what came
    /// after) and returns its `n` ids; an error when no copy of at least `n` ids was queued.
    pub fn wait(&mut self, n: usize) -> GpuResult<Vec<i32>> {
        if n > self.queued {
            return Err(GpuError::invalid(format!(
                "{n} ids asked for, {} queued",
                self.queued
            )));
        }
        self.ctx.bind()?;
        self.wait_event()?;
        self.queued = 0;
        // SAFETY: the copy into the first n i32 is complete (its event is); nothing else
        // writes the memory until the next `queue` (&mut self).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, n) }.to_vec())
    }
}

impl Drop for IdsDownload {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocHost and freed once, after pending copies finish.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::free_host(self.ptr as *mut c_void);
        }
    }
}

/// Page-locked host memory that a step's inputs go up from without waiting: each
/// [`Staging::upload`] copies its data into the next free region and queues the copy to the
/// device on the stream, so the step's kernels (stream-ordered after it) start without the host
/// ever blocking on an upload. A region is never rewritten while a queued copy may still read
/// it: when the memory is full, the next upload waits for the stream first (every earlier copy
/// is then done) and starts again from the beginning. A step ends with one synchronisation (its
/// ids or logits coming back), so the wait is almost always free.
pub struct Staging {
    ctx: Arc<Context>,
    ptr: *mut u8,
    bytes: usize,
    /// Bytes from the start handed to copies since the last wrap.
    used: usize,
}

// SAFETY: owned page-locked memory like a Box<[u8]>; written only through &mut self.
unsafe impl Send for Staging {}

/// Alignment of each staged region (the copies' source addresses).
const STAGING_ALIGN: usize = 16;

impl Staging {
    /// `bytes` of pinned host memory.
    pub fn new(ctx: &Arc<Context>, bytes: usize) -> GpuResult<Self> {
        ctx.bind()?;
        let bytes = bytes.max(STAGING_ALIGN);
        // SAFETY: allocation of `bytes` bytes of host memory, only ever written before it is read
        // by a copy.
        let ptr = ck(unsafe { cu::malloc_host(bytes, 0) }, "cuMemAllocHost")? as *mut u8;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            bytes,
            used: 0,
        })
    }

    /// Queues a copy of `data` into `dst` at byte `offset`, through the staging memory, and
    /// returns without waiting for it. Data larger than the whole staging memory goes up with
    /// [`DevBuf::upload`] (which waits) instead.
    pub fn upload<T: Copy>(&mut self, dst: &DevBuf, offset: usize, data: &[T]) -> GpuResult<()> {
        let n = std::mem::size_of_val(data);
        if offset + n > dst.bytes {
            return Err(GpuError::invalid(format!(
                "upload of {n} bytes at {offset} overruns a buffer of {}",
                dst.bytes
            )));
        }
        if n == 0 {
            return Ok(());
        }
        if n > self.bytes {
            return dst.upload(offset, data);
        }
        let (start, wrap) = staging_region(self.used, n, self.bytes);
        if wrap {
            // Every queued copy must be done before a region is reused.
            self.ctx.sync()?;
        }
        self.ctx.bind()?;
        // SAFETY: [start, start + n) lies inside the allocation and no queued copy reads it (it
        // is past every region handed out since the last wait, or the stream was just waited
        // for); `data` is `n` bytes of plain Copy values. The copy reads the pinned region, which
        // lives as long as `self`, whose Drop waits for the stream before freeing it.
        unsafe {
            let region = self.ptr.add(start);
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, region, n);
            let src = std::slice::from_raw_parts(region as *const u8, n);
            ck(
                cu::memcpy_htod_async(dst.ptr + offset as u64, src, self.ctx.stream),
                "cuMemcpyHtoDAsync",
            )?;
        }
        self.used = start + n;
        Ok(())
    }
}

/// Where [`Staging::upload`] puts `n` bytes (`0 < n <= bytes`) when `used` bytes were handed
/// out since the last wrap: the next aligned offset, or 0 with `true` (wait for the stream
/// first) when they do not fit before the end.
fn staging_region(used: usize, n: usize, bytes: usize) -> (usize, bool) {
    let start = used.div_ceil(STAGING_ALIGN) * STAGING_ALIGN;
    if start + n > bytes {
        (0, true)
    } else {
        (start, false)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocHost and freed once, after pending copies finish.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::free_host(self.ptr as *mut c_void);
        }
    }
}

/// A kernel argument: a device pointer, a 32-bit int or float, or a 64-bit integer.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (`T*`).
    P(u64),
    /// An `int`.
    I(i32),
    /// A `float`.
    F(f32),
    /// An `unsigned long long`.
    U(u64),
}

/// A loaded CUDA module (one kernel family).
pub struct Module {
    ctx: Arc<Context>,
    module: sys::CUmodule,
}

// SAFETY: module and function handles are plain driver handles valid in any thread where the
// context is current.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// Loads a fatbin image.
    pub fn load(ctx: &Arc<Context>, image: &[u8]) -> GpuResult<Self> {
        ctx.bind()?;
        // The driver reads the fatbin header through aligned loads: copy into u64 storage.
        let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
        // SAFETY: `aligned` has at least image.len() bytes; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                image.as_ptr(),
                aligned.as_mut_ptr() as *mut u8,
                image.len(),
            )
        };
        // SAFETY: `aligned` holds a complete fatbin and lives until the call returns (the
        // driver copies the image).
        let module = ck(
            unsafe { cu::module::load_data(aligned.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        Ok(Self {
            ctx: ctx.clone(),
            module,
        })
    }

    /// Looks up an `extern "C"` kernel by name.
    pub fn function(&self, name: &str) -> GpuResult<Kernel> {
        let cname = std::ffi::CString::new(name).map_err(|e| GpuError::invalid(e.to_string()))?;
        // SAFETY: the module is loaded; the name is a valid C string.
        let f = unsafe { cu::module::get_function(self.module, cname) }.map_err(|e| {
            GpuError::invalid(format!(
                "kernel `{name}` is not in the embedded fatbin: {e:?}"
            ))
        })?;
        Ok(Kernel {
            f,
            name: name.to_string(),
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded by cuModuleLoadData and unloaded once, after pending work.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::module::unload(self.module);
        }
    }
}

/// A kernel entry point (valid while its [`Module`] lives; the kernel table keeps both).
#[derive(Clone)]
pub struct Kernel {
    f: sys::CUfunction,
    /// Its symbol.
    pub name: String,
}

// SAFETY: a CUfunction is a plain handle, usable from any thread with the context current.
unsafe impl Send for Kernel {}
// SAFETY: as above.
unsafe impl Sync for Kernel {}

impl Kernel {
    /// Queues the kernel on `ctx`'s stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and every
    /// pointer must address device memory large enough for what the kernel reads and writes
    /// with these arguments and launch geometry.
    pub unsafe fn launch(
        &self,
        ctx: &Context,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> GpuResult<()> {
        // SAFETY: the caller's guarantees; no dynamic shared memory.
        unsafe { self.launch_smem(ctx, grid, block, 0, args) }
    }

    /// Lets launches of this kernel use up to `bytes` of dynamic shared memory (past the 48 KiB
    /// default; H100: up to 227 KiB per block).
    pub fn allow_dynamic_smem(&self, bytes: usize) -> GpuResult<()> {
        let v = i32::try_from(bytes)
            .map_err(|_| GpuError::invalid(format!("{bytes} bytes of smem")))?;
        // SAFETY: a valid function handle; the driver checks the value against the device.
        ck(
            unsafe {
                cu::function::set_function_attribute(
                    self.f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    v,
                )
            },
            &format!("allowing {bytes} bytes of shared memory for {}", self.name),
        )
    }

    /// [`Kernel::launch`] with `smem` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// As [`Kernel::launch`]; `smem` within what [`Kernel::allow_dynamic_smem`] allowed.
    pub unsafe fn launch_smem(
        &self,
        ctx: &Context,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> GpuResult<()> {
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) | Arg::U(p) => p,
                Arg::I(i) => i as u32 as u64,
                Arg::F(f) => f.to_bits() as u64,
            })
            .collect();
        // Each parameter is read from the start of its 8-byte slot (little-endian x86-64, so a
        // 4-byte int or float sits in the low bytes).
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // SAFETY: the caller guarantees the arguments; `params` points at live slots that the
        // driver copies during the call.
        ck(
            unsafe {
                cu::launch_kernel(self.f, grid, (block, 1, 1), smem, ctx.stream, &mut params)
            },
            &format!("launching {}", self.name),
        )
    }
}

/// A CUDA event, for timing work on the stream.
pub struct Event {
    ctx: Arc<Context>,
    ev: sys::CUevent,
}

// SAFETY: a plain driver handle, recorded and read with the context current on the caller.
unsafe impl Send for Event {}

impl Event {
    /// A timing event.
    pub fn new(ctx: &Arc<Context>) -> GpuResult<Self> {
        ctx.bind()?;
        let ev = ck(
            cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT),
            "cuEventCreate",
        )?;
        Ok(Self {
            ctx: ctx.clone(),
            ev,
        })
    }

    /// Records the event on the stream.
    pub fn record(&self) -> GpuResult<()> {
        // SAFETY: event and stream belong to the same live context.
        ck(
            unsafe { cu::event::record(self.ev, self.ctx.stream) },
            "cuEventRecord",
        )
    }

    /// Milliseconds from `self` to `end`, waiting for `end`.
    pub fn elapsed_ms(&self, end: &Event) -> GpuResult<f32> {
        // SAFETY: both events are live and were recorded on this context's stream.
        unsafe {
            ck(cu::event::synchronize(end.ev), "cuEventSynchronize")?;
            ck(cu::event::elapsed(self.ev, end.ev), "cuEventElapsedTime")
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate and destroyed once.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::event::destroy(self.ev);
        }
    }
}

/// An instantiated CUDA graph (a captured decode step).
pub struct Graph {
    ctx: Arc<Context>,
    exec: sys::CUgraphExec,
}

// SAFETY: a plain driver handle, launched only with `&mut` access to the backend.
unsafe impl Send for Graph {}

impl Graph {
    /// Captures everything `record` queues on the stream into a graph and instantiates it. The
    /// work is not run by the capture.
    pub fn capture(ctx: &Arc<Context>, record: impl FnOnce() -> GpuResult<()>) -> GpuResult<Self> {
        ctx.bind()?;
        // SAFETY: the stream is live and not capturing; thread-local mode refuses unsafe calls
        // from this thread (such as synchronous allocations) during the capture.
        let begun = unsafe {
            cu::stream::begin_capture(
                ctx.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        };
        ck(begun, "cuStreamBeginCapture")?;
        let recorded = record();
        // SAFETY: ends the capture begun above, whatever `record` did.
        let graph = ck(
            unsafe { cu::stream::end_capture(ctx.stream) },
            "cuStreamEndCapture",
        );
        let graph = match (recorded, graph) {
            (Ok(()), Ok(g)) => g,
            (Err(e), Ok(g)) => {
                // SAFETY: the graph was produced by the capture and is destroyed once.
                let _ = unsafe { cu::graph::destroy(g) };
                return Err(e);
            }
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
        };
        // SAFETY: `graph` is a complete captured graph; it is destroyed after instantiation.
        let exec = unsafe {
            let exec = ck(
                cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)),
                "cuGraphInstantiate",
            );
            let _ = cu::graph::destroy(graph);
            exec?
        };
        Ok(Self {
            ctx: ctx.clone(),
            exec,
        })
    }

    /// Queues one replay on the stream.
    pub fn launch(&self) -> GpuResult<()> {
        // SAFETY: the executable graph and the stream are live; the buffers it uses are owned by
        // the backend that owns this graph and are never reallocated.
        ck(
            unsafe { cu::graph::launch(self.exec, self.ctx.stream) },
            "cuGraphLaunch",
        )
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: instantiated once and destroyed once, after pending replays.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = cu::graph::exec_destroy(self.exec);
        }
    }
}

/// Bytes of cuBLAS workspace given to the handle (so that graph capture never makes cuBLAS
/// allocate).
pub(crate) const CUBLAS_WORKSPACE: usize = 32 << 20;

/// A cuBLAS handle bound to the context's stream, with its own workspace.
pub struct Cublas {
    ctx: Arc<Context>,
    handle: bsys::cublasHandle_t,
    _workspace: DevBuf,
}

// SAFETY: a cuBLAS handle may be used from any thread, one at a time (`&mut` access).
unsafe impl Send for Cublas {}

impl Cublas {
    /// Creates the handle, on the context's stream, with a fixed workspace.
    pub fn new(ctx: &Arc<Context>) -> GpuResult<Self> {
        if !cublas_present() {
            return Err(GpuError::invalid(
                "cuBLAS (libcublas.so.13) could not be loaded: add its directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        ctx.bind()?;
        let workspace = DevBuf::new(ctx, CUBLAS_WORKSPACE)?;
        let handle = ckb(blas::create_handle(), "cublasCreate")?;
        let this = Self {
            ctx: ctx.clone(),
            handle,
            _workspace: workspace,
        };
        // SAFETY: handle, stream and workspace are live; the workspace outlives the handle (it
        // is dropped after it, being a later field).
        unsafe {
            ckb(
                blas::set_stream(handle, ctx.stream as bsys::cudaStream_t),
                "cublasSetStream",
            )?;
            ckb(
                bsys::cublasSetWorkspace_v2(
                    handle,
                    this._workspace.ptr() as *mut c_void,
                    CUBLAS_WORKSPACE,
                )
                .result(),
                "cublasSetWorkspace",
            )?;
        }
        Ok(this)
    }

    /// `C (rows x cols, column-major, ldc = rows) = W · B`, i.e. in row-major terms
    /// `Y[c][r] = Σ_k W[r][k] · X[c][k]`: W is a row-major BF16 `rows x k` weight (the Hugging
    /// Face layout), X holds `cols` BF16 activation rows of `k` values with a stride of `ldb`
    /// elements, Y is f32 `cols x rows`. FP32 accumulation (`CUBLAS_COMPUTE_32F`), FP32 output.
    ///
    /// # Safety
    /// `w` must hold `rows * k` BF16, `x` must hold `(cols - 1) * ldb + k` BF16 and `y`
    /// `rows * cols` f32, all device memory of this context.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_bf16(
        &self,
        w: u64,
        rows: usize,
        k: usize,
        x: u64,
        ldb: usize,
        cols: usize,
        y: u64,
    ) -> GpuResult<()> {
        // SAFETY: the caller's guarantees, with ldc = rows.
        unsafe { self.gemm_bf16_ldc(w, rows, k, x, ldb, cols, y, rows) }
    }

    /// [`Cublas::gemm_bf16`] writing each activation row's `rows` outputs `ldc` f32 apart (a
    /// chunk of a matrix's rows into its place in the whole product).
    ///
    /// # Safety
    /// As [`Cublas::gemm_bf16`], with `y` holding `(cols - 1) * ldc + rows` f32 and
    /// `ldc >= rows`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_bf16_ldc(
        &self,
        w: u64,
        rows: usize,
        k: usize,
        x: u64,
        ldb: usize,
        cols: usize,
        y: u64,
        ldc: usize,
    ) -> GpuResult<()> {
        if ldc < rows {
            return Err(GpuError::invalid(format!("GEMM ldc {ldc} < rows {rows}")));
        }
        let (one, zero) = (1.0f32, 0.0f32);
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| GpuError::invalid(format!("GEMM {what} {v} exceeds i32")))
        };
        let (m, n, kk, ldb, ldc) = (
            int(rows, "rows")?,
            int(cols, "cols")?,
            int(k, "k")?,
            int(ldb, "ldb")?,
            int(ldc, "ldc")?,
        );
        let _ = &self.ctx;
        // SAFETY: the caller guarantees the extents; alpha and beta are host f32 (the handle's
        // default host pointer mode), read during the call.
        ckb(
            unsafe {
                blas::gemm_ex(
                    self.handle,
                    bsys::cublasOperation_t::CUBLAS_OP_T,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    kk,
                    &one as *const f32 as *const c_void,
                    w as *const c_void,
                    bsys::cudaDataType::CUDA_R_16BF,
                    kk,
                    x as *const c_void,
                    bsys::cudaDataType::CUDA_R_16BF,
                    ldb,
                    &zero as *const f32 as *const c_void,
                    y as *mut c_void,
                    bsys::cudaDataType::CUDA_R_32F,
                    ldc,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            },
            "cublasGemmEx",
        )
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once, after pending work on the stream.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx.ctx);
            let _ = cu::stream::synchronize(self.ctx.stream);
            let _ = blas::destroy_handle(self.handle);
        }
    }
}

/// Queues a device-to-device copy of `bytes` on the stream.
///
/// # Safety
/// Both addresses must hold `bytes` bytes of device memory of this context.
pub unsafe fn copy_dtod(ctx: &Context, dst: u64, src: u64, bytes: usize) -> GpuResult<()> {
    // SAFETY: guaranteed by the caller.
    ck(
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, ctx.stream) },
        "cuMemcpyDtoDAsync",
    )
}

/// The installed driver's CUDA version as `major * 1000 + minor * 10` (13000 for CUDA 13.0).
pub fn driver_version() -> GpuResult<i32> {
    let mut v = 0i32;
    // SAFETY: writes one int.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    ck(r.result(), "cuDriverGetVersion")?;
    Ok(v)
}

/// The device's name.
pub fn device_name(dev: sys::CUdevice) -> GpuResult<String> {
    ck(cu::device::get_name(dev), "cuDeviceGetName")
}

/// Whether the driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { sys::is_culib_present() }
}

/// Whether cuBLAS (`libcublas.so.13`) can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { bsys::is_culib_present() }
}

/// The cuBLAS library that was loaded: its version `(major, minor, patch)` and, where
/// `/proc/self/maps` shows it, its path. cudarc tries several names (`libcublas.so` first, then
/// `.so.13`, then older majors), so the one actually loaded may not be CUDA 13's.
pub fn cublas_loaded() -> GpuResult<((i32, i32, i32), Option<String>)> {
    use bsys::libraryPropertyType as P;
    let get = |p: P, what: &str| -> GpuResult<i32> {
        let mut v = 0;
        // SAFETY: a plain query of the loaded library; `v` outlives the call.
        let st = unsafe { bsys::cublasGetProperty(p, &mut v) };
        if st != bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(GpuError::invalid(format!(
                "cublasGetProperty({what}): {st:?}"
            )));
        }
        Ok(v)
    };
    let version = (
        get(P::MAJOR_VERSION, "major")?,
        get(P::MINOR_VERSION, "minor")?,
        get(P::PATCH_LEVEL, "patch")?,
    );
    let path = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| {
                    p.rsplit('/').next().is_some_and(|f| {
                        f.starts_with("libcublas.so") || f.starts_with("libcublas64")
                    })
                })
                .map(str::to_string)
        });
    Ok((version, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Staged regions never overlap a region handed out since the last wait: consecutive ones
    /// are disjoint and aligned, and one that does not fit before the end starts again at 0
    /// only with a wait.
    #[test]
    fn staging_regions_are_disjoint_until_a_wait() {
        let bytes = 1000;
        let mut used = 0;
        let mut live: Vec<(usize, usize)> = Vec::new();
        let mut waits = 0;
        for (k, n) in [7usize, 100, 1, 16, 400, 300, 250, 3, 999, 1000, 64]
            .into_iter()
            .enumerate()
        {
            let (start, wrap) = staging_region(used, n, bytes);
            if wrap {
                waits += 1;
                live.clear();
            }
            assert_eq!(start % STAGING_ALIGN, 0, "upload {k}");
            assert!(start + n <= bytes, "upload {k} overruns");
            for &(a, b) in &live {
                assert!(
                    start >= b || start + n <= a,
                    "upload {k} overlaps [{a}, {b})"
                );
            }
            live.push((start, start + n));
            used = start + n;
        }
        assert!(waits >= 3, "{waits} waits");
        assert_eq!(staging_region(0, bytes, bytes), (0, false));
        assert_eq!(staging_region(1, bytes, bytes), (0, true));
    }
}
