//! Per-model and per-instance state, created in the Initialize entry points and stored in Triton
//! as opaque pointers (`TRITONBACKEND_ModelSetState` / `ModelInstanceSetState`).
//!
//! Ownership: `ModelInitialize` boxes a [`ModelState`] and hands Triton the raw pointer;
//! `ModelFinalize` takes it back and drops it. The same holds for [`InstanceState`]. Triton
//! finalizes every instance of a model before the model, so an instance may borrow its model's
//! state for its whole life.

use std::ffi::{c_void, CStr};
use std::path::PathBuf;
use std::ptr;

use std::sync::Arc;

use super::backend_config::BackendSettings;
use super::config::{DeviceChoice, InstanceKind, ModelConfig};
use super::error::{check, TritonError};
use super::metrics::{InstanceMetrics, Metric, ModelMetrics};
use super::request::InstanceHandle;
use super::served::{Placement, Served};
use super::sys;
use super::worker::Worker;

/// Everything a model needs, read once from Triton at `ModelInitialize`.
#[derive(Debug)]
pub(super) struct ModelState {
    /// The model's name.
    pub name: String,
    /// The version being loaded.
    pub version: u64,
    /// The version folder, `<repository>/<model>/<version>`.
    pub version_dir: PathBuf,
    /// The validated configuration.
    pub config: ModelConfig,
    /// The loaded model, shared with the instances.
    pub served: Arc<Served>,
    /// Its custom metrics; `None` when the server refused them (no metrics support).
    pub metrics: Option<Arc<ModelMetrics>>,
}

/// One model instance.
#[derive(Debug)]
pub(super) struct InstanceState {
    /// Triton's name of the instance.
    pub name: String,
    /// Its kind (never `Auto`: Triton resolves it before creating instances).
    pub kind: InstanceKind,
    /// Its GPU id (meaningful for `Gpu`).
    pub device_id: i32,
    /// The model it serves.
    pub served: Arc<Served>,
    /// Its engine thread; taken by ModelInstanceFinalize.
    pub worker: Option<Worker>,
    /// Triton's handle of the instance.
    pub handle: InstanceHandle,
}

/// A C string from Triton, copied; null is an error naming `what`.
///
/// # Safety
/// `p` is null or a valid NUL-terminated string.
unsafe fn owned_str(p: *const std::ffi::c_char, what: &str) -> Result<String, TritonError> {
    if p.is_null() {
        return Err(TritonError::Internal {
            context: format!("Triton returned no {what}"),
            source: "null pointer".into(),
        });
    }
    // SAFETY: non-null, and a valid C string by the caller's contract.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl ModelState {
    /// Reads name, version, repository and configuration of `model` and validates them.
    ///
    /// # Safety
    /// `model` is the live handle passed to `TRITONBACKEND_ModelInitialize`.
    pub unsafe fn from_triton(model: *mut sys::TRITONBACKEND_Model) -> Result<Self, TritonError> {
        let mut name_p = ptr::null();
        // SAFETY: live handle (contract); the out-pointer is a valid local.
        unsafe {
            check(
                "TRITONBACKEND_ModelName",
                sys::TRITONBACKEND_ModelName(model, &mut name_p),
            )?
        };
        // SAFETY: Triton returns a NUL-terminated name that lives as long as the model.
        let name = unsafe { owned_str(name_p, "model name")? };

        let mut version = 0u64;
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelVersion",
                sys::TRITONBACKEND_ModelVersion(model, &mut version),
            )?
        };

        let mut artifact: sys::TRITONBACKEND_ArtifactType = 0;
        let mut location = ptr::null();
        // SAFETY: live handle; valid out-pointers.
        unsafe {
            check(
                "TRITONBACKEND_ModelRepository",
                sys::TRITONBACKEND_ModelRepository(model, &mut artifact, &mut location),
            )?
        };
        if artifact != sys::TRITONBACKEND_ARTIFACT_FILESYSTEM {
            return Err(TritonError::Unsupported(format!(
                "model {name}: repository artifact type {artifact}; only a filesystem repository is supported"
            )));
        }
        // SAFETY: a NUL-terminated path that lives as long as the model.
        let repository = PathBuf::from(unsafe { owned_str(location, "model repository")? });
        let version_dir = repository.join(version.to_string());

        // SAFETY: live handle (contract).
        let json = unsafe { model_config_json(model)? };
        let config = ModelConfig::from_json(&json, &version_dir)?;
        // SAFETY: live handle (contract).
        let settings = unsafe { backend_settings(model)? };
        let served = Served::load(&config, &settings).map_err(|e| match e {
            TritonError::ModelFiles { dir, source } => TritonError::ModelFiles {
                dir: format!("{dir} (model {name} version {version})"),
                source,
            },
            other => other,
        })?;
        let metrics = match ModelMetrics::new(&name, version) {
            Ok(m) => {
                m.set(Metric::WeightStoredBytes, served.weight_stored_bytes as f64);
                m.set(Metric::WeightBf16Bytes, served.weight_bf16_bytes as f64);
                Some(Arc::new(m))
            }
            Err(e) => {
                tracing::warn!(
                    "model {name} version {version}: serving without custom metrics: {}",
                    e.chain()
                );
                None
            }
        };
        Ok(ModelState {
            name,
            version,
            version_dir,
            config,
            served: Arc::new(served),
            metrics,
        })
    }
}

