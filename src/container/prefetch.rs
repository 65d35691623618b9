//! Reading a checkpoint's tensors ahead of their decoding or checking: large sequential reads
//! into reused buffers on a thread of their own, under a byte budget ([`read_ahead`], for
//! `decompress` and `verify`), and the budget and buffer pool every pipeline shares.
//!
//! Reading through the files' memory maps, every few pages of input cost a page fault in
//! whichever thread touched them first (most of a run's time was system time), and reading
//! waited on coding. Here one thread reads each tensor with positioned reads (`pread`) straight
//! into a buffer, in storage order, while the previous tensors are decoded and written; the
//! kernel sees one sequential reader. (`compress` maps its input after all, but populates each
//! tensor's pages with one call on its reader thread, which avoids both costs and the copy:
//! see `compress.rs` and docs/format.md §4.4.)
//!
//! Memory stays bounded whatever the checkpoint's size: [`Budget`] admits a tensor only while
//! the input bytes read but not yet written stay within [`READ_AHEAD_BYTES`] and at most
//! [`READ_AHEAD_TENSORS`] tensors are in flight (a tensor larger than the byte limit is admitted
//! alone), so at most `max(READ_AHEAD_BYTES, largest tensor)` bytes of input are held, plus their
//! coded forms, which are no larger, and a few spare buffers kept for reuse.

use std::fs::File;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use super::ContainerError;

/// Input bytes a pipeline may hold read but not yet written: two of a Llama-3.1-8B's largest
/// layer matrices (117 MB each) can be read ahead of coding, small next to any machine that holds
/// such a model.
pub const READ_AHEAD_BYTES: u64 = 256 << 20;

/// Tensors a pipeline may hold read but not yet written: a few ahead keep the coder busy, and
/// their buffers come back for reuse soon (a fresh buffer costs a page fault per 4 KiB it fills,
/// and a checkpoint has hundreds of small tensors).
pub const READ_AHEAD_TENSORS: usize = 8;

/// A count of bytes and of tensors in flight with limits; [`Budget::acquire`] waits for room.
pub struct Budget {
    state: Mutex<BudgetState>,
    room: Condvar,
    limit: u64,
    max_tensors: usize,
}

struct BudgetState {
    used: u64,
    tensors: usize,
    closed: bool,
}

impl Budget {
    /// A budget of `limit` bytes in at most `max_tensors` tensors.
    pub fn new(limit: u64, max_tensors: usize) -> Self {
        Self {
            state: Mutex::new(BudgetState {
                used: 0,
                tensors: 0,
                closed: false,
            }),
            room: Condvar::new(),
            limit,
            max_tensors: max_tensors.max(1),
        }
    }

    /// Takes `n` bytes for one tensor, waiting while others hold bytes and `n` more would pass
    /// the limit (so a request larger than the limit proceeds once it is alone) or the tensor
    /// limit is reached. `false` once the budget is closed: the pipeline is stopping.
    pub fn acquire(&self, n: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.closed
            && s.tensors > 0
            && (s.used + n > self.limit || s.tensors >= self.max_tensors)
        {
            s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return false;
        }
        s.used += n;
        s.tensors += 1;
        true
    }

    /// Gives back the `n` bytes of one tensor taken by [`Budget::acquire`].
    pub fn release(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.used = s.used.saturating_sub(n);
        s.tensors = s.tensors.saturating_sub(1);
        self.room.notify_all();
    }

    /// Stops the pipeline: every waiting and later [`Budget::acquire`] returns `false`.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.room.notify_all();
    }
}

/// Buffers kept for reuse between pipeline stages, under a count and a byte limit (a fresh
/// buffer costs a page fault per 4 KiB it fills; a reused one costs nothing).
pub struct BufferPool<T = u8> {
    spare: Mutex<Vec<Vec<T>>>,
    max_buffers: usize,
    max_bytes: usize,
}

impl<T> BufferPool<T> {
    /// A pool keeping at most `max_buffers` buffers of at most `max_bytes` capacity in all.
    pub fn new(max_buffers: usize, max_bytes: usize) -> Self {
        Self {
            spare: Mutex::new(Vec::new()),
            max_buffers,
            max_bytes,
        }
    }

    /// A buffer with room for `len` elements: the smallest spare one that has it, else a new one
    /// (growing a smaller one would copy its contents). Its contents and length are whatever it
    /// had.
    pub fn take(&self, len: usize) -> Vec<T> {
        self.spare_for(len).unwrap_or_else(|| {
            let mut b = Vec::with_capacity(len);
            // A fresh buffer's pages fault in as it fills: 2 MiB pages make that 512 times
            // fewer faults.
            crate::codec::tensor::advise_huge_pages(b.spare_capacity_mut());
            b
        })
    }

