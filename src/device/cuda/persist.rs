//! The persisted runtime form: the tbe3 images of a model's fused linear layers, written next to
//! the weights the first time a GPU load computes them (`<model dir>/runtime/tbe3.bin`,
//! [`runtime_path`]) and read back by every later load instead of decoding the stored tensors
//! and encoding them again (docs/memory.md, "The persisted runtime form", has the measurements
//! behind this choice).
//!
//! The file is tied to the stored weights by an identity ([`weights_identity`]): a hash of every
//! tensor's name, dtype, shape and checksums (and of the weight files' names and sizes; for a
//! plain checkpoint, which carries no checksums, also their modification times). A file written
//! for other weights is not used. Each image carries its own checksum, verified when it is read,
//! and is validated as a tbe3 image before anything uploads it; a file that fails any check is
//! reported and computed again, never trusted and never a crash.
//!
//! Layout: `MAGIC`, the images one after another, the index (JSON: format, identity, and per
//! slot its shape, offset, length and checksum), the index's length (u64 little-endian), and
//! `MAGIC` again. The index is at the end so that the writer streams images as they are encoded
//! (one fused layer in memory at a time) and only knows the offsets at the end. Written to a
//! temporary file in the same directory and renamed into place, so a reader never sees half a
//! file; a directory that cannot be written (a read-only model repository) means the forms are
//! computed in memory at each load, with a log line, never a failed load.
//!
//! CPU code throughout, unit-tested without a GPU.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::codec::checksum::{xxh3_64, Xxh3};
use serde::{Deserialize, Serialize};

use super::stream::Slot;
use crate::codec::runtime::{RuntimeMatrix, RuntimeView, Shape};
use crate::container::Checkpoint;

/// First and last 8 bytes of a persisted runtime form.
pub const MAGIC: [u8; 8] = *b"UWTBE3\0\x01";

/// Version of the file's layout and of the tbe3 image it holds: bump it when either changes,
/// and every persisted file is computed again.
pub const PERSIST_FORMAT: u32 = 1;

/// Where a model's persisted runtime form lives: `<model_dir>/runtime/tbe3.bin`.
pub fn runtime_path(model_dir: &Path) -> PathBuf {
    model_dir.join("runtime").join("tbe3.bin")
}

/// The identity of a checkpoint's weights, `xxh3-64:<hex>`: a hash of the weight files' names
/// and sizes and of every tensor's name, dtype, shape and (compressed checkpoints) the checksums
/// of its original bytes and stored parts, so changed weights give another identity while a copy
/// of the same files gives the same one. A plain checkpoint has no checksums: its files'
/// modification times are hashed too, so an edited file is never taken for the old one.
pub fn weights_identity(ckpt: &Checkpoint) -> std::io::Result<String> {
    let mut h = Xxh3::new();
    h.update(&PERSIST_FORMAT.to_le_bytes());
    for name in ckpt.file_names() {
        let md = std::fs::metadata(ckpt.dir().join(name))?;
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(&md.len().to_le_bytes());
        if !ckpt.is_compressed() {
            let t = md
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.update(&t.as_nanos().to_le_bytes());
        }
    }
    for e in ckpt.entries() {
        h.update(e.name.as_bytes());
        h.update(&[0]);
        h.update(format!("{:?}{:?}", e.dtype, e.shape).as_bytes());
        if let Some(m) = &e.meta {
            h.update(m.checksum.as_bytes());
            if let Some(r) = &m.rans {
                h.update(r.parts_checksum.as_bytes());
            }
        }
        h.update(&[0]);
    }
    Ok(format!("xxh3-64:{:016x}", h.digest()))
}

/// One image's place in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct IndexEntry {
    slot: Slot,
    rows: usize,
    cols: usize,
    tile_elems: usize,
    offset: u64,
    len: u64,
    /// `xxh3-64` of the image bytes.
    checksum: u64,
}

/// The index at the end of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Index {
    format: u32,
    identity: String,
    slots: Vec<IndexEntry>,
}

/// Largest index accepted (a corrupt length must not make the reader allocate gigabytes).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// An opened persisted runtime form whose index was read and whose identity matches.
pub struct PersistedReader {
    path: PathBuf,
    file: File,
    file_len: u64,
    slots: HashMap<Slot, IndexEntry>,
}

