//! Memory the host hands to the backend, laid out so that misuse faults at once and the fault
//! is reported as the rule it breaks.
//!
//! Every buffer ([`GuardBuf`]) is its own `mmap` ending exactly at an inaccessible guard page:
//! writing past the end of an output buffer (more than `OutputBuffer` asked for) or reading past
//! the end of an input buffer faults on the first byte out of bounds; the few bytes of alignment
//! slack before the guard page are filled with a canary checked at [`GuardBuf::overrun`]. When a
//! buffer's lifetime ends (its request released, its response sent, its `Execute` call returned)
//! [`GuardBuf::retire`] makes it inaccessible instead of freeing it, so a late access faults too.
//! Nothing is ever unmapped during a run: addresses are never reused.
//!
//! [`install_fault_handler`] installs a `SIGSEGV`/`SIGBUS` handler that looks the faulting
//! address up in a lock-free table of these regions, writes the violation to stderr and exits
//! with status 1 (nothing else is safe inside a signal handler: no report can be written). A
//! fault elsewhere is passed on to the handler that was installed before (Rust's stack-overflow
//! reporter, or the default action).
//!
//! Once the region table ([`MAX_REGIONS`] slots, two per buffer) is full, the host falls back to
//! plain heap buffers with a canary (overruns still caught at send, late accesses no longer).

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Table size: two slots per guarded buffer (its guard page, then its retired pages), so
/// 16 Ki guarded buffers; each is two memory mappings, well under Linux's default
/// `vm.max_map_count` (65530).
pub const MAX_REGIONS: usize = 1 << 15;
const CANARY: u8 = 0xA5;
const ALIGN: usize = 16;

/// What a region is; the handler prints the matching sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Region {
    /// The guard page after a buffer.
    Overrun = 1,
    /// An input buffer after its request was released.
    ReleasedInput = 2,
    /// An output buffer after its response was sent or deleted.
    SentOutput = 3,
    /// The request-pointer array of an `Execute` call after the call returned.
    ExecuteArray = 4,
    /// A memory-manager allocation after `MemoryManagerFree`.
    FreedAllocation = 5,
}

impl Region {
    fn sentence(v: usize) -> &'static [u8] {
        match v {
            1 => b"access past the end of a buffer the host handed out (guard page hit): ",
            2 => b"use after RequestRelease: access to an input buffer of a released request: ",
            3 => b"use after ResponseSend/ResponseDelete: access to the output buffer of a finished response: ",
            4 => b"access to the request array of TRITONBACKEND_ModelInstanceExecute after the call returned (the array belongs to Triton; copy the pointers out): ",
            5 => b"use after TRITONBACKEND_MemoryManagerFree: ",
            _ => b"fault in a host region: ",
        }
    }
}

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    what: AtomicUsize,
    label_ptr: AtomicUsize,
    label_len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    what: AtomicUsize::new(0),
    label_ptr: AtomicUsize::new(0),
    label_len: AtomicUsize::new(0),
};
static SLOTS: [Slot; MAX_REGIONS] = [EMPTY; MAX_REGIONS];
static USED: AtomicUsize = AtomicUsize::new(0);

/// Records `[start, end)` as `what`, labelled (the label is leaked: it must outlive any fault).
fn register(start: usize, end: usize, what: Region, label: &str) -> bool {
    let i = USED.fetch_add(1, Ordering::AcqRel);
    if i >= MAX_REGIONS {
        return false;
    }
    let label: &'static [u8] = Box::leak(label.as_bytes().to_vec().into_boxed_slice());
    let s = &SLOTS[i];
    s.end.store(end, Ordering::Relaxed);
    s.what.store(what as usize, Ordering::Relaxed);
    s.label_ptr
        .store(label.as_ptr() as usize, Ordering::Relaxed);
    s.label_len.store(label.len(), Ordering::Relaxed);
    // Published last: the handler ignores slots whose start is 0.
    s.start.store(start, Ordering::Release);
    true
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
}

/// A buffer handed to the backend; see the module documentation. Never freed.
#[derive(Debug)]
pub struct GuardBuf {
    ptr: *mut u8,
    len: usize,
    /// Start and length of the accessible mapping (0 for a heap fallback).
    map: *mut u8,
    map_len: usize,
    /// Bytes between `ptr + len` and the guard page, filled with CANARY.
    slack: usize,
    retired: bool,
}

// SAFETY: the buffer is plain memory owned by the ledger; access is serialized by the ledger's
// mutex (the backend's own accesses are its business and are what the guards check).
unsafe impl Send for GuardBuf {}

