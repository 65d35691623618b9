//! The backend under the genuine Triton core (`libtritonserver.so`, r26.06, CPU-only), started
//! in-process through its C API with the core loaded into the global scope, as the
//! `tritonserver` executable has it (tests/triton_core/harness.rs finds and loads it; the
//! local-scope load is tests/triton_core_local.rs). The model repository holds the compressed
//! real test model (SmolLM2-135M-Instruct); every generation is compared with what
//! `unweight generate` produces for the same settings.
//!
//! Each test starts its own server (one at a time) and checks, besides its subject, that every
//! request got exactly one FINAL and one release and that every output buffer was released.

mod backend_so;
#[path = "triton_core/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "triton_host/support.rs"]
mod support;

use std::time::Duration;

use harness::{core, cpu_config, live_buffers, Input, ModelSpec, Outcome, Scope, Server};
use support::{compressed_model, expected, finish_reason, model_dir, Gen};

const MODEL: &str = "unweight_llama";

/// The server with the compressed test model as `names`, or `None` (skipped loudly) when there
/// is no core or no test model.
fn server(names: &[&str]) -> Option<Server> {
    let api = core(Scope::Global)?;
    model_dir()?;
    let models: Vec<ModelSpec> = names
        .iter()
        .map(|n| ModelSpec {
            name: n.to_string(),
            config: cpu_config(),
        })
        .collect();
    Some(Server::start(api, &models, compressed_model()))
}

/// The request for `g` as the core's inputs (batch dimension 1).
fn inputs(g: &Gen, stream: bool) -> Vec<Input> {
    let mut v = vec![
        Input::text("text_input", g.prompt),
        Input::i32("max_tokens", g.max_tokens),
        Input::bool("stream", stream),
        Input::bool("exclude_input_in_output", true),
    ];
    if g.temperature > 0.0 {
        v.push(Input::f32("temperature", g.temperature));
        v.push(Input::u64("random_seed", g.seed));
    }
    if g.top_k != 0 {
        v.push(Input::i32("top_k", g.top_k));
    }
    if g.top_p != 1.0 {
        v.push(Input::f32("top_p", g.top_p));
    }
    v
}

/// One FINAL, one release, no error.
fn completed(id: &str, o: &Outcome) {
    assert_eq!(o.finals, 1, "{id}: exactly one FINAL: {o:?}");
    assert_eq!(o.releases, 1, "{id}: exactly one release: {o:?}");
    assert!(o.errors().is_empty(), "{id}: {:?}", o.errors());
}

/// The outcome is what `unweight generate` gives for `g`.
fn matches_cli(id: &str, o: &Outcome, g: &Gen, stream: bool) {
    completed(id, o);
    let want = expected(g);
    assert_eq!(o.text(), want.text, "{id}: text");
    let ids: Vec<i64> = o.ids().into_iter().map(i64::from).collect();
    assert_eq!(ids, want.ids, "{id}: output_ids");
    assert_eq!(
        o.finish_reason().as_deref(),
        Some(finish_reason(&want.finish)),
        "{id}: finish_reason"
    );
    if stream {
        assert_eq!(
            o.responses.len(),
            want.ids.len(),
            "{id}: one response per token"
        );
    } else {
        assert_eq!(o.responses.len(), 1, "{id}: one response");
    }
}

/// After everything finished: no output buffer the core allocated is still held.
fn no_leaks() {
    assert_eq!(live_buffers(), 0, "output buffers not released");
}

#[test]
fn streaming_and_whole_generations_equal_the_cli() {
    let Some(s) = server(&[MODEL]) else { return };
    let greedy = Gen::greedy("The capital of France is", 12);
    let sampled = Gen::sampled("Once upon a time", 12, 0.8, 42);
    let nucleus = Gen::sampled("def fibonacci(n):", 10, 1.0, 3).with_top(20, 0.9);
    for (g, stream) in [
        (&greedy, false),
        (&greedy, true),
        (&sampled, false),
        (&sampled, true),
        (&nucleus, true),
    ] {
        let id = format!("{}-{stream}", g.prompt);
        let o = s.infer(MODEL, &id, inputs(g, stream)).unwrap();
        matches_cli(&id, &o, g, stream);
    }
    no_leaks();
}

