//! `unweight decompress`: a compressed checkpoint back to a plain one, shard for shard, with the
//! original tensors, dtypes, shapes and user metadata.
//!
//! The same three-stage pipeline as `compress` ([`super::prefetch`]): a reader thread reads each
//! tensor's stored parts with large positioned reads into reused buffers (no memory map, so no
//! page fault per 4 KiB of input), the calling thread checks and decodes them into a reused
//! output buffer, and a writer thread writes the result, so reading, decoding and writing
//! overlap. The bytes read but not yet written stay within
//! [`READ_AHEAD_BYTES`](super::prefetch::READ_AHEAD_BYTES) of original tensor bytes (or one
//! tensor, if larger), plus their stored forms, which are no larger.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use super::checkpoint::{Checkpoint, TensorEntry, INDEX_FILE};
use super::compress::{copy_aux_files, progress_bar, write_index, CompressReport};
use super::meta::{Encoding, META_KEY};
use super::prefetch::{
    read_ahead, Budget, BufferPool, ReadJob, READ_AHEAD_BYTES, READ_AHEAD_TENSORS,
};
use super::writer::{header_bytes, OutputDir, SafetensorsWriter};
use super::ContainerError;

/// What the decoder hands the writer.
enum ToWriter<'c> {
    /// One tensor's original bytes, the other buffer it used (for reuse), and the bytes it
    /// holds of the budget.
    Tensor {
        entry: &'c TensorEntry,
        bytes: Vec<u8>,
        spare: Vec<u8>,
        hold: u64,
    },
    /// The current file is complete.
    FileEnd,
}

/// Buffers kept for reuse between tensors: the read-ahead's input and output buffers.
const SPARE_BUFFERS: usize = 2 * READ_AHEAD_TENSORS;

/// Splits a buffer holding `ranges`' bytes back to back into one slice per range.
pub(super) fn split_pieces<'b>(buf: &'b [u8], ranges: &[std::ops::Range<usize>]) -> Vec<&'b [u8]> {
    let mut at = 0;
    ranges
        .iter()
        .map(|r| {
            let piece = &buf[at..at + r.len()];
            at += r.len();
            piece
        })
        .collect()
}

/// The pieces a [`ReadJob`] reads for one tensor: its stored ranges, in file
/// `file_base + entry.file` of the reader's path list.
pub(super) fn stored_read_job(
    ck: &Checkpoint,
    entry: &TensorEntry,
    file_base: usize,
) -> Vec<(usize, std::ops::Range<u64>)> {
    ck.stored_ranges(entry)
        .into_iter()
        .map(|r| (file_base + entry.file, r.start as u64..r.end as u64))
        .collect()
}

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
    let budget = Budget::new(READ_AHEAD_BYTES, READ_AHEAD_TENSORS);
    let pool = BufferPool::new(SPARE_BUFFERS, READ_AHEAD_BYTES as usize);
    let paths: Vec<&Path> = ck.files().iter().map(|f| f.path()).collect();
    let (to_decoder, from_reader) = mpsc::channel::<Result<Vec<u8>, ContainerError>>();
    let (to_writer, from_decoder) = mpsc::channel::<ToWriter<'_>>();
    let result = std::thread::scope(|scope| {
        let (ck, budget, pool, paths) = (&ck, &budget, &pool, &paths);
        scope.spawn(move || {
            let jobs = ck.entries().iter().map(|e| ReadJob {
                pieces: stored_read_job(ck, e, 0),
                hold: e.original_bytes() as u64,
            });
            read_ahead(paths, jobs, budget, pool, &to_decoder);
        });
        let out_dir = out.path();
        let writer = scope.spawn(move || {
            let r = write_files(ck, out_dir, budget, pool, from_decoder);
            if r.is_err() {
                budget.close();
            }
            r
        });
        let decoded = (|| -> Result<(), ContainerError> {
            for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
                for entry in ck.entries().iter().filter(|e| e.file == fi) {
                    bar.set_message(entry.name.clone());
                    let stored = from_reader
                        .recv()
                        .map_err(|_| stopped(file.path(), "reader"))??;
                    let ranges = ck.stored_ranges(entry);
                    let pieces = split_pieces(&stored, &ranges);
                    let encoded = entry
                        .meta
                        .as_ref()
                        .is_some_and(|m| m.encoding == Encoding::ExpRans);
                    let mut out = if encoded {
                        pool.take(entry.original_bytes())
                    } else {
                        Vec::new()
                    };
                    let kept = ck.decode_stored_into(entry, &pieces, &mut out)?;
                    let (bytes, spare) = if kept { (stored, out) } else { (out, stored) };
                    bar.inc(entry.original_bytes() as u64);
                    weight_map.insert(entry.name.clone(), fname.clone());
                    report.stored_bytes.push(entry.original_bytes() as u64);
                    report.tensors.push(
                        entry
                            .meta
                            .clone()
                            .expect("compressed entries carry metadata"),
                    );
                    to_writer
                        .send(ToWriter::Tensor {
                            entry,
                            bytes,
                            spare,
                            hold: entry.original_bytes() as u64,
                        })
                        .map_err(|_| stopped(file.path(), "writer"))?;
                }
                to_writer
                    .send(ToWriter::FileEnd)
                    .map_err(|_| stopped(file.path(), "writer"))?;
            }
            Ok(())
        })();
        if decoded.is_err() {
            budget.close();
        }
        drop((to_writer, from_reader));
        let written = writer.join().expect("the writer thread does not panic");
        // The writer's own error explains a decoder that stopped because the writer stopped.
        written.and(decoded)
    });
    result?;
    bar.finish_and_clear();
    if ck.is_sharded() {
        write_index(&out.path().join(INDEX_FILE), total, &weight_map)?;
    }
    copy_aux_files(input, out.path(), &mut report)?;
    out.commit()?;
    report.elapsed = start.elapsed();
    Ok(report)
}

/// The error of a pipeline stage that found another stage gone (that stage reports why).
fn stopped(path: &Path, stage: &str) -> ContainerError {
    ContainerError::checkpoint(path, format!("decompression stopped: the {stage} stopped"))
}

/// The writer stage: the output files one after the other, each with its original user
/// metadata and a header sized exactly (every size is known up front); gives each tensor's
/// budget back and its buffers to the pool once written.
fn write_files(
    ck: &Checkpoint,
    out_dir: &Path,
    budget: &Budget,
    pool: &BufferPool,
    from_decoder: mpsc::Receiver<ToWriter<'_>>,
) -> Result<(), ContainerError> {
    for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
        let mut user_meta: HashMap<String, String> = file.user_meta().clone();
        user_meta.remove(META_KEY);
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
        let mut writer = SafetensorsWriter::create(&out_dir.join(fname), reserve)?;
        loop {
            let Ok(msg) = from_decoder.recv() else {
                // The decoder stopped; it reports why.
                return Ok(());
            };
            match msg {
                ToWriter::Tensor {
                    entry,
                    bytes,
                    spare,
                    hold,
                } => {
                    writer.add(&entry.name, entry.dtype, &entry.shape, &bytes)?;
                    pool.give(bytes);
                    pool.give(spare);
                    budget.release(hold);
                }
                ToWriter::FileEnd => {
                    writer.finish(&user_meta)?;
                    break;
                }
            }
        }
    }
    Ok(())
}
