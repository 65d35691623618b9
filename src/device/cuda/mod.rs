//! The CUDA backend: the whole Llama step on the GPU, each linear layer stored compressed (tbe3)
//! or raw and multiplied by the strategy its [`plan`] names ([`linear`]: fused GEMV, tensor-core
//! kernel, or cuBLAS after a chunked decode); the autotuner ([`tune`]) makes the plans.
//!
//! Owns: the device context and stream ([`driver`]), the embedded kernels ([`kernels`],
//! [`tbe3`], [`mma`], [`gather`]), the weights in device memory, a KV cache preallocated from a memory budget (`kv`), and one CUDA
//! graph per decode batch-size bucket ([`backend`]). It chooses decode tokens on the device
//! ([`sample`]: greedy ids, or the sampler of docs/sampling.md) so only ids cross PCIe; a
//! prompt's first token is still sampled by the engine from the one row of logits a prefill
//! returns. Must not allocate device memory after construction (so a request can be refused,
//! never run out of memory).
//!
//! Runtime probing: [`probe`] says whether this process can run the backend, and if not, why
//! (built without kernels, no driver library, a driver older than CUDA 13.0, no device, wrong
//! architecture, no cuBLAS). The driver and cuBLAS are loaded at run time (cudarc's
//! `dynamic-loading`), so the same binary runs on machines without a GPU;
//! [`crate::device::load_backend`] falls back to the CPU there and says why. docs/cuda.md
//! describes the layout, the numerics and what was verified where.

pub mod backend;
pub mod driver;
pub mod gather;
pub mod harness;
pub mod kernels;
mod kv;
pub mod linear;
pub mod mma;
pub mod options;
pub mod persist;
pub mod plan;
pub mod sample;
pub mod sizing;
pub mod stream;
pub mod tbe3;
pub mod tune;
pub(crate) mod weights;

pub use backend::{CudaBackend, StepTiming};
pub use harness::KernelHarness;
pub use options::{CudaOptions, PlanChoice, PlanSource};

use std::sync::Arc;

use self::driver::{Context, GpuError};
use super::DeviceError;

impl From<GpuError> for DeviceError {
    fn from(e: GpuError) -> Self {
        DeviceError::Cuda(e)
    }
}

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Its name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
    /// L2 cache bytes.
    pub l2_bytes: i32,
    /// Device memory bytes.
    pub total_memory: usize,
    /// Free device memory bytes when first probed (the probe of device 0 runs once per process).
    pub free_memory: usize,
    /// The cuBLAS library loaded: version and path (`/proc/self/maps`), so a log or a result
    /// file says which one ran; probing refuses one older than CUDA 13's.
    pub cublas: Option<String>,
    /// The driver's CUDA version, `major * 1000 + minor * 10`.
    pub driver_cuda_version: i32,
    /// The nvcc that built the kernels.
    pub nvcc: Option<String>,
}

/// Set to `1` to make [`probe`] report no GPU (tests of the fallback on a GPU machine).
pub const FORCE_NO_GPU_ENV: &str = "UNWEIGHT_FORCE_NO_GPU";

/// The oldest driver the kernels load on, as `cuDriverGetVersion` reports it (`major * 1000 +
/// minor * 10`): they are built by CUDA 13.0's nvcc (sm_90a SASS and compute_90a PTX), and
/// cudarc is bound to the 13.0 driver API. An older driver would pass every other check and fail
/// later, at module load, as an error instead of the CPU fallback, so [`probe`] refuses it.
pub const MIN_DRIVER_CUDA_VERSION: i32 = 13000;

/// `Err(reason)` when a driver reporting CUDA `version` (`cuDriverGetVersion`'s form) is older
/// than [`MIN_DRIVER_CUDA_VERSION`]. Pure, so the message is unit-tested without a GPU.
pub fn check_driver_version(version: i32) -> Result<(), String> {
    if version >= MIN_DRIVER_CUDA_VERSION {
        return Ok(());
    }
    let v = |x: i32| format!("{}.{}", x / 1000, x % 1000 / 10);
    Err(format!(
        "the NVIDIA driver supports CUDA {}, the kernels need {} or newer (update the driver)",
        v(version),
        v(MIN_DRIVER_CUDA_VERSION)
    ))
}

/// Whether device 0 can run this backend: `Ok` with its description, or `Err` with the reason it
/// cannot. Never panics (a panic in the dynamic loader is caught and reported).
pub fn probe() -> Result<DeviceInfo, String> {
    probe_ordinal(0)
}