    /// The smallest spare buffer with room for `len` elements, or an empty one (no allocation)
    /// if none has it: for a caller that allocates its buffers itself (zeroed, sized to their
    /// length, as `codec::tensor::encode_into` does) and only wants the reuse.
    pub fn reuse(&self, len: usize) -> Vec<T> {
        self.spare_for(len).unwrap_or_default()
    }

    fn spare_for(&self, len: usize) -> Option<Vec<T>> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let pick = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        pick.map(|i| spare.swap_remove(i))
    }

    /// Gives a buffer back; the smallest buffers are freed when over the limits.
    pub fn give(&self, buf: Vec<T>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.push(buf);
        spare.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        let mut bytes = 0;
        let keep = spare
            .iter()
            .take(self.max_buffers)
            .take_while(|b| {
                bytes += b.capacity() * std::mem::size_of::<T>();
                bytes <= self.max_bytes
            })
            .count();
        spare.truncate(keep);
    }

    /// Frees the spare buffers of more than `max_bytes` bytes, outside the lock: a pipeline
    /// that knows no tensor still to come needs one that large frees it while the other stages
    /// work, instead of keeping it to the end, where freeing it was a serial step.
    pub fn free_larger_than(&self, max_bytes: usize) {
        let larger: Vec<Vec<T>> = {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            let (larger, keep) = std::mem::take(&mut *spare)
                .into_iter()
                .partition(|b| b.capacity() * std::mem::size_of::<T>() > max_bytes);
            *spare = keep;
            larger
        };
        drop(larger);
    }
}

/// One read of the [`read_ahead`] stage: byte ranges of its files, concatenated into one
/// buffer, holding `hold` bytes of the budget until the consumer releases them.
pub struct ReadJob {
    /// `(file index, absolute byte range)` pieces, in buffer order.
    pub pieces: Vec<(usize, std::ops::Range<u64>)>,
    /// Bytes of the budget the job holds.
    pub hold: u64,
}