impl std::fmt::Debug for PersistedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistedReader")
            .field("path", &self.path)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl PersistedReader {
    /// Opens `path` for weights of `identity`: `Ok(None)` when there is no file, `Err(why)` when
    /// there is one that cannot be used (unreadable, not this format, another format version,
    /// written for other weights, a corrupt index).
    pub fn open(path: &Path, identity: &str) -> Result<Option<Self>, String> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot be opened: {e}")),
        };
        let io = |e: std::io::Error| format!("cannot be read: {e}");
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 24 {
            return Err(format!(
                "is {file_len} bytes, too short to be a runtime form"
            ));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head).map_err(io)?;
        let mut tail = [0u8; 16];
        file.seek(SeekFrom::Start(file_len - 16)).map_err(io)?;
        file.read_exact(&mut tail).map_err(io)?;
        if head != MAGIC || tail[8..] != MAGIC {
            return Err("is not a persisted runtime form (wrong magic bytes)".into());
        }
        let index_len = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
        if index_len > MAX_INDEX_BYTES || index_len > file_len - 24 {
            return Err(format!(
                "has a corrupt index length ({index_len} bytes in a file of {file_len})"
            ));
        }
        let index_start = file_len - 16 - index_len;
        let mut text = vec![0u8; index_len as usize];
        file.seek(SeekFrom::Start(index_start)).map_err(io)?;
        file.read_exact(&mut text).map_err(io)?;
        let index: Index =
            serde_json::from_slice(&text).map_err(|e| format!("has a corrupt index: {e}"))?;
        if index.format != PERSIST_FORMAT {
            return Err(format!(
                "is format {}, this build reads format {PERSIST_FORMAT}",
                index.format
            ));
        }
        if index.identity != identity {
            return Err(format!(
                "was written for other weights (identity {}, the weights now are {identity})",
                index.identity
            ));
        }
        let mut slots = HashMap::with_capacity(index.slots.len());
        for e in index.slots {
            if e.offset < 8
                || e.offset
                    .checked_add(e.len)
                    .is_none_or(|end| end > index_start)
            {
                return Err(format!(
                    "has a corrupt index: {:?} lies outside the images",
                    e.slot
                ));
            }
            slots.insert(e.slot, e);
        }
        Ok(Some(Self {
            path: path.to_path_buf(),
            file,
            file_len,
            slots,
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Number of images the file holds.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True for a file without images.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Reads `slot`'s image, which must have `shape`: its checksum is verified and it is checked
    /// as a tbe3 image of that shape. `Err(why)` when it is missing, of another shape, or fails
    /// a check.
    pub fn read(&mut self, slot: Slot, shape: Shape) -> Result<RuntimeMatrix, String> {
        let e = self
            .slots
            .get(&slot)
            .ok_or_else(|| format!("has no image of {slot:?}"))?;
        let stored = (e.rows, e.cols, e.tile_elems);
        if stored != (shape.rows, shape.cols, shape.tile_elems) {
            return Err(format!(
                "holds {slot:?} as {} × {} in tiles of {}, the load needs {} × {} in tiles of {}",
                e.rows, e.cols, e.tile_elems, shape.rows, shape.cols, shape.tile_elems
            ));
        }
        let (offset, checksum) = (e.offset, e.checksum);
        let mut image = vec![0u8; e.len as usize];
        let io = |e: std::io::Error| format!("cannot be read at {slot:?}: {e}");
        self.file.seek(SeekFrom::Start(offset)).map_err(io)?;
        self.file.read_exact(&mut image).map_err(io)?;
        if xxh3_64(&image) != checksum {
            return Err(format!("is corrupt: {slot:?}'s image fails its checksum"));
        }
        RuntimeView::new(shape, &image).map_err(|e| format!("is corrupt at {slot:?}: {e}"))?;
        Ok(RuntimeMatrix { shape, image })
    }
}

/// Writes a persisted runtime form image by image, then puts it in place atomically
/// ([`PersistedWriter::finish`]); dropped unfinished, it removes its temporary file.
pub struct PersistedWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// Unbuffered: each image is one large write, and a buffer would be host memory held for
    /// the whole load.
    out: Option<File>,
    offset: u64,
    index: Index,
}

impl std::fmt::Debug for PersistedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistedWriter")
            .field("path", &self.path)
            .field("images", &self.index.slots.len())
            .finish_non_exhaustive()
    }
}

/// Distinguishes the temporary files of loads running at once in one process.
static WRITERS: AtomicUsize = AtomicUsize::new(0);

