//! The backend under the Triton test host (`unweight-triton-host`, docs/test-host.md): the
//! built `libtriton_unweight.so` loaded with `dlopen(RTLD_NOW | RTLD_LOCAL)` as Triton loads it,
//! driven through its entry points, every response checked against the contract in
//! docs/triton.md ("Requests and responses") and every Triton ownership rule checked by the host
//! (a run with a violation exits 1 and lists it).
//!
//! Each test builds a temporary model repository: `unweight_llama/config.pbtxt` (the committed
//! `model_repository/unweight_llama/config.pbtxt`) and the version folder `1/` holding the test
//! model, compressed with `unweight compress` or linked as plain BF16. Instances run on the CPU
//! (`--instance-kind cpu`). Expected texts come from `unweight generate --json` with the same
//! prompt, seed and sampling settings.
//!
//! What the genuine Triton core checks better (its own refusal of requests that do not match the
//! model configuration, concurrency) is tested under it in tests/triton_core.rs;
//! docs/test-host.md says which checks are whose.
//!
//! Needs the real model (`.cache/smollm2`): without it the model tests print "skipped" loudly,
//! and fail instead when UNWEIGHT_REQUIRE_TEST_MODEL=1 (as `make test` and CI set it).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

mod backend_so;
#[path = "triton_host/support.rs"]
mod support;

use support::*;

// ----- host behaviour without the model -------------------------------------------------