/// The reader stage of a pipeline: performs `jobs` in order, each once the budget admits it,
/// into a buffer from `pool`, and sends the buffers to the consumer. Returns when the jobs are
/// done, the budget is closed or the consumer has gone; an I/O error closes the budget and is
/// sent on as the last message.
pub fn read_ahead(
    paths: &[&Path],
    jobs: impl IntoIterator<Item = ReadJob>,
    budget: &Budget,
    pool: &BufferPool,
    to: &std::sync::mpsc::Sender<Result<Vec<u8>, ContainerError>>,
) {
    let mut open: Vec<Option<File>> = paths.iter().map(|_| None).collect();
    let r = (|| -> Result<(), ContainerError> {
        for job in jobs {
            if !budget.acquire(job.hold) {
                return Ok(());
            }
            let len: u64 = job.pieces.iter().map(|(_, r)| r.end - r.start).sum();
            let mut buf = pool.take(len as usize);
            buf.clear();
            for (fi, r) in &job.pieces {
                let path = paths[*fi];
                let file = match &mut open[*fi] {
                    Some(f) => f,
                    slot => {
                        let f = File::open(path).map_err(|e| ContainerError::io(path, e))?;
                        advise_sequential(&f);
                        slot.insert(f)
                    }
                };
                append_range(file, path, r.start, r.end, &mut buf)?;
            }
            if to.send(Ok(buf)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    })();
    if let Err(e) = r {
        budget.close();
        let _ = to.send(Err(e));
    }
}

/// Tells the kernel a file is read sequentially (larger read-ahead). Only a hint.
pub fn advise_sequential(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call's duration; the advice changes no data.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
}

/// Appends bytes `start..end` of `file` to `buf`, with large positioned reads straight into its
/// spare capacity (not zeroed first, unlike `Read::read_to_end` on a plain reader).
fn append_range(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ContainerError> {
    use std::os::fd::AsRawFd;
    let len = (end - start) as usize;
    buf.reserve_exact(len);
    let mut done = 0usize;
    while done < len {
        let want = (len - done).min(1 << 30);
        let dst = buf.spare_capacity_mut();
        // SAFETY: `dst` has at least `len - done >= want` bytes of writable capacity; `pread`
        // writes at most `want` bytes there and touches nothing else.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dst.as_mut_ptr().cast(),
                want,
                (start + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ContainerError::io(path, e));
        }
        if n == 0 {
            return Err(ContainerError::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "file ends {} bytes before the tensor at {start}",
                        len - done
                    ),
                ),
            ));
        }
        // SAFETY: `pread` initialised the `n` bytes after the current length.
        unsafe { buf.set_len(buf.len() + n as usize) };
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_budget_waits_for_room_admits_a_large_request_alone_and_closes() {
        let b = Arc::new(Budget::new(100, 2));
        assert!(b.acquire(60));
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(60))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "60 + 60 > 100 must wait");
        b.release(60);
        assert!(waiter.join().unwrap());
        b.release(60);
        assert!(b.acquire(1000), "alone, a request over the limit proceeds");
        b.release(1000);
        assert!(b.acquire(1) && b.acquire(1));
        let third = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(1))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!third.is_finished(), "a third tensor waits for one of two");
        b.release(1);
        assert!(third.join().unwrap());
        b.release(1);
        b.release(1);
        assert!(b.acquire(1000));
        let blocked = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(1))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.close();
        assert!(
            !blocked.join().unwrap(),
            "closing wakes a waiter with false"
        );
    }

    #[test]
    fn the_pool_hands_out_the_smallest_fitting_buffer_and_keeps_within_its_limits() {
        let pool: BufferPool = BufferPool::new(3, 1000);
        for cap in [100, 400, 200, 300] {
            pool.give(Vec::with_capacity(cap));
        }
        // Four buffers over a limit of three: the smallest went.
        let b = pool.take(150);
        assert_eq!(b.capacity(), 200, "the smallest that fits");
        assert!(pool.take(500).capacity() >= 500, "none fits: a new one");
        assert_eq!(pool.take(1).capacity(), 300);
        assert_eq!(pool.take(1).capacity(), 400);
        assert_eq!(pool.take(1).capacity(), 1, "empty: a new one");
        // Over the byte limit: the largest that fit are kept.
        pool.give(Vec::with_capacity(600));
        pool.give(Vec::with_capacity(500));
        assert_eq!(pool.take(1).capacity(), 600);
        assert_eq!(pool.take(1).capacity(), 1);
    }

    #[test]
    fn freeing_the_larger_spares_keeps_the_smaller_ones() {
        let pool: BufferPool<u16> = BufferPool::new(4, 1 << 20);
        for cap in [10, 100, 1000] {
            pool.give(Vec::with_capacity(cap));
        }
        // 20, 200 and 2,000 bytes: the last is over the limit.
        pool.free_larger_than(200);
        assert_eq!(pool.take(500).capacity(), 500, "the 1,000 went: a new one");
        assert_eq!(pool.take(50).capacity(), 100);
        assert_eq!(pool.take(1).capacity(), 10);
    }

    #[test]
    fn read_ahead_concatenates_pieces_of_several_files_and_reports_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let da: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let db: Vec<u8> = (0..3000u32).map(|i| (i * 3) as u8).collect();
        std::fs::write(&a, &da).unwrap();
        std::fs::write(&b, &db).unwrap();
        let paths = [a.as_path(), b.as_path()];
        let budget = Budget::new(1 << 20, 4);
        let pool = BufferPool::new(4, 1 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        let jobs = vec![
            ReadJob {
                pieces: vec![(0, 10..20), (1, 0..5), (0, 4990..5000)],
                hold: 1,
            },
            ReadJob {
                pieces: vec![(1, 2000..3001)],
                hold: 1,
            },
        ];
        read_ahead(&paths, jobs, &budget, &pool, &tx);
        let first = rx.recv().unwrap().unwrap();
        let want: Vec<u8> = [&da[10..20], &db[0..5], &da[4990..5000]].concat();
        assert_eq!(first, want);
        let err = rx.recv().unwrap().unwrap_err().to_string();
        assert!(err.contains("file ends 1 bytes before"), "{err}");
        assert!(!budget.acquire(1), "an error closes the budget");
    }

    #[test]
    fn ranges_are_read_exactly_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let mut buf = vec![1u8; 5];
        append_range(&f, &path, 1000, 90_000, &mut buf).unwrap();
        assert_eq!(buf[..5], [1; 5]);
        assert_eq!(buf[5..], data[1000..90_000]);
        append_range(&f, &path, 3, 7, &mut buf).unwrap();
        assert_eq!(buf[89_005..], data[3..7]);
        assert!(append_range(&f, &path, 99_000, 100_001, &mut buf).is_err());
    }
}
