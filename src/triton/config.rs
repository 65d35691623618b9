//! The model configuration: Triton's `config.pbtxt`, as the JSON that `TRITONBACKEND_ModelConfig`
//! returns, parsed into a validated [`ModelConfig`].
//!
//! Triton prints the protobuf with its field names and defaults; parameters arrive as
//! `"parameters": {"key": {"string_value": "..."}}` and instance kinds as `"KIND_GPU"`. Fields this
//! backend does not read are ignored; unknown *parameters* are errors (a typo must not silently
//! fall back to a default). Every error names the field by its JSON path. No FFI here: the parser
//! is tested on JSON fixtures.
//!
//! Parameters (all optional):
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `weights_dir` | checkpoint directory (plain or compressed); relative paths are taken from the version folder | the version folder |
//! | `max_concurrent_sequences` | sequences decoded together per instance (KV-cache slots) | 64 |
//! | `max_sequence_length` | tokens per sequence, prompt included | the model's `max_position_embeddings` |
//! | `max_prefill_tokens` | prompt tokens prefilled per engine step at most, over all prompts: longer prompts are prefilled in chunks while running streams keep decoding (smaller: shorter stalls of running streams while short prompts are admitted, longer time to first token); the only limit when no stream is decoding | 256 |
//! | `max_step_slowdown` | while streams decode, a step carrying a long prompt's chunk is planned to take at most this many times a decode-only step (a number ≥ 1; chunks sized by their predicted cost, calibrated on measured step times), so running streams' gaps between tokens stay within about this multiple of their plain decode gap while a long prompt is admitted (larger: shorter time to first token for long prompts; a paced step takes at least 8 prompt tokens); `off`: `max_prefill_tokens` alone for every prompt | 2 |
//! | `short_prompt_tokens` | prompts of at most this many tokens are never paced, only `max_prefill_tokens` limits them, so a burst of short requests starts together (whole prompts in one step while the cap has room; the running streams wait that step); `0` paces every prompt | `max_prefill_tokens` |
//! | `kv_cache_bytes` | KV-cache budget per instance, bytes (suffixes `K`, `M`, `G`, `Ki`, `Mi`, `Gi` allowed) | CPU: `max_concurrent_sequences` × `max_sequence_length` tokens; GPU: `kv_cache_fraction` |
//! | `kv_cache_fraction` | GPU, without `kv_cache_bytes`: fraction of the device memory left after weights and work buffers given to the KV cache, in (0, 1] | 0.9 |
//! | `device` | `auto` (the instance group's kind decides), `cpu` or `gpu` | `auto` |
//! | `exclude_input_in_output` | `true` or `false`: whether a non-streaming response leaves the prompt out when the request has no `exclude_input_in_output` input (TensorRT-LLM's model parameter of that name; Triton's OpenAI-compatible frontend never sends the input) | `false` |
//! | `plan` | GPU only: `auto` (the weights directory's tuning table for this GPU, tuned and saved at the first load), `compressed` (untuned defaults) or `baseline` (uncompressed BF16 + cuBLAS) | `auto` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::TritonError;
pub use crate::device::cuda::PlanChoice;

/// Default of `max_concurrent_sequences`.
pub const DEFAULT_MAX_CONCURRENT_SEQUENCES: usize = 64;

/// Where an instance runs, as the instance group says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceKind {
    /// `KIND_AUTO`: Triton picks GPU when there is one.
    Auto,
    /// `KIND_CPU`: the CPU engine.
    Cpu,
    /// `KIND_GPU`: the CUDA engine on the instance's device.
    Gpu,
}

/// The `device` parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Follow the instance group's kind.
    Auto,
    /// Always the CPU engine.
    Cpu,
    /// Always the CUDA engine.
    Gpu,
}

/// One `instance_group` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceGroup {
    /// Its kind.
    pub kind: InstanceKind,
    /// Instances of this group (per GPU listed, for `KIND_GPU`).
    pub count: u32,
    /// GPU ids; empty means all (Triton's rule).
    pub gpus: Vec<i32>,
}