#[test]
fn host_usage_errors_exit_2() {
    let repo = Repo::new(&committed_config(), Weights::Empty);
    // The committed config asks for a GPU; without --instance-kind cpu and with no GPU the
    // host refuses the config as Triton would.
    let out = Command::new(HOST)
        .arg("run")
        .arg("--backend")
        .arg(shared_object())
        .arg("--repository")
        .arg(repo.tmp.path())
        .args(["--model", MODEL, "--gpus", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid or unsupported gpu id 0"), "{err}");
    // A malformed requests file.
    let req = repo.tmp.path().join("bad.json");
    std::fs::write(&req, r#"[{"id": "a", "inputz": {}}]"#).unwrap();
    let out = Command::new(HOST)
        .arg("run")
        .arg("--backend")
        .arg(shared_object())
        .arg("--repository")
        .arg(repo.tmp.path())
        .args(["--model", MODEL, "--instance-kind", "cpu", "--requests"])
        .arg(&req)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inputz"));
}

#[test]
fn config_subcommand_prints_the_model_config_json() {
    let repo = Repo::new(&committed_config(), Weights::Empty);
    let out = Command::new(HOST)
        .arg("config")
        .arg("--repository")
        .arg(repo.tmp.path())
        .args(["--model", MODEL, "--instance-kind", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], MODEL);
    assert_eq!(v["backend"], "unweight");
    assert_eq!(v["model_transaction_policy"]["decoupled"], true);
    assert_eq!(v["instance_group"][0]["kind"], "KIND_CPU");
    assert_eq!(v["input"][0]["name"], "text_input");
    assert_eq!(v["input"][0]["data_type"], "TYPE_STRING");
}

// ----- scenario 1: lifecycle --------------------------------------------------------------

#[test]
fn loads_and_unloads_cleanly_without_requests() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let (code, report) = repo.run(json!([]), &[]);
    let report = clean(code, report);
    loaded(&report);
    assert_eq!(report["finalize_errors"], json!([]));
    assert_eq!(report["instances"][0]["name"], "unweight_llama_0");
    assert_eq!(report["instances"][0]["kind"], "KIND_CPU");
    assert_eq!(report["instances"][0]["life"], "Finalized");
}

#[test]
fn broken_configs_fail_model_initialize_naming_the_field() {
    let cases = [
        (
            with_parameter(&committed_config(), "no_such_parameter", "1"),
            "no_such_parameter",
        ),
        (
            committed_config().replace("decoupled: true", "decoupled: false"),
            "decoupled",
        ),
        (
            with_parameter(&committed_config(), "max_sequence_length", "-5"),
            "max_sequence_length",
        ),
    ];
    for (config, field) in cases {
        let repo = Repo::new(&config, Weights::Empty);
        let (code, report) = repo.run(json!([]), &[]);
        let report = clean(code, report);
        let e = &report["model_initialize_error"];
        assert_eq!(e["code"], "INVALID_ARG", "{field}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "the error names {field}: {e}"
        );
        // Triton finalizes the model it failed to initialize; no instance was created.
        assert_eq!(report["instances"][0]["life"], "Created");
    }
}

/// The backend's `tracing` events reach Triton's log with Triton's levels, source file and line;
/// VERBOSE ones only when Triton has verbose logging on, as it is at the moment of the event
/// (a level switched at run time, as `/v2/logging` does, is seen by events already logged
/// once). The committed config's KIND_GPU instance, with the GPU hidden from the backend, shows
/// the CPU fallback's WARN.
#[test]
fn logs_reach_tritons_log_at_their_levels() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let short = |id: &str| json!({"id": id, "inputs": {"text_input": {"data": [["Hello"]]}, "max_tokens": {"data": [[2]]}}});
    let mut late = short("late");
    late["delay_ms"] = json!(300);
    late["log_verbose"] = json!(1);
    let mut later = short("later");
    later["after"] = json!({"id": "late", "responses": 1});
    later["log_verbose"] = json!(0);
    let reqs = json!([
        short("good"),
        {"id": "bad", "inputs": {"text_input": {"data": [["Hello"]]}, "top_p": {"data": [[1.5]]}}},
        late,
        later,
    ]);
    let env = [("UNWEIGHT_FORCE_NO_GPU", "1")];
    let logs = |verbose: bool| {
        let extra: &[&str] = if verbose {
            &["--gpus", "1", "--log-verbose", "1"]
        } else {
            &["--gpus", "1"]
        };
        let (code, report) = repo.run_as(reqs.clone(), "config", &env, extra);
        let report = clean(code, report);
        loaded(&report);
        assert_eq!(report["instances"][0]["kind"], "KIND_GPU");
        report["logs"].as_array().unwrap().clone()
    };
    let has = |logs: &[Value], level: &str, parts: &[&str]| {
        logs.iter().any(|l| {
            l["level"] == level
                && l["file"].as_str().is_some_and(|f| f.starts_with("src/"))
                && l["line"].as_u64().is_some_and(|n| n > 0)
                && parts
                    .iter()
                    .all(|p| l["message"].as_str().unwrap_or("").contains(p))
        })
    };
    let verbose = logs(true);
    let show = || serde_json::to_string_pretty(&verbose).unwrap();
    assert!(
        has(&verbose, "INFO", &["backend initialized"]),
        "{}",
        show()
    );
    assert!(
        has(
            &verbose,
            "INFO",
            &["instance unweight_llama_0", "engine thread started"]
        ),
        "{}",
        show()
    );
    assert!(
        has(
            &verbose,
            "WARN",
            &["GPU 0 cannot be used", "running on the CPU engine"]
        ),
        "{}",
        show()
    );
    assert!(
        has(&verbose, "VERBOSE", &["admitted", "good"]),
        "{}",
        show()
    );
    assert!(
        has(&verbose, "VERBOSE", &["bad request", "top_p"]),
        "{}",
        show()
    );
    let quiet = logs(false);
    let show = || serde_json::to_string_pretty(&quiet).unwrap();
    assert!(has(&quiet, "INFO", &["backend initialized"]));
    // The admission of "good" ran with VERBOSE off; that of "late" at the same callsite after
    // VERBOSE was switched on, and that of "later" after it was switched off again.
    assert!(
        has(&quiet, "VERBOSE", &["admitted", "request=\"late\""]),
        "a level switched on at run time is seen: {}",
        show()
    );
    assert!(
        quiet
            .iter()
            .filter(|l| l["level"] == "VERBOSE")
            .all(|l| l["message"].as_str().unwrap().contains("request=\"late\"")),
        "VERBOSE events were formatted while Triton had verbose logging off: {}",
        show()
    );
}

/// `parameters.device: gpu` on a machine whose GPU cannot be used: the instance does not fall
/// back to the CPU but fails ModelInstanceInitialize with UNAVAILABLE saying why.
#[test]
fn a_required_gpu_that_cannot_be_used_fails_instance_initialize_with_unavailable() {
    if model_dir().is_none() {
        return;
    }
    let config = with_parameter(&committed_config(), "device", "gpu");
    let repo = Repo::new(&config, Weights::Plain);
    let env = [("UNWEIGHT_FORCE_NO_GPU", "1")];
    let (code, report) = repo.run_as(json!([]), "config", &env, &["--gpus", "1"]);
    let report = clean(code, report);
    assert!(report["model_initialize_error"].is_null());
    let errors = report["instance_initialize_errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors["unweight_llama_0"];
    assert_eq!(e["code"], "UNAVAILABLE", "{e}");
    let msg = e["message"].as_str().unwrap();
    for part in [
        "instance unweight_llama_0",
        "parameters.device is gpu",
        "GPU 0 cannot be used",
        "UNWEIGHT_FORCE_NO_GPU",
    ] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
}

/// A config with `max_batch_size: 0`: tensors without the batch dimension, in and out.
#[test]
fn an_unbatched_config_serves_tensors_without_the_batch_dimension() {
    if model_dir().is_none() {
        return;
    }
    let config = committed_config().replace("max_batch_size: 1", "max_batch_size: 0");
    assert!(config.contains("max_batch_size: 0"));
    let repo = Repo::new(&config, Weights::Plain);
    let g = Gen::greedy("The capital of France is", 8);
    // Gen's data is [[x]]: flattened, the host gives unbatched tensors the shape [1].
    let reqs = json!([g.request("stream", true), g.request("whole", false)]);
    let (code, report) = repo.run(reqs, &[]);
    let report = clean(code, report);
    loaded(&report);
    let want = expected(&g);
    let unbatched_scalar = |resp: &Value, name: &str| {
        let o = &resp["outputs"][name];
        assert_eq!(o["shape"], json!([1]), "{name}: {resp}");
        o["data"][0].clone()
    };

    let r = request(&report, "stream");
    completed(r);
    let rs = responses(r);
    assert_eq!(rs.len(), want.ids.len(), "one response per token");
    let mut streamed = vec![];
    for resp in rs {
        assert!(resp["error"].is_null(), "{resp}");
        assert_eq!(unbatched_scalar(resp, "num_output_tokens"), 1);
        assert_eq!(resp["outputs"]["output_ids"]["shape"], json!([1]));
        streamed.push(resp["outputs"]["output_ids"]["data"][0].as_i64().unwrap());
    }
    assert_eq!(streamed, want.ids);
    assert_eq!(r["text_output"], want.text);

    let r = request(&report, "whole");
    completed(r);
    let resp = &responses(r)[0];
    assert_eq!(
        unbatched_scalar(resp, "text_output"),
        format!("{}{}", g.prompt, want.text)
    );
    assert_eq!(
        unbatched_scalar(resp, "finish_reason"),
        finish_reason(&want.finish)
    );
    let n = want.prompt_ids.len() + want.ids.len();
    assert_eq!(resp["outputs"]["output_ids"]["shape"], json!([n]));
}

// ----- scenario 2: non-streaming generation ------------------------------------------------

#[test]
fn non_streaming_generation_matches_the_cli() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Compressed);
    let greedy = Gen::greedy("The capital of France is", 12);
    let sampled = Gen::sampled("Once upon a time", 12, 0.8, 42);
    let nucleus = Gen::sampled("def fibonacci(n):", 12, 1.0, 3).with_top(20, 0.9);
    let mut excluded = greedy.request("greedy", false);
    excluded["inputs"]["exclude_input_in_output"] = json!({"data": [[true]]});
    let mut sampled_req = sampled.request("sampled", false);
    sampled_req["inputs"]["exclude_input_in_output"] = json!({"data": [[true]]});
    // The same prompt as token ids: the ids come back in front of the generated ones.
    let want = expected(&greedy);
    let by_ids = json!({"id": "input-ids", "inputs": {
        "input_ids": {"data": [want.prompt_ids.clone()]},
        "max_tokens": {"data": [[greedy.max_tokens]]},
        "exclude_input_in_output": {"data": [[false]]},
    }});
    // A stop word ends generation and is not returned.
    let stopped = Gen::greedy("The capital of France is", 12).with_stop(".");
    // So does a stop token: the greedy continuation's fourth token, given as an id.
    let stop_token = want.ids[3];
    let by_stop_token = json!({"id": "stop-token", "inputs": {
        "input_ids": {"data": [want.prompt_ids.clone()]},
        "max_tokens": {"data": [[greedy.max_tokens]]},
        "stop_token_ids": {"data": [[stop_token, 49151]]},
    }});
    // Only the outputs asked for come back.
    let mut only_text = greedy.request("only-text", false);
    only_text["outputs"] = json!(["text_output"]);
    let reqs = json!([
        excluded,
        only_text,
        greedy.request("greedy-with-prompt", false),
        sampled_req,
        nucleus.request("top-k-top-p", false),
        by_ids,
        stopped.request("stop-word", false),
        by_stop_token,
    ]);
    let (code, report) = repo.run(reqs, &[]);
    let report = clean(code, report);
    loaded(&report);
    check_non_streaming(request(&report, "greedy"), &greedy, false);
    check_non_streaming(request(&report, "greedy-with-prompt"), &greedy, true);
    check_non_streaming(request(&report, "sampled"), &sampled, false);
    check_non_streaming(request(&report, "top-k-top-p"), &nucleus, true);

    let r = request(&report, "only-text");
    completed(r);
    let resp = &responses(r)[0];
    let names: Vec<&String> = resp["outputs"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["text_output"], "only the requested output");
    assert_eq!(
        scalar(resp, "text_output").as_str().unwrap(),
        format!("{}{}", greedy.prompt, want.text)
    );

    let r = request(&report, "input-ids");
    completed(r);
    let resp = &responses(r)[0];
    let mut all = want.prompt_ids.clone();
    all.extend(&want.ids);
    assert_eq!(ids(resp), all, "input_ids: prompt ids + generated ids");
    let text = scalar(resp, "text_output").as_str().unwrap();
    assert!(text.ends_with(&want.text), "input_ids: {text:?}");

    let r = request(&report, "stop-word");
    completed(r);
    let resp = &responses(r)[0];
    let want = expected(&stopped);
    assert_eq!(
        want.finish, "stop_string",
        "the CLI stops at the stop word: {want:?}"
    );
    assert_eq!(
        scalar(resp, "text_output").as_str().unwrap(),
        format!("{}{}", stopped.prompt, want.text),
        "stop word: text up to it"
    );
    assert_eq!(scalar(resp, "finish_reason"), "stop");

    let r = request(&report, "stop-token");
    completed(r);
    let resp = &responses(r)[0];
    let greedy_ids = expected(&greedy).ids;
    let first = greedy_ids.iter().position(|&t| t == stop_token).unwrap();
    assert_eq!(
        ids(resp),
        greedy_ids[..first],
        "stop token: the ids before it, without it"
    );
    assert_eq!(scalar(resp, "finish_reason"), "stop");
}

