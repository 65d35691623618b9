//! The CUDA kernel build, called from `build.rs`.
//!
//! Every `kernels/*.cu` is compiled by nvcc, one process per file, in parallel, into its own
//! fatbin holding sm_90a machine code and compute_90a PTX (`-gencode=arch=compute_90a,
//! code=[sm_90a,compute_90a]`, -O3, -lineinfo, C++17). A single fatbin for all families would need
//! relocatable device code and a device link, which keeps SASS only (no PTX) and costs
//! cross-file inlining; one fatbin per family, one CUDA module each, is candle's layout. The
//! fatbins are embedded in the library by `$OUT_DIR/cuda_kernels.rs` (`include_bytes!`) and the
//! crate is compiled with `--cfg unweight_kernels`.
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin/nvcc`, the path in `.cuda/NVCC_PATH` (the
//! pinned CUDA 13.0 toolkit `scripts/setup` installs from PyPI), then `nvcc` on `PATH`. `$NVCC`
//! is a path or a bare name looked up on `PATH`; when set (non-empty) it is the only candidate,
//! and one that does not resolve to an executable file fails the build naming it. A kernel
//! that fails to compile fails the build with nvcc's message. Without nvcc the crate builds
//! CPU-only with a warning (an error when `UNWEIGHT_REQUIRE_NVCC=1`, as CI should set), and the
//! CUDA backend reports "built without CUDA kernels" at run time.
//!
//! ptxas's resource report (`-Xptxas -v`: registers, shared memory, spills per kernel) is written
//! to `$OUT_DIR/kernels-resource-usage.txt` and copied to `target/<profile>/`.
//! `UNWEIGHT_NVCC_FLAGS` adds flags (space separated) to every nvcc command.

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target architecture: sm_90a machine code plus compute_90a PTX.
const GENCODE: &str = "-gencode=arch=compute_90a,code=[sm_90a,compute_90a]";

/// Compiles the kernels (or explains why not) and tells cargo what it did.
pub fn build(manifest: &Path) {
    println!("cargo:rustc-check-cfg=cfg(unweight_kernels)");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "UNWEIGHT_NVCC_FLAGS",
        "UNWEIGHT_REQUIRE_NVCC",
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let kernels_dir = manifest.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    let mut sources = Vec::new();
    let mut headers = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&kernels_dir) {
        for e in entries.flatten() {
            let p = e.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some("cu") => sources.push(p),
                Some("cuh") => headers.push(p),
                _ => {}
            }
        }
    }
    sources.sort();
    for p in sources.iter().chain(&headers) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let Some(nvcc) = find_nvcc(manifest) else {
        let msg = "nvcc not found ($NVCC, $CUDA_HOME/bin/nvcc, .cuda/NVCC_PATH, PATH): building \
                   CPU-only; the CUDA backend will report \"built without CUDA kernels\" (run \
                   scripts/setup to install the pinned CUDA 13.0 nvcc)";
        if env::var_os("UNWEIGHT_REQUIRE_NVCC").is_some_and(|v| v == "1") {
            panic!("UNWEIGHT_REQUIRE_NVCC=1 but {msg}");
        }
        println!("cargo:warning={msg}");
        return;
    };
    if sources.is_empty() {
        panic!("no kernels/*.cu found in {}", kernels_dir.display());
    }
    let extra: Vec<String> = env::var("UNWEIGHT_NVCC_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // The build script reruns whenever a source file or the checkout's commit changes (build.rs:
    // the binary records the commit it was built from), not only when a kernel does: unchanged
    // kernels, compiler and flags reuse the fatbins of the last compile in OUT_DIR.
    let flags = compile_flags(&extra);
    let version = nvcc_version(&nvcc).unwrap_or_else(|| "unknown".into());
    // What else decides the fatbins: the compiler's version (a new toolkit at the same path),
    // the flags nvcc itself adds from the environment, and every argument it is given.
    let mut context = vec![version.clone()];
    for var in ["NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"] {
        context.push(format!("{var}={}", env::var(var).unwrap_or_default()));
    }
    context.extend(flags.iter().cloned());
    let key = kernels_key(&nvcc, &context, &sources, &headers);
    let key_path = out.join("kernels.key");
    let table_path = out.join("cuda_kernels.rs");
    let report_path = out.join("kernels-resource-usage.txt");
    let fatbin_of = |src: &Path| {
        out.join(format!(
            "{}.fatbin",
            src.file_stem().unwrap().to_string_lossy()
        ))
    };
    let reusable = std::fs::read_to_string(&key_path).is_ok_and(|k| k == key)
        && table_path.is_file()
        && report_path.is_file()
        && sources.iter().all(|s| fatbin_of(s).is_file());
    if reusable {
        finish(&version, &out, &report_path);
        eprintln!(
            "kernels unchanged: reusing the {} fatbins in {}",
            sources.len(),
            out.display()
        );
        return;
    }
    // A compile that stops part way must not leave a key that vouches for it.
    let _ = std::fs::remove_file(&key_path);
    let start = std::time::Instant::now();
    // One nvcc per file, all at once: nvcc's own front end is single-threaded.
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let fatbin = out.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.args(&flags).arg("-o").arg(&fatbin).arg(src);
            let handle = std::thread::spawn(move || cmd.output());
            (stem, src.clone(), fatbin, handle)
        })
        .collect();
    let mut report = String::new();
    let mut table = String::from("pub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, src, fatbin, handle) in jobs {
        let output = handle
            .join()
            .expect("nvcc thread")
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            panic!(
                "nvcc failed on {} ({}):\n{}{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                stderr
            );
        }
        report.push_str(&format!("== kernels/{stem}.cu\n{stderr}\n"));
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(&table_path, table).expect("writing cuda_kernels.rs");
    std::fs::write(&report_path, &report).expect("writing the resource report");
    std::fs::write(&key_path, &key).expect("writing kernels.key");
    finish(&version, &out, &report_path);
    eprintln!(
        "compiled {} kernel files in {:.1} s",
        sources.len(),
        start.elapsed().as_secs_f64()
    );
}

/// What the kernels' build tells cargo and the profile directory, compiled now or reused.
fn finish(version: &str, out: &Path, report_path: &Path) {
    // OUT_DIR is target/<profile>/build/<package>-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let _ = std::fs::copy(report_path, profile_dir.join("kernels-resource-usage.txt"));
    }
    println!("cargo:rustc-cfg=unweight_kernels");
    println!("cargo:rustc-env=UNWEIGHT_NVCC_VERSION={version}");
}

/// nvcc's arguments before `-o`, the same for every kernel file: the target, the fixed flags
/// (ptxas's resource report included), then `UNWEIGHT_NVCC_FLAGS`.
fn compile_flags(extra: &[String]) -> Vec<String> {
    let fixed = [
        GENCODE,
        "-O3",
        "-lineinfo",
        "--std=c++17",
        "-Xptxas",
        "-v",
        "-fatbin",
    ];
    fixed
        .iter()
        .map(|f| f.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

/// Everything the fatbins depend on, as text: the compiler's path, `context` (its version, the
/// flags it reads from the environment, its arguments) and a hash of every kernel source and
/// header (names and contents). Equal keys mean the last compile's fatbins are what a new one
/// would write.
fn kernels_key(
    nvcc: &Path,
    context: &[String],
    sources: &[PathBuf],
    headers: &[PathBuf],
) -> String {
    let mut files: Vec<&PathBuf> = sources.iter().chain(headers).collect();
    files.sort();
    let mut key = format!("{}\n{context:?}\n", nvcc.display());
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        key.push_str(&format!("{} {:016x}\n", f.display(), fnv1a64(&bytes)));
    }
    key
}

/// FNV-1a, 64 bits: a hash that is the same in every build of this script (std's hasher is not
/// promised to be).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let is_file = |p: &Path| is_executable(p).then(|| p.to_path_buf());
    if let Some(v) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        // The user named this compiler: building CPU-only or with another nvcc instead would
        // hide the mistake until run time.
        return Some(
            resolve_nvcc_env(&v, env::var_os("PATH").as_deref()).unwrap_or_else(|e| panic!("{e}")),
        );
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|v| !v.is_empty()) {
        if let Some(p) = is_file(&Path::new(&home).join("bin/nvcc")) {
            return Some(p);
        }
    }
    let pinned = manifest.join(".cuda/NVCC_PATH");
    if pinned.is_file() {
        println!("cargo:rerun-if-changed={}", pinned.display());
        if let Ok(text) = std::fs::read_to_string(&pinned) {
            if let Some(p) = is_file(Path::new(text.trim())) {
                return Some(p);
            }
        }
    }
    find_on_path(OsStr::new("nvcc"), env::var_os("PATH").as_deref())
}

/// The compiler a non-empty `$NVCC` names, given `$PATH`: a bare name (no `/`) is looked up on
/// `path` as a shell would, anything else is a path (relative ones to the package root, the build
/// script's working directory). `Err` names the value and why it is unusable; the build then
/// fails, since the user asked for that compiler (a silent CPU-only build, or another nvcc, would
/// surface only at run time). Pure apart from reading the file system, so it is unit-tested.
pub fn resolve_nvcc_env(value: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, String> {
    let shown = Path::new(value).display();
    let bare = !value.as_encoded_bytes().contains(&b'/');
    if bare {
        return find_on_path(value, path).ok_or_else(|| {
            format!(
                "$NVCC={shown}: no executable `{shown}` on PATH; set NVCC to nvcc's full path, or \
                 unset it to search $CUDA_HOME/bin, .cuda/NVCC_PATH and PATH"
            )
        });
    }
    let p = Path::new(value);
    let why = if !p.exists() {
        "no such file"
    } else if !p.is_file() {
        "not a file"
    } else if !is_executable(p) {
        "not executable"
    } else {
        return Ok(p.to_path_buf());
    };
    Err(format!(
        "$NVCC={shown}: {why}; set NVCC to nvcc's full path, or unset it to search \
         $CUDA_HOME/bin, .cuda/NVCC_PATH and PATH"
    ))
}

/// The first executable file called `name` in the directories of `path` (a `$PATH` value).
fn find_on_path(name: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    env::split_paths(path?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// A regular file (after symlinks) that someone may execute.
fn is_executable(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        p.is_file()
    }
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
}

// Compiled only where a test target includes this file (tests/cli.rs does): build scripts have
// no test harness of their own.
#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        p
    }

    #[test]
    fn kernels_key_changes_with_any_kernel_file_the_compiler_or_the_flags() {
        let tmp = tempfile::tempdir().unwrap();
        let (cu, cuh) = (tmp.path().join("a.cu"), tmp.path().join("common.cuh"));
        std::fs::write(&cu, "__global__ void k() {}\n").unwrap();
        std::fs::write(&cuh, "#define X 1\n").unwrap();
        let nvcc = Path::new("/opt/cuda/bin/nvcc");
        let key = |nvcc: &Path, context: &[String]| {
            kernels_key(
                nvcc,
                context,
                std::slice::from_ref(&cu),
                std::slice::from_ref(&cuh),
            )
        };
        let base = key(nvcc, &[]);
        assert_eq!(key(nvcc, &[]), base, "same inputs, same key");
        std::fs::write(&cuh, "#define X 2\n").unwrap();
        let header_changed = key(nvcc, &[]);
        assert_ne!(
            header_changed, base,
            "a header's contents are part of the key"
        );
        std::fs::write(&cu, "__global__ void k() { }\n").unwrap();
        assert_ne!(
            key(nvcc, &[]),
            header_changed,
            "a source's contents are part of the key"
        );
        let now = key(nvcc, &[]);
        assert_ne!(key(Path::new("/usr/bin/nvcc"), &[]), now, "the compiler is");
        assert_ne!(key(nvcc, &["-G".to_string()]), now, "the flags are");
        let release = |v: &str| vec![format!("Cuda compilation tools, release {v}")];
        assert_ne!(
            key(nvcc, &release("13.1")),
            key(nvcc, &release("13.0")),
            "the compiler's version is"
        );
        // Every fixed flag is in the arguments the key sees, so editing one recompiles.
        let flags = compile_flags(&["-DX".to_string()]);
        for f in ["-O3", "-lineinfo", "--std=c++17", "-fatbin", GENCODE, "-DX"] {
            assert!(flags.iter().any(|g| g == f), "{f} missing from {flags:?}");
        }
        // FNV-1a's published test vectors: the key must not depend on the build of the script.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn nvcc_env_resolves_bare_names_on_path_and_rejects_unusable_values() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // a/nvcc is not executable, b/nvcc is: a bare name skips the first, as a shell does.
        file(&a, "nvcc", 0o644);
        let exe = file(&b, "nvcc", 0o755);
        let path = env::join_paths([&a, &b]).unwrap();
        let path = Some(path.as_os_str());
        assert_eq!(resolve_nvcc_env(OsStr::new("nvcc"), path), Ok(exe.clone()));
        assert_eq!(resolve_nvcc_env(exe.as_os_str(), None), Ok(exe.clone()));

        let err = |v: &OsStr, path| resolve_nvcc_env(v, path).unwrap_err();
        let e = err(OsStr::new("nvcc-missing"), path);
        assert!(e.starts_with("$NVCC=nvcc-missing: no executable"), "{e}");
        assert!(err(OsStr::new("nvcc"), None).contains("on PATH"));
        let missing = tmp.path().join("nonexistent/nvcc");
        let e = err(missing.as_os_str(), path);
        assert!(
            e.contains(&format!("$NVCC={}: no such file", missing.display())),
            "{e}"
        );
        assert!(err(a.as_os_str(), path).contains(": not a file"));
        #[cfg(unix)]
        assert!(err(a.join("nvcc").as_os_str(), path).contains(": not executable"));
    }
}