#[test]
fn concurrent_streams_each_get_what_they_would_get_alone() {
    let Some(s) = server(&[MODEL]) else { return };
    const PROMPTS: [&str; 4] = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
    ];
    // 8 different requests (4 prompts, greedy and sampled, different lengths), each twice: 8
    // runs of the CLI to compare with, 16 streams at once.
    let gens: Vec<Gen> = (0..16usize)
        .map(|i| {
            let k = i % 8;
            let max_tokens = 6 + k as i32;
            if k < 4 {
                Gen::greedy(PROMPTS[k % 4], max_tokens)
            } else {
                Gen::sampled(PROMPTS[k % 4], max_tokens, 0.7, 100 + k as u64)
            }
        })
        .collect();
    let flights: Vec<_> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| s.submit(MODEL, &format!("r{i}"), inputs(g, true)).unwrap())
        .collect();
    let mut spans = Vec::new();
    for (i, (f, g)) in flights.into_iter().zip(&gens).enumerate() {
        let o = f.finish();
        matches_cli(&format!("r{i}"), &o, g, true);
        spans.push((o.responses[0].at, o.responses.last().unwrap().at));
    }
    // They ran together (continuous batching), not one after the other: at some moment at
    // least 8 of them were streaming.
    let most_at_once = spans
        .iter()
        .map(|&(t, _)| spans.iter().filter(|&&(a, b)| a <= t && t <= b).count())
        .max()
        .unwrap();
    assert!(most_at_once >= 8, "at most {most_at_once} streams at once");
    no_leaks();
}

#[test]
fn cancelling_a_stream_ends_it_with_cancelled_and_spares_the_others() {
    let Some(s) = server(&[MODEL]) else { return };
    let long = Gen::greedy("Once upon a time", 64);
    let other = Gen::greedy("The capital of France is", 16);
    let victim = s.submit(MODEL, "victim", inputs(&long, true)).unwrap();
    let bystander = s.submit(MODEL, "other", inputs(&other, true)).unwrap();
    drop(victim.wait_until(Duration::from_secs(120), |o| o.responses.len() >= 3));
    victim.cancel();
    let o = victim.finish();
    assert_eq!(o.finals, 1, "{o:?}");
    assert_eq!(o.releases, 1, "{o:?}");
    let last = o.responses.last().expect("responses");
    assert_eq!(
        last.error.as_ref().map(|e| e.code_name()),
        Some("CANCELLED"),
        "the stream ends with CANCELLED: {last:?}"
    );
    assert!(
        o.responses.len() < 64,
        "cancelled before the end ({} responses)",
        o.responses.len()
    );
    matches_cli("other", &bystander.finish(), &other, true);
    no_leaks();
}

#[test]
fn unloading_with_requests_in_flight_ends_each_once_and_frees_the_model() {
    let Some(s) = server(&[MODEL, "second"]) else {
        return;
    };
    let g = Gen::greedy("Once upon a time", 48);
    let flights: Vec<_> = (0..3)
        .map(|i| {
            s.submit("second", &format!("u{i}"), inputs(&g, i != 2))
                .unwrap()
        })
        .collect();
    drop(flights[0].wait_until(Duration::from_secs(120), |o| !o.responses.is_empty()));
    s.unload("second");
    for (i, f) in flights.into_iter().enumerate() {
        let o = f.finish();
        assert_eq!(o.finals, 1, "u{i}: {o:?}");
        assert_eq!(o.releases, 1, "u{i}: {o:?}");
        // Either it ran to its end or the backend ended it with UNAVAILABLE at finalize.
        if let Some(e) = o.errors().first() {
            assert_eq!(e.code_name(), "UNAVAILABLE", "u{i}: {e:?}");
        } else {
            matches_cli(&format!("u{i}"), &o, &g, i != 2);
        }
    }
    // Every request object is deleted: the core can finish the unload.
    s.wait_for_state("second", "UNAVAILABLE", Duration::from_secs(60));
    let refused = s
        .submit("second", "late", inputs(&g, true))
        .err()
        .expect("an unloaded model refuses requests");
    assert!(
        refused.message.contains("second"),
        "names the model: {refused:?}"
    );
    // The other model was not disturbed.
    let other = Gen::greedy("The capital of France is", 6);
    let o = s.infer(MODEL, "after", inputs(&other, true)).unwrap();
    matches_cli("after", &o, &other, true);
    no_leaks();
}