// ----- scenario 3: streaming -----------------------------------------------------------------

#[test]
fn streaming_sends_one_response_per_token() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let greedy = Gen::greedy("The capital of France is", 12);
    let sampled = Gen::sampled("Once upon a time", 10, 0.8, 7);
    // The prompt arrives in three buffers, split mid-element.
    let mut split = greedy.request("split", true);
    split["inputs"]["text_input"]["split_buffers"] = json!(3);
    let reqs = json!([
        greedy.request("greedy", true),
        sampled.request("sampled", true),
        split,
    ]);
    let (code, report) = repo.run(reqs, &[]);
    let report = clean(code, report);
    loaded(&report);
    check_streaming(request(&report, "greedy"), &greedy);
    check_streaming(request(&report, "sampled"), &sampled);
    check_streaming(request(&report, "split"), &greedy);
}

// ----- scenario 5: cancellation ----------------------------------------------------------------

#[test]
fn cancelling_a_stream_ends_it_with_cancelled_and_spares_the_others() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let long = Gen::greedy("Once upon a time", 24);
    let other = Gen::greedy("The capital of France is", 16);
    let mut victim = long.request("victim", true);
    victim["cancel_after_responses"] = json!(3);
    let mut early = long.request("cancelled-at-once", true);
    early["cancel_after_responses"] = json!(0);
    // A non-streaming request cancelled while it generates: one FINAL, CANCELLED.
    let mut quiet = Gen::greedy("Once upon a time", 400).request("non-streaming", false);
    quiet["cancel_after_ms"] = json!(300);
    let reqs = json!([
        victim,
        early,
        quiet,
        other.request("other", true),
        long.request("same-prompt", true)
    ]);
    let (code, report) = repo.run(reqs, &[]);
    let report = clean(code, report);
    for id in ["victim", "cancelled-at-once", "non-streaming"] {
        let r = request(&report, id);
        completed(r);
        let rs = responses(r);
        let last = rs.last().unwrap();
        assert_eq!(last["error"]["code"], "CANCELLED", "{id}: {last}");
        assert!(
            rs.len() < 24,
            "{id}: cancelled before the end ({} responses)",
            rs.len()
        );
        assert_eq!(r["cancelled"], true);
        assert_eq!(
            r["statistics"]["success"], false,
            "{id}: a cancelled request is a failure in Triton's statistics"
        );
    }
    assert_eq!(request(&report, "other")["statistics"]["success"], true);
    assert!(responses(request(&report, "victim")).len() >= 4);
    assert_eq!(responses(request(&report, "non-streaming")).len(), 1);
    check_streaming(request(&report, "other"), &other);
    check_streaming(request(&report, "same-prompt"), &long);
}

