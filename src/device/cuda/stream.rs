//! The GPU load, tensor by tensor: each linear layer is read from the stored checkpoint (decoded
//! from its compressed form, checksum-verified), fused with its siblings (q|k|v, gate|up),
//! encoded into the runtime form the plan stores it in (raw BF16 or tbe3), handed to a
//! [`WeightSink`] and dropped before the next one is read. So the host never holds more than
//! one fused layer in its stored, BF16 and runtime forms at once, never the model.
//!
//! With [`stream_weights_persisted`] the tbe3 images come from the model's persisted runtime
//! form ([`super::persist`]) when it is there and belongs to these weights, and are written to it
//! as they are computed when it is not: the runtime form is computed once per model, not at
//! every load.
//!
//! Everything here runs on the CPU: the CUDA backend's sink uploads each piece
//! ([`super::backend`]), `unweight bench load` discards it (the CPU side of a GPU load, measured
//! without a GPU), and the tests count the host bytes held.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::codec::runtime::{decode_tile, encode_le_bytes, RuntimeMatrix, RuntimeView, Shape};
use crate::codec::CodecError;
use crate::container::Checkpoint;
use crate::device::DeviceError;
use crate::model::weights::{load_matrix, load_vector, MatrixData, WeightMode};
use crate::model::LlamaConfig;

use super::persist::{runtime_path, weights_identity, PersistedReader, PersistedWriter};
use super::plan::{Plan, Role, Storage};

/// Where a piece of the model goes in the backend's weights.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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

/// Where a [`stream_weights`] call spent its time (seconds) and what it did, so that the cost of
/// computing the runtime form at every load can be weighed against reading it from a file.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamTimes {
    /// Reading and decoding the stored tensors (checksums verified) and fusing them.
    pub read_decode_s: f64,
    /// Encoding the tbe3 runtime forms.
    pub encode_s: f64,
    /// Reading the persisted runtime form (checksums verified, images checked) and decoding
    /// the images of raw slots back to BF16.
    pub persisted_read_s: f64,
    /// Writing the persisted runtime form (the final sync and rename included).
    pub persisted_write_s: f64,
    /// In the sink (the upload, on the GPU).
    pub sink_s: f64,
    /// Linear layers encoded to tbe3 by this load.
    pub encoded: usize,
    /// Linear layers taken from the persisted runtime form.
    pub from_persisted: usize,
}

/// What a load did with the persisted runtime form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Persisted {
    /// Not used: the plan stores no layer in tbe3, or the load was not asked to persist.
    #[default]
    Off,
    /// Every tbe3 image was read from this file.
    Read(PathBuf),
    /// The forms were computed and written to this file; `replaced` says why an existing file
    /// was not used, if there was one.
    Written {
        /// The file.
        path: PathBuf,
        /// Why the file that was there could not be used.
        replaced: Option<String>,
    },
    /// The forms were computed in memory and not persisted, for this reason (a read-only
    /// model directory, a corrupt file found half-way, ...): the next load computes them again.
    NotSaved(String),
}

/// The storage `plan` gives `slot`; vectors are never asked.
fn storage_of(plan: &Plan, slot: Slot) -> Storage {
    match slot.role() {
        Some(role) => plan.storage(role),
        None => plan.embed,
    }
}

/// Where the linear layers' runtime forms come from during one load.
enum Source {
    /// Decoded from the checkpoint and encoded as the plan says.
    Compute,
    /// Decoded and encoded as [`Source::Compute`], and every layer (whatever its storage) also
    /// encoded to tbe3 and written to the persisted form.
    Write(PersistedWriter),
    /// Read from the persisted form.
    Read(PersistedReader),
}

/// Produces one linear layer at a time from `source`.
struct Producer<'a> {
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    source: Source,
    times: StreamTimes,
    /// Set when persisting stopped half-way (a write failed, a corrupt image was found).
    abandoned: Option<String>,
}

