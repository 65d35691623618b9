//! `unweight verify`: decodes every tensor of a compressed checkpoint and compares it byte for
//! byte with the original checkpoint. Any difference, missing or extra tensor, or tensor that
//! fails to load is reported by name; nothing stops at the first problem.

use std::collections::BTreeSet;
use std::path::Path;

use super::checkpoint::Checkpoint;
use super::compress::progress_bar;
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
    for e in orig.entries() {
        bar.set_message(e.name.clone());
        bar.inc(e.original_bytes() as u64);
        let Some(c) = comp.entry(&e.name) else {
            miss(&e.name, "missing from the compressed checkpoint".into());
            continue;
        };
        if c.dtype != e.dtype || c.shape != e.shape {
            miss(
                &e.name,
                format!(
                    "is {:?} {:?} in the compressed checkpoint, {:?} {:?} in the original",
                    c.dtype, c.shape, e.dtype, e.shape
                ),
            );
            continue;
        }
        let want = orig.load_entry(e)?;
        match comp.load_entry(c) {
            Err(err) => miss(&e.name, format!("does not load: {err}")),
            Ok(got) => match first_difference(&want, &got) {
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
        orig.release(e);
        comp.release(c);
    }
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
