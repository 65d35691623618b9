//! Helpers of tests/triton_host.rs: temporary model repositories, running the host, building
//! requests, the expected generations (from `unweight generate --json`) and the contract checks
//! on the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use serde_json::{json, Value};

pub const MODEL: &str = "unweight_llama";
pub const HOST: &str = env!("CARGO_BIN_EXE_unweight-triton-host");
pub const CLI: &str = env!("CARGO_BIN_EXE_unweight");

// ----- setup ------------------------------------------------------------------------------

pub use crate::backend_so::shared_object;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir() -> Option<PathBuf> {
    let dir = root().join(".cache/smollm2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var_os("UNWEIGHT_REQUIRE_TEST_MODEL").is_some_and(|v| v == "1") {
        panic!(
            "the test model is required (UNWEIGHT_REQUIRE_TEST_MODEL=1) but {} is missing",
            dir.display()
        );
    }
    println!(
        "*** skipped: no test model (run `unweight fetch-test-model --out .cache/smollm2`) ***"
    );
    None
}

/// The committed config.pbtxt.
pub fn committed_config() -> String {
    let p = root()
        .join("model_repository")
        .join(MODEL)
        .join("config.pbtxt");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `text` with parameter `key` set to `value` (replaced if present, else added).
pub fn with_parameter(text: &str, key: &str, value: &str) -> String {
    let line = format!("parameters {{ key: \"{key}\" value: {{ string_value: \"{value}\" }} }}");
    let needle = format!("key: \"{key}\"");
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !(l.trim_start().starts_with("parameters") && l.contains(&needle)))
        .map(str::to_string)
        .collect();
    out.push(line);
    out.join("\n") + "\n"
}

/// The test model compressed once per test binary run, into a fixed folder under cargo's
/// `CARGO_TARGET_TMPDIR` that each run empties first: a `TempDir` in a static is never dropped,
/// so it used to leave a 173 MB copy in /tmp after every run.
pub fn compressed_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = model_dir().expect("the test model");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("triton-host-compressed-smollm2");
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let o = Command::new(CLI)
            .arg("compress")
            .arg(&src)
            .arg("--out")
            .arg(&out)
            .arg("--no-progress")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "unweight compress: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// How the version folder is filled.
#[derive(Clone, Copy, PartialEq)]
pub enum Weights {
    /// Links to the plain BF16 test model.
    Plain,
    /// Links to the compressed test model.
    Compressed,
    /// Nothing: for configurations that must fail before the weights are read.
    Empty,
}

/// A temporary model repository.
pub struct Repo {
    pub tmp: tempfile::TempDir,
}

impl Repo {
    pub fn new(config: &str, weights: Weights) -> Repo {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join(MODEL);
        std::fs::create_dir_all(m.join("1")).unwrap();
        std::fs::write(m.join("config.pbtxt"), config).unwrap();
        let from = match weights {
            Weights::Plain => model_dir(),
            Weights::Compressed => Some(compressed_model().to_path_buf()),
            Weights::Empty => None,
        };
        if let Some(from) = from {
            for e in std::fs::read_dir(&from).unwrap() {
                let e = e.unwrap();
                std::os::unix::fs::symlink(e.path(), m.join("1").join(e.file_name())).unwrap();
            }
        }
        Repo { tmp }
    }

    pub fn version_dir(&self) -> PathBuf {
        self.tmp.path().join(MODEL).join("1")
    }

    /// Runs the host with every instance group rewritten to KIND_CPU; returns the exit code and
    /// the report.
    pub fn run(&self, requests: Value, extra: &[&str]) -> (i32, Value) {
        self.run_as(requests, "cpu", &[], extra)
    }

