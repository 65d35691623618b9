//! `unweight compress`: a plain checkpoint directory in, a compressed one out.
//!
//! A three-stage pipeline, tensor by tensor in storage order. A reader thread maps each tensor's
//! pages in with one call (the input is memory-mapped; no copy of it is ever made) and hashes
//! and counts its values piece by piece while each piece is in the cache (a large tensor's
//! second half mapped in and counted by a helper thread meanwhile). The calling thread hands
//! each tensor, as soon as it is read, to a task of the pool that codes it from those counts
//! into reused buffers (a large tensor's chunks spread over the pool; a small tensor is coded
//! by the one thread that took it) and sends it on as soon as it is coded: no tensor waits for
//! a group of others to be read or coded. A writer thread puts the coded tensors back in
//! storage order and writes the parts where they were coded, hashing them as it goes, and
//! unmaps the input pages. Reading, coding and writing overlap.
//! docs/format.md §4.4 has the measurements behind each choice.
//!
//! Memory is bounded: the input mapped but not yet written stays within
//! [`READ_AHEAD_BYTES`](super::prefetch::READ_AHEAD_BYTES) and [`TENSORS_AHEAD`] tensors (or
//! one tensor, if larger), plus
//! its coded form (no larger, and word slots only written a third of the way), plus spare raw
//! and word buffers kept for reuse (at most 128 and 256 MiB). The input's sharding is kept: every
//! input shard becomes an output shard of the same name. Every 2-D-or-more BF16 tensor (all
//! linear weights, embeddings, lm_head) is encoded; vectors (norms), non-BF16 tensors and
//! tensors that would not shrink are stored raw.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use safetensors::Dtype;

use super::checkpoint::{Checkpoint, TensorEntry, INDEX_FILE};
use super::meta::{
    self, part_name, Encoding, FileMeta, RansMeta, TensorMeta, FORMAT_NAME, FORMAT_VERSION,
    META_KEY,
};
use super::prefetch::{Budget, BufferPool, READ_AHEAD_BYTES, READ_AHEAD_TENSORS};
use super::reader::dtype_name;
use super::writer::{header_reserve, OutputDir, SafetensorsWriter};
use super::ContainerError;
use crate::codec::model::{TensorStats, ValueCounts};
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
    let budget = Budget::new(READ_AHEAD_BYTES, TENSORS_AHEAD);
    let pools = Pools::new();
    let (to_coder, from_reader) = mpsc::channel::<Result<ReadTensor, ContainerError>>();
    let (to_writer, from_coder) = mpsc::channel::<(usize, ToWriter)>();
    let result = std::thread::scope(|scope| {
        let (ck, budget, pools) = (&ck, &budget, &pools);
        // A panic in any stage closes the budget, so that the others stop instead of waiting for
        // room the panicked one will never give back; the panic then surfaces.
        let _close = CloseOnPanic(budget);
        let reader = std::thread::Builder::new()
            .name("uw-read".into())
            .spawn_scoped(scope, move || {
                let _close = CloseOnPanic(budget);
                read_tensors(ck, budget, &to_coder)
            })
            .expect("spawn");
        let out_dir = out.path();
        let writer = std::thread::Builder::new()
            .name("uw-write".into())
            .spawn_scoped(scope, move || {
                let _close = CloseOnPanic(budget);
                let r = write_tensors(ck, out_dir, budget, from_coder, pools);
                if r.is_err() {
                    budget.close();
                }
                r
            })
            .expect("spawn");
        // Every tensor is coded by a task of the pool as soon as it is read (a large one
        // spreading its chunks over the pool, a small one on the thread that took it), and sent
        // to the writer as soon as it is coded; the writer puts them back in order.
        let failed = std::sync::Mutex::new(None);
        // Called on a thread of a pool (`install`), this thread would wait for the reader while
        // its tasks sat in its own queue, forever in a pool of one thread: it codes each tensor
        // itself instead (its chunks still spread over the pool).
        let on_worker = rayon::current_thread_index().is_some();
        let coded = rayon::in_place_scope(|s| -> Result<(), ContainerError> {
            let mut seq = 0;
            for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
                for entry in ck.entries().iter().filter(|e| e.file == fi) {
                    let read = from_reader
                        .recv()
                        .map_err(|_| stopped(file.path(), "reader"))??;
                    bar.set_message(entry.name.clone());
                    weight_map.insert(entry.name.clone(), fname.clone());
                    let (to_writer, failed, bar) = (to_writer.clone(), &failed, &bar);
                    let n = seq;
                    let task = move || {
                        let _close = CloseOnPanic(budget);
                        match compress_tensor(file.path(), entry, read, opts.params, pools) {
                            Ok(msg) => {
                                bar.inc(entry.original_bytes() as u64);
                                // A writer gone has its own error.
                                let _ = to_writer.send((n, msg));
                            }
                            Err(e) => {
                                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                                f.get_or_insert(e);
                                budget.close();
                            }
                        }
                    };
                    if on_worker {
                        task();
                    } else {
                        s.spawn(move |_| task());
                    }
                    seq += 1;
                }
                to_writer
                    .send((seq, ToWriter::FileEnd))
                    .map_err(|_| stopped(file.path(), "writer"))?;
                seq += 1;
            }
            Ok(())
        });
        // A task's error explains a reader that stopped because the budget closed.
        let coded = match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => coded,
        };
        if coded.is_err() {
            budget.close();
        }
        drop((to_writer, from_reader));
        let written = writer.join().expect("the writer thread does not panic");
        reader.join().expect("the reader thread does not panic");
        // The writer's own error explains a coder that stopped because the writer stopped.
        let written = written?;
        coded.map(|()| written)
    });
    (report.tensors, report.stored_bytes) = result?;
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
struct Part<'a> {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: PartBytes<'a>,
}