/// Default of `kv_cache_fraction` (as vLLM's `gpu_memory_utilization`).
pub const DEFAULT_KV_CACHE_FRACTION: f64 = 0.9;

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The model's name.
    pub name: String,
    /// `max_batch_size` (0 or more; inputs are `[[x]]`-shaped when ≥ 1).
    pub max_batch_size: u32,
    /// The checkpoint directory, resolved.
    pub weights_dir: PathBuf,
    /// Sequences decoded together per instance.
    pub max_concurrent_sequences: usize,
    /// Tokens per sequence; `None` for the model's own limit.
    pub max_sequence_length: Option<usize>,
    /// Prompt tokens prefilled per engine step at most (the chunk cap of chunked prefill).
    pub max_prefill_tokens: usize,
    /// The engine's `max_step_slowdown`: `None` when `off`.
    pub max_step_slowdown: Option<f64>,
    /// The engine's `short_prompt_tokens`: prompts it never paces.
    pub short_prompt_tokens: usize,
    /// KV-cache budget per instance in bytes; `None` for the defaults.
    pub kv_cache_bytes: Option<u64>,
    /// GPU instances without `kv_cache_bytes`: the fraction of the device memory left after
    /// weights and work buffers that the KV cache takes.
    pub kv_cache_fraction: f64,
    /// The `device` parameter.
    pub device: DeviceChoice,
    /// The `plan` parameter (GPU instances).
    pub plan: PlanChoice,
    /// The `exclude_input_in_output` parameter: the default of the input of that name.
    pub exclude_input_in_output: bool,
    /// The instance groups.
    pub instance_groups: Vec<InstanceGroup>,
}

const KNOWN_PARAMETERS: [&str; 11] = [
    "weights_dir",
    "max_concurrent_sequences",
    "max_sequence_length",
    "max_prefill_tokens",
    "max_step_slowdown",
    "short_prompt_tokens",
    "kv_cache_bytes",
    "kv_cache_fraction",
    "device",
    "plan",
    "exclude_input_in_output",
];

