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
    /// Kept open to compare the file's current length with the mapping's (see
    /// [`SafetensorsFile::populate`]).
    file: File,
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
        // every mmap-based safetensors loader); a file that shrank is caught before its bytes
        // are read by the checked paths (`populate`, `read`, `read_at`) rather than by SIGBUS.
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
            file,
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

    /// The bytes of a stored tensor, without the checks of [`SafetensorsFile::read`].
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.range(name).map(|(a, b)| &self.mmap[a..b])
    }

    /// The bytes at an absolute range of the file (one [`SafetensorsFile::range`]), without the
    /// checks of [`SafetensorsFile::read`]; callers that read them call
    /// [`SafetensorsFile::populate`] first.
    pub fn bytes_at(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.mmap[r]
    }

    /// The bytes of a stored tensor, mapped in and checked to still be in the file
    /// ([`SafetensorsFile::populate`]); `Ok(None)` when no such tensor is stored.
    pub fn read(&self, name: &str) -> Result<Option<&[u8]>, ContainerError> {
        match self.range(name) {
            None => Ok(None),
            Some((a, b)) => {
                self.populate(a, b)?;
                Ok(Some(&self.mmap[a..b]))
            }
        }
    }

    /// Like [`SafetensorsFile::read`] for an absolute byte range.
    pub fn read_at(&self, r: std::ops::Range<usize>) -> Result<&[u8], ContainerError> {
        self.populate(r.start, r.end)?;
        Ok(&self.mmap[r])
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
    /// range is first read.
    ///
    /// It is also the check that the range is still in the file. Reading a mapped page past the
    /// end of a file that shrank after it was opened (overwritten in place by `cp`, truncated)
    /// raises SIGBUS, which would end the process: the whole Triton server, every model on it.
    /// So the file's current length is compared with the mapping's first, and a populate that
    /// fails because a page is gone (`EFAULT`) is an error too; both name the file. Pages
    /// dropped between this call and the read can still fault (the window is the read of one
    /// tensor); keeping files unchanged while they are open is the caller's contract, as for
    /// every memory-mapped safetensors loader. Other populate failures (kernels before 5.14 do
    /// not know the advice) are ignored: reads then fault the pages in as usual.
    pub fn populate(&self, start: usize, end: usize) -> Result<(), ContainerError> {
        self.check_length()?;
        #[cfg(target_os = "linux")]
        if end > start {
            if let Err(e) =
                self.mmap
                    .advise_range(memmap2::Advice::PopulateRead, start, end - start)
            {
                if e.raw_os_error() == Some(libc::EFAULT) {
                    self.check_length()?;
                    return Err(self.shrank(None));
                }
            }
        }
        Ok(())
    }

    /// Errors when the file is now shorter than when it was mapped.
    fn check_length(&self) -> Result<(), ContainerError> {
        let now = self
            .file
            .metadata()
            .map_err(|e| ContainerError::io(&self.path, e))?
            .len();
        if now < self.mmap.len() as u64 {
            return Err(self.shrank(Some(now)));
        }
        Ok(())
    }

    fn shrank(&self, now: Option<u64>) -> ContainerError {
        let now = now.map_or_else(|| "fewer".to_string(), |n| n.to_string());
        ContainerError::io(
            &self.path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank to {now} bytes while open (it had {} bytes when opened): \
                     it was truncated or overwritten in place; reload once it is complete",
                    self.mmap.len()
                ),
            ),
        )
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Truncates the file at `path` to `len` bytes, keeping its inode, as `cp` over an existing
    /// file does first.
    pub(crate) fn shrink_to(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// A file with two BF16 tensors of `elems` elements each, `a` then `b`.
    fn write_two_tensors(path: &Path, elems: usize) -> (Vec<u8>, Vec<u8>) {
        let a: Vec<u8> = (0..2 * elems).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..2 * elems).map(|i| (i % 241) as u8).collect();
        let views = vec![
            (
                "a",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![elems], &a).unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![elems], &b).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, &None, path).unwrap();
        (a, b)
    }

    #[test]
    fn an_unchanged_file_reads_its_tensors_through_the_checked_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let (a, b) = write_two_tensors(&path, 1 << 16);
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.read("a").unwrap(), Some(&a[..]));
        let (start, end) = f.range("b").unwrap();
        assert_eq!(f.read_at(start..end).unwrap(), &b[..]);
        assert_eq!(f.read("c").unwrap(), None);
    }

    /// Without the length check and the populate, reading the mapping past the new end of the
    /// file raises SIGBUS and this test process dies instead of failing an assertion.
    #[test]
    fn a_file_that_shrank_after_it_was_opened_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write_two_tensors(&path, 1 << 16);
        let f = SafetensorsFile::open(&path).unwrap();
        let opened = std::fs::metadata(&path).unwrap().len();
        shrink_to(&path, 4096);
        let (start, end) = f.range("b").unwrap();
        for err in [
            f.read("b").unwrap_err(),
            f.read_at(start..end).unwrap_err(),
            f.populate(start, end).unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("shrank to 4096 bytes"), "{msg}");
            assert!(
                msg.contains(&format!("{opened} bytes when opened")),
                "{msg}"
            );
        }
    }
}
