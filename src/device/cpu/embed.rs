//! The embedding rows of a step's tokens, widened to f32.
//!
//! Plain weights are read in place. Compressed embeddings are decoded chunk by chunk: the tokens
//! are grouped by the chunks their row lies in, and each such span of chunks is decoded once per
//! step (in parallel over spans) rather than once per token, which made a long prompt's
//! embedding decode its chunks hundreds of times. Each task holds one span (the chunks of one
//! row, one or two unless rows are longer than a chunk) at a time, never the whole matrix.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::device::DeviceError;
use crate::model::weights::{bf16_to_f32, Matrix, MatrixData, WeightError};

/// `out (ids.len() × cols)` = rows `ids` of `w`, each BF16 value widened exactly.
pub fn gather(w: &Matrix, ids: &[usize], out: &mut [f32]) -> Result<(), DeviceError> {
    let k = w.cols;
    assert_eq!(
        out.len(),
        ids.len() * k,
        "{}: output is not n × cols",
        w.name
    );
    if let Some(&r) = ids.iter().find(|&&r| r >= w.rows) {
        return Err(DeviceError::Invalid(format!(
            "{}: row {r} of {}",
            w.name, w.rows
        )));
    }
    let widen = |bytes: &[u8], o: &mut [f32]| {
        for (o, b) in o.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        }
    };
    let m = match &w.data {
        MatrixData::Bf16(bytes) => {
            for (&r, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
                widen(&bytes[2 * r * k..2 * (r + 1) * k], o);
            }
            return Ok(());
        }
        MatrixData::Compressed(m) => m,
    };
    if k == 0 {
        return Ok(());
    }
    // Positions in `ids` by the span of chunks `c0..c1` their row lies in.
    let ce = m.chunk_elems;
    let mut spans: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, &r) in ids.iter().enumerate() {
        let (a, b) = (r * k, (r + 1) * k);
        spans.entry((a / ce, (b - 1) / ce + 1)).or_default().push(i);
    }
    let spans: Vec<_> = spans.into_iter().collect();
    let rows: Vec<Vec<(usize, Vec<u8>)>> = spans
        .par_iter()
        .map(|&((c0, c1), ref at)| {
            let start = m.chunk_range(c0).start;
            let mut buf = vec![0u8; 2 * (m.chunk_range(c1 - 1).end - start)];
            for c in c0..c1 {
                let rg = m.chunk_range(c);
                let off = 2 * (rg.start - start);
                m.decode_chunk(c, &mut buf[off..off + 2 * rg.len()])
                    .map_err(|source| WeightError::Codec {
                        tensor: w.name.clone(),
                        source,
                    })?;
            }
            Ok(at
                .iter()
                .map(|&i| {
                    let s = 2 * (ids[i] * k - start);
                    (i, buf[s..s + 2 * k].to_vec())
                })
                .collect())
        })
        .collect::<Result<_, DeviceError>>()?;
    for (i, bytes) in rows.into_iter().flatten() {
        widen(&bytes, &mut out[i * k..(i + 1) * k]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Params};
    use crate::model::weights::CompressedMatrix;

    #[test]
    fn compressed_rows_equal_plain_rows_for_repeated_and_straddling_ids() {
        // Rows inside one chunk, across two, longer than a chunk; ids repeated, out of order.
        for (rows, cols, chunk) in [(40, 40, 32), (37, 100, 96), (5, 700, 256), (64, 33, 1024)] {
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|i| {
                    let v = ((i * 7919) % 2000) as f32 / 1000.0 - 1.0;
                    crate::model::synth::f32_to_bf16(v).to_le_bytes()
                })
                .collect();
            let enc = codec::encode(
                &bytes,
                Params {
                    chunk_elems: chunk,
                    ..Params::default()
                },
            )
            .unwrap();
            let plain = Matrix {
                name: "e".into(),
                rows,
                cols,
                data: MatrixData::Bf16(bytes),
            };
            let comp = Matrix {
                name: "e".into(),
                rows,
                cols,
                data: MatrixData::Compressed(CompressedMatrix::from_encoded(&enc)),
            };
            let ids: Vec<usize> = (0..3 * rows).map(|i| (i * 13 + 5) % rows).collect();
            let (mut a, mut b) = (
                vec![0f32; ids.len() * cols],
                vec![f32::NAN; ids.len() * cols],
            );
            gather(&plain, &ids, &mut a).unwrap();
            gather(&comp, &ids, &mut b).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{rows}x{cols} chunk {chunk}");
            for (j, &r) in ids.iter().enumerate() {
                let want: Vec<u32> = comp
                    .row(r)
                    .unwrap()
                    .chunks_exact(2)
                    .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])).to_bits())
                    .collect();
                assert_eq!(bits(&b[j * cols..(j + 1) * cols]), want, "row {r}");
            }
            assert!(gather(&comp, &[rows], &mut vec![0f32; cols]).is_err());
        }
    }
}
