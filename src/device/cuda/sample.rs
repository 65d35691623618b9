//! The device sampler's host side: each decode row's [`RowSampling`] packed into the records
//! `kernels/sample.cu` reads ([`SampleRow`], one per row; [`SampleEdit`], one per logit edit),
//! with everything the kernel must not do itself done here: the fixed-point conversions
//! ([`gap_scale`], [`top_p_fixed`], computed exactly as the CPU sampler computes them), the
//! greedy flag, the range checks. Host-only, unit-tested without a GPU; the backend uploads
//! the records and launches `sample_rows` ([`super::kernels::Kernels::sample_rows`]).

use super::driver::{GpuError, GpuResult};
use crate::device::sampling::{gap_scale, top_p_fixed};
use crate::device::{LogitEdit, RowSampling};

/// One row's parameters, as `struct SampleRow` in kernels/sample.cu (48 bytes, the field
/// offsets tested below).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRow {
    /// `gap_scale(temperature)`; 0 for a greedy row (unused there).
    pub scale: f32,
    /// Top-k; 0 = off.
    pub top_k: u32,
    /// `top_p_fixed(top_p)`; 2^32 = off.
    pub top_p32: u64,
    /// The request's seed (the Philox key).
    pub seed: u64,
    /// Tokens generated before this one (the Philox counter).
    pub position: u64,
    /// 1: the argmax of the edited logits, no draw.
    pub greedy: u32,
    /// The row's edits: `edits[edits_begin..edits_end]`.
    pub edits_begin: u32,
    /// See [`SampleRow::edits_begin`].
    pub edits_end: u32,
    /// Padding to a multiple of 8 bytes (0).
    pub pad: u32,
}

/// One logit edit, as `struct SampleEdit` in kernels/sample.cu (8 bytes): `l - delta`, or
/// `-inf` when `delta` is NaN (a mask; a penalty's delta is always finite).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SampleEdit {
    /// Token id (below the vocabulary: others are dropped when packing).
    pub id: u32,
    /// The penalty to subtract, or NaN for a mask.
    pub delta: f32,
}

/// A decode batch's sampling records, ready to upload.
#[derive(Debug)]
pub struct Packed {
    /// One per row, in batch order.
    pub rows: Vec<SampleRow>,
    /// Every row's edits, row after row.
    pub edits: Vec<SampleEdit>,
}