impl GuardBuf {
    /// A zeroed buffer of `len` bytes (a 0-byte buffer still has a valid, distinct address).
    pub fn new(len: usize, label: &str) -> GuardBuf {
        let slack = (ALIGN - len % ALIGN) % ALIGN;
        let page = page_size();
        let data = (len + slack).div_ceil(page).max(1) * page;
        let total = data + page;
        if USED.load(Ordering::Relaxed) + 1 < MAX_REGIONS {
            // SAFETY: anonymous private mapping; checked for failure below.
            let base = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    total,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base != libc::MAP_FAILED {
                let base = base.cast::<u8>();
                // SAFETY: `base + data` is the last page of the mapping just made.
                let guard = unsafe { base.add(data) };
                // SAFETY: the page belongs to our mapping.
                let ok = unsafe { libc::mprotect(guard.cast(), page, libc::PROT_NONE) } == 0;
                if ok
                    && register(
                        guard as usize,
                        guard as usize + page,
                        Region::Overrun,
                        label,
                    )
                {
                    // SAFETY: within the mapping; `len + slack <= data`.
                    let p = unsafe { guard.sub(len + slack) };
                    // SAFETY: the slack bytes are inside the accessible part of the mapping.
                    unsafe { ptr::write_bytes(p.add(len), CANARY, slack) };
                    return GuardBuf {
                        ptr: p,
                        len,
                        map: base,
                        map_len: data,
                        slack,
                        retired: false,
                    };
                }
            }
        }
        // Fallback: heap memory with a trailing canary.
        let mut v = vec![0u8; len + ALIGN];
        v[len..].fill(CANARY);
        let p = Box::leak(v.into_boxed_slice()).as_mut_ptr();
        GuardBuf {
            ptr: p,
            len,
            map: ptr::null_mut(),
            map_len: 0,
            slack: ALIGN,
            retired: false,
        }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8], label: &str) -> GuardBuf {
        let b = GuardBuf::new(bytes.len(), label);
        // SAFETY: `b` has `bytes.len()` writable bytes and does not overlap `bytes`.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        b
    }

    /// The address handed to the backend.
    pub fn ptr(&self) -> *mut c_void {
        self.ptr.cast()
    }

    /// Its size in bytes (without the slack before the guard page).
    pub fn len(&self) -> usize {
        self.len
    }

    /// The contents (before retirement).
    pub fn bytes(&self) -> &[u8] {
        assert!(!self.retired, "reading a retired buffer");
        // SAFETY: `len` accessible bytes at `ptr` until retired.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Whether bytes past the end were written (the canary slack before the guard page).
    pub fn overrun(&self) -> bool {
        if self.retired {
            return false;
        }
        // SAFETY: the slack bytes follow the buffer inside the accessible mapping.
        let slack = unsafe { std::slice::from_raw_parts(self.ptr.add(self.len), self.slack) };
        slack.iter().any(|&b| b != CANARY)
    }

    /// Ends the buffer's lifetime: every later access faults and is reported as `what`.
    pub fn retire(&mut self, what: Region, label: &str) {
        if self.retired {
            return;
        }
        self.retired = true;
        if self.map.is_null() || USED.load(Ordering::Relaxed) >= MAX_REGIONS {
            // A heap fallback, or no slot left to explain a fault: stays accessible.
            return;
        }
        // SAFETY: the accessible part of our own mapping.
        let ok = unsafe { libc::mprotect(self.map.cast(), self.map_len, libc::PROT_NONE) } == 0;
        if ok {
            register(
                self.map as usize,
                self.map as usize + self.map_len,
                what,
                label,
            );
        }
    }
}

static PREVIOUS: OnceLock<(libc::sigaction, libc::sigaction)> = OnceLock::new();

/// Installs the fault handler (once per process).
pub fn install_fault_handler() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct filled as documented; the handler only uses
        // async-signal-safe calls (write, _exit, sigaction) and atomics.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fault as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old_segv: libc::sigaction = std::mem::zeroed();
            let mut old_bus: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGSEGV, &sa, &mut old_segv);
            libc::sigaction(libc::SIGBUS, &sa, &mut old_bus);
            (old_segv, old_bus)
        }
    });
}

fn write_all(bytes: &[u8]) {
    // SAFETY: write(2) on stderr with a valid slice; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

fn write_hex(mut v: usize) {
    let mut buf = [0u8; 18];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    i -= 1;
    buf[i] = b'x';
    i -= 1;
    buf[i] = b'0';
    write_all(&buf[i..]);
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let used = USED.load(Ordering::Acquire).min(MAX_REGIONS);
    // Later registrations win: a retired buffer is registered after its guard page.
    for s in SLOTS[..used].iter().rev() {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Ordering::Relaxed) {
            continue;
        }
        write_all(b"\nunweight-triton-host: VIOLATION: ");
        write_all(Region::sentence(s.what.load(Ordering::Relaxed)));
        let (p, n) = (
            s.label_ptr.load(Ordering::Relaxed),
            s.label_len.load(Ordering::Relaxed),
        );
        // SAFETY: the label was leaked by `register` and is never freed.
        write_all(unsafe { std::slice::from_raw_parts(p as *const u8, n) });
        write_all(b" (address ");
        write_hex(addr);
        write_all(b"); exiting with status 1, no report written\n");
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(1) };
    }
    // Not ours: hand over to whoever was installed before.
    let Some((segv, bus)) = PREVIOUS.get() else {
        return;
    };
    let prev = if sig == libc::SIGBUS { bus } else { segv };
    if prev.sa_sigaction == libc::SIG_DFL || prev.sa_sigaction == libc::SIG_IGN {
        // SAFETY: restoring the default action; returning re-executes the faulting
        // instruction, which then kills the process as usual.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, ptr::null_mut());
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with this signature (SA_SIGINFO).
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
            unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler, installed with this signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
        f(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_end_at_the_guard_page_and_detect_overruns() {
        let mut b = GuardBuf::from_bytes(b"hello", "test");
        assert_eq!(b.bytes(), b"hello");
        assert!(!b.overrun());
        // SAFETY: writes into the slack, inside the mapping: what an overrun by one byte does.
        unsafe { *b.ptr.add(5) = 0 };
        assert!(b.overrun());
        b.retire(Region::SentOutput, "test");
        assert!(b.retired);
        let z = GuardBuf::new(0, "empty");
        assert!(!z.ptr().is_null());
        assert!(z.bytes().is_empty());
        let aligned = GuardBuf::new(32, "aligned");
        assert_eq!(aligned.ptr() as usize % ALIGN, 0);
    }
}
