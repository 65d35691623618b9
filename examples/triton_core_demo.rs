//! `make demo`'s serving step through the genuine Triton core: starts the core in-process (the
//! library `tests/triton_core/harness.rs` finds: `$TRITON_CORE_DIR`, `/opt/tritonserver/lib`,
//! `../shared/triton-core`), loads `libtriton_unweight.so` for a model repository of the given
//! weights and config.pbtxt (instance groups on the CPU), sends four requests at once (a greedy
//! stream, a seeded sampled stream, a whole greedy generation without the prompt, and a stream
//! cancelled after four responses), and prints one JSON report: each request's text, response
//! and FINAL counts and last error, and the backend's `unweight_*` metrics lines.
//!
//! Usage: `triton_core_demo <weights_dir> <config.pbtxt>`. Exit status 3 (and a line saying so)
//! when there is no core, so the demo can fall back to the stand-in host.

#[path = "../tests/backend_so/mod.rs"]
mod backend_so;
#[path = "../tests/triton_core/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use harness::{core, Input, ModelSpec, Scope, Server};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, config] = args.as_slice() else {
        eprintln!("usage: triton_core_demo <weights_dir> <config.pbtxt>");
        std::process::exit(2);
    };
    let Some(api) = core(Scope::Global) else {
        std::process::exit(3);
    };
    let config = std::fs::read_to_string(config).expect("reading config.pbtxt");
    let config: String = config
        .lines()
        .map(|l| {
            if l.starts_with("instance_group") {
                "instance_group [ { count: 1 kind: KIND_CPU } ]"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let model = "unweight_llama";
    let server = Server::start(
        api,
        &[ModelSpec {
            name: model.into(),
            config,
        }],
        &PathBuf::from(weights),
    );
    let base = |prompt: &str, n: i32, stream: bool| {
        vec![
            Input::text("text_input", prompt),
            Input::i32("max_tokens", n),
            Input::bool("stream", stream),
        ]
    };
    let mut sampled = base("Once upon a time", 24, true);
    sampled.extend([
        Input::f32("temperature", 0.8),
        Input::f32("top_p", 0.95),
        Input::u64("random_seed", 7),
    ]);
    let mut whole = base("Rust is a programming language that", 24, false);
    whole.push(Input::bool("exclude_input_in_output", true));
    let requests = vec![
        ("stream-greedy", base("The capital of France is", 24, true)),
        ("stream-sampled", sampled),
        ("whole", whole),
        ("cancelled", base("Count to ten:", 64, true)),
    ];
    let flights: Vec<_> = requests
        .into_iter()
        .map(|(id, inputs)| {
            let f = server
                .submit(model, id, inputs)
                .unwrap_or_else(|e| panic!("{id}: {} {}", e.code_name(), e.message));
            (id, f)
        })
        .collect();
    // Cancel the last one once it has streamed four responses, while the others still run.
    if let Some((_, f)) = flights.iter().find(|(id, _)| *id == "cancelled") {
        drop(f.wait_until(Duration::from_secs(300), |o| o.responses.len() >= 4));
        f.cancel();
    }
    let mut report = serde_json::Map::new();
    for (id, f) in flights {
        let o = f.finish();
        let last_error = o.responses.last().and_then(|r| r.error.clone());
        report.insert(
            id.into(),
            json!({
                "text_output": o.text(),
                "responses": o.responses.len(),
                "finals": o.finals,
                "releases": o.releases,
                "error": last_error.map(|e| json!({"code": e.code_name(), "message": e.message})),
            }),
        );
    }
    let metrics: Vec<String> = server
        .metrics()
        .lines()
        .filter(|l| l.starts_with("unweight_") || l.starts_with("nv_inference_request_success"))
        .map(str::to_string)
        .collect();
    drop(server);
    let out = json!({
        "requests": report,
        "metrics": metrics,
        "live_output_buffers": harness::live_buffers(),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