/// The matrix of a runtime image as little-endian BF16 bytes, decoded tile by tile (tiles in
/// parallel) straight into the byte buffer: no second whole-matrix copy.
fn decode_le_bytes(view: &RuntimeView<'_>) -> Result<Vec<u8>, CodecError> {
    let tile = view.shape().tile_elems;
    let mut out = vec![0u8; 2 * view.shape().len()];
    out.par_chunks_mut(2 * tile).enumerate().try_for_each_init(
        Vec::new,
        |bits: &mut Vec<u16>, (t, o)| {
            bits.resize(o.len() / 2, 0);
            decode_tile(view, t, bits)?;
            for (d, b) in o.chunks_exact_mut(2).zip(bits.iter()) {
                d.copy_from_slice(&b.to_le_bytes());
            }
            Ok(())
        },
    )?;
    Ok(out)
}

impl Producer<'_> {
    /// Reads `parts` (each a tensor name and its rows, `rows_i × cols` BF16, checked against the
    /// checkpoint) and stacks them row-wise as one matrix.
    fn read_fused(
        &mut self,
        what: &str,
        parts: &[(String, usize)],
        shape: Shape,
    ) -> Result<Vec<u8>, DeviceError> {
        let t0 = Instant::now();
        let mut bytes = Vec::new();
        for (name, r) in parts {
            let m = load_matrix(self.ckpt, name.clone(), *r, shape.cols, WeightMode::Decoded)?;
            let MatrixData::Bf16(b) = m.data else {
                return Err(DeviceError::Invalid(format!(
                    "{name}: not decoded to BF16 at load"
                )));
            };
            if parts.len() == 1 {
                bytes = b;
            } else {
                if bytes.capacity() == 0 {
                    bytes.reserve_exact(2 * shape.len());
                }
                bytes.extend_from_slice(&b);
            }
        }
        if bytes.len() != 2 * shape.len() {
            return Err(DeviceError::Invalid(format!(
                "{what}: {} bytes for {} × {}",
                bytes.len(),
                shape.rows,
                shape.cols
            )));
        }
        self.times.read_decode_s += t0.elapsed().as_secs_f64();
        Ok(bytes)
    }

    /// Encodes `bytes` (a `shape` BF16 matrix) into its tbe3 image, counting it.
    fn encode(
        &mut self,
        what: &str,
        bytes: &[u8],
        shape: Shape,
    ) -> Result<RuntimeMatrix, DeviceError> {
        let t = Instant::now();
        let m = encode_le_bytes(bytes, shape)
            .map_err(|e| DeviceError::Invalid(format!("{what}: tbe3 encoding: {e}")))?;
        self.times.encode_s += t.elapsed().as_secs_f64();
        self.times.encoded += 1;
        Ok(m)
    }

    /// Stops persisting (the load goes on computing in memory), saying why.
    fn abandon(&mut self, why: String) {
        tracing::warn!(
            reason = %why,
            "the persisted runtime form is not used for the rest of this load; the forms are \
             computed from the stored weights"
        );
        if let Source::Read(r) = &self.source {
            // A corrupt file: removed, so that the next load writes a good one.
            let _ = std::fs::remove_file(r.path());
        }
        self.source = Source::Compute;
        self.abandoned.get_or_insert(why);
    }

    /// Layer `slot` (its `parts` stacked, `cols` columns) in the form the plan stores it in.
    fn linear(
        &mut self,
        slot: Slot,
        parts: &[(String, usize)],
        cols: usize,
    ) -> Result<(Shape, HostLinear), DeviceError> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let what = parts
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join(" | ");
        let shape = Shape::for_matrix(rows, cols)
            .map_err(|e| DeviceError::Invalid(format!("{what} ({rows} × {cols}): {e}")))?;
        let storage = storage_of(self.plan, slot);
        if let Source::Read(r) = &mut self.source {
            let t = Instant::now();
            match r.read(slot, shape) {
                Ok(m) => {
                    let form = match storage {
                        Storage::Tbe3 => HostLinear::Tbe3(m),
                        Storage::Raw => {
                            let view = m.view().map_err(|e| {
                                DeviceError::Invalid(format!("{what}: persisted image: {e}"))
                            })?;
                            let bytes = decode_le_bytes(&view).map_err(|e| {
                                DeviceError::Invalid(format!("{what}: persisted image: {e}"))
                            })?;
                            HostLinear::Raw(bytes)
                        }
                    };
                    self.times.persisted_read_s += t.elapsed().as_secs_f64();
                    self.times.from_persisted += 1;
                    return Ok((shape, form));
                }
                Err(why) => {
                    let why = format!("{} {why}", r.path().display());
                    self.abandon(why);
                }
            }
        }
        let bytes = self.read_fused(&what, parts, shape)?;
        if let Source::Write(_) = self.source {
            let m = self.encode(&what, &bytes, shape)?;
            let t = Instant::now();
            let put = match &mut self.source {
                Source::Write(w) => w.put(slot, &m),
                _ => Ok(()),
            };
            self.times.persisted_write_s += t.elapsed().as_secs_f64();
            if let Err(e) = put {
                self.abandon(format!("writing the persisted runtime form: {e}"));
            }
            return Ok((
                shape,
                match storage {
                    Storage::Tbe3 => HostLinear::Tbe3(m),
                    Storage::Raw => HostLinear::Raw(bytes),
                },
            ));
        }
        let form = match storage {
            Storage::Raw => HostLinear::Raw(bytes),
            Storage::Tbe3 => {
                let m = self.encode(&what, &bytes, shape)?;
                drop(bytes);
                HostLinear::Tbe3(m)
            }
        };
        Ok((shape, form))
    }
}

