//! Reading a plain checkpoint's tensors ahead of their coding: large sequential reads into
//! reused buffers on a thread of their own, under a byte budget.
//!
//! `compress` used to read tensors through the files' memory maps: every 4 KiB of input cost a
//! page fault (most of a run's time was system time), and reading waited on coding. Here one
//! thread reads each tensor with positioned reads (`pread`) straight into a buffer, in storage
//! order, while the previous tensors are coded and written; the kernel sees one sequential reader.
//!
//! Memory stays bounded whatever the checkpoint's size: [`Budget`] admits a tensor only while
//! the input bytes read but not yet written stay within [`READ_AHEAD_BYTES`] and at most
//! [`READ_AHEAD_TENSORS`] tensors are in flight (a tensor larger than the byte limit is admitted
//! alone), so at most `max(READ_AHEAD_BYTES, largest tensor)` bytes of input are held, plus their
//! coded forms, which are no larger, and a few spare buffers kept for reuse.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
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

/// Reads bytes `start..end` of `file` into `buf` (cleared first; its capacity is reused), with
/// large positioned reads that never touch a memory map.
pub fn read_range(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ContainerError> {
    buf.clear();
    let len = (end - start) as usize;
    buf.reserve_exact(len);
    // A fresh buffer's pages fault in as the read fills them: 2 MiB pages make that 512 times
    // fewer faults.
    crate::codec::tensor::advise_huge_pages(buf.spare_capacity_mut());
    // `read_to_end` fills the spare capacity without zeroing it first.
    let got = Positioned { file, at: start }
        .take(len as u64)
        .read_to_end(buf)
        .map_err(|e| ContainerError::io(path, e))?;
    if got != len {
        return Err(ContainerError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file ends {} bytes before the tensor at {start}", len - got),
            ),
        ));
    }
    Ok(())
}

/// A reader at a moving offset of a file, by `pread` (the file's own position is not used).
struct Positioned<'a> {
    file: &'a File,
    at: u64,
}

impl Read for Positioned<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
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
    fn ranges_are_read_exactly_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let mut buf = vec![1u8; 5];
        read_range(&f, &path, 1000, 90_000, &mut buf).unwrap();
        assert_eq!(buf, data[1000..90_000]);
        read_range(&f, &path, 3, 7, &mut buf).unwrap();
        assert_eq!(buf, data[3..7]);
        assert!(read_range(&f, &path, 99_000, 100_001, &mut buf).is_err());
    }
}
