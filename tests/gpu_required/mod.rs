//! The one rule for GPU tests, shared by tests/cuda.rs, tests/cuda_tbe3.rs and tests/cuda_tune.rs:
//! a test that needs a GPU is `#[ignore = "needs a GPU: run by scripts/gpu-check"]`, so a plain
//! `cargo test` reports it as ignored (not run), never as passed; scripts/gpu-check runs the test
//! binaries with `--include-ignored`, and there a missing GPU is a failure, never a skip.

use triton_unweight::device::cuda;

/// Panics (fails the test) unless this process can run the CUDA backend; the message is the
/// probe's reason, so a GPU machine with a broken driver or missing cuBLAS says which.
pub fn require_gpu() {
    if let Err(reason) = cuda::probe() {
        panic!("this test needs a GPU and there is none usable: {reason}");
    }
}