/// Walks the model: the embedding, then per layer its input norm, q|k|v, o, post norm, gate|up
/// and down, then the final norm and (untied) lm_head.
fn walk(
    cfg: &LlamaConfig,
    p: &mut Producer<'_>,
    sink: &mut dyn WeightSink,
) -> Result<(), DeviceError> {
    let (h, im, q, kv, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.vocab_size,
    );
    let linear = |p: &mut Producer<'_>,
                  sink: &mut dyn WeightSink,
                  slot: Slot,
                  parts: Vec<(String, usize)>,
                  cols| {
        let (shape, form) = p.linear(slot, &parts, cols)?;
        let t = Instant::now();
        sink.linear(slot, shape, form)?;
        p.times.sink_s += t.elapsed().as_secs_f64();
        Ok::<(), DeviceError>(())
    };
    let vector = |p: &mut Producer<'_>, sink: &mut dyn WeightSink, slot: Slot, name: String| {
        sink.vector(slot, load_vector(p.ckpt, name, h)?)
    };
    linear(
        p,
        sink,
        Slot::Embed,
        vec![("model.embed_tokens.weight".into(), v)],
        h,
    )?;
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        vector(
            p,
            sink,
            Slot::InputNorm(l),
            format!("{pre}.input_layernorm.weight"),
        )?;
        linear(
            p,
            sink,
            Slot::Qkv(l),
            vec![
                (format!("{pre}.self_attn.q_proj.weight"), q),
                (format!("{pre}.self_attn.k_proj.weight"), kv),
                (format!("{pre}.self_attn.v_proj.weight"), kv),
            ],
            h,
        )?;
        linear(
            p,
            sink,
            Slot::O(l),
            vec![(format!("{pre}.self_attn.o_proj.weight"), h)],
            q,
        )?;
        vector(
            p,
            sink,
            Slot::PostNorm(l),
            format!("{pre}.post_attention_layernorm.weight"),
        )?;
        linear(
            p,
            sink,
            Slot::GateUp(l),
            vec![
                (format!("{pre}.mlp.gate_proj.weight"), im),
                (format!("{pre}.mlp.up_proj.weight"), im),
            ],
            h,
        )?;
        linear(
            p,
            sink,
            Slot::Down(l),
            vec![(format!("{pre}.mlp.down_proj.weight"), h)],
            im,
        )?;
    }
    vector(p, sink, Slot::Norm, "model.norm.weight".into())?;
    if !cfg.tie_word_embeddings {
        linear(p, sink, Slot::LmHead, vec![("lm_head.weight".into(), v)], h)?;
    }
    Ok(())
}

/// Streams every weight of `cfg`'s model from `ckpt` into `sink`, one piece at a time, in the
/// runtime forms `plan` chooses: the embedding, then per layer its input norm, q|k|v, o, post
/// norm, gate|up and down, then the final norm and (untied) lm_head. Names, shapes and dtypes
/// are checked as [`crate::model::weights::LlamaWeights::load`] checks them, and every tensor's
/// checksum is verified by decoding it. Returns where the time went. Computes every tbe3 form;
/// [`stream_weights_persisted`] reads them from the persisted runtime form instead.
pub fn stream_weights(
    ckpt: &Checkpoint,
    cfg: &LlamaConfig,
    plan: &Plan,
    sink: &mut dyn WeightSink,
) -> Result<StreamTimes, DeviceError> {
    let mut p = Producer {
        ckpt,
        plan,
        source: Source::Compute,
        times: StreamTimes::default(),
        abandoned: None,
    };
    walk(cfg, &mut p, sink)?;
    Ok(p.times)
}

