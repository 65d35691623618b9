//! `unweight inspect`: per-tensor sizes and encodings, with both order-0 floors next to the
//! stored size: the exponent-only floor `n × (8 + H_exp) / 8` (exponent coded, 8 bits raw) and
//! the whole-value floor `n × H_value / 8`. Compressed checkpoints of version 2 are described from
//! their metadata without decoding; version-1 files (which record only `H_exp`) and plain
//! checkpoints are read to measure the entropies.

use std::path::Path;

use safetensors::Dtype;
use serde::Serialize;

use super::checkpoint::Checkpoint;
use super::reader::dtype_name;
use super::ContainerError;
use crate::codec::model;

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
    /// Order-0 entropy of the whole 16-bit values in bits per value (BF16 only).
    pub value_entropy_bits: Option<f64>,
    /// The exponent-only floor `n × (8 + H_exp) / 8` in bytes (BF16 only).
    pub exponent_floor_bytes: Option<f64>,
    /// The whole-value floor `n × H_value / 8` in bytes (BF16 only).
    pub value_floor_bytes: Option<f64>,
}

/// Totals of the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InspectTotal {
    /// Sum of original bytes.
    pub original_bytes: u64,
    /// Sum of stored bytes.
    pub stored_bytes: u64,
    /// Sum of the exponent-only floors, other tensors at their original size.
    pub exponent_floor_bytes: f64,
    /// Sum of the whole-value floors, other tensors at their original size.
    pub value_floor_bytes: f64,
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
        let recorded = e.meta.as_ref().map(|m| {
            (
                m.encoding.as_str().to_string(),
                m.exponent_entropy_bits,
                m.value_entropy_bits,
            )
        });
        let (encoding, h_exp, h_val) = match recorded {
            Some((enc, Some(he), Some(hv))) => (enc, Some(he), Some(hv)),
            _ if e.dtype != Dtype::BF16 => {
                (recorded.map_or("plain".to_string(), |r| r.0), None, None)
            }
            _ => {
                // A plain checkpoint, or a version-1 file: measure from the (decoded) values.
                let bytes = ck.load_entry(e)?;
                let v = model::value_histogram(&bytes);
                drop(bytes);
                ck.release(e);
                let enc = recorded.map_or("plain".to_string(), |r| r.0);
                let he = model::entropy(&model::key_histogram(&v, 0));
                (enc, Some(he), Some(model::entropy(&v)))
            }
        };
        let n = e.numel() as f64;
        let row = InspectRow {
            name: e.name.clone(),
            shape: e.shape.clone(),
            dtype: dtype_name(e.dtype),
            encoding,
            original_bytes: e.original_bytes() as u64,
            stored_bytes: ck.stored_bytes(e) as u64,
            exponent_entropy_bits: h_exp,
            value_entropy_bits: h_val,
            exponent_floor_bytes: h_exp.map(|h| n * (8.0 + h) / 8.0),
            value_floor_bytes: h_val.map(|h| n * h / 8.0),
        };
        total.original_bytes += row.original_bytes;
        total.stored_bytes += row.stored_bytes;
        let original = row.original_bytes as f64;
        total.exponent_floor_bytes += row.exponent_floor_bytes.unwrap_or(original);
        total.value_floor_bytes += row.value_floor_bytes.unwrap_or(original);
        rows.push(row);
    }
    Ok(InspectReport {
        tensors: rows,
        total,
    })
}