#[test]
fn bad_requests_are_refused_by_the_core_or_the_backend_while_others_stream() {
    let Some(s) = server(&[MODEL]) else { return };
    let good = Gen::greedy("The capital of France is", 16);
    let running = s.submit(MODEL, "good", inputs(&good, true)).unwrap();

    // Refused by the core before the backend sees them: ServerInferAsync itself fails.
    let undeclared = vec![
        Input::text("text_input", "hi"),
        Input::i32("no_such_input", 1),
    ];
    let wrong_type = vec![
        Input::text("text_input", "hi"),
        Input::f32("max_tokens", 4.0),
    ];
    let mut wrong_shape = Input::i32("max_tokens", 4);
    wrong_shape.shape = vec![1, 1, 1];
    for (what, req) in [
        ("an undeclared input", undeclared),
        ("a wrong datatype", wrong_type),
        (
            "a wrong shape",
            vec![Input::text("text_input", "hi"), wrong_shape],
        ),
    ] {
        let e = s.submit(MODEL, what, req).err().unwrap_or_else(|| {
            panic!("the core accepted {what}");
        });
        assert_eq!(e.code_name(), "INVALID_ARG", "{what}: {e:?}");
    }
    let e = s
        .submit("no_such_model", "x", vec![Input::text("text_input", "hi")])
        .err()
        .expect("an unknown model is refused");
    assert!(e.message.contains("no_such_model"), "{e:?}");

    // Accepted by the core, refused by the backend with a response naming the input.
    for (what, req, names) in [
        ("no prompt", vec![Input::i32("max_tokens", 4)], "text_input"),
        (
            "a negative max_tokens",
            vec![
                Input::text("text_input", "hi"),
                Input::i32("max_tokens", -3),
            ],
            "max_tokens",
        ),
        (
            "a temperature that is not a number",
            vec![
                Input::text("text_input", "hi"),
                Input::f32("temperature", f32::NAN),
            ],
            "temperature",
        ),
    ] {
        let o = s.infer(MODEL, what, req).unwrap();
        assert_eq!(o.finals, 1, "{what}: {o:?}");
        assert_eq!(o.releases, 1, "{what}: {o:?}");
        let errors = o.errors();
        assert_eq!(errors.len(), 1, "{what}: {o:?}");
        assert_eq!(errors[0].code_name(), "INVALID_ARG", "{what}: {o:?}");
        assert!(
            errors[0].message.contains(names),
            "{what}: the message names {names}: {}",
            errors[0].message
        );
    }
    matches_cli("good", &running.finish(), &good, true);
    no_leaks();
}

/// The value of `name{model="<model>",version="1"}` in Prometheus text.
fn metric(text: &str, name: &str, model: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let (n, labels) = key.split_once('{')?;
        (n == name
            && labels.contains(&format!("model=\"{model}\""))
            && labels.contains("version=\"1\""))
        .then(|| value.parse().ok())?
    })
}

/// Bytes of tensor data in a safetensors file (its size less the header).
fn safetensors_data_bytes(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header
}