/// [`probe`] for device `ordinal`.
pub fn probe_ordinal(ordinal: usize) -> Result<DeviceInfo, String> {
    if std::env::var_os(FORCE_NO_GPU_ENV).is_some_and(|v| v == "1") {
        return Err(format!("{FORCE_NO_GPU_ENV}=1"));
    }
    if !kernels::built_with_kernels() {
        return Err(
            "built without CUDA kernels (nvcc was not found when the crate was compiled)".into(),
        );
    }
    if !driver::driver_present() {
        return Err("no NVIDIA driver: libcuda.so could not be loaded".into());
    }
    let run = || {
        std::panic::catch_unwind(|| probe_inner(ordinal))
            .unwrap_or_else(|_| Err("the CUDA driver library failed to load (panic caught)".into()))
    };
    // Once per process for the default device: a probe retains and releases the primary context,
    // which creates and destroys it when nothing else holds it (a second or more per probe).
    if ordinal == 0 {
        static PROBED: std::sync::OnceLock<Result<DeviceInfo, String>> = std::sync::OnceLock::new();
        return PROBED.get_or_init(run).clone();
    }
    run()
}

fn probe_inner(ordinal: usize) -> Result<DeviceInfo, String> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    // Before cuInit and any other call: cuDriverGetVersion needs neither, and an old driver may
    // lack the versioned entry points (`_v2`, ...) the 13.0 bindings resolve later.
    let driver_cuda_version = driver::driver_version().map_err(|e| e.message)?;
    check_driver_version(driver_cuda_version)?;
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?} (no usable GPU)"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if count <= ordinal as i32 {
        return Err(format!("no CUDA device {ordinal} ({count} found)"));
    }
    let ctx: Arc<Context> = Context::new(ordinal).map_err(|e| e.message)?;
    let attr = |a| ctx.attribute(a).map_err(|e| e.message);
    let cc = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let name = driver::device_name(ctx.device()).map_err(|e| e.message)?;
    if cc != (9, 0) {
        return Err(format!(
            "{name} has compute capability {}.{}; the kernels are built for sm_90a (H100/H200) only",
            cc.0, cc.1
        ));
    }
    if !driver::cublas_present() {
        return Err(
            "cuBLAS (libcublas.so.13) could not be loaded: add its directory to LD_LIBRARY_PATH"
                .into(),
        );
    }
    let ((major, minor, patch), path) = driver::cublas_loaded().map_err(|e| e.message)?;
    let where_ = path
        .as_deref()
        .unwrap_or("(path not found in /proc/self/maps)");
    if major < 13 {
        return Err(format!(
            "the cuBLAS loaded is version {major}.{minor}.{patch} ({where_}); unweight needs CUDA \
             13's cuBLAS (libcublas.so.13): put its directory first on LD_LIBRARY_PATH"
        ));
    }
    let cublas = format!("{major}.{minor}.{patch} at {where_}");
    tracing::info!(cublas = %cublas, "cuBLAS loaded");
    let (free_memory, total_memory) = ctx.mem_info().map_err(|e| e.message)?;
    Ok(DeviceInfo {
        cublas: Some(cublas),
        ordinal,
        name,
        compute_capability: cc,
        multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
        total_memory,
        free_memory,
        driver_cuda_version,
        nvcc: kernels::nvcc_version().map(str::to_string),
    })
}

