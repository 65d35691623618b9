//! The GPU load, tensor by tensor: each linear layer is read from the stored checkpoint (decoded
//! from its compressed form, checksum-verified), fused with its siblings (q|k|v, gate|up),
//! encoded into the runtime form the plan stores it in (raw BF16 or tbe3), handed to a
//! [`WeightSink`] and dropped before the next one is read. So the host never holds more than
//! one fused layer in its stored, BF16 and runtime forms at once, never the model.
//!
//! Everything here runs on the CPU: the CUDA backend's sink uploads each piece
//! ([`super::backend`]), `unweight bench load` discards it (the CPU side of a GPU load, measured
//! without a GPU), and the tests count the host bytes held.

use crate::codec::runtime::{encode_le_bytes, RuntimeMatrix, Shape};
use crate::container::Checkpoint;
use crate::device::DeviceError;
use crate::model::weights::{load_matrix, load_vector, MatrixData, WeightMode};
use crate::model::LlamaConfig;

use super::plan::{Plan, Role, Storage};

/// Where a piece of the model goes in the backend's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The token embedding (`vocab × hidden`), stored as [`Plan::embed`] says.
    Embed,
    /// Layer `l`'s RMSNorm before attention (a vector).
    InputNorm(usize),
    /// Layer `l`'s fused q|k|v projection.
    Qkv(usize),
    /// Layer `l`'s attention output projection.
    O(usize),
    /// Layer `l`'s RMSNorm before the MLP (a vector).
    PostNorm(usize),
    /// Layer `l`'s fused gate|up projection.
    GateUp(usize),
    /// Layer `l`'s down projection.
    Down(usize),
    /// The final RMSNorm (a vector).
    Norm,
    /// The output projection (absent when tied to the embedding).
    LmHead,
}

impl Slot {
    /// The plan role of a linear slot (`None` for vectors and the embedding).
    pub fn role(self) -> Option<Role> {
        match self {
            Slot::Qkv(_) => Some(Role::Qkv),
            Slot::O(_) => Some(Role::O),
            Slot::GateUp(_) => Some(Role::GateUp),
            Slot::Down(_) => Some(Role::Down),
            Slot::LmHead => Some(Role::LmHead),
            Slot::Embed | Slot::InputNorm(_) | Slot::PostNorm(_) | Slot::Norm => None,
        }
    }
}

/// One linear layer on the host, in the form it will have on the device.
#[derive(Debug)]
pub enum HostLinear {
    /// Little-endian BF16, row-major.
    Raw(Vec<u8>),
    /// The tbe3 image.
    Tbe3(RuntimeMatrix),
}

impl HostLinear {
    /// Host bytes it holds.
    pub fn host_bytes(&self) -> usize {
        match self {
            HostLinear::Raw(b) => b.len(),
            HostLinear::Tbe3(m) => m.image.len(),
        }
    }
}

/// Takes the pieces of a model as [`stream_weights`] produces them, one at a time; whatever it
/// does not keep is dropped as soon as it returns.
pub trait WeightSink {
    /// A norm vector (f32).
    fn vector(&mut self, slot: Slot, values: Vec<f32>) -> Result<(), DeviceError>;
    /// A linear layer of `shape`, in its runtime form.
    fn linear(&mut self, slot: Slot, shape: Shape, form: HostLinear) -> Result<(), DeviceError>;
}

/// Where a [`stream_weights`] call spent its time (seconds), so that the cost of computing the
/// runtime form at every load can be weighed against reading it from a file.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamTimes {
    /// Reading and decoding the stored tensors (checksums verified) and fusing them.
    pub read_decode_s: f64,
    /// Encoding the tbe3 runtime forms.
    pub encode_s: f64,
    /// In the sink (the upload, on the GPU).
    pub sink_s: f64,
}

/// The storage `plan` gives `slot`; vectors are never asked.
fn storage_of(plan: &Plan, slot: Slot) -> Storage {
    match slot.role() {
        Some(role) => plan.storage(role),
        None => plan.embed,
    }
}

