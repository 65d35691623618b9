//! The matrices a tuning run measures ([`Sample`]): layer 0 of a model, fused as the backend
//! runs it, from weights in memory ([`layer0_samples`]) or read from a checkpoint one tensor at
//! a time ([`checkpoint_samples`]), or synthetic matrices of a shape ([`synthetic_samples`]).

use std::borrow::Cow;

use crate::container::Checkpoint;
use crate::device::cuda::plan::Role;
use crate::device::DeviceError;
use crate::model::weights::{LlamaWeights, Matrix};
use crate::model::LlamaConfig;

/// Where a tuned matrix's values come from.
pub enum MatrixSource<'a> {
    /// Little-endian BF16 bytes (`2 × rows × cols`): a real model's layer-0 matrix, q|k|v and
    /// gate|up stacked row-wise as the backend fuses them.
    Bf16(Cow<'a, [u8]>),
    /// N(0, `sigma`) BF16 generated on the device from `seed` (downloaded once for the tbe3
    /// encode).
    Synthetic {
        /// Generator seed.
        seed: u64,
        /// Standard deviation.
        sigma: f32,
    },
}

impl std::fmt::Debug for MatrixSource<'_> {
    /// The byte count, not the bytes (a sample can be a gigabyte).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatrixSource::Bf16(b) => write!(f, "Bf16({} bytes)", b.len()),
            MatrixSource::Synthetic { seed, sigma } => {
                write!(f, "Synthetic {{ seed: {seed}, sigma: {sigma} }}")
            }
        }
    }
}

/// One matrix to tune: its role, rows, columns and values.
pub type Sample<'a> = (Role, usize, usize, MatrixSource<'a>);

/// Parts stacked row-wise (`[(name, bytes, rows, cols)]`): borrowed when there is one.
fn fuse<'a>(role: Role, parts: &[(&str, &'a [u8], usize, usize)]) -> Result<Sample<'a>, String> {
    let cols = parts[0].3;
    let mut rows = 0;
    for &(name, bytes, r, c) in parts {
        if c != cols {
            return Err(format!(
                "{name} has {c} columns, {} has {cols}: they cannot be fused",
                parts[0].0
            ));
        }
        if bytes.len() != 2 * r * c {
            return Err(format!(
                "{name}: {} bytes for a {r} × {c} BF16 matrix",
                bytes.len()
            ));
        }
        rows += r;
    }
    let data = if let [one] = parts {
        Cow::Borrowed(one.1)
    } else {
        Cow::Owned(parts.iter().flat_map(|p| p.1.iter().copied()).collect())
    };
    Ok((role, rows, cols, MatrixSource::Bf16(data)))
}

/// The matrices a model is tuned on: layer 0's q|k|v, o, gate|up and down, fused as the backend
/// runs them, and the output projection (the embedding when tied). Every layer of a Llama has
/// the same shapes, and the timings depend on the shape and, through the escapes, a little on
/// the values, so one layer's real values stand for all.
pub fn layer0_samples(w: &LlamaWeights) -> Result<Vec<Sample<'_>>, DeviceError> {
    let l = w
        .layers
        .first()
        .ok_or_else(|| DeviceError::Invalid("a model without layers cannot be tuned".into()))?;
    let groups: [(Role, Vec<&Matrix>); 5] = [
        (Role::Qkv, vec![&l.q_proj, &l.k_proj, &l.v_proj]),
        (Role::O, vec![&l.o_proj]),
        (Role::GateUp, vec![&l.gate_proj, &l.up_proj]),
        (Role::Down, vec![&l.down_proj]),
        (Role::LmHead, vec![w.output()]),
    ];
    groups
        .iter()
        .map(|(role, ms)| {
            let parts = ms
                .iter()
                .map(|m| {
                    Ok((
                        m.name.as_str(),
                        crate::device::cuda::weights::bf16_bytes(m, "tuning")?,
                        m.rows,
                        m.cols,
                    ))
                })
                .collect::<Result<Vec<_>, DeviceError>>()?;
            fuse(*role, &parts).map_err(DeviceError::Invalid)
        })
        .collect()
}

