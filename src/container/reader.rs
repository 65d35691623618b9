//! Read access to one safetensors file over a memory map: the parsed and validated header, the
//! user metadata (including the `unweight` entry of compressed files) and tensor byte ranges.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

use super::meta::{FileMeta, FORMAT_NAME, FORMAT_VERSION, META_KEY, OLDEST_VERSION};
use super::ContainerError;

/// One memory-mapped, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Tensors in storage order (by offset).
    tensors: Vec<(String, TensorInfo)>,
    index: HashMap<String, usize>,
    user_meta: HashMap<String, String>,
    unweight: Option<FileMeta>,
}

impl SafetensorsFile {
    /// Opens and validates a file: header well-formed, offsets covering the data exactly (a
    /// truncated file is an error here), and any `unweight` metadata of a supported version.
    pub fn open(path: &Path) -> Result<Self, ContainerError> {
        let file = File::open(path).map_err(|e| ContainerError::io(path, e))?;
        // SAFETY: the map is read-only and private; the file is not modified by this process
        // while mapped. A concurrent writer from another process is outside our contract (as for
        // every mmap-based safetensors loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ContainerError::io(path, e))?;
        let bad = |msg: String| ContainerError::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            bad(match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    "file size does not match the header (truncated or padded file)".to_string()
                }
                safetensors::SafeTensorError::InvalidHeaderLength => {
                    "header length exceeds the file (truncated file)".to_string()
                }
                other => format!("{other:?}"),
            })
        })?;
        let mut tensors: Vec<(String, TensorInfo)> = metadata
            .tensors()
            .into_iter()
            .map(|(n, i)| (n, i.clone()))
            .collect();
        tensors.sort_by_key(|(_, i)| i.data_offsets.0);
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let user_meta = metadata.metadata().clone().unwrap_or_default();
        let unweight = match user_meta.get(META_KEY) {
            None => None,
            Some(json) => Some(parse_file_meta(path, json)?),
        };
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
            index,
            user_meta,
            unweight,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stored tensors in storage order: name, dtype, shape.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, Dtype, &[usize])> {
        self.tensors
            .iter()
            .map(|(n, i)| (n.as_str(), i.dtype, i.shape.as_slice()))
    }

    /// Dtype and shape of a stored tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.index
            .get(name)
            .map(|&i| (self.tensors[i].1.dtype, self.tensors[i].1.shape.as_slice()))
    }

    /// The bytes of a stored tensor.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.range(name).map(|(a, b)| &self.mmap[a..b])
    }

    /// The bytes at an absolute range of the file (one [`SafetensorsFile::range`]).
    pub fn bytes_at(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.mmap[r]
    }

    /// Absolute byte range of a stored tensor in the file.
    pub fn range(&self, name: &str) -> Option<(usize, usize)> {
        self.index.get(name).map(|&i| {
            let (a, b) = self.tensors[i].1.data_offsets;
            (self.data_start + a, self.data_start + b)
        })
    }

    /// The user metadata (`__metadata__`), including the `unweight` entry if present.
    pub fn user_meta(&self) -> &HashMap<String, String> {
        &self.user_meta
    }

    /// The parsed `unweight` metadata of a compressed file; `None` for a plain file.
    pub fn unweight(&self) -> Option<&FileMeta> {
        self.unweight.as_ref()
    }

    /// Maps a byte range's pages in, reading them from the file if they are not in the page
    /// cache, in one call (`MADV_POPULATE_READ`) rather than one page fault per few pages as the
    /// range is first read. Only a hint: where it fails, reads fault the pages in as usual.
    pub fn populate(&self, start: usize, end: usize) {
        #[cfg(target_os = "linux")]
        if end > start {
            let _ = self
                .mmap
                .advise_range(memmap2::Advice::PopulateRead, start, end - start);
        }
    }

    /// Tells the kernel that a byte range will not be read again soon, so streaming through a
    /// checkpoint larger than memory keeps the resident set bounded by the largest tensor.
    pub fn release(&self, start: usize, end: usize) {
        if end > start {
            // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only drops clean
            // page-cache references; a later read of the range faults the same bytes back in
            // from the file. No Rust reference observes a change in content.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

fn parse_file_meta(path: &Path, json: &str) -> Result<FileMeta, ContainerError> {
    // Read the version before the full structure, so a future version with a different layout
    // gets the version error rather than a parse error.
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        ContainerError::checkpoint(
            path,
            format!("`{META_KEY}` metadata is not valid JSON: {e}"),
        )
    })?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(ContainerError::checkpoint(
            path,
            format!("`{META_KEY}` metadata does not declare format \"{FORMAT_NAME}\""),
        ));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if (OLDEST_VERSION as u64..=FORMAT_VERSION as u64).contains(&v) => {}
        other => {
            return Err(ContainerError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: other
                    .map_or_else(|| format!("{:?}", value.get("version")), |v| v.to_string()),
                supported: FORMAT_VERSION,
            })
        }
    }
    let fm: FileMeta = serde_json::from_value(value).map_err(|e| {
        ContainerError::checkpoint(path, format!("`{META_KEY}` metadata is malformed: {e}"))
    })?;
    if fm.version == 1 {
        if let Some(t) = fm
            .tensors
            .iter()
            .find(|t| t.rans.as_ref().is_some_and(|r| r.mantissa_bits != 0))
        {
            return Err(ContainerError::corrupt(
                path,
                &t.name,
                "a version 1 file cannot code mantissa bits",
            ));
        }
    }
    Ok(fm)
}

/// The safetensors name of a dtype ("BF16", "F32", ...).
pub fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// Parses a safetensors dtype name.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}