/// Median device-to-device copy bandwidth in bytes per second, counting bytes read plus bytes
/// written, over `repeats` copies of `bytes` (pick more than the L2 cache), timed with events
/// after a warm-up. The ceiling a memory-bound step is compared with.
pub fn copy_bandwidth(bytes: usize, repeats: usize) -> Result<f64, DeviceError> {
    use self::driver::{copy_dtod, DevBuf, Event};
    let ctx = Context::new(0)?;
    let (a, b) = (DevBuf::new(&ctx, bytes)?, DevBuf::new(&ctx, bytes)?);
    let (start, end) = (Event::new(&ctx)?, Event::new(&ctx)?);
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats.max(1) + 2 {
        let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        start.record()?;
        // SAFETY: both buffers hold `bytes` bytes of this context.
        unsafe { copy_dtod(&ctx, dst.ptr(), src.ptr(), bytes)? };
        end.record()?;
        let ms = start.elapsed_ms(&end)?;
        if i >= 2 {
            times.push(ms as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(2.0 * bytes as f64 / (median * 1e-3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_older_than_cuda_13_are_refused_with_both_versions() {
        assert_eq!(check_driver_version(13000), Ok(()));
        assert_eq!(check_driver_version(13020), Ok(()));
        assert_eq!(check_driver_version(14000), Ok(()));
        let e = check_driver_version(12080).unwrap_err();
        assert_eq!(
            e,
            "the NVIDIA driver supports CUDA 12.8, the kernels need 13.0 or newer (update the \
             driver)"
        );
        assert!(check_driver_version(12090)
            .unwrap_err()
            .contains("supports CUDA 12.9,"));
        assert!(check_driver_version(11040)
            .unwrap_err()
            .contains("supports CUDA 11.4,"));
        // One below the minimum: 12.99 is not a real release but must still be refused.
        assert!(check_driver_version(MIN_DRIVER_CUDA_VERSION - 1).is_err());
        assert!(check_driver_version(0).unwrap_err().contains("CUDA 0.0,"));
    }

    #[test]
    fn driver_result_codes_map_to_the_fault_kind_the_cuda_documentation_gives_them() {
        use super::driver::{fault_kind_of_code, fault_kind_of_cublas_status, FaultKind};
        use cudarc::cublas::sys::cublasStatus_t as B;
        use cudarc::driver::sys::CUresult as R;
        // By cudarc's names, so a wrong number in the table fails here.
        let fatal = [
            R::CUDA_ERROR_ILLEGAL_ADDRESS,
            R::CUDA_ERROR_LAUNCH_FAILED,
            R::CUDA_ERROR_LAUNCH_TIMEOUT,
            R::CUDA_ERROR_ECC_UNCORRECTABLE,
            R::CUDA_ERROR_NVLINK_UNCORRECTABLE,
            R::CUDA_ERROR_HARDWARE_STACK_ERROR,
            R::CUDA_ERROR_ILLEGAL_INSTRUCTION,
            R::CUDA_ERROR_MISALIGNED_ADDRESS,
            R::CUDA_ERROR_INVALID_ADDRESS_SPACE,
            R::CUDA_ERROR_INVALID_PC,
            R::CUDA_ERROR_ASSERT,
            R::CUDA_ERROR_CONTEXT_IS_DESTROYED,
            R::CUDA_ERROR_DEINITIALIZED,
            R::CUDA_ERROR_DEVICE_UNAVAILABLE,
            R::CUDA_ERROR_CONTAINED,
            R::CUDA_ERROR_TENSOR_MEMORY_LEAK,
            R::CUDA_ERROR_SYSTEM_NOT_READY,
            R::CUDA_ERROR_UNKNOWN,
        ];
        for c in fatal {
            assert_eq!(fault_kind_of_code(c as u32), FaultKind::Fatal, "{c:?}");
        }
        for c in [
            R::CUDA_ERROR_OUT_OF_MEMORY,
            R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
        ] {
            assert_eq!(fault_kind_of_code(c as u32), FaultKind::Resource, "{c:?}");
        }
        for c in [
            R::CUDA_ERROR_INVALID_VALUE,
            R::CUDA_ERROR_INVALID_HANDLE,
            R::CUDA_ERROR_INVALID_IMAGE,
            R::CUDA_ERROR_NOT_FOUND,
            R::CUDA_ERROR_NOT_READY,
            R::CUDA_ERROR_NO_BINARY_FOR_GPU,
            R::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE,
            R::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
        ] {
            assert_eq!(fault_kind_of_code(c as u32), FaultKind::Invalid, "{c:?}");
        }
        assert_eq!(
            fault_kind_of_cublas_status(B::CUBLAS_STATUS_ALLOC_FAILED as u32),
            FaultKind::Resource
        );
        for c in [
            B::CUBLAS_STATUS_EXECUTION_FAILED,
            B::CUBLAS_STATUS_INTERNAL_ERROR,
        ] {
            assert_eq!(fault_kind_of_cublas_status(c as u32), FaultKind::Fatal);
        }
        assert_eq!(
            fault_kind_of_cublas_status(B::CUBLAS_STATUS_INVALID_VALUE as u32),
            FaultKind::Invalid
        );
    }

    #[test]
    fn a_fault_keeps_its_kind_through_every_layer_that_describes_it() {
        use super::driver::{FaultKind, GpuError};
        let fatal = GpuError {
            message: "cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED".into(),
            kind: FaultKind::Fatal,
        };
        let e: DeviceError = fatal.context("q_proj").context("layer 3").into();
        assert_eq!(e.kind(), FaultKind::Fatal);
        assert_eq!(
            e.to_string(),
            "CUDA: layer 3: q_proj: cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED"
        );
        assert_eq!(
            DeviceError::cuda("too big".into()).kind(),
            FaultKind::Invalid
        );
        assert_eq!(DeviceError::NoFreeSlot(4).kind(), FaultKind::Resource);
        assert_eq!(
            DeviceError::Invalid("empty prompt".into()).kind(),
            FaultKind::Invalid
        );
    }
}