impl ModelConfig {
    /// Parses and validates Triton's model configuration JSON. `version_dir` is the model's
    /// version folder (`<repository>/<model>/<version>`), the default and the base of a
    /// relative `weights_dir`.
    pub fn from_json(json: &str, version_dir: &Path) -> Result<Self, TritonError> {
        let root: Value = serde_json::from_str(json)
            .map_err(|e| TritonError::config("(root)", format!("not valid JSON: {e}")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| TritonError::config("(root)", "not a JSON object"))?;

        let name = match obj.get("name") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(TritonError::config("name", "expected a string")),
        };
        let max_batch_size = match obj.get("max_batch_size") {
            None => 0,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    TritonError::config("max_batch_size", format!("expected 0 or more, got {v}"))
                })?,
        };
        let decoupled = obj
            .get("model_transaction_policy")
            .and_then(|p| p.get("decoupled"))
            .map(|d| {
                d.as_bool().ok_or_else(|| {
                    TritonError::config(
                        "model_transaction_policy.decoupled",
                        format!("expected a boolean, got {d}"),
                    )
                })
            })
            .transpose()?
            .unwrap_or(false);
        if !decoupled {
            return Err(TritonError::config(
                "model_transaction_policy.decoupled",
                "must be true: this backend streams tokens (model_transaction_policy { decoupled: true })",
            ));
        }

        let params = parameters(obj.get("parameters"))?;
        let weights_dir = match params.get("weights_dir") {
            None => version_dir.to_path_buf(),
            Some(s) if s.trim().is_empty() => {
                return Err(TritonError::config(
                    "parameters.weights_dir",
                    "empty; leave it out to use the version folder",
                ))
            }
            Some(s) => version_dir.join(s),
        };
        let max_concurrent_sequences = match params.get("max_concurrent_sequences") {
            None => DEFAULT_MAX_CONCURRENT_SEQUENCES,
            Some(s) => positive("parameters.max_concurrent_sequences", s)?,
        };
        let max_sequence_length = params
            .get("max_sequence_length")
            .map(|s| positive("parameters.max_sequence_length", s))
            .transpose()?;
        let max_prefill_tokens = match params.get("max_prefill_tokens") {
            None => crate::engine::DEFAULT_PREFILL_CHUNK,
            Some(s) => positive("parameters.max_prefill_tokens", s)?,
        };
        let max_step_slowdown = match params.get("max_step_slowdown").map(|s| s.trim()) {
            None => Some(crate::engine::DEFAULT_STEP_SLOWDOWN),
            Some(s) if s.eq_ignore_ascii_case("off") => None,
            Some(s) => match s.parse::<f64>() {
                Ok(f) if f.is_finite() && f >= 1.0 => Some(f),
                _ => {
                    return Err(TritonError::config(
                        "parameters.max_step_slowdown",
                        format!("expected a number of at least 1, or off, got {s:?}"),
                    ))
                }
            },
        };
        let short_prompt_tokens = match params.get("short_prompt_tokens") {
            None => max_prefill_tokens,
            Some(s) => s.trim().parse::<usize>().map_err(|_| {
                TritonError::config(
                    "parameters.short_prompt_tokens",
                    format!("expected a non-negative integer, got {s:?}"),
                )
            })?,
        };
        let kv_cache_bytes = params
            .get("kv_cache_bytes")
            .map(|s| bytes("parameters.kv_cache_bytes", s))
            .transpose()?;
        let kv_cache_fraction = match params.get("kv_cache_fraction") {
            None => DEFAULT_KV_CACHE_FRACTION,
            Some(s) => match s.trim().parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 1.0 => f,
                _ => {
                    return Err(TritonError::config(
                        "parameters.kv_cache_fraction",
                        format!("expected a number in (0, 1], got {s:?}"),
                    ))
                }
            },
        };
        let device = match params.get("device").map(|s| s.trim().to_ascii_lowercase()) {
            None => DeviceChoice::Auto,
            Some(s) => match s.as_str() {
                "auto" => DeviceChoice::Auto,
                "cpu" => DeviceChoice::Cpu,
                "gpu" | "cuda" => DeviceChoice::Gpu,
                _ => {
                    return Err(TritonError::config(
                        "parameters.device",
                        format!("expected auto, cpu or gpu, got {s:?}"),
                    ))
                }
            },
        };

        let plan = match params.get("plan").map(|s| s.trim().to_ascii_lowercase()) {
            None => PlanChoice::Auto,
            Some(s) => match s.as_str() {
                "auto" => PlanChoice::Auto,
                "compressed" => PlanChoice::Compressed,
                "baseline" => PlanChoice::Baseline,
                _ => {
                    return Err(TritonError::config(
                        "parameters.plan",
                        format!("expected auto, compressed or baseline, got {s:?}"),
                    ))
                }
            },
        };

        let exclude_input_in_output = match params
            .get("exclude_input_in_output")
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => false,
            Some(s) => match s.as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(TritonError::config(
                        "parameters.exclude_input_in_output",
                        format!("expected true or false, got {s:?}"),
                    ))
                }
            },
        };

        let instance_groups = instance_groups(obj.get("instance_group"))?;
        for (i, g) in instance_groups.iter().enumerate() {
            let clash = matches!(
                (device, g.kind),
                (DeviceChoice::Cpu, InstanceKind::Gpu) | (DeviceChoice::Gpu, InstanceKind::Cpu)
            );
            if clash {
                return Err(TritonError::config(
                    format!("instance_group[{i}].kind"),
                    format!("{:?} contradicts parameters.device = {device:?}", g.kind),
                ));
            }
        }

        Ok(ModelConfig {
            name,
            max_batch_size,
            weights_dir,
            max_concurrent_sequences,
            max_sequence_length,
            max_prefill_tokens,
            max_step_slowdown,
            short_prompt_tokens,
            kv_cache_bytes,
            kv_cache_fraction,
            device,
            plan,
            exclude_input_in_output,
            instance_groups,
        })
    }
}