#[test]
fn custom_metrics_count_sequences_tokens_kv_and_weights() {
    let Some(api) = core(Scope::Global) else {
        return;
    };
    let Some(plain) = model_dir() else { return };
    let config = support::with_parameter(
        &support::with_parameter(&cpu_config(), "max_concurrent_sequences", "4"),
        "max_sequence_length",
        "512",
    );
    let s = Server::start(
        api,
        &[ModelSpec {
            name: MODEL.into(),
            config,
        }],
        compressed_model(),
    );
    let m = |text: &str, name: &str| {
        metric(text, name, MODEL).unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    let before = s.metrics();
    assert_eq!(m(&before, "unweight_kv_cache_capacity_tokens"), 4.0 * 512.0);
    for name in [
        "unweight_active_sequences",
        "unweight_queued_sequences",
        "unweight_kv_cache_used_tokens",
        "unweight_prompt_tokens_total",
        "unweight_generated_tokens_total",
    ] {
        assert_eq!(m(&before, name), 0.0, "{name} before any request");
    }
    let bf16 = m(&before, "unweight_weight_bf16_bytes");
    assert_eq!(
        bf16,
        safetensors_data_bytes(&plain.join("model.safetensors")) as f64
    );
    let stored = m(&before, "unweight_weight_stored_bytes");
    let on_disk: u64 = std::fs::read_dir(compressed_model())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        stored > 0.5 * bf16 && stored < bf16 && stored <= on_disk as f64,
        "stored {stored}, bf16 {bf16}, files {on_disk}"
    );
    assert!(
        before.contains("# TYPE unweight_prompt_tokens_total counter"),
        "{before}"
    );

    // While a stream runs: one active sequence holding its tokens in the KV cache.
    let g = Gen::greedy("Once upon a time", 40);
    let f = s.submit(MODEL, "watched", inputs(&g, true)).unwrap();
    drop(f.wait_until(Duration::from_secs(120), |o| o.responses.len() >= 5));
    let during = s.metrics();
    assert_eq!(m(&during, "unweight_active_sequences"), 1.0, "{during}");
    let used = m(&during, "unweight_kv_cache_used_tokens");
    let want = expected(&g);
    // The cache holds the prompt and every generated token but the last (fed by the next step).
    assert!(
        used >= (want.prompt_ids.len() + 4) as f64 && used <= (want.prompt_ids.len() + 39) as f64,
        "KV tokens in use {used}"
    );
    let o = f.finish();
    completed("watched", &o);
    // Two more, one queued behind nothing: the counters add up.
    let short = Gen::greedy("The capital of France is", 7);
    let o2 = s.infer(MODEL, "short", inputs(&short, false)).unwrap();
    completed("short", &o2);

    let after = s.metrics();
    let prompts = (want.prompt_ids.len() + expected(&short).prompt_ids.len()) as f64;
    let generated = (o.ids().len() + o2.ids().len()) as f64;
    assert_eq!(m(&after, "unweight_prompt_tokens_total"), prompts);
    assert_eq!(m(&after, "unweight_generated_tokens_total"), generated);
    for name in [
        "unweight_active_sequences",
        "unweight_queued_sequences",
        "unweight_kv_cache_used_tokens",
    ] {
        assert_eq!(m(&after, name), 0.0, "{name} after the requests");
    }
    // Triton's own per-model metrics come from the statistics the backend reports.
    let success = after
        .lines()
        .find(|l| l.starts_with("nv_inference_request_success{") && l.contains(MODEL))
        .unwrap_or_else(|| panic!("no nv_inference_request_success:\n{after}"));
    assert!(success.ends_with(" 2"), "{success}");
    no_leaks();
}

/// `unweight generate --json` on the plain test model with `args`: (text, generated ids).
fn cli_generate(args: &[&str]) -> (String, Vec<i64>) {
    let model = model_dir().expect("the test model");
    let o = std::process::Command::new(support::CLI)
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "unweight generate {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids = v["output_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    (v["text"].as_str().unwrap().to_string(), ids)
}

/// The inputs Triton's OpenAI-compatible frontend builds for a non-vLLM model
/// (`_create_trtllm_inference_request` in its engine/utils/triton.py): `[[x]]`-shaped
/// text_input, stream and max_tokens; stop_words as `[[...]]`; top_p, frequency_penalty,
/// presence_penalty and temperature whenever the OpenAI request has them (its schema gives
/// top_p, temperature 1 and both penalties 0 by default, so they are always sent); seed when
/// given. Never exclude_input_in_output: the model's parameter decides.
struct OpenAi<'a> {
    prompt: &'a str,
    stream: bool,
    max_tokens: i32,
    stop: &'a [&'a str],
    top_p: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    seed: Option<u64>,
    temperature: f32,
}

impl OpenAi<'_> {
    fn inputs(&self) -> Vec<Input> {
        let mut v = vec![
            Input::text("text_input", self.prompt),
            Input::bool("stream", self.stream),
            Input::i32("max_tokens", self.max_tokens),
        ];
        if !self.stop.is_empty() {
            v.push(Input::texts("stop_words", self.stop));
        }
        v.push(Input::f32("top_p", self.top_p));
        v.push(Input::f32("frequency_penalty", self.frequency_penalty));
        v.push(Input::f32("presence_penalty", self.presence_penalty));
        if let Some(seed) = self.seed {
            v.push(Input::u64("seed", seed));
        }
        v.push(Input::f32("temperature", self.temperature));
        v
    }

    /// The same settings as `unweight generate` arguments.
    fn cli_args(&self) -> Vec<String> {
        let mut a = vec![
            "--max-tokens".to_string(),
            self.max_tokens.to_string(),
            "--top-p".into(),
            self.top_p.to_string(),
            "--frequency-penalty".into(),
            self.frequency_penalty.to_string(),
            "--presence-penalty".into(),
            self.presence_penalty.to_string(),
            "--seed".into(),
            self.seed.unwrap_or(0).to_string(),
            "--temperature".into(),
            self.temperature.to_string(),
        ];
        for s in self.stop {
            a.push("--stop".into());
            a.push(s.to_string());
        }
        a
    }
}

