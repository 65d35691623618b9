//! What the instances on one device share, and how they let go of it together when its context
//! dies.
//!
//! One copy of a model's device weights per device, shared by every instance that runs the same
//! weights in the same form there: a process-wide [`Registry`] keyed by (weights identity,
//! device, storage form) holding a [`Weak`] to what was uploaded. The first instance loads the
//! payload; the next ones (and an engine rebuilt while another instance still holds the copy)
//! get the same [`Arc`]. The copy is freed when its last user drops it, and a fatal fault
//! ([`Registry::invalidate`]) makes the registry forget it, so no engine built afterwards reuses
//! memory of a dead context.
//!
//! The context itself: every instance on a GPU retains the device's one primary context, so a
//! sticky fault in one kills it for all. [`ContextEpochs`] numbers its generations: the faulting
//! instance ends one, the others see that and let go (the dead weights with them), and a new
//! context is made only once no one holds the dead one, so no rebuilt engine lands in it.
//!
//! Generic and host-only, so that the sharing and the hand-over are unit-tested on the CPU with
//! fakes; the CUDA backend keeps its device weights in a [`Registry`] (`cuda::weights`) and each
//! of its contexts holds a [`ContextLease`] (`cuda::driver::Context`).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// One key's place: loads of one key wait on its lock, loads of other keys do not.
type Cell<T> = Arc<Mutex<Weak<T>>>;

/// Shared payloads by key (see the module documentation).
pub struct Registry<K, T> {
    cells: Mutex<HashMap<K, Cell<T>>>,
}