/// The backend's settings, stored by TRITONBACKEND_Initialize in the backend state (defaults
/// when there is none).
///
/// # Safety
/// `model` is a live model handle.
unsafe fn backend_settings(
    model: *mut sys::TRITONBACKEND_Model,
) -> Result<BackendSettings, TritonError> {
    let mut backend = ptr::null_mut();
    // SAFETY: live handle; valid out-pointer.
    unsafe {
        check(
            "TRITONBACKEND_ModelBackend",
            sys::TRITONBACKEND_ModelBackend(model, &mut backend),
        )?
    };
    let mut raw: *mut c_void = ptr::null_mut();
    // SAFETY: the backend handle just returned is live; valid out-pointer.
    unsafe {
        check(
            "TRITONBACKEND_BackendState",
            sys::TRITONBACKEND_BackendState(backend, &mut raw),
        )?
    };
    if raw.is_null() {
        return Ok(BackendSettings::default());
    }
    // SAFETY: set by TRITONBACKEND_Initialize from `into_raw::<BackendSettings>`, freed only by
    // TRITONBACKEND_Finalize, which Triton calls after every model is finalized.
    Ok(unsafe { &*raw.cast::<BackendSettings>() }.clone())
}

/// The model configuration as JSON (config version 1). The message is ours and is deleted here.
///
/// # Safety
/// `model` is a live model handle.
unsafe fn model_config_json(model: *mut sys::TRITONBACKEND_Model) -> Result<String, TritonError> {
    let mut message: *mut sys::TRITONSERVER_Message = ptr::null_mut();
    // SAFETY: live handle; valid out-pointer. Config version 1 is the only one defined.
    unsafe {
        check(
            "TRITONBACKEND_ModelConfig",
            sys::TRITONBACKEND_ModelConfig(model, 1, &mut message),
        )?
    };
    let mut base = ptr::null();
    let mut len = 0usize;
    // SAFETY: `message` is the live message just returned; valid out-pointers.
    let serialized = unsafe {
        check(
            "TRITONSERVER_MessageSerializeToJson",
            sys::TRITONSERVER_MessageSerializeToJson(message, &mut base, &mut len),
        )
    };
    let json = serialized.and_then(|()| {
        if base.is_null() {
            return Err(TritonError::Internal {
                context: "TRITONSERVER_MessageSerializeToJson".into(),
                source: "null buffer".into(),
            });
        }
        // SAFETY: `base` points to `len` bytes owned by `message`, alive until the delete below;
        // they are copied out first.
        let bytes = unsafe { std::slice::from_raw_parts(base.cast::<u8>(), len) };
        Ok(String::from_utf8_lossy(bytes).into_owned())
    });
    // SAFETY: the caller owns the message returned by ModelConfig; deleted exactly once, after
    // the last use of its buffer.
    let deleted = unsafe {
        check(
            "TRITONSERVER_MessageDelete",
            sys::TRITONSERVER_MessageDelete(message),
        )
    };
    let json = json?;
    deleted?;
    Ok(json)
}