/// [`layer0_samples`] read straight from a checkpoint (decoded and checksum-verified when
/// compressed), without loading the other layers: what `unweight tune <MODEL_DIR>` tunes on.
pub fn checkpoint_samples(
    ckpt: &Checkpoint,
    cfg: &LlamaConfig,
) -> Result<Vec<Sample<'static>>, DeviceError> {
    let (h, im, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let p = "model.layers.0";
    let out_name = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight".to_string()
    } else {
        "lm_head.weight".to_string()
    };
    // (role, [(tensor, rows, cols)]) in the backend's fusing order.
    type Parts = Vec<(String, usize, usize)>;
    let groups: Vec<(Role, Parts)> = vec![
        (
            Role::Qkv,
            vec![
                (format!("{p}.self_attn.q_proj.weight"), qd, h),
                (format!("{p}.self_attn.k_proj.weight"), kvd, h),
                (format!("{p}.self_attn.v_proj.weight"), kvd, h),
            ],
        ),
        (
            Role::O,
            vec![(format!("{p}.self_attn.o_proj.weight"), h, qd)],
        ),
        (
            Role::GateUp,
            vec![
                (format!("{p}.mlp.gate_proj.weight"), im, h),
                (format!("{p}.mlp.up_proj.weight"), im, h),
            ],
        ),
        (
            Role::Down,
            vec![(format!("{p}.mlp.down_proj.weight"), h, im)],
        ),
        (Role::LmHead, vec![(out_name, v, h)]),
    ];
    let dir = ckpt.dir().display().to_string();
    let mut out = Vec::new();
    for (role, parts) in groups {
        let mut loaded = Vec::new();
        for (name, rows, cols) in &parts {
            let e = ckpt.entry(name).ok_or_else(|| {
                DeviceError::Invalid(format!("{dir}: no tensor {name} to tune on"))
            })?;
            if e.shape != [*rows, *cols] || e.dtype != safetensors::Dtype::BF16 {
                return Err(DeviceError::Invalid(format!(
                    "{dir}: {name} is {:?} {:?}, expected BF16 [{rows}, {cols}]",
                    e.dtype, e.shape
                )));
            }
            let bytes = ckpt
                .load_entry(e)
                .map_err(|err| DeviceError::Invalid(format!("{dir}: {name}: {err}")))?
                .into_owned();
            ckpt.release(e);
            loaded.push((name.as_str(), bytes, *rows, *cols));
        }
        let refs: Vec<(&str, &[u8], usize, usize)> = loaded
            .iter()
            .map(|(n, b, r, c)| (*n, b.as_slice(), *r, *c))
            .collect();
        let (role, rows, cols, src) = fuse(role, &refs).map_err(DeviceError::Invalid)?;
        let MatrixSource::Bf16(data) = src else {
            unreachable!("fuse returns BF16 bytes")
        };
        out.push((
            role,
            rows,
            cols,
            MatrixSource::Bf16(Cow::Owned(data.into_owned())),
        ));
    }
    Ok(out)
}

/// Synthetic N(0, `sigma`) matrices of every role of `cfg` (seeds `seed + role index`).
pub fn synthetic_samples(
    cfg: &LlamaConfig,
    seed: u64,
    sigma: f32,
) -> Result<Vec<Sample<'static>>, DeviceError> {
    let shapes = crate::device::cuda::sizing::role_shapes(cfg)?;
    Ok(shapes
        .iter()
        .enumerate()
        .map(|(i, (&role, s))| {
            (
                role,
                s.rows,
                s.cols,
                MatrixSource::Synthetic {
                    seed: seed.wrapping_add(i as u64),
                    sigma,
                },
            )
        })
        .collect())
}