// ----- scenario 6: unload with requests in flight ------------------------------------------

#[test]
fn unloading_with_requests_in_flight_answers_each_with_unavailable() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let g = Gen::greedy("Once upon a time", 200);
    let mut ns = g.request("non-streaming", false);
    ns["inputs"]["max_tokens"] = json!({"data": [[200]]});
    let reqs = json!({
        "requests": [g.request("a", true), g.request("b", true), ns],
        "unload_after_responses": 4
    });
    let (code, report) = repo.run(reqs, &[]);
    let report = clean(code, report);
    assert_eq!(report["unloaded_after_responses"], 4);
    assert_eq!(report["finalize_errors"], json!([]));
    // ModelInstanceFinalize joined the engine thread although it was busy.
    no_thread_lingers(&report);
    for id in ["a", "b", "non-streaming"] {
        let r = request(&report, id);
        completed(r);
        let last = responses(r).last().unwrap();
        assert_eq!(last["error"]["code"], "UNAVAILABLE", "{id}: {last}");
    }
}

// ----- the queue limit --------------------------------------------------------------------

#[test]
fn requests_beyond_the_queue_limit_get_unavailable() {
    if model_dir().is_none() {
        return;
    }
    // One sequence at a time: the instance holds at most 4 requests (4 x
    // max_concurrent_sequences); six arrive in one Execute call.
    let config = with_parameter(&committed_config(), "max_concurrent_sequences", "1");
    let repo = Repo::new(&config, Weights::Plain);
    let g = Gen::greedy("The capital of France is", 8);
    let reqs: Vec<Value> = (0..6).map(|i| g.request(&format!("r{i}"), true)).collect();
    let (code, report) = repo.run(Value::Array(reqs), &[]);
    let report = clean(code, report);
    let mut refused = 0;
    for i in 0..6 {
        let r = request(&report, &format!("r{i}"));
        if responses(r).len() == 1 && responses(r)[0]["error"]["code"] == "UNAVAILABLE" {
            refused += 1;
            completed(r);
        } else {
            check_streaming(r, &g);
        }
    }
    assert_eq!(refused, 2, "4 accepted, 2 refused");
}

