//! `unweight verify`: decodes every tensor of a compressed checkpoint and compares it byte for
//! byte with the original checkpoint. Any difference, missing or extra tensor, or tensor that
//! fails to load is reported by name; nothing stops at the first problem.
//!
//! A reader thread reads each original tensor and its compressed parts with large positioned
//! reads into reused buffers, ahead of the comparison and under the same byte budget as
//! `decompress` ([`super::prefetch`]); the calling thread decodes and compares.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc;

use super::checkpoint::{Checkpoint, TensorEntry};
use super::compress::progress_bar;
use super::decompress::{split_pieces, stored_read_job};
use super::prefetch::{
    read_ahead, Budget, BufferPool, ReadJob, READ_AHEAD_BYTES, READ_AHEAD_TENSORS,
};
use super::ContainerError;

/// One tensor that is not identical.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The tensor.
    pub name: String,
    /// How it differs.
    pub reason: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    /// Tensors compared and found identical.
    pub identical: usize,
    /// Bytes of those tensors.
    pub identical_bytes: u64,
    /// Every tensor that is not identical.
    pub mismatches: Vec<Mismatch>,
}

impl VerifyReport {
    /// True when every tensor is identical and none is missing or extra.
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Compares every tensor of `original` (a plain checkpoint) with `compressed`.
pub fn verify_dirs(
    original: &Path,
    compressed: &Path,
    progress: bool,
) -> Result<VerifyReport, ContainerError> {
    let orig = Checkpoint::open(original)?;
    let comp = Checkpoint::open(compressed)?;
    if !comp.is_compressed() {
        return Err(ContainerError::checkpoint(
            compressed,
            "is not an unweight-compressed checkpoint (no unweight metadata)",
        ));
    }
    let total: u64 = orig
        .entries()
        .iter()
        .map(|e| e.original_bytes() as u64)
        .sum();
    let bar = progress_bar(progress, total);
    let mut report = VerifyReport::default();
    let mut miss =
        |name: &str, reason: String| report_mismatch(&mut report.mismatches, name, reason);
    let mut identical = (0usize, 0u64);
    // The tensors present on both sides with the same dtype and shape are compared; each one
    // holds its original bytes twice of the budget (read, and decoded).
    let pairs: Vec<(&TensorEntry, Option<&TensorEntry>)> = orig
        .entries()
        .iter()
        .map(|e| {
            let c = comp
                .entry(&e.name)
                .filter(|c| c.dtype == e.dtype && c.shape == e.shape);
            (e, c)
        })
        .collect();
    let paths: Vec<&Path> = orig
        .files()
        .iter()
        .chain(comp.files())
        .map(|f| f.path())
        .collect();
    let budget = Budget::new(READ_AHEAD_BYTES, READ_AHEAD_TENSORS);
    let pool = BufferPool::new(2 * READ_AHEAD_TENSORS, READ_AHEAD_BYTES as usize);
    let (to_checker, from_reader) = mpsc::channel::<Result<Vec<u8>, ContainerError>>();
    let compared = std::thread::scope(|scope| {
        let (budget, pool, paths, pairs, orig, comp) =
            (&budget, &pool, &paths, &pairs, &orig, &comp);
        scope.spawn(move || {
            let jobs = pairs.iter().filter_map(|&(e, c)| {
                let c = c?;
                let mut pieces = stored_read_job(orig, e, 0);
                pieces.extend(stored_read_job(comp, c, orig.files().len()));
                Some(ReadJob {
                    pieces,
                    hold: 2 * e.original_bytes() as u64,
                })
            });
            read_ahead(paths, jobs, budget, pool, &to_checker);
        });
        let r = (|| -> Result<(), ContainerError> {
            for &(e, c) in pairs {
                bar.set_message(e.name.clone());
                bar.inc(e.original_bytes() as u64);
                let Some(c) = c else {
                    match comp.entry(&e.name) {
                        None => miss(&e.name, "missing from the compressed checkpoint".into()),
                        Some(c) => miss(
                            &e.name,
                            format!(
                                "is {:?} {:?} in the compressed checkpoint, {:?} {:?} in the original",
                                c.dtype, c.shape, e.dtype, e.shape
                            ),
                        ),
                    }
                    continue;
                };
                let buf = from_reader.recv().map_err(|_| {
                    ContainerError::checkpoint(
                        compared_path(comp, c),
                        "verify stopped: the reader stopped",
                    )
                })??;
                let want_len = e.original_bytes();
                let (want, stored) = buf.split_at(want_len);
                let pieces = split_pieces(stored, &comp.stored_ranges(c));
                let mut out = pool.take(want_len);
                let got = match comp.decode_stored_into(c, &pieces, &mut out) {
                    Err(err) => Err(err),
                    Ok(true) => Ok(pieces[0]),
                    Ok(false) => Ok(&out[..]),
                };
                match got {
                    Err(err) => miss(&e.name, format!("does not load: {err}")),
                    Ok(got) => match first_difference(want, got) {
                        None => {
                            identical.0 += 1;
                            identical.1 += want.len() as u64;
                        }
                        Some((at, count)) => miss(
                            &e.name,
                            format!("{count} of {} bytes differ, first at byte {at}", want.len()),
                        ),
                    },
                }
                pool.give(out);
                pool.give(buf);
                budget.release(2 * want_len as u64);
            }
            Ok(())
        })();
        budget.close();
        drop(from_reader);
        r
    });
    compared?;
    let names: BTreeSet<&str> = orig.entries().iter().map(|e| e.name.as_str()).collect();
    for c in comp.entries() {
        if !names.contains(c.name.as_str()) {
            miss(
                &c.name,
                "is in the compressed checkpoint but not in the original".into(),
            );
        }
    }
    bar.finish_and_clear();
    report.identical = identical.0;
    report.identical_bytes = identical.1;
    Ok(report)
}

fn report_mismatch(list: &mut Vec<Mismatch>, name: &str, reason: String) {
    list.push(Mismatch {
        name: name.to_string(),
        reason,
    });
}

/// The file holding a compressed tensor (for errors).
fn compared_path<'a>(comp: &'a Checkpoint, c: &TensorEntry) -> &'a Path {
    comp.files()[c.file].path()
}

/// Position of the first differing byte and the number of differing bytes, or `None` if equal.
fn first_difference(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    if a == b {
        return None;
    }
    let common = a.len().min(b.len());
    let first = (0..common).find(|&i| a[i] != b[i]).unwrap_or(common);
    let count = (0..common).filter(|&i| a[i] != b[i]).count() + a.len().abs_diff(b.len());
    Some((first, count))
}
