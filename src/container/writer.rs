//! Writing: a streaming safetensors writer (tensor data goes to disk as it is produced, the header
//! is written at the end) and a staging directory that appears under its final name only when
//! complete, so an interrupted or failed run never leaves a partial output that looks finished.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Value};

use super::reader::dtype_name;
use super::ContainerError;

/// A safetensors file being written. Tensor bytes are appended to a side file as they come; the
/// header (which must list every offset) and the data are joined in [`SafetensorsWriter::finish`].
pub struct SafetensorsWriter {
    path: PathBuf,
    data_path: PathBuf,
    data: BufWriter<File>,
    entries: Vec<(String, Dtype, Vec<usize>, usize, usize)>,
    offset: usize,
}

impl SafetensorsWriter {
    /// Starts a file at `path` (inside a staging directory).
    pub fn create(path: &Path) -> Result<Self, ContainerError> {
        let data_path = path.with_extension("data-partial");
        let data = File::create(&data_path).map_err(|e| ContainerError::io(&data_path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            data_path,
            data: BufWriter::with_capacity(1 << 22, data),
            entries: Vec::new(),
            offset: 0,
        })
    }

    /// Appends one tensor. `bytes.len()` must equal the shape's element count times the dtype
    /// size; safetensors readers reject the file otherwise, so it is checked here.
    pub fn add(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), ContainerError> {
        let expect = shape.iter().product::<usize>() * dtype.size();
        if expect != bytes.len() {
            return Err(ContainerError::checkpoint(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes for shape {shape:?} of {dtype:?}",
                    bytes.len()
                ),
            ));
        }
        self.data
            .write_all(bytes)
            .map_err(|e| ContainerError::io(&self.data_path, e))?;
        let end = self.offset + bytes.len();
        self.entries
            .push((name.to_string(), dtype, shape.to_vec(), self.offset, end));
        self.offset = end;
        Ok(())
    }

    /// Appends a 1-D U8 tensor.
    pub fn add_u8(&mut self, name: &str, bytes: &[u8]) -> Result<(), ContainerError> {
        self.add(name, Dtype::U8, &[bytes.len()], bytes)
    }

    /// Bytes of tensor data written so far.
    pub fn data_bytes(&self) -> usize {
        self.offset
    }

    /// Writes the header and the data into the final file and removes the side file.
    pub fn finish(self, user_meta: &HashMap<String, String>) -> Result<(), ContainerError> {
        let Self {
            path,
            data_path,
            data,
            entries,
            ..
        } = self;
        data.into_inner()
            .map_err(|e| ContainerError::io(&data_path, e.into_error()))?
            .sync_all()
            .map_err(|e| ContainerError::io(&data_path, e))?;
        let layout: Vec<_> = entries
            .iter()
            .map(|(n, d, s, a, b)| (n.as_str(), *d, s.as_slice(), *a, *b))
            .collect();
        let text = header_bytes(&layout, user_meta);
        let mut out =
            BufWriter::new(File::create(&path).map_err(|e| ContainerError::io(&path, e))?);
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&text)?;
            out.flush()?;
            let mut src = File::open(&data_path)?;
            std::io::copy(&mut src, out.get_mut())?;
            out.get_mut().sync_all()
        };
        write(&mut out).map_err(|e| ContainerError::io(&path, e))?;
        fs::remove_file(&data_path).map_err(|e| ContainerError::io(&data_path, e))
    }
}

/// The complete safetensors header (length prefix, JSON padded with spaces to a multiple of 8)
/// for tensors laid out as `(name, dtype, shape, begin, end)` data offsets.
pub fn header_bytes(
    entries: &[(&str, Dtype, &[usize], usize, usize)],
    user_meta: &HashMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !user_meta.is_empty() {
        let sorted: BTreeMap<_, _> = user_meta.iter().collect();
        header.insert("__metadata__".into(), json!(sorted));
    }
    for (name, dtype, shape, a, b) in entries {
        header.insert(
            name.to_string(),
            json!({"dtype": dtype_name(*dtype), "shape": shape, "data_offsets": [a, b]}),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).expect("JSON of strings and numbers");
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// An output directory being built under a hidden staging name next to its final name.
///
/// Dropping it without [`OutputDir::commit`] removes the staging directory, so errors and
/// panics leave nothing behind that could be mistaken for a finished output.
pub struct OutputDir {
    staging: PathBuf,
    target: PathBuf,
    replace: bool,
    committed: bool,
}

impl OutputDir {
    /// Prepares to write `target`, made from the data in `source` if any. An existing non-empty
    /// `target` is an error unless `replace`; a `target` that is `source` or one of its
    /// ancestors is always an error, since replacing it would destroy the input.
    pub fn create(
        source: Option<&Path>,
        target: &Path,
        replace: bool,
    ) -> Result<Self, ContainerError> {
        if let (Some(Ok(src)), Ok(dst)) = (source.map(fs::canonicalize), fs::canonicalize(target)) {
            if src.starts_with(&dst) {
                return Err(ContainerError::checkpoint(
                    target,
                    format!(
                        "output directory would replace the input {} (choose another --out)",
                        src.display()
                    ),
                ));
            }
        }
        if let Ok(mut entries) = fs::read_dir(target) {
            if entries.next().is_some() && !replace {
                return Err(ContainerError::checkpoint(
                    target,
                    "output directory exists and is not empty (pass --force to replace it)",
                ));
            }
        } else if target.exists() {
            return Err(ContainerError::checkpoint(
                target,
                "output path exists and is not a directory",
            ));
        }
        let name = target
            .file_name()
            .ok_or_else(|| ContainerError::checkpoint(target, "output path has no directory name"))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| ContainerError::io(&parent, e))?;
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| ContainerError::io(&staging, e))?;
        }
        fs::create_dir(&staging).map_err(|e| ContainerError::io(&staging, e))?;
        Ok(Self {
            staging,
            target: target.to_path_buf(),
            replace,
            committed: false,
        })
    }

    /// Where files are written until commit.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the finished directory to its final name.
    pub fn commit(mut self) -> Result<PathBuf, ContainerError> {
        if self.replace && self.target.exists() {
            fs::remove_dir_all(&self.target).map_err(|e| ContainerError::io(&self.target, e))?;
        } else if self.target.is_dir() {
            // An empty directory that existed before: rename onto it needs it gone.
            fs::remove_dir(&self.target).map_err(|e| ContainerError::io(&self.target, e))?;
        }
        fs::rename(&self.staging, &self.target).map_err(|e| ContainerError::io(&self.target, e))?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}