impl InstanceState {
    /// Reads name, kind and device of `instance` and checks them against the model.
    ///
    /// # Safety
    /// `instance` is the live handle passed to `TRITONBACKEND_ModelInstanceInitialize`.
    pub unsafe fn from_triton(
        instance: *mut sys::TRITONBACKEND_ModelInstance,
        model: &ModelState,
    ) -> Result<Self, TritonError> {
        let mut name_p = ptr::null();
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceName",
                sys::TRITONBACKEND_ModelInstanceName(instance, &mut name_p),
            )?
        };
        // SAFETY: a NUL-terminated name that lives as long as the instance.
        let name = unsafe { owned_str(name_p, "instance name")? };

        let mut kind_raw: sys::TRITONSERVER_InstanceGroupKind = 0;
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceKind",
                sys::TRITONBACKEND_ModelInstanceKind(instance, &mut kind_raw),
            )?
        };
        let kind = match kind_raw {
            sys::TRITONSERVER_INSTANCEGROUPKIND_CPU => InstanceKind::Cpu,
            sys::TRITONSERVER_INSTANCEGROUPKIND_GPU => InstanceKind::Gpu,
            other => {
                return Err(TritonError::Unsupported(format!(
                    "instance {name}: instance group kind {other}; use KIND_GPU or KIND_CPU"
                )))
            }
        };

        let clash = matches!(
            (model.config.device, kind),
            (DeviceChoice::Cpu, InstanceKind::Gpu) | (DeviceChoice::Gpu, InstanceKind::Cpu)
        );
        if clash {
            return Err(TritonError::config(
                "parameters.device",
                format!(
                    "{:?} contradicts instance {name} of kind {kind:?}",
                    model.config.device
                ),
            ));
        }

        let mut device_id = 0i32;
        // SAFETY: live handle; valid out-pointer.
        unsafe {
            check(
                "TRITONBACKEND_ModelInstanceDeviceId",
                sys::TRITONBACKEND_ModelInstanceDeviceId(instance, &mut device_id),
            )?
        };
        let placement = match kind {
            InstanceKind::Gpu => Placement::Gpu {
                ordinal: usize::try_from(device_id).map_err(|_| {
                    TritonError::config(
                        "instance_group.gpus",
                        format!("instance {name}: device id {device_id} is negative"),
                    )
                })?,
                required: model.config.device == DeviceChoice::Gpu,
            },
            _ => Placement::Cpu,
        };
        let served = Arc::clone(&model.served);
        let handle = InstanceHandle(instance);
        let limit = served.max_sequences.saturating_mul(4).max(1);
        let engine = served.engine(&name, placement)?;
        let rebuild = {
            let (served, name) = (Arc::clone(&served), name.clone());
            Box::new(move || served.engine(&name, placement))
        };
        let metrics = model.metrics.clone().map(InstanceMetrics::new);
        let worker = Worker::spawn(&name, engine, rebuild, handle, limit, metrics)?;
        Ok(InstanceState {
            name,
            kind,
            device_id,
            served,
            worker: Some(worker),
            handle,
        })
    }
}

/// Boxes `state` for Triton; the pointer goes back through [`take_box`] exactly once.
pub(super) fn into_raw<T>(state: T) -> *mut c_void {
    Box::into_raw(Box::new(state)).cast()
}

/// Takes back a state boxed by [`into_raw`]; null gives `None` (Initialize failed before
/// setting it).
///
/// # Safety
/// `p` is null or came from `into_raw::<T>` and has not been taken back before.
pub(super) unsafe fn take_box<T>(p: *mut c_void) -> Option<Box<T>> {
    if p.is_null() {
        None
    } else {
        // SAFETY: produced by Box::into_raw::<T> and not yet reclaimed (contract).
        Some(unsafe { Box::from_raw(p.cast::<T>()) })
    }
}