/// A part's bytes, in the buffers they were read or coded into (no copy is made to gather
/// them): the first `len` bytes of a byte buffer, or pieces of a buffer of coded words
/// (little-endian u16), one per chunk, written as they are on a little-endian machine.
enum PartBytes<'a> {
    /// A tensor stored as it is: its bytes in the input's memory map.
    Input(&'a [u8]),
    Bytes {
        buf: Vec<u8>,
        len: usize,
        /// Whether the buffer goes back to the raw-plane pool once written.
        reuse: bool,
    },
    Words {
        buf: Vec<u16>,
        pieces: Vec<std::ops::Range<usize>>,
    },
}

impl PartBytes<'_> {
    /// Runs `f` on the stored (little-endian) bytes, as slices in order.
    fn with_slices<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        match self {
            Self::Input(b) => f(&[b]),
            Self::Bytes { buf, len, .. } => f(&[&buf[..*len]]),
            #[cfg(target_endian = "little")]
            Self::Words { buf, pieces } => {
                let slices: Vec<&[u8]> = pieces
                    .iter()
                    .map(|r| {
                        let w = &buf[r.clone()];
                        // SAFETY: any initialised u16 slice is a valid u8 slice of twice the
                        // length (u8 has alignment 1, u16 no padding); on a little-endian
                        // machine those are the LE bytes.
                        unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), 2 * w.len()) }
                    })
                    .collect();
                f(&slices)
            }
            #[cfg(not(target_endian = "little"))]
            Self::Words { buf, pieces } => {
                let owned: Vec<Vec<u8>> = pieces
                    .iter()
                    .map(|r| {
                        buf[r.clone()]
                            .iter()
                            .flat_map(|w| w.to_le_bytes())
                            .collect()
                    })
                    .collect();
                f(&owned.iter().map(|v| v.as_slice()).collect::<Vec<_>>())
            }
        }
    }

    /// Number of stored bytes.
    fn len(&self) -> usize {
        match self {
            Self::Input(b) => b.len(),
            Self::Bytes { len, .. } => *len,
            Self::Words { pieces, .. } => pieces.iter().map(|r| 2 * r.len()).sum(),
        }
    }
}