    /// Runs the host with `--instance-kind kind` and extra environment variables.
    pub fn run_as(
        &self,
        requests: Value,
        kind: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> (i32, Value) {
        let req = self.tmp.path().join("requests.json");
        std::fs::write(&req, serde_json::to_vec_pretty(&requests).unwrap()).unwrap();
        let report = self.tmp.path().join("report.json");
        let _ = std::fs::remove_file(&report);
        let out = Command::new(HOST)
            .arg("run")
            .arg("--backend")
            .arg(shared_object())
            .arg("--repository")
            .arg(self.tmp.path())
            .args([
                "--model",
                MODEL,
                "--instance-kind",
                kind,
                "--timeout",
                "300",
            ])
            .arg("--requests")
            .arg(&req)
            .arg("--report")
            .arg(&report)
            .args(extra)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        let text = std::fs::read_to_string(&report).unwrap_or_else(|_| {
            panic!(
                "the host wrote no report (exit {code}):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (code, serde_json::from_str(&text).unwrap())
    }
}

/// The report of a run that must have broken no rule.
pub fn clean(code: i32, report: Value) -> Value {
    let v = &report["violations"];
    assert!(
        code == 0 && v.as_array().is_some_and(|a| a.is_empty()),
        "host exited {code} with violations:\n{}",
        serde_json::to_string_pretty(v).unwrap()
    );
    assert_eq!(report["warnings"], json!([]), "host warnings");
    no_thread_lingers(&report);
    report
}

/// Every thread the backend started is gone after the unload (ModelInstanceFinalize joins the
/// engine threads), except the workers of rayon's global pool, named `uw-pool-N`
/// (src/triton/threads.rs): that pool lives as long as the process, in Triton too.
pub fn no_thread_lingers(report: &Value) {
    let left: Vec<&Value> = report["lingering_threads"]
        .as_array()
        .expect("lingering_threads in the report")
        .iter()
        .filter(|t| !t["name"].as_str().unwrap_or("").starts_with("uw-pool-"))
        .collect();
    assert!(
        left.is_empty(),
        "threads still running after the unload: {left:?}"
    );
}

/// A loaded model: the run must have initialized everything.
pub fn loaded(report: &Value) {
    for k in ["backend_initialize_error", "model_initialize_error"] {
        assert!(report[k].is_null(), "{k}: {}", report[k]);
    }
    assert_eq!(report["instance_initialize_errors"], json!({}));
}

// ----- requests ---------------------------------------------------------------------------

#[derive(Clone)]
pub struct Gen {
    pub prompt: &'static str,
    pub max_tokens: i32,
    pub temperature: f32,
    pub seed: u64,
    /// A stop word (`stop_words`, the CLI's `--stop`).
    pub stop: Option<&'static str>,
    /// `top_k` and `top_p` (0 and 1 = off).
    pub top_k: i32,
    pub top_p: f32,
}

impl Gen {
    pub fn greedy(prompt: &'static str, max_tokens: i32) -> Gen {
        Gen {
            prompt,
            max_tokens,
            temperature: 0.0,
            seed: 0,
            stop: None,
            top_k: 0,
            top_p: 1.0,
        }
    }

    pub fn sampled(prompt: &'static str, max_tokens: i32, temperature: f32, seed: u64) -> Gen {
        Gen {
            prompt,
            max_tokens,
            temperature,
            seed,
            stop: None,
            top_k: 0,
            top_p: 1.0,
        }
    }

    pub fn with_top(mut self, top_k: i32, top_p: f32) -> Gen {
        self.top_k = top_k;
        self.top_p = top_p;
        self
    }

    pub fn with_stop(mut self, stop: &'static str) -> Gen {
        self.stop = Some(stop);
        self
    }

    /// The request, with the batch dimension (`max_batch_size: 1`).
    pub fn request(&self, id: &str, stream: bool) -> Value {
        // The prompt is echoed in non-streaming responses (the committed config's
        // exclude_input_in_output parameter leaves it out by default).
        let mut inputs = json!({
            "text_input": {"data": [[self.prompt]]},
            "max_tokens": {"data": [[self.max_tokens]]},
            "stream": {"data": [[stream]]},
            "exclude_input_in_output": {"data": [[false]]},
        });
        if self.temperature > 0.0 {
            inputs["temperature"] = json!({"data": [[self.temperature]]});
            inputs["random_seed"] = json!({"data": [[self.seed]]});
        }
        if let Some(stop) = self.stop {
            inputs["stop_words"] = json!({"data": [[stop]]});
        }
        if self.top_k != 0 {
            inputs["top_k"] = json!({"data": [[self.top_k]]});
        }
        if self.top_p != 1.0 {
            inputs["top_p"] = json!({"data": [[self.top_p]]});
        }
        json!({"id": id, "inputs": inputs})
    }
}

/// What `unweight generate --json` produces (cached per settings).
#[derive(Clone, Debug)]
pub struct Expected {
    pub text: String,
    pub ids: Vec<i64>,
    pub finish: String,
    pub prompt_ids: Vec<i64>,
}

pub fn expected(g: &Gen) -> Expected {
    static CACHE: OnceLock<Mutex<HashMap<String, Expected>>> = OnceLock::new();
    let key = format!(
        "{}|{}|{}|{}|{:?}|{}|{}",
        g.prompt, g.max_tokens, g.temperature, g.seed, g.stop, g.top_k, g.top_p
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(e) = cache.lock().unwrap().get(&key) {
        return e.clone();
    }
    let model = model_dir().expect("the test model");
    let mut cmd = Command::new(CLI);
    cmd.arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt", g.prompt])
        .args(["--max-tokens", &g.max_tokens.to_string()])
        .args(["--temperature", &g.temperature.to_string()])
        .args(["--seed", &g.seed.to_string()])
        .args(["--top-k", &g.top_k.to_string()])
        .args(["--top-p", &g.top_p.to_string()])
        .arg("--json");
    if let Some(stop) = g.stop {
        cmd.args(["--stop", stop]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "unweight generate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = Expected {
        text: v["text"].as_str().unwrap().to_string(),
        ids: v["output_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect(),
        finish: v["finish_reason"].as_str().unwrap().to_string(),
        prompt_ids: v["prompt_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect(),
    };
    cache.lock().unwrap().insert(key, e.clone());
    e
}

/// The contract's finish reason for the CLI's.
pub fn finish_reason(cli: &str) -> &'static str {
    match cli {
        "max_tokens" | "context_full" => "length",
        _ => "stop",
    }
}

pub fn request<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no request {id} in the report"))
}

pub fn responses(r: &Value) -> &Vec<Value> {
    r["responses"].as_array().unwrap()
}

/// When (host milliseconds) request `r` got its first and its last response.
pub fn window(r: &Value) -> (f64, f64) {
    let rs = responses(r);
    let t = |x: &Value| x["t_ms"].as_f64().expect("t_ms");
    (t(&rs[0]), t(rs.last().unwrap()))
}

/// The single element of a one-element output.
pub fn scalar<'a>(resp: &'a Value, name: &str) -> &'a Value {
    let o = &resp["outputs"][name];
    let d = o["data"]
        .as_array()
        .unwrap_or_else(|| panic!("output {name} in {resp}"));
    assert_eq!(d.len(), 1, "{name}: {resp}");
    assert_eq!(
        o["shape"],
        json!([1, 1]),
        "{name}: shape with the batch dimension"
    );
    &d[0]
}

pub fn ids(resp: &Value) -> Vec<i64> {
    let o = &resp["outputs"]["output_ids"];
    let d: Vec<i64> = o["data"]
        .as_array()
        .unwrap_or_else(|| panic!("output_ids in {resp}"))
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    assert_eq!(o["shape"], json!([1, d.len()]));
    d
}

/// Every request ends with exactly one FINAL (the last response), is released, and reported
/// statistics.
pub fn completed(r: &Value) {
    let rs = responses(r);
    assert_eq!(r["final_count"], 1, "{}: one FINAL", r["id"]);
    assert_eq!(
        rs.last().unwrap()["final"],
        true,
        "{}: FINAL comes last",
        r["id"]
    );
    assert_eq!(r["released"], true, "{}", r["id"]);
    assert!(!r["statistics"].is_null(), "{}: statistics", r["id"]);
    let failed = rs.last().unwrap()["error"].is_object();
    assert_eq!(
        r["statistics"]["success"], !failed,
        "{}: statistics report success exactly when the FINAL carries no error",
        r["id"]
    );
    for resp in rs {
        assert_eq!(resp["source"], "backend", "{}: {resp}", r["id"]);
    }
}

/// A non-streaming success: one FINAL response with the whole text.
pub fn check_non_streaming(r: &Value, g: &Gen, prompt_included: bool) {
    completed(r);
    let rs = responses(r);
    assert_eq!(rs.len(), 1, "{}: exactly one response", r["id"]);
    let resp = &rs[0];
    assert!(resp["error"].is_null(), "{}: {}", r["id"], resp["error"]);
    let want = expected(g);
    let text = scalar(resp, "text_output").as_str().unwrap();
    let full = if prompt_included {
        format!("{}{}", g.prompt, want.text)
    } else {
        want.text.clone()
    };
    assert_eq!(text, full, "{}: text", r["id"]);
    assert_eq!(
        scalar(resp, "finish_reason"),
        finish_reason(&want.finish),
        "{}",
        r["id"]
    );
    assert_eq!(
        scalar(resp, "num_output_tokens"),
        &json!(want.ids.len()),
        "{}",
        r["id"]
    );
    let got = ids(resp);
    assert!(
        got.ends_with(&want.ids),
        "{}: output_ids {got:?} do not end with {:?}",
        r["id"],
        want.ids
    );
}

/// A streaming success: one response per token, deltas adding up to the whole text, the
/// finish reason only on the FINAL one. A stream that ends at an end-of-sequence token or a stop
/// word learns so only after its last token's response went out: its FINAL is then one more
/// response without a token (`num_output_tokens` 0, `finish_reason` `stop`).
pub fn check_streaming(r: &Value, g: &Gen) {
    completed(r);
    let want = expected(g);
    let rs = responses(r);
    let id = &r["id"];
    let tokenless_final = scalar(rs.last().unwrap(), "num_output_tokens") == 0;
    if tokenless_final {
        assert_eq!(
            finish_reason(&want.finish),
            "stop",
            "{id}: only a stop ends a stream with a response without a token"
        );
    }
    assert_eq!(
        rs.len() - usize::from(tokenless_final),
        want.ids.len(),
        "{id}: one response per generated token"
    );
    let mut all_ids = vec![];
    for (i, resp) in rs.iter().enumerate() {
        assert!(resp["error"].is_null(), "{id}: {}", resp["error"]);
        let last = i + 1 == rs.len();
        assert_eq!(resp["final"], last, "{id}: response {i}");
        let tokens = if last && tokenless_final { 0 } else { 1 };
        assert_eq!(
            scalar(resp, "num_output_tokens"),
            tokens,
            "{id}: response {i}"
        );
        let reason = scalar(resp, "finish_reason").as_str().unwrap();
        if last {
            assert_eq!(reason, finish_reason(&want.finish), "{id}");
        } else {
            assert_eq!(reason, "", "{id}: response {i}");
        }
        all_ids.extend(ids(resp));
    }
    assert_eq!(all_ids, want.ids, "{id}: streamed ids");
    assert_eq!(r["text_output"], want.text, "{id}: concatenated deltas");
}

/// The error of a request answered with exactly one FINAL error response by the backend.
pub fn single_error(r: &Value) -> (String, String) {
    let rs = responses(r);
    assert_eq!(rs.len(), 1, "{}: one response: {rs:?}", r["id"]);
    assert_eq!(rs[0]["final"], true, "{}", r["id"]);
    assert_eq!(rs[0]["source"], "backend", "{}: {}", r["id"], rs[0]);
    assert_eq!(r["released"], true, "{}", r["id"]);
    assert_eq!(
        r["statistics"]["success"], false,
        "{}: an error is reported as a failure",
        r["id"]
    );
    let e = &rs[0]["error"];
    assert!(
        e.is_object(),
        "{}: expected an error response, got {}",
        r["id"],
        rs[0]
    );
    (
        e["code"].as_str().unwrap().to_string(),
        e["message"].as_str().unwrap().to_string(),
    )
}