impl<K, T> Default for Registry<K, T> {
    fn default() -> Self {
        Self {
            cells: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, T> std::fmt::Debug for Registry<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone, T> Registry<K, T> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn cell(&self, key: &K) -> Cell<T> {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget keys whose payload is gone, so the map does not grow with every model ever
        // loaded (a cell being filled right now is kept: someone holds it).
        cells.retain(|_, c| {
            Arc::strong_count(c) > 1 || c.try_lock().is_ok_and(|w| w.strong_count() > 0)
        });
        Arc::clone(cells.entry(key.clone()).or_default())
    }

    /// The payload of `key`: the live one when there is one (`shared` true), else made now by
    /// `load` and kept for the next caller (`shared` false). Two callers for one key at once:
    /// the second waits for the first's load and shares it; a failed load leaves nothing, and
    /// the next caller loads again.
    pub fn get_or_load<E>(
        &self,
        key: &K,
        load: impl FnOnce() -> Result<T, E>,
    ) -> Result<(Arc<T>, bool), E> {
        let cell = self.cell(key);
        let mut weak = cell.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = weak.upgrade() {
            return Ok((live, true));
        }
        let made = Arc::new(load()?);
        *weak = Arc::downgrade(&made);
        Ok((made, false))
    }

    /// Forgets `key`'s payload if it is `held` (the copy a caller found dead): later
    /// [`Registry::get_or_load`] calls load a new one. A newer payload (another holder already
    /// invalidated the old one and loaded again) is left alone. Returns whether it was forgotten.
    pub fn invalidate(&self, key: &K, held: &Arc<T>) -> bool {
        let cell = {
            let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
            match cells.get(key) {
                Some(c) => Arc::clone(c),
                None => return false,
            }
        };
        let mut weak = cell.lock().unwrap_or_else(PoisonError::into_inner);
        if std::ptr::eq(weak.as_ptr(), Arc::as_ptr(held)) {
            *weak = Weak::new();
            true
        } else {
            false
        }
    }

    /// Number of keys whose payload is alive.
    pub fn live(&self) -> usize {
        let cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        cells
            .values()
            .filter(|c| {
                c.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .strong_count()
                    > 0
            })
            .count()
    }
}

/// Which generation of each device's context is alive, and who still holds the older ones.
///
/// Every instance on a GPU retains the same primary context, so a sticky fault in one (an
/// illegal address, say) kills it for all of them, and the driver makes a fresh one only once
/// every holder has released the dead one. A backend holds a [`ContextLease`] for as long as it
/// holds the context; the one that gets a fatal fault ends the generation
/// ([`ContextLease::mark_lost`]); the others see it ([`ContextLease::lost`]) at their next step,
/// or within a moment when idle, and let go; and a new lease, taken before a new context is
/// made, waits until no holder of a dead generation is left ([`ContextEpochs::acquire`]), so a
/// rebuilt engine never retains the dead context again.
#[derive(Debug, Default)]
pub struct ContextEpochs {
    devices: Mutex<HashMap<usize, DeviceEpoch>>,
    released: Condvar,
}

/// One device's current generation and the number of leases of each live one.
#[derive(Debug, Default)]
struct DeviceEpoch {
    current: u64,
    holders: BTreeMap<u64, usize>,
}

impl DeviceEpoch {
    /// Leases still held on generations that are dead.
    fn stale(&self) -> usize {
        self.holders.range(..self.current).map(|(_, n)| n).sum()
    }
}

impl ContextEpochs {
    /// No device has lost a context yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, HashMap<usize, DeviceEpoch>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A lease on device `ordinal`'s live context generation, taken before the context is
    /// retained: immediately when no one holds a dead generation of it, else once they have all
    /// let go, waiting at most `wait`. The error says how many holders of the dead context are
    /// left.
    pub fn acquire(
        self: &Arc<Self>,
        ordinal: usize,
        wait: Duration,
    ) -> Result<ContextLease, String> {
        let deadline = Instant::now() + wait;
        let mut devices = self.devices();
        loop {
            let dev = devices.entry(ordinal).or_default();
            let stale = dev.stale();
            if stale == 0 {
                *dev.holders.entry(dev.current).or_default() += 1;
                return Ok(ContextLease {
                    epochs: Arc::clone(self),
                    ordinal,
                    epoch: dev.current,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "device {ordinal}'s context was lost to a fatal fault and {stale} holder(s) \
                     of it have not let go after {} s: a new context can only be made once \
                     they have",
                    wait.as_secs_f64()
                ));
            }
            devices = self
                .released
                .wait_timeout(devices, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A hold on one generation of a device's context (see [`ContextEpochs`]); released on drop.
#[derive(Debug)]
pub struct ContextLease {
    epochs: Arc<ContextEpochs>,
    ordinal: usize,
    epoch: u64,
}

impl ContextLease {
    /// Whether this generation of the context is dead (a holder got a fatal fault in it).
    pub fn lost(&self) -> bool {
        self.epochs
            .devices()
            .get(&self.ordinal)
            .is_some_and(|d| d.current > self.epoch)
    }

    /// This generation got a fatal fault: every holder is to let go, and new leases wait until
    /// they have. Returns whether this call ended it (false: already ended by another holder).
    pub fn mark_lost(&self) -> bool {
        let mut devices = self.epochs.devices();
        let dev = devices.entry(self.ordinal).or_default();
        if dev.current != self.epoch {
            return false;
        }
        dev.current += 1;
        true
    }

    /// The device this lease is on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl Drop for ContextLease {
    fn drop(&mut self) {
        let mut devices = self.epochs.devices();
        if let Some(dev) = devices.get_mut(&self.ordinal) {
            if let Some(n) = dev.holders.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    dev.holders.remove(&self.epoch);
                }
            }
        }
        drop(devices);
        self.epochs.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake device copy: counts how many were made and how many are alive.
    struct Upload {
        drops: Arc<AtomicUsize>,
        id: usize,
    }

    impl Drop for Upload {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Fake {
        made: AtomicUsize,
        drops: Arc<AtomicUsize>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                made: AtomicUsize::new(0),
                drops: Arc::new(AtomicUsize::new(0)),
            }
        }
        fn load(&self) -> Result<Upload, String> {
            let id = self.made.fetch_add(1, Ordering::SeqCst);
            Ok(Upload {
                drops: Arc::clone(&self.drops),
                id,
            })
        }
        fn made(&self) -> usize {
            self.made.load(Ordering::SeqCst)
        }
        fn dropped(&self) -> usize {
            self.drops.load(Ordering::SeqCst)
        }
    }

    type Key = (&'static str, usize);

    #[test]
    fn instances_of_one_model_on_one_device_share_one_copy_until_the_last_goes() {
        let reg: Registry<Key, Upload> = Registry::new();
        let f = Fake::new();
        let (a, shared_a) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        let (b, shared_b) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        assert!(!shared_a && shared_b);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(f.made(), 1);
        // Another device, another model: their own copies.
        let (c, _) = reg.get_or_load(&("m", 1), || f.load()).unwrap();
        let (d, _) = reg.get_or_load(&("n", 0), || f.load()).unwrap();
        assert_eq!(f.made(), 3);
        assert!(!Arc::ptr_eq(&a, &c) && !Arc::ptr_eq(&a, &d));
        assert_eq!(reg.live(), 3);
        // One instance goes (or is rebuilt while the other holds the copy): the copy stays and
        // the rebuilt engine gets it back.
        drop(a);
        assert_eq!(f.dropped(), 0);
        let (a2, shared) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        assert!(shared && Arc::ptr_eq(&a2, &b));
        assert_eq!(f.made(), 3);
        // The last user goes: the copy is freed, and the next instance loads again.
        drop((a2, b));
        assert_eq!(f.dropped(), 1);
        assert_eq!(reg.live(), 2);
        let (e, shared) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        assert!(!shared);
        assert_eq!((f.made(), e.id), (4, 3));
        drop((c, d, e));
        assert_eq!(f.dropped(), 4);
        assert_eq!(reg.live(), 0);
    }

    #[test]
    fn after_a_fatal_fault_the_dead_copy_is_never_handed_out_again() {
        let reg: Registry<Key, Upload> = Registry::new();
        let f = Fake::new();
        let (a, _) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        let (b, _) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        // Instance a faults fatally: the copy is forgotten, though b still holds it.
        assert!(reg.invalidate(&("m", 0), &a));
        drop(a);
        let (a2, shared) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        assert!(!shared, "the rebuilt engine must not get the dead copy");
        assert!(!Arc::ptr_eq(&a2, &b));
        assert_eq!(f.made(), 2);
        // Then b faults (same dead context): invalidating its old copy leaves the new one alone,
        // and its rebuild shares the new one.
        assert!(!reg.invalidate(&("m", 0), &b));
        drop(b);
        assert_eq!(
            f.dropped(),
            1,
            "the dead copy is freed when its last holder goes"
        );
        let (b2, shared) = reg.get_or_load(&("m", 0), || f.load()).unwrap();
        assert!(shared && Arc::ptr_eq(&a2, &b2));
        assert_eq!(f.made(), 2);
        // Unknown keys: nothing to forget.
        assert!(!reg.invalidate(&("x", 0), &b2));
    }

    #[test]
    fn a_failed_load_leaves_nothing_and_concurrent_loads_share_one() {
        let reg: Arc<Registry<Key, Upload>> = Arc::new(Registry::new());
        let f = Arc::new(Fake::new());
        let r: Result<(Arc<Upload>, bool), String> =
            reg.get_or_load(&("m", 0), || Err("no memory".into()));
        assert_eq!(r.err().as_deref(), Some("no memory"));
        assert_eq!(reg.live(), 0);
        // Eight instances loading at once: one load, one copy.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (reg, f) = (Arc::clone(&reg), Arc::clone(&f));
                std::thread::spawn(move || {
                    reg.get_or_load(&("m", 0), || {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        f.load()
                    })
                    .unwrap()
                })
            })
            .collect();
        let got: Vec<(Arc<Upload>, bool)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(f.made(), 1);
        assert_eq!(got.iter().filter(|g| !g.1).count(), 1);
        assert!(got.iter().all(|g| Arc::ptr_eq(&g.0, &got[0].0)));
    }

    #[test]
    fn a_lost_context_is_seen_by_every_holder_and_a_new_one_waits_until_all_let_go() {
        let epochs = ContextEpochs::new();
        let a = epochs.acquire(0, Duration::ZERO).unwrap();
        let b = epochs.acquire(0, Duration::ZERO).unwrap();
        let other_device = epochs.acquire(1, Duration::ZERO).unwrap();
        assert!(!a.lost() && !b.lost());
        // a faults: the generation ends once, for both holders, and for no other device.
        assert!(a.mark_lost());
        assert!(
            !b.mark_lost(),
            "a second fault in the dead context ends nothing new"
        );
        assert!(a.lost() && b.lost() && !other_device.lost());
        // a let go, b has not yet: no new lease on device 0 (device 1 is unaffected).
        drop(a);
        let err = epochs.acquire(0, Duration::from_millis(20)).unwrap_err();
        assert!(
            err.contains("device 0") && err.contains("1 holder"),
            "{err}"
        );
        assert!(epochs.acquire(1, Duration::ZERO).is_ok());
        // A rebuild waiting for b gets its lease as soon as b lets go, in the new generation.
        let waiter = {
            let epochs = Arc::clone(&epochs);
            std::thread::spawn(move || epochs.acquire(0, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !waiter.is_finished(),
            "the rebuild must wait for the dead context's holder"
        );
        drop(b);
        let fresh = waiter.join().unwrap().unwrap();
        assert!(!fresh.lost());
        // Later leases join the live generation at once.
        let again = epochs.acquire(0, Duration::ZERO).unwrap();
        assert!(!again.lost());
        assert!(fresh.mark_lost() && again.lost());
    }
}
