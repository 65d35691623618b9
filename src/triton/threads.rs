//! Names of the threads the backend runs in Triton's process.
//!
//! The CPU engine and the weight decoder use rayon's global pool, which lives as long as the
//! process (Triton never unloads a backend library). Left to itself, rayon starts it lazily from
//! whichever thread first needs it, and its workers inherit that thread's name, typically an
//! instance's engine thread (`unweight-<instance>`): in `top -H`, gdb or the test host's
//! `lingering_threads` they would look like engine threads that outlived their instance.
//! [`name_global_pool`] starts the pool at `TRITONBACKEND_Initialize` with its own names, so
//! an `unweight-*` thread is always an engine thread (joined by `ModelInstanceFinalize`).

/// Prefix of the global pool's worker names (`uw-pool-0`, ...; Linux keeps 15 bytes of a name).
pub(super) const POOL_THREAD_PREFIX: &str = "uw-pool-";

/// Starts rayon's global pool with named workers (its default size: `RAYON_NUM_THREADS` or
/// one per CPU). Does nothing when the pool already exists (something used it first).
pub(super) fn name_global_pool() {
    let built = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("{POOL_THREAD_PREFIX}{i}"))
        .build_global();
    if let Err(e) = built {
        tracing::debug!("rayon's global pool was already started: {e}");
    }
}