/// `parameters` as key → string value; unknown keys and non-string values are errors.
fn parameters(v: Option<&Value>) -> Result<BTreeMap<String, String>, TritonError> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return Ok(out) };
    let obj = v
        .as_object()
        .ok_or_else(|| TritonError::config("parameters", "expected an object"))?;
    for (key, value) in obj {
        let field = format!("parameters.{key}");
        if !KNOWN_PARAMETERS.contains(&key.as_str()) {
            return Err(TritonError::config(
                field,
                format!("unknown parameter; known: {}", KNOWN_PARAMETERS.join(", ")),
            ));
        }
        let s = value
            .get("string_value")
            .and_then(Value::as_str)
            .ok_or_else(|| TritonError::config(&field, "expected { string_value: \"...\" }"))?;
        out.insert(key.clone(), s.to_string());
    }
    Ok(out)
}

fn positive(field: &str, s: &str) -> Result<usize, TritonError> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(TritonError::config(
            field,
            format!("expected a positive integer, got {s:?}"),
        )),
    }
}

/// A byte count with an optional decimal (K, M, G) or binary (Ki, Mi, Gi) suffix.
fn bytes(field: &str, s: &str) -> Result<u64, TritonError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let mult: u64 = match suffix.trim() {
        "" => 1,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => 0,
    };
    num.parse::<u64>()
        .ok()
        .filter(|_| mult > 0)
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            TritonError::config(
                field,
                format!("expected a positive byte count such as 8Gi, got {s:?}"),
            )
        })
}

