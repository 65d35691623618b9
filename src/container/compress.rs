//! `unweight compress`: a plain checkpoint directory in, a compressed one out.
//!
//! A three-stage pipeline, tensor by tensor in storage order: a reader thread reads each tensor
//! with large positioned reads into a reused buffer ([`super::prefetch`]), the calling thread
//! codes it (a large tensor with all cores, a one-chunk tensor on its own thread, so the many
//! small tensors of a checkpoint never wake the pool), and a writer thread writes it, so reading,
//! coding and writing overlap. Memory is bounded: the input read but not yet written stays within
//! [`READ_AHEAD_BYTES`](super::prefetch::READ_AHEAD_BYTES) (or one tensor, if larger), plus its
//! coded form. The input's sharding is kept: every input shard becomes an output shard of the
//! same name. Every 2-D-or-more BF16 tensor (all linear weights, embeddings, lm_head) is
//! encoded; vectors (norms), non-BF16 tensors and tensors that would not shrink are stored raw.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use safetensors::Dtype;

use rayon::prelude::*;

use super::checkpoint::{Checkpoint, TensorEntry, INDEX_FILE};
use super::meta::{
    self, part_name, Encoding, FileMeta, RansMeta, TensorMeta, FORMAT_NAME, FORMAT_VERSION,
    META_KEY,
};
use super::prefetch::{
    advise_sequential, read_range, Budget, READ_AHEAD_BYTES, READ_AHEAD_TENSORS,
};
use super::reader::dtype_name;
use super::writer::{header_reserve, OutputDir, SafetensorsWriter};
use super::ContainerError;
use crate::codec::{self, Params};

/// Settings of one compression run.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// Codec parameters.
    pub params: Params,
    /// Replace an existing non-empty output directory.
    pub force: bool,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            params: Params::default(),
            force: false,
            progress: true,
        }
    }
}

