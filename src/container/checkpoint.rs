//! A checkpoint directory, plain or compressed, opened as one set of logical tensors.
//!
//! Plain and compressed checkpoints go through the same type: [`Checkpoint::load`] returns the
//! original bytes of a tensor either way, decoding and verifying checksums where needed. Both
//! single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) layouts are
//! read.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::meta::{self, part_name, Encoding, TensorMeta, PARTS};
use super::reader::{parse_dtype, SafetensorsFile};
use super::ContainerError;
use crate::codec::{self, EncodedView, Params};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The original bytes of a tensor, from [`Checkpoint::decode_stored`].
pub(super) enum Decoded {
    /// They are the stored bytes themselves (plain and `raw` tensors).
    Stored,
    /// Decoded.
    Bytes(Vec<u8>),
}

/// One logical tensor of a checkpoint.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Its name in the original checkpoint.
    pub name: String,
    /// Index of the file holding it in [`Checkpoint::files`].
    pub file: usize,
    /// Its original dtype.
    pub dtype: Dtype,
    /// Its original shape.
    pub shape: Vec<usize>,
    /// Compressed-container metadata; `None` in a plain checkpoint.
    pub meta: Option<TensorMeta>,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the original tensor.
    pub fn original_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    file_names: Vec<String>,
    entries: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    sharded: bool,
    compressed: bool,
}

