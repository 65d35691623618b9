//! The backend loads and serves when the core library sits in a local symbol scope
//! (`dlopen(RTLD_NOW | RTLD_LOCAL)`), as Python's in-process `tritonserver` module (Triton's
//! OpenAI-compatible frontend) loads it: the backend's `DT_NEEDED libtritonserver.so` (build.rs)
//! brings the core into the backend's own scope. Before that link, loading failed with
//! "undefined symbol: TRITONBACKEND_BackendState". One process per scope, hence its own file
//! (tests/triton_core.rs has the global scope).

mod backend_so;
#[path = "triton_core/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "triton_host/support.rs"]
mod support;

use harness::{core, cpu_config, live_buffers, Input, ModelSpec, Scope, Server};
use support::{compressed_model, expected, model_dir, Gen};

#[test]
fn the_backend_loads_and_serves_with_the_core_in_a_local_scope() {
    let Some(api) = core(Scope::Local) else {
        return;
    };
    if model_dir().is_none() {
        return;
    }
    // The core is not in the global scope: its functions are not visible to a plain lookup.
    let name = std::ffi::CString::new("TRITONSERVER_ServerNew").unwrap();
    // SAFETY: RTLD_DEFAULT lookup of a valid name.
    let global = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    assert!(global.is_null(), "the core leaked into the global scope");

    let s = Server::start(
        api,
        &[ModelSpec {
            name: "unweight_llama".into(),
            config: cpu_config(),
        }],
        compressed_model(),
    );
    let g = Gen::greedy("The capital of France is", 8);
    let o = s
        .infer(
            "unweight_llama",
            "local",
            vec![
                Input::text("text_input", g.prompt),
                Input::i32("max_tokens", g.max_tokens),
                Input::bool("stream", true),
            ],
        )
        .unwrap();
    assert_eq!((o.finals, o.releases), (1, 1), "{o:?}");
    assert!(o.errors().is_empty(), "{:?}", o.errors());
    assert_eq!(o.text(), expected(&g).text);
    drop(s);
    assert_eq!(live_buffers(), 0);
}