/// What a compression run did.
#[derive(Clone, Debug)]
pub struct CompressReport {
    /// The final output directory.
    pub output: PathBuf,
    /// Metadata of every tensor written, in order.
    pub tensors: Vec<TensorMeta>,
    /// Stored bytes of each tensor (parts or raw bytes), parallel to `tensors`.
    pub stored_bytes: Vec<u64>,
    /// Non-weight files copied (config, tokenizer, ...).
    pub copied: Vec<String>,
    /// Files and directories of the input that were not carried over.
    pub skipped: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl CompressReport {
    /// An empty report for a run writing `output`.
    pub(super) fn new(output: &Path) -> Self {
        Self {
            output: output.to_path_buf(),
            tensors: Vec::new(),
            stored_bytes: Vec::new(),
            copied: Vec::new(),
            skipped: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }
}

/// File name endings of weight formats that are never copied as auxiliary files.
const WEIGHT_SUFFIXES: [&str; 8] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".ckpt",
    ".h5",
    ".msgpack",
];

/// Compresses the checkpoint in `input` into a new directory `output`.
pub fn compress_dir(
    input: &Path,
    output: &Path,
    opts: &CompressOptions,
) -> Result<CompressReport, ContainerError> {
    let start = Instant::now();
    opts.params
        .validate()
        .map_err(|e| ContainerError::checkpoint(input, e.to_string()))?;
    let ck = Checkpoint::open(input)?;
    if ck.is_compressed() {
        return Err(ContainerError::checkpoint(
            input,
            "is already an unweight-compressed checkpoint",
        ));
    }
    let out = OutputDir::create(Some(input), output, opts.force)?;
    let total: u64 = ck.entries().iter().map(|e| e.original_bytes() as u64).sum();
    let bar = progress_bar(opts.progress, total);
    let mut report = CompressReport::new(output);
    let mut weight_map = BTreeMap::new();
    let budget = Budget::new(READ_AHEAD_BYTES, READ_AHEAD_TENSORS);
    let (to_coder, from_reader) = mpsc::channel::<Result<Vec<u8>, ContainerError>>();
    let (to_writer, from_coder) = mpsc::channel::<ToWriter>();
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    let result = std::thread::scope(|scope| {
        let (ck, budget) = (&ck, &budget);
        let reader = scope.spawn(move || {
            let r = read_tensors(ck, budget, &to_coder, &recycled);
            if let Err(e) = r {
                budget.close();
                let _ = to_coder.send(Err(e));
            }
        });
        let out_dir = out.path();
        let writer = scope.spawn(move || {
            let r = write_tensors(ck, out_dir, budget, from_coder, recycle);
            if r.is_err() {
                budget.close();
            }
            r
        });
        let coded = (|| -> Result<(), ContainerError> {
            for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
                let mut metas = Vec::new();
                let entries: Vec<&TensorEntry> =
                    ck.entries().iter().filter(|e| e.file == fi).collect();
                for group in small_tensor_groups(&entries) {
                    bar.set_message(group[0].name.clone());
                    let mut inputs = Vec::with_capacity(group.len());
                    for _ in group {
                        inputs.push(
                            from_reader
                                .recv()
                                .map_err(|_| stopped(file.path(), "reader"))??,
                        );
                    }
                    let code = |(entry, bytes): (&&TensorEntry, Vec<u8>)| {
                        compress_tensor(
                            file.path(),
                            &entry.name,
                            entry.dtype,
                            &entry.shape,
                            bytes,
                            opts.params,
                        )
                    };
                    // Small tensors are coded side by side, one per thread: each alone is too
                    // little work to spread over the pool.
                    let coded: Vec<_> = if group.len() == 1 {
                        group.iter().zip(inputs).map(code).collect()
                    } else {
                        group.par_iter().zip(inputs).map(code).collect()
                    };
                    for (entry, c) in group.iter().zip(coded) {
                        let (m, stored, msg) = c?;
                        bar.inc(m.original_bytes);
                        weight_map.insert(entry.name.clone(), fname.clone());
                        report.stored_bytes.push(stored);
                        report.tensors.push(m.clone());
                        metas.push(m);
                        to_writer
                            .send(msg)
                            .map_err(|_| stopped(file.path(), "writer"))?;
                    }
                }
                let mut user_meta = file.user_meta().clone();
                let fm = FileMeta {
                    format: FORMAT_NAME.into(),
                    version: FORMAT_VERSION,
                    tensors: metas,
                };
                user_meta.insert(
                    META_KEY.into(),
                    serde_json::to_string(&fm).expect("metadata serialises"),
                );
                to_writer
                    .send(ToWriter::FileEnd(user_meta))
                    .map_err(|_| stopped(file.path(), "writer"))?;
            }
            Ok(())
        })();
        if coded.is_err() {
            budget.close();
        }
        drop((to_writer, from_reader));
        let written = writer.join().expect("the writer thread does not panic");
        reader.join().expect("the reader thread does not panic");
        // The writer's own error explains a coder that stopped because the writer stopped.
        written.and(coded)
    });
    result?;
    bar.finish_and_clear();
    if ck.is_sharded() {
        let stored: u64 = report.stored_bytes.iter().sum();
        write_index(&out.path().join(INDEX_FILE), stored, &weight_map)?;
    }
    copy_aux_files(input, out.path(), &mut report)?;
    out.commit()?;
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Writes a sharded checkpoint's index: logical tensor names to shard files.
pub(super) fn write_index(
    path: &Path,
    total_size: u64,
    weight_map: &BTreeMap<String, String>,
) -> Result<(), ContainerError> {
    let index =
        serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).expect("index serialises");
    fs::write(path, text + "\n").map_err(|e| ContainerError::io(path, e))
}