impl PersistedWriter {
    /// Starts the file for weights of `identity` at `path` (its directory is created): an error
    /// when the directory cannot be written.
    pub fn create(path: &Path, identity: &str) -> std::io::Result<Self> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tbe3.bin".into());
        let tmp = dir.join(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            WRITERS.fetch_add(1, Ordering::Relaxed)
        ));
        let mut out = File::create(&tmp)?;
        let mut w = Self {
            path: path.to_path_buf(),
            tmp,
            out: None,
            offset: MAGIC.len() as u64,
            index: Index {
                format: PERSIST_FORMAT,
                identity: identity.to_string(),
                slots: Vec::new(),
            },
        };
        out.write_all(&MAGIC)?;
        w.out = Some(out);
        Ok(w)
    }

    /// Appends `slot`'s image.
    pub fn put(&mut self, slot: Slot, m: &RuntimeMatrix) -> std::io::Result<()> {
        let out = self.out.as_mut().ok_or_else(|| {
            std::io::Error::other("the persisted runtime form was already finished")
        })?;
        out.write_all(&m.image)?;
        self.index.slots.push(IndexEntry {
            slot,
            rows: m.shape.rows,
            cols: m.shape.cols,
            tile_elems: m.shape.tile_elems,
            offset: self.offset,
            len: m.image.len() as u64,
            checksum: xxh3_64(&m.image),
        });
        self.offset += m.image.len() as u64;
        Ok(())
    }

    /// Writes the index, syncs the file and renames it into place; returns its path.
    pub fn finish(mut self) -> std::io::Result<PathBuf> {
        let mut out = self
            .out
            .take()
            .ok_or_else(|| std::io::Error::other("already finished"))?;
        let index = serde_json::to_vec(&self.index).map_err(std::io::Error::other)?;
        out.write_all(&index)?;
        out.write_all(&(index.len() as u64).to_le_bytes())?;
        out.write_all(&MAGIC)?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&self.tmp, &self.path)?;
        Ok(self.path.clone())
    }
}

impl Drop for PersistedWriter {
    fn drop(&mut self) {
        // Unfinished (an error, or the load failed): leave nothing behind. After a successful
        // rename the temporary name no longer exists and this does nothing.
        self.out = None;
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::runtime::encode;

    fn matrix(rows: usize, cols: usize, seed: u16) -> RuntimeMatrix {
        let shape = Shape::for_matrix(rows, cols).unwrap();
        let bits: Vec<u16> = (0..shape.len())
            .map(|i| 0x3c00u16.wrapping_add((i as u16).wrapping_mul(seed) % 0x300))
            .collect();
        encode(&bits, shape).unwrap()
    }

    #[test]
    fn a_written_form_reads_back_image_for_image_and_only_for_its_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = runtime_path(dir.path());
        let (a, b) = (matrix(8, 256, 7), matrix(3, 512, 13));
        let mut w = PersistedWriter::create(&path, "id-1").unwrap();
        w.put(Slot::Qkv(0), &a).unwrap();
        w.put(Slot::Embed, &b).unwrap();
        assert!(!path.exists(), "nothing in place before finish");
        assert_eq!(w.finish().unwrap(), path);
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("tbe3.bin")]);

        let mut r = PersistedReader::open(&path, "id-1").unwrap().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.read(Slot::Embed, b.shape).unwrap(), b);
        assert_eq!(r.read(Slot::Qkv(0), a.shape).unwrap(), a);
        let e = r.read(Slot::O(0), a.shape).unwrap_err();
        assert!(e.contains("no image of O(0)"), "{e}");
        let e = r.read(Slot::Embed, a.shape).unwrap_err();
        assert!(e.contains("the load needs 8 × 256"), "{e}");

        let e = PersistedReader::open(&path, "id-2").unwrap_err();
        assert!(e.contains("other weights"), "{e}");
        assert!(PersistedReader::open(&dir.path().join("none"), "id-1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn every_kind_of_damage_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = runtime_path(dir.path());
        let a = matrix(8, 256, 5);
        let mut w = PersistedWriter::create(&path, "id").unwrap();
        w.put(Slot::Down(1), &a).unwrap();
        w.finish().unwrap();
        let good = std::fs::read(&path).unwrap();
        let n = good.len();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("too short", good[..10].to_vec()),
            ("wrong magic", {
                let mut b = good.clone();
                b[0] ^= 1;
                b
            }),
            ("corrupt index length", {
                let mut b = good.clone();
                b[n - 10] = 0xff;
                b
            }),
            ("corrupt index", {
                let mut b = good.clone();
                b[n - 17] = b'{';
                b
            }),
        ];
        for (want, bytes) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let e = PersistedReader::open(&path, "id").unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        // A flipped bit inside the image: the index opens, the image fails its checksum.
        let mut b = good.clone();
        b[8 + 3] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        let mut r = PersistedReader::open(&path, "id").unwrap().unwrap();
        let e = r.read(Slot::Down(1), a.shape).unwrap_err();
        assert!(e.contains("fails its checksum"), "{e}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the directory would go: refused even for root.
        std::fs::write(dir.path().join("runtime"), b"x").unwrap();
        assert!(PersistedWriter::create(&runtime_path(dir.path()), "id").is_err());
        // An unfinished writer removes its temporary file.
        let ok = tempfile::tempdir().unwrap();
        let path = runtime_path(ok.path());
        let mut w = PersistedWriter::create(&path, "id").unwrap();
        w.put(Slot::Embed, &matrix(2, 128, 3)).unwrap();
        drop(w);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            0
        );
    }
}
