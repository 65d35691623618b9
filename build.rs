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
//!    package tritonserver-rs 0.4.1).
//! 4. The backend links against `libtritonserver.so` as Triton's own backends do: a stub of the
//!    server library is compiled here from the function names the bindings declare (each body
//!    aborts; it is never loaded where a real server runs), into `$OUT_DIR/triton-stub/` only
//!    (never shipped, never committed), and the cdylib is linked against it, so it records
//!    `DT_NEEDED libtritonserver.so` and loads wherever the server library is loaded, in the
//!    global scope (`tritonserver`) or a local one (Python's in-process `tritonserver` module).
//!    The stub's path is passed to the crate as `UNWEIGHT_TRITONSERVER_STUB` for the test host,
//!    whose executable provides the server functions itself (docs/triton.md, docs/test-host.md).
//!
//! 5. Every `kernels/*.cu` is compiled by nvcc into a fatbin (sm_90a code + compute_90a PTX)
//!    embedded in the library (`build/cuda.rs`; docs/cuda.md). Without nvcc the crate builds CPU
//!    only, with a warning; `UNWEIGHT_REQUIRE_NVCC=1` (set by `make test` and CI) makes that an
//!    error.
//! 6. The commit the binary is built from goes into `UNWEIGHT_BUILD_COMMIT` (`-dirty` when the
//!    sources that make it differ from that commit; empty outside a git checkout), so a
//!    benchmark's result file names the code that ran, not whatever the checkout holds when it
//!    runs. The script reruns when the commit or any source changes; kernels are only
//!    recompiled when they change (`build/cuda.rs`).

#[path = "build/commit.rs"]
mod commit;
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
    commit::build_commit(&manifest);

    let include = find_triton_include(&manifest);
    let functions = generate_bindings(&include);
    let server_functions: Vec<String> = {
        let backend_impl = backend_implemented(&include);
        functions
            .into_iter()
            .filter(|f| !backend_impl.contains(f))
            .collect()
    };
    let stub = build_server_stub(&server_functions);
    // Only the cdylib links it (the rlib's users, the CLI and the tests, must not need it). The
    // library precedes the Rust objects on the link line, so --as-needed is off around it.
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--push-state,--no-as-needed,{},--pop-state",
        stub.display()
    );
    println!(
        "cargo:rustc-env=UNWEIGHT_TRITONSERVER_STUB={}",
        stub.display()
    );
}

/// The functions a backend implements (declared `TRITONBACKEND_ISPEC` in tritonbackend.h): the
/// stub must not define them, or `dlsym(backend, "TRITONBACKEND_GetBackendAttribute")` would find
/// the stub's when the backend leaves an optional entry point out.
fn backend_implemented(include: &Path) -> Vec<String> {
    let h = include.join("triton/core/tritonbackend.h");
    let text = std::fs::read_to_string(&h).unwrap_or_else(|e| panic!("{}: {e}", h.display()));
    let names: Vec<String> = text
        .split("TRITONBACKEND_ISPEC")
        .skip(1)
        .filter_map(|decl| {
            let head = decl.split('(').next()?;
            let name = head
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .rev()
                .find(|t| !t.is_empty())?;
            name.starts_with("TRITONBACKEND_").then(|| name.to_string())
        })
        // Declared TRITONBACKEND_ISPEC by mistake: the server implements it (the core exports it).
        .filter(|n| n != "TRITONBACKEND_InferenceResponseOutputByName")
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n == "TRITONBACKEND_ModelInstanceExecute"),
        "no TRITONBACKEND_ISPEC declarations found in {}",
        h.display()
    );
    names
}

/// Compiles `$OUT_DIR/triton-stub/libtritonserver.so` (soname `libtritonserver.so`) defining
/// every function in `functions`; each body reports the call and aborts, since a process that
/// reaches the stub was meant to bind to a real server. Returns its path.
fn build_server_stub(functions: &[String]) -> PathBuf {
    let dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("triton-stub");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut c = String::from(
        "/* Generated by build.rs: link-time stand-in for Triton's server library. */\n\
         #include <stdio.h>\n#include <stdlib.h>\n\
         static void stub_called(const char* name) {\n\
         \x20 fprintf(stderr, \"libtritonserver.so stub: %s called; the real server library \
         must provide it\\n\", name);\n  abort();\n}\n",
    );
    for f in functions {
        c.push_str(&format!("void {f}(void) {{ stub_called(\"{f}\"); }}\n"));
    }
    let src = dir.join("tritonserver_stub.c");
    std::fs::write(&src, c).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let so = dir.join("libtritonserver.so");
    println!("cargo:rerun-if-env-changed=CC");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&cc)
        .args([
            "-shared",
            "-fPIC",
            "-O0",
            "-w",
            "-Wl,-soname,libtritonserver.so",
            "-o",
        ])
        .arg(&so)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("running {cc} for the libtritonserver.so stub: {e}"));
    assert!(status.success(), "{cc} failed to build {}", so.display());
    so
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

/// Writes `$OUT_DIR/triton_sys.rs`; returns the names of the functions it declares.
fn generate_bindings(include: &Path) -> Vec<String> {
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
    let text = bindings.to_string();
    std::fs::write(&out, &text).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    let functions: Vec<String> = text
        .split("pub fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .filter(|name| name.starts_with("TRITON"))
        .map(str::to_string)
        .collect();
    assert!(
        functions.iter().any(|f| f == "TRITONSERVER_ErrorNew"),
        "no Triton functions found in the bindings of {}",
        backend_h.display()
    );
    functions
}