/// Copies the top-level non-weight files (config, tokenizer, generation config, README, ...)
/// and records what was left out.
pub(super) fn copy_aux_files(
    input: &Path,
    output: &Path,
    report: &mut CompressReport,
) -> Result<(), ContainerError> {
    let mut names: Vec<_> = fs::read_dir(input)
        .map_err(|e| ContainerError::io(input, e))?
        .filter_map(|e| e.ok())
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let is_weight = name == INDEX_FILE || WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s));
        if path.is_file() && !is_weight {
            fs::copy(&path, output.join(&name)).map_err(|e| ContainerError::io(&path, e))?;
            report.copied.push(name);
        } else if !(path.is_file() && (name == INDEX_FILE || name.ends_with(".safetensors"))) {
            report.skipped.push(name);
        }
    }
    Ok(())
}

/// Whether a tensor is a candidate for `exp-rans` (see the module docs).
fn is_candidate(dtype: Dtype, shape: &[usize]) -> bool {
    dtype == Dtype::BF16 && shape.len() >= 2 && shape.iter().all(|&d| d > 0)
}

/// An upper bound of the header of output file `fi`: every candidate tensor as three parts of
/// the widest size, every metadata number at its widest.
fn header_bound(ck: &Checkpoint, fi: usize, user_meta: &HashMap<String, String>) -> usize {
    let widest = "x".repeat(meta::checksum_of(&[]).len());
    let mut names = Vec::new();
    let mut metas = Vec::new();
    for e in ck.entries().iter().filter(|e| e.file == fi) {
        let candidate = is_candidate(e.dtype, &e.shape);
        if candidate {
            names.extend(
                meta::PARTS
                    .iter()
                    .map(|p| (part_name(&e.name, p), Dtype::U8, vec![usize::MAX])),
            );
        } else {
            names.push((e.name.clone(), e.dtype, e.shape.clone()));
        }
        metas.push(TensorMeta {
            name: e.name.clone(),
            dtype: dtype_name(e.dtype),
            shape: e.shape.clone(),
            encoding: Encoding::ExpRans,
            original_bytes: u64::MAX,
            checksum: widest.clone(),
            // The longest text an f64 can print as.
            exponent_entropy_bits: Some(-2.2250738585072014e-308),
            value_entropy_bits: Some(-2.2250738585072014e-308),
            rans: candidate.then(|| RansMeta {
                chunk_elems: usize::MAX,
                prob_bits: u32::MAX,
                lanes: usize::MAX,
                mantissa_bits: u32::MAX,
                parts_checksum: widest.clone(),
            }),
        });
    }
    let mut meta = user_meta.clone();
    let fm = FileMeta {
        format: FORMAT_NAME.into(),
        version: u32::MAX,
        tensors: metas,
    };
    meta.insert(
        META_KEY.into(),
        serde_json::to_string(&fm).expect("metadata serialises"),
    );
    let tensors: Vec<_> = names
        .iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect();
    header_reserve(&tensors, &meta)
}

/// One stored tensor of an output file: its name, dtype, shape and bytes.
struct Part {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: PartBytes,
}

/// A part's bytes: a byte buffer, or the coded words (little-endian u16), written as they are
/// on a little-endian machine rather than copied into bytes first.
enum PartBytes {
    Bytes(Vec<u8>),
    Words(Vec<u16>),
}

impl PartBytes {
    /// Runs `f` on the stored (little-endian) bytes.
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Self::Bytes(b) => f(b),
            #[cfg(target_endian = "little")]
            // SAFETY: any initialised u16 slice is a valid u8 slice of twice the length (u8 has
            // alignment 1, u16 no padding); on a little-endian machine those are the LE bytes.
            Self::Words(w) => {
                f(unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), 2 * w.len()) })
            }
            #[cfg(not(target_endian = "little"))]
            Self::Words(w) => f(&w.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>()),
        }
    }
}