/// The buffers the coder codes into and the writer gives back once written, for reuse: raw
/// planes and word slots. A fresh buffer costs a page fault per page it fills (and, once the
/// allocator reuses freed memory for it, a `memset` to zero it); a reused one costs nothing.
/// Each pool keeps as many buffers as tensors can be in flight ([`TENSORS_AHEAD`]): with 8,
/// half the buffers of 16 tensors in flight were freed and allocated again, tensor after tensor
/// (page faults and `memset` of fresh buffers were 8.7% of compress CPU in `perf`).
struct Pools {
    raw: BufferPool<u8>,
    words: BufferPool<u16>,
}

impl Pools {
    /// Frees the spare buffers of more than `max_bytes` (see [`BufferPool::free_larger_than`]).
    fn free_larger_than(&self, max_bytes: usize) {
        self.raw.free_larger_than(max_bytes);
        self.words.free_larger_than(max_bytes);
    }

    fn new() -> Self {
        let bytes = READ_AHEAD_BYTES as usize;
        Self {
            raw: BufferPool::new(TENSORS_AHEAD, bytes / 2),
            words: BufferPool::new(TENSORS_AHEAD, bytes),
        }
    }

    /// Gives a written part's buffer back to its pool.
    fn give(&self, bytes: PartBytes<'_>) {
        match bytes {
            PartBytes::Bytes {
                buf, reuse: true, ..
            } => self.raw.give(buf),
            PartBytes::Words { buf, .. } => self.words.give(buf),
            _ => {}
        }
    }
}

/// What the coder hands the writer.
enum ToWriter<'a> {
    /// One input tensor: its metadata (without the input's checksum, which comes with it, and
    /// for an `exp-rans` tensor without the parts checksum, which the writer computes as it
    /// writes the parts, while each is in the cache), its stored
    /// tensors (three parts, or the tensor raw), and where the input tensor lies (file index and
    /// byte range), whose pages and read-ahead budget are given back once it is written.
    Tensor {
        meta: Box<TensorMeta>,
        parts: Vec<Part<'a>>,
        input: (usize, usize, usize),
        /// The input tensor's checksum, for `meta` (the reader may still be hashing).
        checksum: Checksum,
    },
    /// The current file is complete; the next tensors go to the next file.
    FileEnd,
}

/// The error of a pipeline stage that found another stage gone (that stage reports why).
fn stopped(path: &Path, stage: &str) -> ContainerError {
    ContainerError::checkpoint(path, format!("compression stopped: the {stage} stopped"))
}

/// Tensors `compress` may hold read but not yet written: twice what `decompress` holds. While
/// the writer writes a large tensor (SmolLM2's 54 MiB embedding takes it ~20 ms), the reader
/// and coder go on through the small tensors after it instead of waiting (8 ahead: coding
/// stalled there; 16: 1.45–1.50 → 1.69–1.72 GB/s on the synthetic SmolLM2, load 2; 32 and 64
/// gained nothing more under load and cost 10 and 45 MiB more peak RSS). It also bounds the
/// tensors being coded at once: a task is only started for a tensor the reader was let read.
const TENSORS_AHEAD: usize = 2 * READ_AHEAD_TENSORS;

/// Bytes hashed and (BF16) counted at a time: a piece stays in the core's cache (a quarter of a
/// MiB, next to the quarter MiB of value counts, in a 1 MiB L2) between the two.
const PIECE: usize = 256 << 10;

/// BF16 tensors of at least this many bytes are read by two threads (see [`read_tensors`]).
const SPLIT_READ_BYTES: usize = 16 << 20;

/// One tensor as the reader hands it on: its bytes (in the input's memory map, their pages
/// mapped in), where they lie, their checksum and, for BF16, the statistics its coding needs.
struct ReadTensor<'a> {
    bytes: &'a [u8],
    input: (usize, usize, usize),
    checksum: Checksum,
    stats: Option<TensorStats>,
}

/// An input tensor's checksum (XXH3 of its bytes): known when it is handed on, or, for a
/// tensor read by two threads, sent by the reader once it has hashed the second half. The
/// coder needs only the counts: coding starts while the reader hashes, and only the writer
/// waits for the checksum.
enum Checksum {
    Ready(u64),
    Later(mpsc::Receiver<u64>),
}

impl Checksum {
    /// The checksum; `None` if the reader stopped before sending it.
    fn get(self) -> Option<u64> {
        match self {
            Self::Ready(c) => Some(c),
            Self::Later(r) => r.recv().ok(),
        }
    }
}