// ----- a small KV budget, paged -------------------------------------------------------------

#[test]
fn a_small_kv_budget_serves_sixteen_short_requests_at_once() {
    if model_dir().is_none() {
        return;
    }
    // 380Mi holds two sequences of the full 8192 tokens (23040 bytes a token on the CPU
    // engine's BF16 cache; 760Mi when it was f32) and 17294 tokens in all. Sixteen requests of
    // about 100 tokens: when the cache counted slots of the full length, two ran at a time and
    // eight were refused; paged, the cache counts the tokens held, so every one is accepted and
    // they run together.
    const BUDGET: u64 = 380 << 20;
    let config = with_parameter(&committed_config(), "kv_cache_bytes", "380Mi");
    let repo = Repo::new(&config, Weights::Plain);
    const LONG: [&str; 2] = [
        "In the small village at the edge of the forest, the baker rose before dawn every \
         morning to light the ovens. The smell of fresh bread drifted through the narrow \
         streets, waking the children, the fishermen and the old schoolteacher who lived above \
         the library. One winter morning, however, the ovens stayed cold, and nobody in the \
         village could remember a day without bread. What happened next was",
        "Write a short summary of the following notes. The committee met on Tuesday to discuss \
         the new library budget, the repairs to the bridge over the river, the summer festival \
         and the request from the football club for a second training field. After a long \
         debate the members agreed to fund the bridge first, to postpone the field until next \
         year and to ask volunteers to help with the festival. Summary:",
    ];
    let gens: Vec<Gen> = (0..16).map(|i| Gen::greedy(LONG[i % 2], 8)).collect();
    let reqs: Vec<Value> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| g.request(&format!("r{i}"), true))
        .collect();
    let (code, report) = repo.run(Value::Array(reqs), &[]);
    let report = clean(code, report);
    loaded(&report);
    for (i, g) in gens.iter().enumerate() {
        let r = request(&report, &format!("r{i}"));
        let first = &responses(r)[0];
        assert!(first["error"].is_null(), "r{i} was refused: {first}");
        check_streaming(r, g);
    }
    let spans: Vec<(f64, f64)> = (0..16)
        .map(|i| window(request(&report, &format!("r{i}"))))
        .collect();
    let most_at_once = spans
        .iter()
        .map(|&(t, _)| spans.iter().filter(|&&(a, b)| a <= t && t <= b).count())
        .max()
        .unwrap();
    assert!(
        most_at_once > 2,
        "at most {most_at_once} requests streamed at once: {spans:?}"
    );
    // The load log states the capacity: whole blocks of 16 tokens of BF16 keys and values,
    // 2 x layers x kv_heads x head_dim x 2 bytes a token (1080 blocks of SmolLM2).
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir().unwrap().join("config.json")).unwrap(),
    )
    .unwrap();
    let dim = |k: &str| cfg[k].as_u64().unwrap();
    let per_token = 2 * dim("num_hidden_layers") * dim("num_key_value_heads") * dim("head_dim") * 2;
    let tokens = BUDGET / (16 * per_token) * 16;
    assert_eq!(
        tokens / 8192,
        2,
        "the budget is meant to hold two full sequences"
    );
    let logs = report["logs"].as_array().unwrap();
    let memory = logs
        .iter()
        .filter_map(|l| l["message"].as_str())
        .find(|m| m.contains("KV capacity"))
        .unwrap_or_else(|| panic!("no memory line in {logs:?}"));
    assert!(
        memory.contains("weights 0.25 GiB (BF16 would be 0.25 GiB)")
            && memory.contains(&format!(
                "KV capacity {tokens} tokens, that is 2 sequences of 8192 tokens"
            )),
        "{memory}"
    );
}

// ----- scenario 7: bad requests ------------------------------------------------------------