/// Reads `parts` (each a tensor name and its rows, `rows_i × cols` BF16, checked against the checkpoint), stacks them
/// row-wise as one matrix, and encodes it in `storage` form. The BF16 copy is dropped before
/// returning; at most the fused BF16, one part and the encoded form are alive at once.
fn fused(
    ckpt: &Checkpoint,
    parts: &[(String, usize)],
    cols: usize,
    storage: Storage,
    times: &mut StreamTimes,
) -> Result<(Shape, HostLinear), DeviceError> {
    let t0 = std::time::Instant::now();
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let what = parts
        .iter()
        .map(|p| p.0.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
    let shape = Shape::for_matrix(rows, cols)
        .map_err(|e| DeviceError::Invalid(format!("{what} ({rows} × {cols}): {e}")))?;
    let mut bytes = Vec::new();
    for (name, r) in parts {
        let m = load_matrix(ckpt, name.clone(), *r, cols, WeightMode::Decoded)?;
        let MatrixData::Bf16(b) = m.data else {
            return Err(DeviceError::Invalid(format!(
                "{name}: not decoded to BF16 at load"
            )));
        };
        if parts.len() == 1 {
            bytes = b;
        } else {
            if bytes.capacity() == 0 {
                bytes.reserve_exact(2 * rows * cols);
            }
            bytes.extend_from_slice(&b);
        }
    }
    let t1 = std::time::Instant::now();
    times.read_decode_s += (t1 - t0).as_secs_f64();
    let form = match storage {
        Storage::Raw => HostLinear::Raw(bytes),
        Storage::Tbe3 => {
            let m = encode_le_bytes(&bytes, shape)
                .map_err(|e| DeviceError::Invalid(format!("{what}: tbe3 encoding: {e}")))?;
            drop(bytes);
            times.encode_s += t1.elapsed().as_secs_f64();
            HostLinear::Tbe3(m)
        }
    };
    Ok((shape, form))
}

/// Streams every weight of `cfg`'s model from `ckpt` into `sink`, one piece at a time, in the
/// runtime forms `plan` chooses: the embedding, then per layer its input norm, q|k|v, o, post
/// norm, gate|up and down, then the final norm and (untied) lm_head. Names, shapes and dtypes
/// are checked as [`crate::model::weights::LlamaWeights::load`] checks them, and every tensor's
/// checksum is verified by decoding it. Returns where the time went.
pub fn stream_weights(
    ckpt: &Checkpoint,
    cfg: &LlamaConfig,
    plan: &Plan,
    sink: &mut dyn WeightSink,
) -> Result<StreamTimes, DeviceError> {
    let times = std::cell::RefCell::new(StreamTimes::default());
    let (h, im, q, kv, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.vocab_size,
    );
    let linear = |sink: &mut dyn WeightSink, slot: Slot, parts: Vec<(String, usize)>, cols| {
        let (shape, form) = fused(
            ckpt,
            &parts,
            cols,
            storage_of(plan, slot),
            &mut times.borrow_mut(),
        )?;
        let t = std::time::Instant::now();
        sink.linear(slot, shape, form)?;
        times.borrow_mut().sink_s += t.elapsed().as_secs_f64();
        Ok::<(), DeviceError>(())
    };
    let vector = |sink: &mut dyn WeightSink, slot: Slot, name: String| {
        sink.vector(slot, load_vector(ckpt, name, h)?)
    };
    linear(
        sink,
        Slot::Embed,
        vec![("model.embed_tokens.weight".into(), v)],
        h,
    )?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        vector(
            sink,
            Slot::InputNorm(l),
            format!("{p}.input_layernorm.weight"),
        )?;
        linear(
            sink,
            Slot::Qkv(l),
            vec![
                (format!("{p}.self_attn.q_proj.weight"), q),
                (format!("{p}.self_attn.k_proj.weight"), kv),
                (format!("{p}.self_attn.v_proj.weight"), kv),
            ],
            h,
        )?;
        linear(
            sink,
            Slot::O(l),
            vec![(format!("{p}.self_attn.o_proj.weight"), h)],
            q,
        )?;
        vector(
            sink,
            Slot::PostNorm(l),
            format!("{p}.post_attention_layernorm.weight"),
        )?;
        linear(
            sink,
            Slot::GateUp(l),
            vec![
                (format!("{p}.mlp.gate_proj.weight"), im),
                (format!("{p}.mlp.up_proj.weight"), im),
            ],
            h,
        )?;
        linear(
            sink,
            Slot::Down(l),
            vec![(format!("{p}.mlp.down_proj.weight"), h)],
            im,
        )?;
    }
    vector(sink, Slot::Norm, "model.norm.weight".into())?;
    if !cfg.tie_word_embeddings {
        linear(sink, Slot::LmHead, vec![("lm_head.weight".into(), v)], h)?;
    }
    Ok(times.into_inner())
}