/// What the coder hands the writer.
enum ToWriter {
    /// The stored tensors of one input tensor (three parts, or the tensor raw), the input
    /// buffer when it is not one of them (for reuse once written), and the input bytes it held
    /// from the read-ahead budget.
    Tensor {
        parts: Vec<Part>,
        spare: Option<Vec<u8>>,
        input_bytes: u64,
    },
    /// The current file is complete: its user metadata; the next tensors go to the next file.
    FileEnd(HashMap<String, String>),
}

/// The error of a pipeline stage that found another stage gone (that stage reports why).
fn stopped(path: &Path, stage: &str) -> ContainerError {
    ContainerError::checkpoint(path, format!("compression stopped: the {stage} stopped"))
}

/// Tensors of at most this many bytes are small: coded several at a time, one per thread.
const SMALL_TENSOR_BYTES: usize = 4 << 20;

/// The most small tensors coded at a time (at most the tensors the reader may hold).
const SMALL_TENSOR_GROUP: usize = READ_AHEAD_TENSORS / 2;

/// A file's entries in order, cut into groups: runs of up to [`SMALL_TENSOR_GROUP`] small
/// tensors, and every larger tensor alone.
fn small_tensor_groups<'a, 'e>(entries: &'a [&'e TensorEntry]) -> Vec<&'a [&'e TensorEntry]> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start + 1;
        if entries[start].original_bytes() <= SMALL_TENSOR_BYTES {
            while end < entries.len()
                && end - start < SMALL_TENSOR_GROUP
                && entries[end].original_bytes() <= SMALL_TENSOR_BYTES
            {
                end += 1;
            }
        }
        groups.push(&entries[start..end]);
        start = end;
    }
    groups
}

/// Buffers the reader keeps for reuse; more are freed.
const SPARE_BUFFERS: usize = 2 * READ_AHEAD_TENSORS;