#[test]
fn bad_requests_get_invalid_arg_naming_the_input_while_others_stream() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    // good-1 streams long enough for every bad request to arrive while it runs (128 tokens,
    // no end-of-sequence before); good-3 streams until an end-of-sequence token (29 tokens).
    let long = Gen::greedy("Once upon a time", 128);
    let good = Gen::greedy("The capital of France is", 16);
    let ends_early = Gen::greedy("The capital of France is", 128);
    let text = |s: &str| json!({"data": [[s]]});
    let i32s = |v: i64| json!({"data": [[v]]});
    let f32s = |v: Value| json!({"data": [[v]]});
    // (id, inputs, the input the message must name, skip Triton's core checks)
    let bad: Vec<(&str, Value, &str, bool)> = vec![
        (
            "missing-prompt",
            json!({"max_tokens": i32s(4)}),
            "text_input",
            false,
        ),
        (
            "max-tokens-fp32",
            json!({"text_input": text("Hi"), "max_tokens": {"datatype": "FP32", "data": [[4.0]]}}),
            "max_tokens",
            true,
        ),
        (
            "two-prompts",
            json!({"text_input": {"data": [["a", "b"]]}}),
            "text_input",
            true,
        ),
        (
            "batch-of-two",
            json!({"text_input": {"data": [["a"], ["b"]]}}),
            "text_input",
            true,
        ),
        (
            "empty-prompt",
            json!({"text_input": text("")}),
            "text_input",
            false,
        ),
        (
            "prompt-too-long",
            json!({"input_ids": {"data": [vec![42; 8200]]}}),
            "input_ids",
            false,
        ),
        (
            "max-tokens-0",
            json!({"text_input": text("Hi"), "max_tokens": i32s(0)}),
            "max_tokens",
            false,
        ),
        (
            "max-tokens-negative",
            json!({"text_input": text("Hi"), "max_tokens": i32s(-3)}),
            "max_tokens",
            false,
        ),
        (
            "max-tokens-huge",
            json!({"text_input": text("Hi"), "max_tokens": i32s(i32::MAX as i64)}),
            "max_tokens",
            false,
        ),
        (
            "temperature-nan",
            json!({"text_input": text("Hi"), "temperature": f32s(json!("nan"))}),
            "temperature",
            false,
        ),
        (
            "temperature-negative",
            json!({"text_input": text("Hi"), "temperature": f32s(json!(-0.5))}),
            "temperature",
            false,
        ),
        (
            "top-p-zero",
            json!({"text_input": text("Hi"), "top_p": f32s(json!(0.0))}),
            "top_p",
            false,
        ),
        (
            "top-p-above-one",
            json!({"text_input": text("Hi"), "top_p": f32s(json!(1.5))}),
            "top_p",
            false,
        ),
        (
            "top-k-negative",
            json!({"text_input": text("Hi"), "top_k": i32s(-1)}),
            "top_k",
            false,
        ),
        (
            "invalid-utf8",
            json!({"text_input": {"data": [[{"hex": "48fffe"}]]}}),
            "text_input",
            false,
        ),
        (
            "id-out-of-vocab",
            json!({"input_ids": {"data": [[1, 49152]]}}),
            "input_ids",
            false,
        ),
        (
            "id-negative",
            json!({"input_ids": {"data": [[-1]]}}),
            "input_ids",
            false,
        ),
        (
            "both-prompts",
            json!({"text_input": text("Hi"), "input_ids": {"data": [[1, 2]]}}),
            "input_ids",
            false,
        ),
        (
            "truncated-bytes",
            json!({"text_input": {"raw_hex": "0500000048", "shape": [1, 1]}}),
            "text_input",
            true,
        ),
        (
            "empty-stop-word",
            json!({"text_input": text("Hi"), "stop_words": {"data": [["x", ""]]}}),
            "stop_words",
            false,
        ),
        (
            "stop-token-out-of-vocab",
            json!({"text_input": text("Hi"), "stop_token_ids": {"data": [[2, 49152]]}}),
            "stop_token_ids",
            false,
        ),
        (
            "min-length-above-max",
            json!({"text_input": text("Hi"), "max_tokens": i32s(4), "min_length": i32s(5)}),
            "min_length",
            false,
        ),
    ];
    // One bad request in the same Execute call as the good ones.
    let mut reqs = vec![
        long.request("good-1", true),
        good.request("good-2", false),
        ends_early.request("good-3", true),
        json!({"id": "bad-with-good", "inputs": {"text_input": text("Hi"), "top_k": i32s(-2)}}),
    ];
    // The others arrive once good-1 has streamed two tokens, spread over 10 ms steps.
    let after = json!({"id": "good-1", "responses": 2});
    for (i, (id, inputs, _, skip)) in bad.iter().enumerate() {
        reqs.push(json!({
            "id": id, "inputs": inputs, "skip_core_checks": skip,
            "after": after, "delay_ms": 10 * i,
        }));
    }
    // An input in GPU memory (a client using CUDA shared memory): a capability this backend
    // lacks, so UNSUPPORTED rather than INVALID_ARG.
    reqs.push(json!({
        "id": "gpu-memory", "after": after, "delay_ms": 10 * bad.len(),
        "inputs": {"text_input": {"data": [["Hi"]], "memory_type": "GPU"}},
    }));
    let (code, report) = repo.run(Value::Array(reqs), &[]);
    let report = clean(code, report);
    let (c, msg) = single_error(request(&report, "gpu-memory"));
    assert_eq!(c, "UNSUPPORTED", "{msg}");
    assert!(
        msg.contains("input 'text_input'") && msg.contains("GPU memory"),
        "{msg}"
    );
    let (c, msg) = single_error(request(&report, "bad-with-good"));
    assert_eq!(c, "INVALID_ARG", "{msg}");
    assert!(msg.contains("top_k"), "{msg}");
    let together = report["executes"].as_array().unwrap().iter().any(|e| {
        let ids = e["requests"].as_array().unwrap();
        ["good-1", "good-2", "good-3", "bad-with-good"]
            .iter()
            .all(|id| ids.contains(&json!(id)))
    });
    assert!(
        together,
        "one Execute call held the good requests and bad-with-good"
    );
    // Each bad request was answered while good-1 was streaming: after its first response and
    // before its last.
    let (first, last) = window(request(&report, "good-1"));
    let ids = bad.iter().map(|b| b.0).chain(["gpu-memory"]);
    for id in ids {
        let t = responses(request(&report, id))[0]["t_ms"].as_f64().unwrap();
        assert!(
            first < t && t < last,
            "{id} answered at {t} ms, not while good-1 streamed ({first} .. {last} ms)"
        );
    }
    let mut failures = vec![];
    for (id, _, input, _) in &bad {
        let (c, msg) = single_error(request(&report, id));
        if c != "INVALID_ARG" || !msg.contains(input) {
            failures.push(format!(
                "{id}: {c} {msg:?} (expected INVALID_ARG naming '{input}')"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    check_streaming(request(&report, "good-1"), &long);
    check_streaming(request(&report, "good-3"), &ends_early);
    assert_eq!(expected(&ends_early).finish, "eos");
    check_non_streaming(request(&report, "good-2"), &good, true);
}

// ----- scenario 8: corrupt weights ------------------------------------------------------------

/// Absolute byte ranges of the stored tensors of a safetensors file, by stored name.
fn stored_ranges(path: &Path) -> Vec<(String, std::ops::Range<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), 8 + n + a..8 + n + b)
        })
        .collect()
}

