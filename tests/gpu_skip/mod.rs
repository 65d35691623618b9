//! The one rule for GPU tests, shared by tests/cuda.rs and tests/cuda_tbe3.rs: without a usable
//! GPU a test says so loudly on stderr (libtest hides stdout of passing tests) and returns early,
//! which is NOT GPU coverage; with `UNWEIGHT_REQUIRE_GPU=1` (scripts/gpu-check) it fails instead.

use triton_unweight::device::cuda;

/// Prints a skip notice where it is seen even when the test passes.
pub fn loud_skip(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "*** skipped: {msg} ***");
}

/// Whether GPU tests run here; prints the loud skip, or panics under `UNWEIGHT_REQUIRE_GPU=1`.
pub fn gpu() -> bool {
    match cuda::probe() {
        Ok(_) => true,
        Err(reason) => {
            if std::env::var_os("UNWEIGHT_REQUIRE_GPU").is_some_and(|v| v == "1") {
                panic!("UNWEIGHT_REQUIRE_GPU=1 but no usable GPU: {reason}");
            }
            loud_skip(&format!("no GPU ({reason}); this is NOT GPU coverage"));
            false
        }
    }
}