/// Whether `plan` stores any of `cfg`'s linear layers in tbe3 (else there is nothing to
/// persist).
fn plan_uses_tbe3(plan: &Plan, cfg: &LlamaConfig) -> bool {
    let mut slots = vec![
        Slot::Embed,
        Slot::Qkv(0),
        Slot::O(0),
        Slot::GateUp(0),
        Slot::Down(0),
    ];
    if !cfg.tie_word_embeddings {
        slots.push(Slot::LmHead);
    }
    slots
        .into_iter()
        .any(|s| storage_of(plan, s) == Storage::Tbe3)
}

/// [`stream_weights`] with the runtime form persisted in `model_dir` ([`runtime_path`]): when
/// the plan stores any layer in tbe3, the images come from the persisted form if it is there
/// and was written for these weights; otherwise they are computed, and every linear layer's
/// tbe3 image (whatever the plan stores: the file serves any plan) is written to it as it is
/// computed. A file that cannot be used is logged and computed again; a directory that cannot
/// be written means the forms are computed in memory, logged, and the load goes on. Raw layers
/// read from the persisted form are its images decoded to BF16 (tbe3 is lossless).
pub fn stream_weights_persisted(
    ckpt: &Checkpoint,
    cfg: &LlamaConfig,
    plan: &Plan,
    sink: &mut dyn WeightSink,
    model_dir: &Path,
) -> Result<(StreamTimes, Persisted), DeviceError> {
    if !plan_uses_tbe3(plan, cfg) {
        return Ok((stream_weights(ckpt, cfg, plan, sink)?, Persisted::Off));
    }
    let path = runtime_path(model_dir);
    let mut replaced = None;
    let source = match weights_identity(ckpt) {
        Err(e) => {
            let why = format!("the weights' identity could not be read: {e}");
            tracing::warn!(reason = %why, "the runtime form is computed in memory");
            replaced = Some(why);
            Source::Compute
        }
        Ok(identity) => {
            let opened = PersistedReader::open(&path, &identity);
            match opened {
                Ok(Some(r)) => Source::Read(r),
                other => {
                    if let Err(why) = other {
                        tracing::warn!(
                            path = %path.display(),
                            reason = %why,
                            "the persisted runtime form cannot be used; computing it again"
                        );
                        replaced = Some(format!("{} {why}", path.display()));
                    }
                    match PersistedWriter::create(&path, &identity) {
                        Ok(w) => Source::Write(w),
                        Err(e) => {
                            let why = format!(
                                "{} cannot be written ({e}); the runtime form is computed in \
                                 memory at every load",
                                path.display()
                            );
                            tracing::warn!("{why}");
                            replaced = Some(why);
                            Source::Compute
                        }
                    }
                }
            }
        }
    };
    let mut p = Producer {
        ckpt,
        plan,
        source,
        times: StreamTimes::default(),
        abandoned: None,
    };
    walk(cfg, &mut p, sink)?;
    let mut times = p.times;
    let outcome = match (p.source, p.abandoned) {
        (_, Some(why)) => Persisted::NotSaved(why),
        (Source::Read(r), None) => {
            tracing::info!(path = %r.path().display(), layers = times.from_persisted, "runtime form read from its persisted copy");
            Persisted::Read(r.path().to_path_buf())
        }
        (Source::Write(w), None) => {
            let t = Instant::now();
            let done = w.finish();
            times.persisted_write_s += t.elapsed().as_secs_f64();
            match done {
                Ok(path) => {
                    tracing::info!(path = %path.display(), "runtime form persisted for later loads");
                    Persisted::Written { path, replaced }
                }
                Err(e) => {
                    let why = format!("writing {}: {e}", path.display());
                    tracing::warn!(reason = %why, "the runtime form could not be persisted");
                    Persisted::NotSaved(why)
                }
            }
        }
        (Source::Compute, None) => {
            Persisted::NotSaved(replaced.unwrap_or_else(|| "not persisted".into()))
        }
    };
    Ok((times, outcome))
}
