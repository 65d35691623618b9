//! Where cargo put the backend's shared object, for the tests that load or inspect it
//! (tests/triton_symbols.rs, tests/triton_host.rs).

use std::path::PathBuf;

/// The cdylib cargo built next to this test (same profile directory).
pub fn shared_object() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    for dir in [deps, deps.parent().expect("profile directory")] {
        let so = dir.join("libtriton_unweight.so");
        if so.is_file() {
            return so;
        }
    }
    panic!(
        "libtriton_unweight.so not found next to {} (cargo builds it with the library)",
        exe.display()
    );
}