/// Closes the budget when the thread holding it unwinds from a panic: a stage that panics
/// never gives its tensors' room back, and the reader would wait for it forever, with every
/// other stage waiting on the reader. Closed, the reader stops, the channels close, every stage
/// ends and the panic surfaces where the threads are joined.
struct CloseOnPanic<'a>(&'a Budget);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close();
        }
    }
}

/// The reader stage: every tensor of the plain checkpoint, in order, once the budget admits it:
/// maps its pages in (one `MADV_POPULATE_READ` per tensor, which reads them from the file if
/// they are not cached) and hashes and counts them piece by piece. A BF16 tensor of at least
/// [`SPLIT_READ_BYTES`] is read by two threads: a helper maps in and counts its second half
/// while this thread maps in, hashes and counts the first; the tensor is handed on with the
/// counts, and this thread then hashes the second half (the hash is one stream) while it is
/// coded, and sends the checksum after it (see [`Checksum`]). The first tensor of a checkpoint
/// (SmolLM2's 54 MiB embedding) is otherwise read by one thread while the coders wait for it.
///
/// The bytes are not copied: the coder codes them where they are mapped, and a tensor stored as
/// it is is written from there. Reading into buffers instead (`pread`, as `decompress` and
/// `verify` do through [`super::prefetch::read_ahead`]) costs a copy of every byte and, for
/// each fresh buffer, the zeroing of its pages; a populated mapping costs neither, and mapping
/// the pages in one call instead of faulting them in was what the memory map used to lack
/// (docs/format.md §4.4 has the measurements). The writer unmaps each tensor's pages once it is
/// written, so the resident input stays within the budget.
fn read_tensors<'a>(
    ck: &'a Checkpoint,
    budget: &Budget,
    to_coder: &mpsc::Sender<Result<ReadTensor<'a>, ContainerError>>,
) {
    let mut counts = ValueCounts::new();
    // A helper's counts for the second half of a large tensor (see `SPLIT_READ_BYTES`).
    let mut helper_counts: Option<ValueCounts> = None;
    for (fi, sf) in ck.files().iter().enumerate() {
        for entry in ck.entries().iter().filter(|e| e.file == fi) {
            if !budget.acquire(entry.original_bytes() as u64) {
                return;
            }
            let (start, end) = sf
                .range(&entry.name)
                .expect("entry of a plain file names a stored tensor");
            let bytes = sf.bytes_at(start..end);
            let bf16 = entry.dtype == Dtype::BF16;
            let mut hash = codec::checksum::Xxh3::new();
            // Bytes left to hash once the tensor is handed on.
            let mut unhashed: &[u8] = &[];
            if bf16 && bytes.len() >= SPLIT_READ_BYTES {
                // The second half is mapped in and counted by a helper thread while this one maps
                // in, hashes and counts the first, then hashes the second.
                let mid = (bytes.len() / 2).next_multiple_of(PIECE);
                let (first, second) = bytes.split_at(mid);
                let theirs = helper_counts.get_or_insert_with(ValueCounts::new);
                let populated = std::thread::scope(|s| {
                    let helper = s.spawn(|| {
                        sf.populate(start + mid, end)?;
                        for piece in second.chunks(PIECE) {
                            theirs.add(piece);
                        }
                        Ok(())
                    });
                    let mine = sf.populate(start, start + mid).map(|()| {
                        for piece in first.chunks(PIECE) {
                            hash.update(piece);
                            counts.add(piece);
                        }
                    });
                    let theirs = helper.join().expect("the counting helper does not panic");
                    mine.and(theirs)
                });
                if let Err(e) = populated {
                    let _ = to_coder.send(Err(e));
                    return;
                }
                unhashed = second;
                counts.absorb(theirs);
            } else {
                if let Err(e) = sf.populate(start, end) {
                    let _ = to_coder.send(Err(e));
                    return;
                }
                for piece in bytes.chunks(PIECE) {
                    hash.update(piece);
                    if bf16 {
                        counts.add(piece);
                    }
                }
            }
            let (checksum, later) = if unhashed.is_empty() {
                (Checksum::Ready(hash.digest()), None)
            } else {
                let (tx, rx) = mpsc::channel();
                (Checksum::Later(rx), Some(tx))
            };
            let read = ReadTensor {
                bytes,
                input: (fi, start, end),
                checksum,
                stats: bf16.then(|| counts.take()),
            };
            if to_coder.send(Ok(read)).is_err() {
                return;
            }
            if let Some(tx) = later {
                hash.update(unhashed);
                // A coder or writer gone has its own error.
                let _ = tx.send(hash.digest());
            }
        }
    }
}

