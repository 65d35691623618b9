//! The shared object Triton loads: what it exports and what it leaves for the server to bind.
//!
//! `libtriton_unweight.so` must define exactly the `TRITONBACKEND_*` entry points (the linker
//! version script `src/triton/exports.map` hides everything else), import every Triton server
//! function, and record `DT_NEEDED libtritonserver.so` as Triton's own backends do (build.rs links
//! it against a stub of the server library; docs/triton.md), so that it loads wherever the
//! server library is loaded. Loading it next to the genuine core, in the global and in a local
//! scope, is tested in tests/triton_core.rs and tests/triton_core_local.rs.

use std::process::Command;

mod backend_so;
use backend_so::shared_object;

/// The entry points the backend implements (`TRITONBACKEND_ISPEC` in tritonbackend.h).
const EXPECTED_EXPORTS: [&str; 7] = [
    "TRITONBACKEND_Finalize",
    "TRITONBACKEND_Initialize",
    "TRITONBACKEND_ModelFinalize",
    "TRITONBACKEND_ModelInitialize",
    "TRITONBACKEND_ModelInstanceExecute",
    "TRITONBACKEND_ModelInstanceFinalize",
    "TRITONBACKEND_ModelInstanceInitialize",
];

fn nm(args: &[&str]) -> Vec<(String, String)> {
    let so = shared_object();
    let out = Command::new("nm")
        .args(args)
        .arg(&so)
        .output()
        .expect("running nm (binutils)");
    assert!(
        out.status.success(),
        "nm {args:?} {}: {}",
        so.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("nm output is UTF-8")
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().rev();
            let name = f.next()?.split('@').next()?.to_string();
            let kind = f.next()?.to_string();
            Some((kind, name))
        })
        .collect()
}

#[test]
fn exports_exactly_the_entry_points() {
    let mut defined: Vec<String> = nm(&["-D", "--defined-only"])
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    defined.sort();
    assert_eq!(
        defined, EXPECTED_EXPORTS,
        "dynamic symbols defined by the backend"
    );
    for (kind, name) in nm(&["-D", "--defined-only"]) {
        assert_eq!(kind, "T", "{name} must be a function in .text");
    }
}

#[test]
fn server_functions_are_imported_from_libtritonserver() {
    let undefined: Vec<String> = nm(&["-D", "--undefined-only"])
        .into_iter()
        .map(|(_, name)| name)
        .filter(|n| n.starts_with("TRITON"))
        .collect();
    for must in [
        "TRITONBACKEND_ApiVersion",
        "TRITONBACKEND_ModelConfig",
        "TRITONSERVER_ErrorNew",
        "TRITONSERVER_ErrorDelete",
        "TRITONSERVER_MessageDelete",
    ] {
        assert!(
            undefined.iter().any(|n| n == must),
            "{must} is not imported: {undefined:?}"
        );
    }
    let so = shared_object();
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&so)
        .output()
        .expect("running readelf (binutils)");
    assert!(out.status.success());
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("(NEEDED)             Shared library: [libtritonserver.so]"),
        "DT_NEEDED libtritonserver.so expected:\n{dynamic}"
    );
    assert!(
        !dynamic.contains("RPATH") && !dynamic.contains("RUNPATH"),
        "no run path: the server library is found where the server loaded it:\n{dynamic}"
    );
    assert!(
        dynamic.contains("Library soname: [libtriton_unweight.so]"),
        "{dynamic}"
    );
}

/// Without a server library in the process (or on the loader's path) Triton's way of loading it
/// (`RTLD_NOW | RTLD_LOCAL`) fails, naming the missing library: the stub it was linked against
/// stays in the build directory.
#[test]
fn dlopen_needs_the_server_library() {
    use std::ffi::{CStr, CString};
    let so = CString::new(shared_object().to_str().expect("UTF-8 path")).unwrap();
    for flags in [
        libc::RTLD_NOW | libc::RTLD_LOCAL,
        libc::RTLD_LAZY | libc::RTLD_LOCAL,
    ] {
        // SAFETY: a valid path string and plain dlopen flags; the load fails before any code of
        // the library runs.
        let handle = unsafe { libc::dlopen(so.as_ptr(), flags) };
        assert!(
            handle.is_null(),
            "dlopen must fail without a server library"
        );
        // SAFETY: dlerror returns this thread's message about the failed dlopen.
        let msg = unsafe { CStr::from_ptr(libc::dlerror()) }
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains("libtritonserver.so"), "{msg}");
    }
}
