//! Build script.
//!
//! Triton loads a backend named `unweight` from `backends/unweight/libtriton_unweight.so`; the
//! shared object records that name as its SONAME so tools (ldd, nm, the loader's error messages)
//! identify it consistently. The CUDA kernel build joins this script with the CUDA runtime issue.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtriton_unweight.so");
}