/// The reader stage: every tensor of the plain checkpoint, in order, read into a buffer (a
/// recycled one when there is one) once the budget admits it.
fn read_tensors(
    ck: &Checkpoint,
    budget: &Budget,
    to_coder: &mpsc::Sender<Result<Vec<u8>, ContainerError>>,
    recycled: &mpsc::Receiver<Vec<u8>>,
) -> Result<(), ContainerError> {
    let mut spare: Vec<Vec<u8>> = Vec::new();
    for (fi, sf) in ck.files().iter().enumerate() {
        let path = sf.path();
        let file = fs::File::open(path).map_err(|e| ContainerError::io(path, e))?;
        advise_sequential(&file);
        for entry in ck.entries().iter().filter(|e| e.file == fi) {
            let len = entry.original_bytes() as u64;
            if !budget.acquire(len) {
                return Ok(());
            }
            spare.extend(recycled.try_iter());
            // The spare buffer that fits best: the smallest large enough, else the largest.
            let pick = spare
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() as u64 >= len)
                .min_by_key(|(_, b)| b.capacity())
                .or_else(|| spare.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
                .map(|(i, _)| i);
            let mut buf = pick.map(|i| spare.swap_remove(i)).unwrap_or_default();
            spare.truncate(SPARE_BUFFERS);
            let (start, end) = sf
                .range(&entry.name)
                .expect("entry of a plain file names a stored tensor");
            read_range(&file, path, start as u64, end as u64, &mut buf)?;
            if to_coder.send(Ok(buf)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The writer stage: the output files, one after the other, from the coder's parts; gives each
/// tensor's budget back and its buffers to the reader once written.
fn write_tensors(
    ck: &Checkpoint,
    out_dir: &Path,
    budget: &Budget,
    from_coder: mpsc::Receiver<ToWriter>,
    recycle: mpsc::Sender<Vec<u8>>,
) -> Result<(), ContainerError> {
    for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
        let reserve = header_bound(ck, fi, file.user_meta());
        let mut writer = SafetensorsWriter::create(&out_dir.join(fname), reserve)?;
        loop {
            let Ok(msg) = from_coder.recv() else {
                // The coder stopped; it reports why.
                return Ok(());
            };
            match msg {
                ToWriter::Tensor {
                    parts,
                    spare,
                    input_bytes,
                } => {
                    for p in parts {
                        p.bytes
                            .with_bytes(|b| writer.add(&p.name, p.dtype, &p.shape, b))?;
                        if let PartBytes::Bytes(b) = p.bytes {
                            let _ = recycle.send(b);
                        }
                    }
                    if let Some(b) = spare {
                        let _ = recycle.send(b);
                    }
                    budget.release(input_bytes);
                }
                ToWriter::FileEnd(user_meta) => {
                    writer.finish(&user_meta)?;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Encodes (or keeps raw) one tensor; returns its metadata, its stored bytes and what the
/// writer gets: the parts to write and, when it is not the raw part, the input buffer for reuse.
fn compress_tensor(
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    bytes: Vec<u8>,
    params: Params,
) -> Result<(TensorMeta, u64, ToWriter), ContainerError> {
    let input_bytes = bytes.len() as u64;
    let mut m = TensorMeta {
        name: name.to_string(),
        dtype: dtype_name(dtype),
        shape: shape.to_vec(),
        encoding: Encoding::Raw,
        original_bytes: bytes.len() as u64,
        checksum: meta::checksum_of(&bytes),
        exponent_entropy_bits: None,
        value_entropy_bits: None,
        rans: None,
    };
    if dtype == Dtype::BF16 {
        if is_candidate(dtype, shape) {
            let enc = codec::encode(&bytes, params.for_tensor(bytes.len() / 2))
                .map_err(|e| ContainerError::corrupt(path, name, e.to_string()))?;
            m.exponent_entropy_bits = Some(enc.exponent_entropy_bits);
            m.value_entropy_bits = Some(enc.value_entropy_bits);
            let index: Vec<u8> = enc
                .offsets
                .iter()
                .chain(&enc.states)
                .flat_map(|w| w.to_le_bytes())
                .chain(enc.table_bytes())
                .collect();
            let exp = PartBytes::Words(enc.exp_words);
            let exp_len = exp.with_bytes(|b| b.len());
            let stored = enc.raw.len() + exp_len + index.len();
            if stored < bytes.len() {
                m.encoding = Encoding::ExpRans;
                m.rans = Some(RansMeta {
                    chunk_elems: enc.params.chunk_elems,
                    prob_bits: enc.params.prob_bits,
                    lanes: codec::ans::LANES,
                    mantissa_bits: enc.params.mantissa_bits,
                    parts_checksum: exp
                        .with_bytes(|e| meta::checksum_of_parts([&enc.raw[..], e, &index])),
                });
                let parts = meta::PARTS
                    .iter()
                    .zip([PartBytes::Bytes(enc.raw), exp, PartBytes::Bytes(index)])
                    .map(|(p, data)| Part {
                        name: part_name(name, p),
                        dtype: Dtype::U8,
                        shape: vec![data.with_bytes(|b| b.len())],
                        bytes: data,
                    })
                    .collect();
                let msg = ToWriter::Tensor {
                    parts,
                    spare: Some(bytes),
                    input_bytes,
                };
                return Ok((m, stored as u64, msg));
            }
        } else {
            let v = codec::model::value_histogram(&bytes);
            m.exponent_entropy_bits =
                Some(codec::model::entropy(&codec::model::key_histogram(&v, 0)));
            m.value_entropy_bits = Some(codec::model::entropy(&v));
        }
    }
    let stored = bytes.len() as u64;
    let part = Part {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes: PartBytes::Bytes(bytes),
    };
    let msg = ToWriter::Tensor {
        parts: vec![part],
        spare: None,
        input_bytes,
    };
    Ok((m, stored, msg))
}

/// A byte-counting progress bar on stderr, hidden unless asked for and stderr is a terminal.
pub(super) fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {wide_msg}",
        )
        .expect("valid template"),
    );
    bar
}
