//! Build script.
//!
//! 1. Triton loads a backend named `unweight` from `backends/unweight/libtriton_unweight.so`; the
//!    shared object records that name as its SONAME so tools (ldd, nm, the loader's error
//!    messages) identify it consistently.
//! 2. A linker version script (`src/triton/exports.map`) makes the cdylib export only the
//!    `TRITONBACKEND_*` entry points; everything else is local.
//! 3. bindgen turns Triton's real C API headers (`tritonbackend.h`, which includes
//!    `tritonserver.h`) into `$OUT_DIR/triton_sys.rs`, included by `src/triton/sys.rs`. The
//!    headers are looked for in `$TRITON_INCLUDE_DIR`, then `/opt/tritonserver/include` (the Triton
//!    container), then `.cache/triton-headers` (written by `scripts/setup` from the crates.io
//!    package tritonserver-rs 0.4.1). No link directive is emitted for the Triton functions: they
//!    stay undefined in the shared object and are bound at `dlopen` by the `tritonserver`
//!    executable (docs/triton.md says why and what follows).
//!
//! 4. Every `kernels/*.cu` is compiled by nvcc into a fatbin (sm_90a code + compute_90a PTX)
//!    embedded in the library (`build/cuda.rs`; docs/cuda.md). Without nvcc the crate builds CPU
//!    only, with a warning; `UNWEIGHT_REQUIRE_NVCC=1` (set by `make test` and CI) makes that an
//!    error.

#[path = "build/cuda.rs"]
mod cuda;

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtriton_unweight.so");

    let map = manifest.join("src/triton/exports.map");
    println!("cargo:rerun-if-changed={}", map.display());
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );

    // The test host defines the server side of Triton's C API; its symbols must be in the
    // executable's dynamic symbol table so the backend's undefined references bind to them at
    // dlopen, as they bind to tritonserver's.
    println!("cargo:rustc-link-arg-bin=unweight-triton-host=-rdynamic");

    cuda::build(&manifest);

    let include = find_triton_include(&manifest);
    generate_bindings(&include);
}

/// The include directory holding `triton/core/tritonbackend.h`, in the documented order.
fn find_triton_include(manifest: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=TRITON_INCLUDE_DIR");
    if let Some(dir) = env::var_os("TRITON_INCLUDE_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_headers(&dir) {
            return dir;
        }
        panic!(
            "TRITON_INCLUDE_DIR={} has no triton/core/tritonbackend.h and tritonserver.h",
            dir.display()
        );
    }
    let candidates = [
        PathBuf::from("/opt/tritonserver/include"),
        manifest.join(".cache/triton-headers"),
    ];
    for dir in &candidates {
        if has_headers(dir) {
            return dir.clone();
        }
    }
    // Rebuild once setup has written the cache.
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join(".cache/triton-headers").display()
    );
    panic!(
        "Triton's C API headers (triton/core/tritonbackend.h, tritonserver.h) were not found in \
         $TRITON_INCLUDE_DIR, /opt/tritonserver/include or {}; run scripts/setup (or `make setup`), \
         which fetches them from the crates.io package tritonserver-rs 0.4.1",
        manifest.join(".cache/triton-headers").display()
    );
}

fn has_headers(dir: &Path) -> bool {
    let core = dir.join("triton/core");
    core.join("tritonbackend.h").is_file() && core.join("tritonserver.h").is_file()
}

fn generate_bindings(include: &Path) {
    let core = include.join("triton/core");
    let backend_h = core.join("tritonbackend.h");
    for h in ["tritonbackend.h", "tritonserver.h"] {
        println!("cargo:rerun-if-changed={}", core.join(h).display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("triton_sys.rs");
    let bindings = bindgen::Builder::default()
        .header(backend_h.to_string_lossy())
        // The headers use unqualified struct names (`TRITONSERVER_Error*`) without typedefs:
        // valid C++ only.
        .clang_arg("-xc++")
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("TRITON.*")
        .allowlist_type("TRITON.*")
        .allowlist_var("TRITON.*")
        // C enums as integer constants: a value Triton adds later must not be undefined
        // behaviour in Rust.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        // Doc comments would turn the headers' examples into doctests.
        .generate_comments(false)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen over {}: {e}", backend_h.display()));
    bindings
        .write_to_file(&out)
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
