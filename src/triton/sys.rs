//! Triton's C API as bindgen generates it from the real headers (build.rs): the
//! `TRITONBACKEND_*` and `TRITONSERVER_*` functions, opaque handle types, enum constants and the
//! API version macros.
//!
//! The functions are imported from `libtritonserver.so`: the cdylib is linked against a stub of
//! it (build.rs) and binds to the server library the process loaded (docs/triton.md). Nothing
//! outside `crate::triton` sees these types.

#![allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

include!(concat!(env!("OUT_DIR"), "/triton_sys.rs"));
