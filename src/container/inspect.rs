//! `unweight inspect`: per-tensor sizes, encodings and exponent entropy, with the lossless floor
//! next to the stored size. Compressed checkpoints are described from their metadata without
//! decoding; plain checkpoints are scanned to measure the entropy.

use std::path::Path;

use safetensors::Dtype;
use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::reader::dtype_name;
use super::ContainerError;
use crate::codec::bf16;

/// One tensor's line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct InspectRow {
    /// Tensor name.
    pub name: String,
    /// Original shape.
    pub shape: Vec<usize>,
    /// Original dtype.
    pub dtype: String,
    /// `exp-rans`, `raw`, or `plain` for a tensor of an uncompressed checkpoint.
    pub encoding: String,
    /// Bytes of the original tensor.
    pub original_bytes: u64,
    /// Bytes it occupies in storage.
    pub stored_bytes: u64,
    /// Exponent entropy in bits per value (BF16 only).
    pub exponent_entropy_bits: Option<f64>,
    /// The lossless floor `n × (8 + H_exp) / 8` in bytes (BF16 only).
    pub floor_bytes: Option<f64>,
}

/// Totals of the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InspectTotal {
    /// Sum of original bytes.
    pub original_bytes: u64,
    /// Sum of stored bytes.
    pub stored_bytes: u64,
}

/// The whole report; its JSON form is the `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    /// One row per tensor, in storage order.
    pub tensors: Vec<InspectRow>,
    /// Totals.
    pub total: InspectTotal,
}

/// Describes every tensor of a checkpoint directory.
pub fn inspect_dir(dir: &Path) -> Result<InspectReport, ContainerError> {
    let ck = Checkpoint::open(dir)?;
    let mut rows = Vec::new();
    let mut total = InspectTotal::default();
    for e in ck.entries() {
        let (encoding, entropy) = match &e.meta {
            Some(m) => (m.encoding.as_str().to_string(), m.exponent_entropy_bits),
            None => {
                let h = (e.dtype == Dtype::BF16).then(|| {
                    let bytes = ck
                        .load_entry(e)
                        .expect("plain tensors load without decoding");
                    bf16::entropy_bits(&bf16::exponent_histogram(&bytes))
                });
                ck.release(e);
                ("plain".to_string(), h)
            }
        };
        let row = InspectRow {
            name: e.name.clone(),
            shape: e.shape.clone(),
            dtype: dtype_name(e.dtype),
            encoding,
            original_bytes: e.original_bytes() as u64,
            stored_bytes: ck.stored_bytes(e) as u64,
            exponent_entropy_bits: entropy,
            floor_bytes: entropy.map(|h| bf16::floor_bytes(e.numel() as u64, h)),
        };
        total.original_bytes += row.original_bytes;
        total.stored_bytes += row.stored_bytes;
        rows.push(row);
    }
    Ok(InspectReport {
        tensors: rows,
        total,
    })
}
