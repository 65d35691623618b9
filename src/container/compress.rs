//! `unweight compress`: a plain checkpoint directory in, a compressed one out.
//!
//! Streams tensor by tensor over memory maps (each tensor's input pages are released once it is
//! written, so peak memory follows the largest tensor, not the checkpoint), encodes each tensor
//! with all cores, and keeps the input's sharding: every input shard becomes an output shard of
//! the same name. Every 2-D-or-more BF16 tensor (all linear weights, embeddings, lm_head) is
//! encoded; vectors (norms), non-BF16 tensors and tensors that would not shrink are stored raw.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use safetensors::Dtype;

use super::checkpoint::{Checkpoint, INDEX_FILE};
use super::meta::{
    self, part_name, Encoding, FileMeta, RansMeta, TensorMeta, FORMAT_NAME, FORMAT_VERSION,
    META_KEY,
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
    for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
        let reserve = header_bound(&ck, fi, file.user_meta());
        let mut writer = SafetensorsWriter::create(&out.path().join(fname), reserve)?;
        let mut metas = Vec::new();
        for entry in ck.entries().iter().filter(|e| e.file == fi) {
            bar.set_message(entry.name.clone());
            let bytes = ck.load_entry(entry)?;
            let (m, stored) = compress_tensor(
                &mut writer,
                file.path(),
                &entry.name,
                entry.dtype,
                &entry.shape,
                &bytes,
                opts.params,
            )?;
            drop(bytes);
            ck.release(entry);
            bar.inc(m.original_bytes);
            weight_map.insert(entry.name.clone(), fname.clone());
            report.stored_bytes.push(stored);
            report.tensors.push(m.clone());
            metas.push(m);
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
        writer.finish(&user_meta)?;
    }
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

/// Encodes (or stores raw) one tensor into `writer`; returns its metadata and stored bytes.
fn compress_tensor(
    writer: &mut SafetensorsWriter,
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
    params: Params,
) -> Result<(TensorMeta, u64), ContainerError> {
    let mut m = TensorMeta {
        name: name.to_string(),
        dtype: dtype_name(dtype),
        shape: shape.to_vec(),
        encoding: Encoding::Raw,
        original_bytes: bytes.len() as u64,
        checksum: meta::checksum_of(bytes),
        exponent_entropy_bits: None,
        value_entropy_bits: None,
        rans: None,
    };
    if dtype == Dtype::BF16 {
        if is_candidate(dtype, shape) {
            let enc = codec::encode(bytes, params.for_tensor(bytes.len() / 2))
                .map_err(|e| ContainerError::corrupt(path, name, e.to_string()))?;
            m.exponent_entropy_bits = Some(enc.exponent_entropy_bits);
            m.value_entropy_bits = Some(enc.value_entropy_bits);
            let exp: Vec<u8> = enc.exp_words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let index: Vec<u8> = enc
                .offsets
                .iter()
                .chain(&enc.states)
                .flat_map(|w| w.to_le_bytes())
                .chain(enc.table_bytes())
                .collect();
            let parts: [&[u8]; 3] = [&enc.raw, &exp, &index];
            let stored: usize = parts.iter().map(|p| p.len()).sum();
            if stored < bytes.len() {
                m.encoding = Encoding::ExpRans;
                m.rans = Some(RansMeta {
                    chunk_elems: enc.params.chunk_elems,
                    prob_bits: enc.params.prob_bits,
                    lanes: codec::ans::LANES,
                    mantissa_bits: enc.params.mantissa_bits,
                    parts_checksum: meta::checksum_of_parts(parts.iter().copied()),
                });
                for (p, data) in meta::PARTS.iter().zip(parts) {
                    writer.add_u8(&part_name(name, p), data)?;
                }
                return Ok((m, stored as u64));
            }
        } else {
            let v = codec::model::value_histogram(bytes);
            m.exponent_entropy_bits =
                Some(codec::model::entropy(&codec::model::key_histogram(&v, 0)));
            m.value_entropy_bits = Some(codec::model::entropy(&v));
        }
    }
    writer.add(name, dtype, shape, bytes)?;
    Ok((m, bytes.len() as u64))
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
