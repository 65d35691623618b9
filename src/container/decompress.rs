//! `unweight decompress`: a compressed checkpoint back to a plain one, shard for shard, with the
//! original tensors, dtypes, shapes and user metadata.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::checkpoint::{Checkpoint, INDEX_FILE};
use super::compress::{copy_aux_files, progress_bar, write_index, CompressReport};
use super::meta::META_KEY;
use super::writer::{header_bytes, OutputDir, SafetensorsWriter};
use super::ContainerError;

/// Decompresses the compressed checkpoint in `input` into a new plain checkpoint `output`.
pub fn decompress_dir(
    input: &Path,
    output: &Path,
    force: bool,
    progress: bool,
) -> Result<CompressReport, ContainerError> {
    let start = Instant::now();
    let ck = Checkpoint::open(input)?;
    if !ck.is_compressed() {
        return Err(ContainerError::checkpoint(
            input,
            "is not an unweight-compressed checkpoint (no unweight metadata)",
        ));
    }
    let out = OutputDir::create(Some(input), output, force)?;
    let total: u64 = ck.entries().iter().map(|e| e.original_bytes() as u64).sum();
    let bar = progress_bar(progress, total);
    let mut report = CompressReport::new(output);
    let mut weight_map = BTreeMap::new();
    for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
        let mut user_meta = file.user_meta().clone();
        user_meta.remove(META_KEY);
        // Every size is known, so the header is exactly the one a one-shot writer would produce.
        let mut offset = 0;
        let layout: Vec<_> = ck
            .entries()
            .iter()
            .filter(|e| e.file == fi)
            .map(|e| {
                offset += e.original_bytes();
                (
                    e.name.as_str(),
                    e.dtype,
                    e.shape.as_slice(),
                    offset - e.original_bytes(),
                    offset,
                )
            })
            .collect();
        let reserve = header_bytes(&layout, &user_meta).len() - 8;
        let mut writer = SafetensorsWriter::create(&out.path().join(fname), reserve)?;
        for entry in ck.entries().iter().filter(|e| e.file == fi) {
            bar.set_message(entry.name.clone());
            let bytes = ck.load_entry(entry)?;
            writer.add(&entry.name, entry.dtype, &entry.shape, &bytes)?;
            drop(bytes);
            ck.release(entry);
            bar.inc(entry.original_bytes() as u64);
            weight_map.insert(entry.name.clone(), fname.clone());
            report.stored_bytes.push(entry.original_bytes() as u64);
            report.tensors.push(
                entry
                    .meta
                    .clone()
                    .expect("compressed entries carry metadata"),
            );
        }
        writer.finish(&user_meta)?;
    }
    bar.finish_and_clear();
    if ck.is_sharded() {
        write_index(&out.path().join(INDEX_FILE), total, &weight_map)?;
    }
    copy_aux_files(input, out.path(), &mut report)?;
    out.commit()?;
    report.elapsed = start.elapsed();
    Ok(report)
}
