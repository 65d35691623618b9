//! Triton's C API as bindgen generates it from the real headers (build.rs writes
//! `$OUT_DIR/triton_sys.rs` for this package): the types, constants and the `extern "C"`
//! declarations whose server-side functions `host/server/` defines with identical signatures.

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
