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
//! pinned CUDA 13.0 toolkit `scripts/setup` installs from PyPI), then `nvcc` on `PATH`. A kernel
//! that fails to compile fails the build with nvcc's message. Without nvcc the crate builds
//! CPU-only with a warning (an error when `UNWEIGHT_REQUIRE_NVCC=1`, as CI should set), and the
//! CUDA backend reports "built without CUDA kernels" at run time.
//!
//! ptxas's resource report (`-Xptxas -v`: registers, shared memory, spills per kernel) is written
//! to `$OUT_DIR/kernels-resource-usage.txt` and copied to `target/<profile>/`.
//! `UNWEIGHT_NVCC_FLAGS` adds flags (space separated) to every nvcc command.

use std::env;
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
    let start = std::time::Instant::now();
    // One nvcc per file, all at once: nvcc's own front end is single-threaded.
    let jobs: Vec<_> = sources
        .iter()
        .map(|src| {
            let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
            let fatbin = out.join(format!("{stem}.fatbin"));
            let mut cmd = Command::new(&nvcc);
            cmd.arg(GENCODE)
                .args([
                    "-O3",
                    "-lineinfo",
                    "--std=c++17",
                    "-Xptxas",
                    "-v",
                    "-fatbin",
                ])
                .args(&extra)
                .arg("-o")
                .arg(&fatbin)
                .arg(src);
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
    std::fs::write(out.join("cuda_kernels.rs"), table).expect("writing cuda_kernels.rs");
    let report_path = out.join("kernels-resource-usage.txt");
    std::fs::write(&report_path, &report).expect("writing the resource report");
    // OUT_DIR is target/<profile>/build/<package>-<hash>/out.
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let _ = std::fs::copy(&report_path, profile_dir.join("kernels-resource-usage.txt"));
    }
    println!("cargo:rustc-cfg=unweight_kernels");
    println!(
        "cargo:rustc-env=UNWEIGHT_NVCC_VERSION={}",
        nvcc_version(&nvcc).unwrap_or_else(|| "unknown".into())
    );
    eprintln!(
        "compiled {} kernel files in {:.1} s",
        sources.len(),
        start.elapsed().as_secs_f64()
    );
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let is_file = |p: &Path| p.is_file().then(|| p.to_path_buf());
    if let Some(p) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        return is_file(Path::new(&p));
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
    let path = env::var_os("PATH")?;
    env::split_paths(&path).find_map(|d| is_file(&d.join("nvcc")))
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
}