impl Checkpoint {
    /// Opens a directory: finds its weight files, validates every header, and (for compressed
    /// checkpoints) checks that the metadata and the stored parts agree.
    pub fn open(dir: &Path) -> Result<Self, ContainerError> {
        if !dir.is_dir() {
            return Err(ContainerError::checkpoint(
                dir,
                "not a directory (expected a checkpoint directory)",
            ));
        }
        let index_path = dir.join(INDEX_FILE);
        let (file_names, weight_map, sharded) = if index_path.exists() {
            let text =
                fs::read_to_string(&index_path).map_err(|e| ContainerError::io(&index_path, e))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ContainerError::checkpoint(&index_path, format!("invalid JSON: {e}"))
            })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ContainerError::checkpoint(&index_path, "has no \"weight_map\" object")
                })?;
            let mut weight_map = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ContainerError::checkpoint(
                        &index_path,
                        format!("weight_map entry `{name}` is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(ContainerError::checkpoint(
                        &index_path,
                        format!("shard name `{file}` is not a plain file name"),
                    ));
                }
                weight_map.insert(name.clone(), file.to_string());
            }
            let names: BTreeSet<String> = weight_map.values().cloned().collect();
            (
                names.into_iter().collect::<Vec<_>>(),
                Some(weight_map),
                true,
            )
        } else if dir.join(SINGLE_FILE).exists() {
            (vec![SINGLE_FILE.to_string()], None, false)
        } else {
            return Err(ContainerError::checkpoint(
                dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
            ));
        };
        let mut files = Vec::with_capacity(file_names.len());
        for name in &file_names {
            let path = dir.join(name);
            if !path.exists() {
                return Err(ContainerError::checkpoint(
                    &path,
                    "shard listed in the index is missing",
                ));
            }
            files.push(SafetensorsFile::open(&path)?);
        }
        let compressed = files.first().is_some_and(|f| f.unweight().is_some());
        let mut entries = Vec::new();
        for (fi, file) in files.iter().enumerate() {
            if file.unweight().is_some() != compressed {
                return Err(ContainerError::checkpoint(
                    file.path(),
                    "mixes compressed and plain shards",
                ));
            }
            match file.unweight() {
                Some(fm) => entries.extend(compressed_entries(file, fi, &fm.tensors)?),
                None => entries.extend(file.tensors().map(|(n, d, s)| TensorEntry {
                    name: n.to_string(),
                    file: fi,
                    dtype: d,
                    shape: s.to_vec(),
                    meta: None,
                })),
            }
        }
        let mut by_name = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if by_name.insert(e.name.clone(), i).is_some() {
                return Err(ContainerError::checkpoint(
                    dir,
                    format!("tensor `{}` is stored twice", e.name),
                ));
            }
        }
        if let Some(wm) = &weight_map {
            for (name, file) in wm {
                match by_name.get(name) {
                    Some(&i) if &file_names[entries[i].file] == file => {}
                    Some(&i) => {
                        return Err(ContainerError::checkpoint(
                            &index_path,
                            format!(
                                "index puts `{name}` in {file} but it is in {}",
                                file_names[entries[i].file]
                            ),
                        ))
                    }
                    None => {
                        return Err(ContainerError::checkpoint(
                            dir.join(file),
                            format!("tensor `{name}` listed in the index is missing"),
                        ))
                    }
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            file_names,
            entries,
            by_name,
            sharded,
            compressed,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint is in the unweight compressed format.
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }

    /// Whether it has an index file and shards.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The weight files, in name order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// The weight file names, in the same order as [`Checkpoint::files`].
    pub fn file_names(&self) -> &[String] {
        &self.file_names
    }

    /// Every logical tensor, file by file in storage order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// One logical tensor by name.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The original bytes of a tensor, decoded and checksum-verified when compressed.
    pub fn load(&self, name: &str) -> Result<Cow<'_, [u8]>, ContainerError> {
        let entry = self
            .entry(name)
            .ok_or_else(|| ContainerError::NoSuchTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        self.load_entry(entry)
    }

    /// Like [`Checkpoint::load`] for an entry of this checkpoint.
    pub fn load_entry(&self, entry: &TensorEntry) -> Result<Cow<'_, [u8]>, ContainerError> {
        let file = &self.files[entry.file];
        let ranges = self.stored_ranges(entry);
        let stored = ranges
            .iter()
            .map(|r| file.read_at(r.clone()))
            .collect::<Result<Vec<&[u8]>, _>>()?;
        match self.decode_stored(entry, &stored)? {
            Decoded::Stored => Ok(Cow::Borrowed(stored[0])),
            Decoded::Bytes(b) => Ok(Cow::Owned(b)),
        }
    }

    /// Where in its file a tensor's stored bytes are: its bytes (plain or `raw`), or its three
    /// parts in [`PARTS`] order (`exp-rans`). Absolute byte offsets.
    pub(super) fn stored_ranges(&self, entry: &TensorEntry) -> Vec<std::ops::Range<usize>> {
        let file = &self.files[entry.file];
        let names: Vec<String> = match entry.meta.as_ref().map(|m| m.encoding) {
            Some(Encoding::ExpRans) => PARTS.iter().map(|p| part_name(&entry.name, p)).collect(),
            _ => vec![entry.name.clone()],
        };
        names
            .iter()
            .map(|n| {
                let (a, b) = file.range(n).expect("validated at open");
                a..b
            })
            .collect()
    }

    /// The original bytes of a tensor from its stored bytes (`stored`, as
    /// [`Checkpoint::stored_ranges`] lists them, however they were read), checksums verified:
    /// [`Decoded::Stored`] when they are `stored[0]` itself (plain and `raw` tensors).
    pub(super) fn decode_stored(
        &self,
        entry: &TensorEntry,
        stored: &[&[u8]],
    ) -> Result<Decoded, ContainerError> {
        let mut out = Vec::new();
        let kept = self.decode_stored_into(entry, stored, &mut out)?;
        Ok(if kept {
            Decoded::Stored
        } else {
            Decoded::Bytes(out)
        })
    }

    /// Like [`Checkpoint::decode_stored`], decoding into `out` (resized to the tensor; a reused
    /// buffer of the right length is not cleared first). Returns `true` when the original bytes
    /// are `stored[0]` itself and `out` was not touched.
    pub(super) fn decode_stored_into(
        &self,
        entry: &TensorEntry,
        stored: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<bool, ContainerError> {
        let path = self.files[entry.file].path();
        let name = entry.name.as_str();
        let Some(m) = &entry.meta else {
            return Ok(true);
        };
        match m.encoding {
            Encoding::Raw => {
                check(path, name, "stored bytes", &m.checksum, stored[0])?;
                Ok(true)
            }
            Encoding::ExpRans => {
                let r = m.rans.as_ref().expect("validated at open");
                let got = meta::checksum_of_parts(stored.iter().copied());
                if got != r.parts_checksum {
                    return Err(ContainerError::corrupt(path, name, format!(
                        "stored parts checksum {got} does not match the recorded {} (the file is damaged)", r.parts_checksum
                    )));
                }
                let len = entry.numel();
                let chunks = len.div_ceil(r.chunk_elems);
                let (offsets_len, states_len) = (4 * (chunks + 1), 4 * codec::ans::LANES * chunks);
                let index = stored[2];
                if index.len() <= offsets_len + states_len {
                    return Err(ContainerError::corrupt(
                        path,
                        name,
                        format!(
                            "index part is {} bytes, too short for {chunks} chunks",
                            index.len()
                        ),
                    ));
                }
                let (offsets, rest) = index.split_at(offsets_len);
                let (states, table) = rest.split_at(states_len);
                let view = EncodedView {
                    len,
                    params: Params {
                        chunk_elems: r.chunk_elems,
                        prob_bits: r.prob_bits,
                        mantissa_bits: r.mantissa_bits,
                    },
                    raw: stored[0],
                    exp_words: stored[1],
                    offsets,
                    states,
                    table,
                };
                // A reused buffer keeps its (stale, initialised) bytes: only growth is zeroed.
                if out.len() > 2 * len {
                    out.truncate(2 * len);
                } else if out.len() < 2 * len {
                    if out.capacity() < 2 * len {
                        // Growing in place would copy the stale bytes first.
                        *out = Vec::with_capacity(2 * len);
                    }
                    codec::tensor::advise_huge_pages(out.spare_capacity_mut());
                    out.resize(2 * len, 0);
                }
                codec::decode_into(&view, out)
                    .map_err(|e| ContainerError::corrupt(path, name, e.to_string()))?;
                check(path, name, "decoded bytes", &m.checksum, out)?;
                Ok(false)
            }
        }
    }

    /// Releases the page-cache mapping of a tensor's stored bytes once it has been consumed (see
    /// [`SafetensorsFile::release`]).
    pub fn release(&self, entry: &TensorEntry) {
        let file = &self.files[entry.file];
        let names: Vec<String> = match entry.meta.as_ref().map(|m| m.encoding) {
            Some(Encoding::ExpRans) => PARTS.iter().map(|p| part_name(&entry.name, p)).collect(),
            _ => vec![entry.name.clone()],
        };
        for n in names {
            if let Some((a, b)) = file.range(&n) {
                file.release(a, b);
            }
        }
    }

    /// Bytes the tensor occupies in storage (its parts, or its raw bytes).
    pub fn stored_bytes(&self, entry: &TensorEntry) -> usize {
        let file = &self.files[entry.file];
        match entry.meta.as_ref().map(|m| m.encoding) {
            Some(Encoding::ExpRans) => PARTS
                .iter()
                .filter_map(|p| file.range(&part_name(&entry.name, p)))
                .map(|(a, b)| b - a)
                .sum(),
            _ => file.range(&entry.name).map_or(0, |(a, b)| b - a),
        }
    }
}

fn check(
    path: &Path,
    name: &str,
    what: &str,
    want: &str,
    bytes: &[u8],
) -> Result<(), ContainerError> {
    let got = meta::checksum_of(bytes);
    if got == want {
        Ok(())
    } else {
        Err(ContainerError::corrupt(
            path,
            name,
            format!(
                "{what} checksum {got} does not match the recorded {want} (the file is damaged)"
            ),
        ))
    }
}

/// Builds the logical entries of a compressed file from its metadata, checking that every
/// stored tensor the metadata refers to exists with the right dtype and size, and that nothing
/// else is stored.
fn compressed_entries(
    file: &SafetensorsFile,
    fi: usize,
    metas: &[TensorMeta],
) -> Result<Vec<TensorEntry>, ContainerError> {
    let path = file.path();
    let mut referenced = BTreeSet::new();
    let mut out = Vec::with_capacity(metas.len());
    for m in metas {
        let dtype = parse_dtype(&m.dtype).ok_or_else(|| ContainerError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: m.name.clone(),
            dtype: m.dtype.clone(),
        })?;
        let numel = m
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                ContainerError::corrupt(path, &m.name, format!("shape {:?} overflows", m.shape))
            })?;
        if numel.checked_mul(dtype.size()) != Some(m.original_bytes as usize) {
            return Err(ContainerError::corrupt(
                path,
                &m.name,
                format!(
                    "recorded size {} bytes does not match shape {:?} of {}",
                    m.original_bytes, m.shape, m.dtype
                ),
            ));
        }
        match m.encoding {
            Encoding::Raw => {
                match file.info(&m.name) {
                    Some((d, s)) if d == dtype && s == m.shape.as_slice() => {}
                    Some((d, s)) => {
                        return Err(ContainerError::corrupt(
                            path,
                            &m.name,
                            format!(
                                "stored as {d:?} {s:?} but metadata says {} {:?}",
                                m.dtype, m.shape
                            ),
                        ))
                    }
                    None => {
                        return Err(ContainerError::corrupt(
                            path,
                            &m.name,
                            "stored tensor is missing",
                        ))
                    }
                }
                referenced.insert(m.name.clone());
            }
            Encoding::ExpRans => {
                if dtype != Dtype::BF16 {
                    return Err(ContainerError::UnsupportedDtype {
                        path: path.to_path_buf(),
                        tensor: m.name.clone(),
                        dtype: m.dtype.clone(),
                    });
                }
                let r = m.rans.as_ref().ok_or_else(|| {
                    ContainerError::corrupt(path, &m.name, "exp-rans tensor has no rans parameters")
                })?;
                if r.lanes != codec::ans::LANES {
                    return Err(ContainerError::corrupt(
                        path,
                        &m.name,
                        format!("{} lanes (only {} are defined)", r.lanes, codec::ans::LANES),
                    ));
                }
                Params {
                    chunk_elems: r.chunk_elems,
                    prob_bits: r.prob_bits,
                    mantissa_bits: r.mantissa_bits,
                }
                .validate()
                .map_err(|e| ContainerError::corrupt(path, &m.name, e.to_string()))?;
                for p in PARTS {
                    let pn = part_name(&m.name, p);
                    match file.info(&pn) {
                        Some((Dtype::U8, s)) if s.len() == 1 => {}
                        Some(_) => {
                            return Err(ContainerError::corrupt(
                                path,
                                &m.name,
                                format!("part `{pn}` is not a 1-D U8 tensor"),
                            ))
                        }
                        None => {
                            return Err(ContainerError::corrupt(
                                path,
                                &m.name,
                                format!("part `{pn}` is missing"),
                            ))
                        }
                    }
                    referenced.insert(pn);
                }
            }
        }
        out.push(TensorEntry {
            name: m.name.clone(),
            file: fi,
            dtype,
            shape: m.shape.clone(),
            meta: Some(m.clone()),
        });
    }
    if let Some((stray, _, _)) = file.tensors().find(|(n, _, _)| !referenced.contains(*n)) {
        return Err(ContainerError::checkpoint(
            path,
            format!("stored tensor `{stray}` is not described by the unweight metadata"),
        ));
    }
    Ok(out)
}