/// What the frontend does with the responses: concatenates each one's text_output (streaming),
/// or reads the one response (non-streaming, where a second, empty FINAL would be allowed).
fn frontend_text(id: &str, o: &Outcome, stream: bool) -> String {
    completed(id, o);
    if !stream {
        assert_eq!(o.responses.len(), 1, "{id}: one response");
    }
    for r in &o.responses {
        let (shape, _) = &r.outputs["text_output"];
        assert_eq!(shape, &vec![1, 1], "{id}: one string per response");
    }
    o.text()
}

#[test]
fn openai_frontend_requests_get_the_cli_completions() {
    let Some(s) = server(&[MODEL]) else { return };
    // Text completions, as /v1/completions sends them.
    let completions = [
        OpenAi {
            prompt: "The capital of France is",
            stream: false,
            max_tokens: 16,
            stop: &["."],
            top_p: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            temperature: 0.0,
        },
        OpenAi {
            prompt: "Once upon a time",
            stream: true,
            max_tokens: 12,
            stop: &[],
            top_p: 0.95,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: Some(11),
            temperature: 0.8,
        },
        // Penalties: greedy text that repeats itself without them.
        OpenAi {
            prompt: "one one one one one one",
            stream: false,
            max_tokens: 12,
            stop: &[],
            top_p: 1.0,
            frequency_penalty: 1.5,
            presence_penalty: 0.5,
            seed: Some(3),
            temperature: 0.0,
        },
    ];
    for (i, c) in completions.iter().enumerate() {
        let id = format!("completion-{i}");
        let o = s.infer(MODEL, &id, c.inputs()).unwrap();
        let args = c.cli_args();
        let mut all: Vec<&str> = vec!["--prompt", c.prompt];
        all.extend(args.iter().map(String::as_str));
        let (want, _) = cli_generate(&all);
        assert_eq!(frontend_text(&id, &o, c.stream), want, "{id}");
    }
    // The penalties change the greedy text.
    let (plain, plain_ids) =
        cli_generate(&["--prompt", completions[2].prompt, "--max-tokens", "12"]);
    let args = completions[2].cli_args();
    let mut a: Vec<&str> = vec!["--prompt", completions[2].prompt];
    a.extend(args.iter().map(String::as_str));
    let (penalized, penalized_ids) = cli_generate(&a);
    assert_ne!(plain_ids, penalized_ids, "{plain:?} vs {penalized:?}");

    // A chat completion: the frontend renders the model's chat template itself and sends the
    // text; the same as `unweight generate --chat`.
    let tok = triton_unweight::engine::text::TextTokenizer::from_dir(compressed_model()).unwrap();
    let rendered = tok
        .apply_chat_template(
            &[triton_unweight::engine::text::ChatMessage::user(
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    for stream in [false, true] {
        let chat = OpenAi {
            prompt: &rendered,
            stream,
            max_tokens: 24,
            stop: &[],
            top_p: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            temperature: 0.0,
        };
        let id = format!("chat-{stream}");
        let o = s.infer(MODEL, &id, chat.inputs()).unwrap();
        let (want, _) = cli_generate(&[
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "24",
        ]);
        assert_eq!(frontend_text(&id, &o, stream), want, "{id}");
    }

    // The core itself refuses what the frontend sends for tool calls (guided decoding): the
    // model does not declare those inputs.
    let mut tools = completions[0].inputs();
    tools.push(Input::text("guided_decoding_guide_type", "json_schema"));
    let e = s.submit(MODEL, "tools", tools).err().expect("refused");
    assert_eq!(e.code_name(), "INVALID_ARG", "{e:?}");
    no_leaks();
}