#[test]
fn corrupt_weights_fail_model_initialize_naming_the_tensor() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Compressed);
    const TENSOR: &str = "model.layers.3.mlp.down_proj.weight";
    let file = repo.version_dir().join("model.safetensors");
    let real = std::fs::canonicalize(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let mut bytes = std::fs::read(&real).unwrap();
    let parts: Vec<_> = stored_ranges(&real)
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{TENSOR}#")))
        .collect();
    assert!(!parts.is_empty(), "{TENSOR} is not stored encoded");
    // The largest part (the coded exponents or the raw sign+mantissa bytes), in its middle.
    let (_, range) = parts.iter().max_by_key(|(_, r)| r.len()).unwrap();
    let at = range.start + range.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&file, bytes).unwrap();
    let (code, report) = repo.run(json!([]), &[]);
    let report = clean(code, report);
    let e = &report["model_initialize_error"];
    assert!(e.is_object(), "ModelInitialize must fail: {report}");
    assert!(
        e["message"].as_str().unwrap().contains(TENSOR),
        "the error names {TENSOR}: {e}"
    );
}

// ----- scenario 9: backend configuration ----------------------------------------------------

#[test]
fn backend_config_sets_the_default_max_tokens() {
    if model_dir().is_none() {
        return;
    }
    let repo = Repo::new(&committed_config(), Weights::Plain);
    let reqs =
        json!([{"id": "default", "inputs": {"text_input": {"data": [["Once upon a time"]]}}}]);
    for n in [3, 6] {
        let (code, report) = repo.run(
            reqs.clone(),
            &["--backend-config", &format!("default-max-tokens={n}")],
        );
        let report = clean(code, report);
        let r = request(&report, "default");
        completed(r);
        let resp = &responses(r)[0];
        assert_eq!(scalar(resp, "num_output_tokens"), &json!(n), "{resp}");
        let want = expected(&Gen::greedy("Once upon a time", n));
        assert_eq!(scalar(resp, "finish_reason"), finish_reason(&want.finish));
        assert!(scalar(resp, "text_output")
            .as_str()
            .unwrap()
            .ends_with(&want.text));
    }
    // A bad value fails TRITONBACKEND_Initialize naming the key; Triton still finalizes the
    // backend, and nothing may be left.
    let (code, report) = repo.run(reqs, &["--backend-config", "default-max-tokens=many"]);
    let report = clean(code, report);
    let e = &report["backend_initialize_error"];
    assert_eq!(e["code"], "INVALID_ARG", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("default-max-tokens"),
        "{e}"
    );
    assert!(report["model_initialize_error"].is_null());
    let r = request(&report, "default");
    assert_eq!(responses(r)[0]["source"], "host", "the model never loaded");
}

// ----- the host's own checks, against a misbehaving backend --------------------------------