fn instance_groups(v: Option<&Value>) -> Result<Vec<InstanceGroup>, TritonError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let arr = v
        .as_array()
        .ok_or_else(|| TritonError::config("instance_group", "expected a list"))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, g) in arr.iter().enumerate() {
        let kind = match g.get("kind") {
            None => InstanceKind::Auto,
            Some(k) => match k.as_str() {
                Some("KIND_AUTO") => InstanceKind::Auto,
                Some("KIND_CPU") => InstanceKind::Cpu,
                Some("KIND_GPU") => InstanceKind::Gpu,
                _ => {
                    return Err(TritonError::config(
                        format!("instance_group[{i}].kind"),
                        format!("expected KIND_GPU, KIND_CPU or KIND_AUTO, got {k}"),
                    ))
                }
            },
        };
        let count = match g.get("count") {
            None => 1,
            Some(c) => c
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    TritonError::config(
                        format!("instance_group[{i}].count"),
                        format!("expected a positive integer, got {c}"),
                    )
                })?,
        };
        let gpus = match g.get("gpus") {
            None => Vec::new(),
            Some(list) => {
                let field = format!("instance_group[{i}].gpus");
                let items = list
                    .as_array()
                    .ok_or_else(|| TritonError::config(&field, "expected a list"))?;
                items
                    .iter()
                    .map(|x| {
                        x.as_i64()
                            .and_then(|n| i32::try_from(n).ok())
                            .filter(|&n| n >= 0)
                            .ok_or_else(|| {
                                TritonError::config(
                                    &field,
                                    format!("expected GPU ids (0 or more), got {x}"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        out.push(InstanceGroup { kind, count, gpus });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape Triton prints for `model_repository/unweight_llama/config.pbtxt` (trimmed of
    /// fields this backend ignores, plus a few it prints and we must ignore).
    const FULL: &str = r#"{
        "name": "unweight_llama", "platform": "", "backend": "unweight", "runtime": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 1,
        "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}],
        "instance_group": [{"name": "unweight_llama_0", "kind": "KIND_GPU", "count": 1,
                            "gpus": [0], "secondary_devices": [], "profile": [],
                            "passive": false, "host_policy": ""}],
        "model_transaction_policy": {"decoupled": true},
        "parameters": {
            "weights_dir": {"string_value": "compressed"},
            "max_concurrent_sequences": {"string_value": "32"},
            "max_sequence_length": {"string_value": "4096"},
            "max_prefill_tokens": {"string_value": "64"},
            "max_step_slowdown": {"string_value": "2.5"},
            "short_prompt_tokens": {"string_value": "32"},
            "kv_cache_bytes": {"string_value": "8Gi"},
            "kv_cache_fraction": {"string_value": "0.75"},
            "device": {"string_value": "auto"},
            "plan": {"string_value": "Baseline"}
        }
    }"#;

    const MINIMAL: &str = r#"{"name": "m", "model_transaction_policy": {"decoupled": true}}"#;

    fn parse(json: &str) -> Result<ModelConfig, TritonError> {
        ModelConfig::from_json(json, Path::new("/models/m/1"))
    }

    /// The field an error names.
    fn field(json: &str) -> String {
        match parse(json) {
            Err(TritonError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// MINIMAL with `parameters` set to one string parameter.
    fn with_param(key: &str, value: &str) -> String {
        format!(
            r#"{{"model_transaction_policy": {{"decoupled": true}},
                "parameters": {{"{key}": {{"string_value": "{value}"}}}}}}"#
        )
    }

    #[test]
    fn full_config() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.name, "unweight_llama");
        assert_eq!(c.max_batch_size, 1);
        assert_eq!(c.weights_dir, Path::new("/models/m/1/compressed"));
        assert_eq!(c.max_concurrent_sequences, 32);
        assert_eq!(c.max_sequence_length, Some(4096));
        assert_eq!(c.max_prefill_tokens, 64);
        assert_eq!(c.max_step_slowdown, Some(2.5));
        assert_eq!(c.short_prompt_tokens, 32);
        assert_eq!(c.kv_cache_bytes, Some(8 << 30));
        assert_eq!(c.kv_cache_fraction, 0.75);
        assert_eq!(c.device, DeviceChoice::Auto);
        assert_eq!(c.plan, PlanChoice::Baseline);
        assert_eq!(
            c.instance_groups,
            vec![InstanceGroup {
                kind: InstanceKind::Gpu,
                count: 1,
                gpus: vec![0]
            }]
        );
    }

    #[test]
    fn max_step_slowdown_parameter() {
        for (v, want) in [("1", Some(1.0)), (" 1.75 ", Some(1.75)), ("OFF", None)] {
            let c = parse(&with_param("max_step_slowdown", v)).unwrap();
            assert_eq!(c.max_step_slowdown, want, "{v:?}");
        }
    }

    #[test]
    fn short_prompt_tokens_follows_the_cap_unless_set() {
        let c = parse(&with_param("max_prefill_tokens", "64")).unwrap();
        assert_eq!(c.short_prompt_tokens, 64);
        for (v, want) in [("0", 0), (" 500 ", 500)] {
            let c = parse(&with_param("short_prompt_tokens", v)).unwrap();
            assert_eq!(c.short_prompt_tokens, want, "{v:?}");
        }
    }

    #[test]
    fn exclude_input_in_output_parameter() {
        for (v, want) in [("true", true), ("False", false), (" TRUE ", true)] {
            let c = parse(&with_param("exclude_input_in_output", v)).unwrap();
            assert_eq!(c.exclude_input_in_output, want, "{v:?}");
        }
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.weights_dir, Path::new("/models/m/1"));
        assert_eq!(c.max_concurrent_sequences, DEFAULT_MAX_CONCURRENT_SEQUENCES);
        assert_eq!(c.max_sequence_length, None);
        assert_eq!(c.max_prefill_tokens, crate::engine::DEFAULT_PREFILL_CHUNK);
        assert_eq!(
            c.max_step_slowdown,
            Some(crate::engine::DEFAULT_STEP_SLOWDOWN)
        );
        assert_eq!(c.short_prompt_tokens, c.max_prefill_tokens);
        assert_eq!(c.kv_cache_bytes, None);
        assert_eq!(c.kv_cache_fraction, DEFAULT_KV_CACHE_FRACTION);
        assert_eq!(c.plan, PlanChoice::Auto);
        assert_eq!(c.device, DeviceChoice::Auto);
        assert!(!c.exclude_input_in_output);
        assert!(c.instance_groups.is_empty());
        assert_eq!(c.max_batch_size, 0);
    }

    #[test]
    fn absolute_weights_dir_is_kept() {
        let c = parse(&with_param("weights_dir", "/data/llama")).unwrap();
        assert_eq!(c.weights_dir, Path::new("/data/llama"));
    }

    #[test]
    fn cpu_group_and_device() {
        let json = r#"{"model_transaction_policy": {"decoupled": true},
            "instance_group": [{"kind": "KIND_CPU", "count": 2}],
            "parameters": {"device": {"string_value": "CPU"}}}"#;
        let c = parse(json).unwrap();
        assert_eq!(c.device, DeviceChoice::Cpu);
        assert_eq!(c.instance_groups[0].kind, InstanceKind::Cpu);
        assert_eq!(c.instance_groups[0].count, 2);
    }

    #[test]
    fn byte_suffixes() {
        for (s, n) in [
            ("1024", 1024u64),
            ("2K", 2_000),
            ("3M", 3_000_000),
            ("1G", 1_000_000_000),
            ("4Ki", 4096),
            ("5Mi", 5 << 20),
            ("6 Gi", 6 << 30),
        ] {
            assert_eq!(bytes("f", s).unwrap(), n, "{s}");
        }
        for s in ["", "0", "-1", "1T", "Gi", "1.5Gi", "99999999999999999999"] {
            assert!(bytes("f", s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "(root)"),
            ("[1]".into(), "(root)"),
            (
                r#"{"name": "m"}"#.into(),
                "model_transaction_policy.decoupled",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": false}}"#.into(),
                "model_transaction_policy.decoupled",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": "yes"}}"#.into(),
                "model_transaction_policy.decoupled",
            ),
            (
                r#"{"name": 3, "model_transaction_policy": {"decoupled": true}}"#.into(),
                "name",
            ),
            (
                r#"{"max_batch_size": -1, "model_transaction_policy": {"decoupled": true}}"#.into(),
                "max_batch_size",
            ),
            (
                with_param("max_concurrent_sequences", "0"),
                "parameters.max_concurrent_sequences",
            ),
            (
                with_param("max_concurrent_sequences", "many"),
                "parameters.max_concurrent_sequences",
            ),
            (
                with_param("max_sequence_length", "-5"),
                "parameters.max_sequence_length",
            ),
            (
                with_param("max_prefill_tokens", "0"),
                "parameters.max_prefill_tokens",
            ),
            (
                with_param("max_step_slowdown", "0.9"),
                "parameters.max_step_slowdown",
            ),
            (
                with_param("max_step_slowdown", "NaN"),
                "parameters.max_step_slowdown",
            ),
            (
                with_param("max_step_slowdown", "fast"),
                "parameters.max_step_slowdown",
            ),
            (
                with_param("short_prompt_tokens", "-1"),
                "parameters.short_prompt_tokens",
            ),
            (with_param("plan", "fastest"), "parameters.plan"),
            (
                with_param("exclude_input_in_output", "yes"),
                "parameters.exclude_input_in_output",
            ),
            (
                with_param("kv_cache_bytes", "lots"),
                "parameters.kv_cache_bytes",
            ),
            (
                with_param("kv_cache_fraction", "1.5"),
                "parameters.kv_cache_fraction",
            ),
            (
                with_param("kv_cache_fraction", "0"),
                "parameters.kv_cache_fraction",
            ),
            (with_param("device", "tpu"), "parameters.device"),
            (with_param("weights_dir", " "), "parameters.weights_dir"),
            (with_param("max_seq_len", "5"), "parameters.max_seq_len"),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "parameters": {"device": {"int_value": 1}}}"#
                    .into(),
                "parameters.device",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true}, "parameters": []}"#.into(),
                "parameters",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "instance_group": [{"kind": "KIND_MODEL"}]}"#
                    .into(),
                "instance_group[0].kind",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "instance_group": [{"kind": "KIND_CPU"}, {"count": 0}]}"#
                    .into(),
                "instance_group[1].count",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "instance_group": [{"gpus": [0, -1]}]}"#
                    .into(),
                "instance_group[0].gpus",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "instance_group": {"kind": "KIND_GPU"}}"#
                    .into(),
                "instance_group",
            ),
            (
                r#"{"model_transaction_policy": {"decoupled": true},
                    "instance_group": [{"kind": "KIND_GPU"}],
                    "parameters": {"device": {"string_value": "cpu"}}}"#
                    .into(),
                "instance_group[0].kind",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(field(&json), want, "{json}");
        }
    }

    #[test]
    fn error_message_names_field_and_value() {
        let err = parse(&with_param("device", "tpu")).unwrap_err();
        let msg = err.chain();
        assert!(msg.contains("parameters.device"), "{msg}");
        assert!(msg.contains("\"tpu\""), "{msg}");
    }
}
