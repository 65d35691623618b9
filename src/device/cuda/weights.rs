//! The device weights of one model ([`Weights`]): uploaded piece by piece as the load streams
//! them ([`UploadSink`]) or from weights decoded at load ([`upload_linear`]), and shared by the
//! instances that run the same weights in the same forms on the same device
//! ([`device_weights`]).

use std::sync::Arc;

use super::driver::{Context, DevBuf, GpuError};
use super::linear::{Form, Linear};
use super::plan::{Plan, Role, Storage};
use super::stream::{HostLinear, Slot, WeightSink};
use super::tbe3::DeviceTbe3;
use crate::codec::runtime::Shape;
use crate::device::shared::Registry;
use crate::device::DeviceError;
use crate::model::weights::{Matrix, MatrixData};

pub(super) struct LayerW {
    pub(super) input_norm: DevBuf,
    pub(super) qkv: Linear,
    pub(super) o: Linear,
    pub(super) post_norm: DevBuf,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
}

/// The device weights of one model in one plan's storage forms; shared by the instances that
/// run the same weights in the same forms on the same device ([`device_weights`]).
pub(super) struct Weights {
    /// The embedding table, raw or tbe3 (`Plan::embed`); a tied lm_head's product reads it.
    pub(super) embed: Linear,
    pub(super) layers: Vec<LayerW>,
    pub(super) norm: DevBuf,
    /// The output projection; `None` when tied: the product then reads the raw embedding.
    pub(super) lm_head: Option<Linear>,
}

/// What makes two loads' device weights interchangeable: the same stored weights
/// ([`super::persist::weights_identity`]), the same device, and the same storage form for
/// every layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WeightsKey {
    identity: String,
    ordinal: usize,
    storage: String,
}

impl WeightsKey {
    /// The key of `identity`'s weights on device `ordinal` stored as `plan` says.
    pub(super) fn new(identity: String, ordinal: usize, plan: &Plan) -> Self {
        let roles: Vec<Storage> = Role::ALL.iter().map(|&r| plan.storage(r)).collect();
        Self {
            identity,
            ordinal,
            storage: format!("embed {:?}, {roles:?}", plan.embed),
        }
    }
}

/// The process's device weights loaded from checkpoints ([`super::CudaBackend::load`]), one
/// copy per (weights, device, storage forms): instances of one model on one GPU share it
/// (docs/cuda.md, "Shared device weights").
pub(super) fn device_weights() -> &'static Registry<WeightsKey, Weights> {
    static REGISTRY: std::sync::OnceLock<Registry<WeightsKey, Weights>> =
        std::sync::OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// `m`'s BF16 bytes; an error naming `m` and `who` (what needs them) when `m` is still
/// compressed, which the device paths that take host weights cannot read.
pub(crate) fn bf16_bytes<'a>(m: &'a Matrix, who: &str) -> Result<&'a [u8], DeviceError> {
    match &m.data {
        MatrixData::Bf16(bytes) => Ok(bytes),
        MatrixData::Compressed(_) => Err(DeviceError::Invalid(format!(
            "{}: {who} takes weights decoded at load (WeightMode::Decoded)",
            m.name
        ))),
    }
}

/// Who needs decoded weights, in [`bf16_bytes`]'s errors.
const BACKEND: &str = "the CUDA backend";

/// Uploads matrices stacked row-wise as one linear layer (fused q|k|v, gate|up) in `storage`.
pub(super) fn upload_linear(
    ctx: &Arc<Context>,
    parts: &[&Matrix],
    storage: Storage,
) -> Result<Linear, DeviceError> {
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|m| m.rows).sum();
    if let Some(m) = parts.iter().find(|m| m.cols != cols) {
        return Err(DeviceError::Invalid(format!(
            "{} has {} columns, {} has {cols}: they cannot be fused",
            m.name, m.cols, parts[0].name
        )));
    }
    let name = parts.iter().map(|m| m.name.as_str()).collect::<Vec<_>>();
    let wrap = |e: GpuError| DeviceError::Cuda(e.context(name.join(" | ")));
    if let [one] = parts {
        return Linear::upload(ctx, bf16_bytes(one, BACKEND)?, rows, cols, storage).map_err(wrap);
    }
    let mut bytes = Vec::with_capacity(2 * rows * cols);
    for m in parts {
        bytes.extend_from_slice(bf16_bytes(m, BACKEND)?);
    }
    Linear::upload(ctx, &bytes, rows, cols, storage).map_err(wrap)
}

/// The CUDA backend's [`WeightSink`]: uploads each piece as [`stream_weights`] hands it over
/// (the host buffers are dropped on return) and assembles the device weights.
pub(super) struct UploadSink<'a> {
    pub(super) ctx: &'a Arc<Context>,
    pub(super) linears: std::collections::BTreeMap<Slot, Linear>,
    pub(super) vectors: std::collections::BTreeMap<Slot, DevBuf>,
}

impl WeightSink for UploadSink<'_> {
    fn vector(&mut self, slot: Slot, values: Vec<f32>) -> Result<(), DeviceError> {
        self.vectors
            .insert(slot, DevBuf::from_host(self.ctx, &values)?);
        Ok(())
    }

    fn linear(&mut self, slot: Slot, shape: Shape, form: HostLinear) -> Result<(), DeviceError> {
        let wrap = |e: GpuError| DeviceError::Cuda(e.context(format_args!("{slot:?}")));
        let linear = match form {
            HostLinear::Raw(bytes) => {
                Linear::upload(self.ctx, &bytes, shape.rows, shape.cols, Storage::Raw)
                    .map_err(wrap)?
            }
            HostLinear::Tbe3(m) => Linear {
                shape,
                form: Form::Tbe3(DeviceTbe3::upload(self.ctx, &m).map_err(wrap)?),
            },
        };
        self.linears.insert(slot, linear);
        Ok(())
    }
}

impl UploadSink<'_> {
    /// The device weights of a model of `layers` layers, every piece present.
    pub(super) fn finish(mut self, layers: usize) -> Result<Weights, DeviceError> {
        let missing = |slot: Slot| DeviceError::Invalid(format!("the load gave no {slot:?}"));
        let mut lin = |slot| self.linears.remove(&slot).ok_or_else(|| missing(slot));
        let embed = lin(Slot::Embed)?;
        let lm_head = lin(Slot::LmHead).ok();
        let mut ls = Vec::with_capacity(layers);
        for l in 0..layers {
            ls.push((
                lin(Slot::Qkv(l))?,
                lin(Slot::O(l))?,
                lin(Slot::GateUp(l))?,
                lin(Slot::Down(l))?,
            ));
        }
        let mut vec = |slot| self.vectors.remove(&slot).ok_or_else(|| missing(slot));
        let layers = ls
            .into_iter()
            .enumerate()
            .map(|(l, (qkv, o, gate_up, down))| {
                Ok(LayerW {
                    input_norm: vec(Slot::InputNorm(l))?,
                    qkv,
                    o,
                    post_norm: vec(Slot::PostNorm(l))?,
                    gate_up,
                    down,
                })
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        Ok(Weights {
            embed,
            layers,
            norm: vec(Slot::Norm)?,
            lm_head,
        })
    }
}