/// The coder's messages, numbered as they were read, back in that order: the tasks of the pool
/// finish them in any order.
struct InOrder<'a> {
    from_coder: mpsc::Receiver<(usize, ToWriter<'a>)>,
    early: BTreeMap<usize, ToWriter<'a>>,
    next: usize,
}

impl<'a> InOrder<'a> {
    /// The next message in order; `None` once the coder stopped before sending it.
    fn next(&mut self) -> Option<ToWriter<'a>> {
        let msg = match self.early.remove(&self.next) {
            Some(m) => m,
            None => loop {
                let (i, m) = self.from_coder.recv().ok()?;
                if i == self.next {
                    break m;
                }
                self.early.insert(i, m);
            },
        };
        self.next += 1;
        Some(msg)
    }
}

/// The writer stage: the output files, one after the other, from the coder's parts, and their
/// metadata (the parts checksums hashed from the bytes as they are written); gives each
/// tensor's budget and input pages back and its buffers to their pools once written. Returns
/// the metadata and the stored bytes of every tensor, in order.
fn write_tensors(
    ck: &Checkpoint,
    out_dir: &Path,
    budget: &Budget,
    from_coder: mpsc::Receiver<(usize, ToWriter<'_>)>,
    pools: &Pools,
) -> Result<(Vec<TensorMeta>, Vec<u64>), ContainerError> {
    let mut all = Vec::new();
    let mut stored_bytes = Vec::new();
    let mut from_coder = InOrder {
        from_coder,
        early: BTreeMap::new(),
        next: 0,
    };
    // The largest tensor from each one on, in storage order: once a tensor is written, spare
    // buffers more than twice the largest still to come (a tensor of `b` bytes codes into at
    // most about `b` bytes of words and `b / 2` of raw plane) are never needed again, and are
    // freed by this thread while the others work rather than all at the end.
    let sizes: Vec<usize> = (0..ck.files().len())
        .flat_map(|fi| ck.entries().iter().filter(move |e| e.file == fi))
        .map(|e| e.original_bytes())
        .collect();
    let mut largest_from = vec![0; sizes.len() + 1];
    for i in (0..sizes.len()).rev() {
        largest_from[i] = largest_from[i + 1].max(sizes[i]);
    }
    for (fi, (file, fname)) in ck.files().iter().zip(ck.file_names()).enumerate() {
        let reserve = header_bound(ck, fi, file.user_meta());
        let mut writer = SafetensorsWriter::create(&out_dir.join(fname), reserve)?;
        let mut metas = Vec::new();
        loop {
            let Some(msg) = from_coder.next() else {
                // The coder stopped; it reports why.
                return Ok((all, stored_bytes));
            };
            match msg {
                ToWriter::Tensor {
                    mut meta,
                    parts,
                    input,
                    checksum,
                } => {
                    let checksum = checksum
                        .get()
                        .ok_or_else(|| stopped(file.path(), "reader"))?;
                    meta.checksum = meta::checksum_string(checksum);
                    stored_bytes.push(parts.iter().map(|p| p.bytes.len() as u64).sum());
                    let mut hash = codec::checksum::Xxh3::new();
                    for p in parts {
                        p.bytes.with_slices(|slices| {
                            for s in slices {
                                hash.update(s);
                            }
                            writer.add_slices(&p.name, p.dtype, &p.shape, slices)
                        })?;
                        pools.give(p.bytes);
                    }
                    if let Some(r) = &mut meta.rans {
                        r.parts_checksum = meta::checksum_string(hash.digest());
                    }
                    metas.push(*meta);
                    let (f, start, end) = input;
                    ck.files()[f].release(start, end);
                    budget.release((end - start) as u64);
                    pools.free_larger_than(2 * largest_from[stored_bytes.len()]);
                }
                ToWriter::FileEnd => {
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
                    all.extend(fm.tensors);
                    break;
                }
            }
        }
    }
    Ok((all, stored_bytes))
}

/// Encodes (or keeps raw) one tensor; returns what the writer gets.
fn compress_tensor<'a>(
    path: &Path,
    entry: &TensorEntry,
    read: ReadTensor<'a>,
    params: Params,
    pools: &Pools,
) -> Result<ToWriter<'a>, ContainerError> {
    let (name, dtype, shape) = (entry.name.as_str(), entry.dtype, entry.shape.as_slice());
    let ReadTensor {
        bytes,
        input,
        checksum,
        stats,
    } = read;
    let mut m = TensorMeta {
        name: name.to_string(),
        dtype: dtype_name(dtype),
        shape: shape.to_vec(),
        encoding: Encoding::Raw,
        original_bytes: bytes.len() as u64,
        // The writer fills it in (see `Checksum`).
        checksum: String::new(),
        exponent_entropy_bits: None,
        value_entropy_bits: None,
        rans: None,
    };
    if let Some(stats) = &stats {
        m.exponent_entropy_bits = Some(stats.exponent_entropy_bits());
        m.value_entropy_bits = Some(stats.value_entropy_bits);
    }
    if let (true, Some(stats)) = (is_candidate(dtype, shape), &stats) {
        let p = params.for_tensor(bytes.len() / 2);
        let n = bytes.len() / 2;
        let mut raw = pools.raw.reuse(codec::model::raw_len(n, p.mantissa_bits));
        let mut words = pools.words.reuse(
            codec::tensor::chunk_count(n, p.chunk_elems) * (p.chunk_elems + codec::ans::LANES),
        );
        let enc = codec::tensor::encode_into(bytes, p, stats, &mut raw, &mut words)
            .map_err(|e| ContainerError::corrupt(path, name, e.to_string()))?;
        let index: Vec<u8> = enc
            .offsets
            .iter()
            .chain(&enc.states)
            .flat_map(|w| w.to_le_bytes())
            .chain(enc.table_bytes())
            .collect();
        let parts = [
            PartBytes::Bytes {
                len: enc.raw_bytes(),
                buf: raw,
                reuse: true,
            },
            PartBytes::Words {
                pieces: enc.chunk_word_ranges().collect(),
                buf: words,
            },
            PartBytes::Bytes {
                len: index.len(),
                buf: index,
                reuse: false,
            },
        ];
        let stored: usize = parts.iter().map(PartBytes::len).sum();
        if stored < bytes.len() {
            m.encoding = Encoding::ExpRans;
            m.exponent_entropy_bits = Some(enc.exponent_entropy_bits);
            m.value_entropy_bits = Some(enc.value_entropy_bits);
            m.rans = Some(RansMeta {
                chunk_elems: enc.params.chunk_elems,
                prob_bits: enc.params.prob_bits,
                lanes: codec::ans::LANES,
                mantissa_bits: enc.params.mantissa_bits,
                // The writer hashes the parts as it writes them.
                parts_checksum: String::new(),
            });
            let parts = meta::PARTS
                .iter()
                .zip(parts)
                .map(|(p, data)| Part {
                    name: part_name(name, p),
                    dtype: Dtype::U8,
                    shape: vec![data.len()],
                    bytes: data,
                })
                .collect();
            let msg = ToWriter::Tensor {
                meta: Box::new(m),
                parts,
                input,
                checksum,
            };
            return Ok(msg);
        }
        for part in parts {
            pools.give(part);
        }
    }
    let part = Part {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes: PartBytes::Input(bytes),
    };
    let msg = ToWriter::Tensor {
        meta: Box::new(m),
        parts: vec![part],
        input,
        checksum,
    };
    Ok(msg)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `compress_dir` called on the only thread of a pool finishes (its tasks would otherwise
    /// wait in the queue of the thread that waits for them) and writes what it writes anywhere
    /// else, byte for byte.
    #[test]
    fn compress_on_the_only_thread_of_a_pool_finishes_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::create_dir(&input).unwrap();
        let elems = 3 << 16;
        let bytes: Vec<u8> = (0..elems)
            .flat_map(|i: u32| {
                crate::model::synth::f32_to_bf16(((i % 977) as f32 - 488.0) * 1e-4).to_le_bytes()
            })
            .collect();
        // More tensors than the reader may hold: it must wait for the writer.
        let names: Vec<String> = (0..TENSORS_AHEAD + 4).map(|i| format!("t{i:02}")).collect();
        let views: Vec<_> = names
            .iter()
            .map(|n| {
                let v =
                    safetensors::tensor::TensorView::new(Dtype::BF16, vec![3 << 8, 1 << 8], &bytes)
                        .unwrap();
                (n.clone(), v)
            })
            .collect();
        let file = input.join(super::super::checkpoint::SINGLE_FILE);
        safetensors::serialize_to_file(views, &None, &file).unwrap();
        let opts = CompressOptions {
            progress: false,
            ..Default::default()
        };
        let out = |name: &str| dir.path().join(name);
        compress_dir(&input, &out("free"), &opts).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (done, finished) = mpsc::channel();
        let (input2, out2, opts2) = (input.clone(), out("pool"), opts.clone());
        std::thread::spawn(move || {
            let r = pool.install(|| compress_dir(&input2, &out2, &opts2).map(|_| ()));
            let _ = done.send(r.map_err(|e| e.to_string()));
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("compress on a one-thread pool finishes within a minute")
            .unwrap();
        let name = super::super::checkpoint::SINGLE_FILE;
        assert_eq!(
            fs::read(out("free").join(name)).unwrap(),
            fs::read(out("pool").join(name)).unwrap()
        );
    }

    /// The reader stage reports a checkpoint file that shrank after it was opened as an error
    /// naming the file, for the coder to end `compress` with, instead of a SIGBUS on the mapped
    /// input. Both the one-reader path and the two-reader path of a large tensor are covered.
    #[test]
    fn the_reader_reports_an_input_that_shrank_while_open() {
        for elems in [1 << 12, SPLIT_READ_BYTES / 2] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(super::super::checkpoint::SINGLE_FILE);
            let bytes: Vec<u8> = (0..2 * elems).map(|i| (i % 253) as u8).collect();
            let view =
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![elems], &bytes).unwrap();
            safetensors::serialize_to_file(vec![("w", view)], &None, &path).unwrap();
            let ck = Checkpoint::open(dir.path()).unwrap();
            super::super::reader::tests::shrink_to(&path, 4096);
            let budget = Budget::new(READ_AHEAD_BYTES, TENSORS_AHEAD);
            let (to_coder, from_reader) = mpsc::channel();
            read_tensors(&ck, &budget, &to_coder);
            let first = from_reader.recv().expect("the reader sends its error");
            let msg = first
                .err()
                .expect("a shrunken input is an error")
                .to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("shrank"), "{msg}");
        }
    }

    #[test]
    fn a_panicking_stage_closes_the_budget_the_reader_waits_on() {
        let budget = Budget::new(1 << 20, 1);
        assert!(budget.acquire(1), "the first tensor is always admitted");
        std::thread::scope(|s| {
            // The reader waits for room the panicking stage holds and will never give back.
            let reader = s.spawn(|| budget.acquire(1));
            let stage = s.spawn(|| {
                let _close = CloseOnPanic(&budget);
                panic!("a coding stage fails");
            });
            assert!(stage.join().is_err());
            assert!(
                !reader.join().unwrap(),
                "the reader stops instead of waiting forever"
            );
        });
        // A stage that ends normally leaves the budget open.
        let budget = Budget::new(1 << 20, 1);
        drop(CloseOnPanic(&budget));
        assert!(budget.acquire(1));
        std::thread::scope(|s| {
            let reader = s.spawn(|| budget.acquire(1));
            std::thread::sleep(std::time::Duration::from_millis(20));
            budget.release(1);
            assert!(
                reader.join().unwrap(),
                "room given back admits the next tensor"
            );
        });
    }
}