/// `tests/triton_host/misbehaving_backend.c` built as `libtriton_bad.so` with a model
/// repository for it; `None` (and a loud skip) without a C compiler.
fn misbehaving_backend() -> Option<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::tempdir().unwrap();
    let so = tmp.path().join("libtriton_bad.so");
    let src = root().join("tests/triton_host/misbehaving_backend.c");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&so)
        .arg(&src)
        .output();
    match built {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "cc {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            println!("*** skipped: no C compiler to build the misbehaving backend ({e}) ***");
            return None;
        }
    }
    let m = tmp.path().join("repo/echo");
    std::fs::create_dir_all(m.join("1")).unwrap();
    std::fs::write(
        m.join("config.pbtxt"),
        r#"backend: "bad"
           max_batch_size: 1
           model_transaction_policy { decoupled: true }
           input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
           output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]
           instance_group [ { kind: KIND_CPU } ]"#,
    )
    .unwrap();
    Some((tmp, so))
}

/// Runs the host on the misbehaving backend: exit code, report (if written), stderr.
fn run_bad(tmp: &Path, so: &Path, ids: &[&str], mode: &str) -> (i32, Option<Value>, String) {
    let reqs: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "inputs": {"text_input": {"data": [[format!("echo {id}")]]}}}))
        .collect();
    let req = tmp.join("requests.json");
    std::fs::write(&req, serde_json::to_vec(&reqs).unwrap()).unwrap();
    let report = tmp.join("report.json");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(HOST)
        .arg("run")
        .arg("--backend")
        .arg(so)
        .arg("--repository")
        .arg(tmp.join("repo"))
        .args([
            "--model",
            "echo",
            "--max-requests-per-execute",
            "1",
            "--timeout",
            "3",
        ])
        .arg("--requests")
        .arg(&req)
        .arg("--report")
        .arg(&report)
        .env("BAD_BACKEND_MODE", mode)
        .output()
        .unwrap();
    let rep = std::fs::read_to_string(&report)
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap());
    (
        out.status.code().unwrap_or(-1),
        rep,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn violations(report: &Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn host_accepts_a_correct_backend() {
    let Some((tmp, so)) = misbehaving_backend() else {
        return;
    };
    let (code, report, stderr) = run_bad(tmp.path(), &so, &["good", "good-2"], "");
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    let report = clean(code, report);
    assert_eq!(request(&report, "good")["text_output"], "echo good");
    assert_eq!(request(&report, "good-2")["final_count"], 1);
}

#[test]
fn host_reports_each_broken_rule() {
    let Some((tmp, so)) = misbehaving_backend() else {
        return;
    };
    let ids = [
        "good",
        "double-release",
        "no-final",
        "second-final",
        "leak-error",
        "use-after-release",
        "no-stats",
        "execute-error",
        "wrong-size",
    ];
    let (code, report, stderr) = run_bad(
        tmp.path(),
        &so,
        &ids,
        "delete-backend-config,leak-model-config",
    );
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(code, 1, "violations make the host exit 1");
    let v = violations(&report);
    let expect = [
        ("use-after-release", "request 'double-release'"),
        ("missing-final", "request 'no-final'"),
        ("multiple-final", "request 'second-final'"),
        ("leaked-error", "never deleted"),
        ("timeout", "request 'no-final'"),
        (
            "use-after-release",
            "TRITONBACKEND_RequestId on request 'use-after-release'",
        ),
        ("statistics", "request 'no-stats' released without"),
        (
            "execute-error-ownership",
            "request 'execute-error' was released",
        ),
        ("output-content", "request 'wrong-size'"),
        ("message-ownership", "backend configuration"),
        ("leaked-message", "model configuration"),
    ];
    for (rule, what) in expect {
        assert!(
            v.iter()
                .any(|x| x.starts_with(&format!("{rule}:")) && x.contains(what)),
            "no {rule} violation about {what}:\n{v:#?}"
        );
    }
    assert!(
        !v.iter().any(|x| x.contains("request 'good'")),
        "the correct request is blamed:\n{v:#?}"
    );
    // Triton answered the request whose Execute failed, with Execute's error.
    let r = request(&report, "execute-error");
    assert_eq!(responses(r).last().unwrap()["source"], "host");
    assert_eq!(responses(r).last().unwrap()["error"]["code"], "INVALID_ARG");
}

#[test]
fn host_catches_reads_of_released_input_buffers() {
    let Some((tmp, so)) = misbehaving_backend() else {
        return;
    };
    let (code, _, stderr) = run_bad(tmp.path(), &so, &["good", "input-after-release"], "");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("use after RequestRelease")
            && stderr.contains("input 'text_input' of request 'input-after-release'"),
        "{stderr}"
    );
}

#[test]
fn host_catches_writes_past_an_output_buffer() {
    let Some((tmp, so)) = misbehaving_backend() else {
        return;
    };
    // "echo overrun" is 12 bytes, 16 with its length: the buffer ends exactly at the guard page.
    let (code, _, stderr) = run_bad(tmp.path(), &so, &["overrun"], "");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("access past the end of a buffer")
            && stderr.contains("output 'text_output' of response #1 of request 'overrun'"),
        "{stderr}"
    );
}