/// Packs `rows` for a vocabulary of `vocab`, with room for `edit_capacity` edits on the device.
/// Errors (before anything is launched) name the row: a parameter out of range
/// ([`RowSampling::validate`]) or more edits than the device buffer holds.
pub fn pack(rows: &[RowSampling], vocab: usize, edit_capacity: usize) -> GpuResult<Packed> {
    let mut packed = Packed {
        rows: Vec::with_capacity(rows.len()),
        edits: Vec::new(),
    };
    for (i, r) in rows.iter().enumerate() {
        r.validate()
            .map_err(|e| GpuError::invalid(format!("sampling of decode row {i}: {e}")))?;
        let begin = packed.edits.len();
        packed
            .edits
            .extend(
                r.edits
                    .iter()
                    .filter(|(id, _)| (*id as usize) < vocab)
                    .map(|&(id, edit)| SampleEdit {
                        id,
                        delta: match edit {
                            LogitEdit::Subtract(d) => d,
                            LogitEdit::Mask => f32::NAN,
                        },
                    }),
            );
        let end = packed.edits.len();
        if end > edit_capacity {
            return Err(GpuError::invalid(format!(
                "sampling of decode row {i}: {end} logit edits in the batch so far, more than \
                 the device buffer's {edit_capacity}"
            )));
        }
        let greedy = r.is_greedy();
        packed.rows.push(SampleRow {
            scale: if greedy {
                0.0
            } else {
                gap_scale(r.temperature)
            },
            top_k: r.top_k,
            top_p32: top_p_fixed(r.top_p),
            seed: r.seed,
            position: r.position,
            greedy: u32::from(greedy),
            // Both below edit_capacity, which the caller sizes from a device buffer.
            edits_begin: u32::try_from(begin).map_err(|_| GpuError::invalid("edits".into()))?,
            edits_end: u32::try_from(end).map_err(|_| GpuError::invalid("edits".into()))?,
            pad: 0,
        });
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The layout kernels/sample.cu declares: a change on one side only would make the kernel
    /// read garbage, so the offsets are pinned here.
    #[test]
    fn records_have_the_kernel_layout() {
        assert_eq!(size_of::<SampleRow>(), 48);
        assert_eq!(offset_of!(SampleRow, scale), 0);
        assert_eq!(offset_of!(SampleRow, top_k), 4);
        assert_eq!(offset_of!(SampleRow, top_p32), 8);
        assert_eq!(offset_of!(SampleRow, seed), 16);
        assert_eq!(offset_of!(SampleRow, position), 24);
        assert_eq!(offset_of!(SampleRow, greedy), 32);
        assert_eq!(offset_of!(SampleRow, edits_begin), 36);
        assert_eq!(offset_of!(SampleRow, edits_end), 40);
        assert_eq!(size_of::<SampleEdit>(), 8);
        assert_eq!(offset_of!(SampleEdit, delta), 4);
        let src = include_str!("../../../kernels/sample.cu");
        for decl in [
            "float scale;",
            "uint32_t top_k;",
            "unsigned long long top_p32;",
            "unsigned long long seed;",
            "unsigned long long position;",
            "uint32_t greedy;",
            "uint32_t edits_begin;",
            "uint32_t edits_end;",
            "uint32_t id;",
            "float delta;",
        ] {
            assert!(src.contains(decl), "kernels/sample.cu lost `{decl}`");
        }
    }

    fn row(temperature: f32, top_k: u32, top_p: f32, edits: Vec<(u32, LogitEdit)>) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            seed: 0x1234_5678_9abc_def0,
            position: 41,
            edits,
        }
    }

    #[test]
    fn rows_carry_the_fixed_point_parameters_and_their_edit_ranges() {
        let rows = [
            row(
                0.8,
                40,
                0.95,
                vec![(3, LogitEdit::Subtract(0.25)), (7, LogitEdit::Mask)],
            ),
            row(
                0.0,
                0,
                1.0,
                vec![(1, LogitEdit::Mask), (100, LogitEdit::Mask)],
            ),
            row(1.3, 1, 0.5, Vec::new()),
        ];
        let p = pack(&rows, 50, 10).unwrap();
        assert_eq!(p.rows.len(), 3);
        let r0 = p.rows[0];
        assert_eq!(r0.scale.to_bits(), gap_scale(0.8).to_bits());
        assert_eq!(
            (r0.top_k, r0.top_p32, r0.greedy),
            (40, top_p_fixed(0.95), 0)
        );
        assert_eq!((r0.seed, r0.position), (0x1234_5678_9abc_def0, 41));
        assert_eq!((r0.edits_begin, r0.edits_end), (0, 2));
        assert_eq!((p.edits[0].id, p.edits[0].delta), (3, 0.25));
        assert!(p.edits[1].id == 7 && p.edits[1].delta.is_nan());
        // Greedy by temperature 0 and by top-k 1; the id beyond the vocabulary is dropped.
        assert_eq!((p.rows[1].greedy, p.rows[1].scale), (1, 0.0));
        assert_eq!((p.rows[1].edits_begin, p.rows[1].edits_end), (2, 3));
        assert_eq!(p.rows[2].greedy, 1);
        assert_eq!((p.rows[2].edits_begin, p.rows[2].edits_end), (3, 3));
        assert_eq!(p.rows[1].top_p32, 1 << 32);
    }

    #[test]
    fn bad_rows_and_overfull_buffers_are_refused_naming_the_row() {
        let ok = row(
            0.7,
            0,
            0.9,
            vec![(1, LogitEdit::Mask), (2, LogitEdit::Mask)],
        );
        let bad = row(0.7, 0, 1.5, Vec::new());
        let e = pack(&[ok.clone(), bad], 10, 10).unwrap_err();
        assert!(e.to_string().contains("decode row 1") && e.to_string().contains("top_p"));
        let e = pack(&[ok.clone(), ok], 10, 3).unwrap_err();
        assert!(e.to_string().contains("decode row 1") && e.to_string().contains("edits"));
    }
}
