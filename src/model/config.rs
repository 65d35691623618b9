//! The Hugging Face `config.json` of a Llama model, parsed into a validated [`LlamaConfig`].
//!
//! Everything the forward pass depends on is read here, once, and checked: a field the engine
//! cannot honour (another rope type, biases, another activation, another architecture) is an
//! error naming the field, never a silent default. Both rope layouts in circulation are read:
//! top-level `rope_theta` + `rope_scaling` (checkpoints as published for Llama 3.1) and the
//! `rope_parameters` object that transformers 5 writes.

use std::path::Path;

use serde_json::{Map, Value};

/// What is wrong with a `config.json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not a JSON object.
    #[error("config.json is not a JSON object: {0}")]
    Json(String),
    /// A required field is absent.
    #[error("config.json: required field `{0}` is missing")]
    Missing(&'static str),
    /// A field has the wrong JSON type or an out-of-range value.
    #[error("config.json: field `{field}` {msg}")]
    Invalid {
        /// The field, dotted for nested ones (`rope_scaling.factor`).
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A valid setting that this engine does not implement.
    #[error("config.json: field `{field}` = {value} is not supported: {msg}")]
    Unsupported {
        /// The field.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// What is supported instead.
        msg: String,
    },
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

fn unsupported(field: impl Into<String>, value: &Value, msg: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        field: field.into(),
        value: value.to_string(),
        msg: msg.into(),
    }
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type: "llama3"`): long wavelengths are
/// slowed by `factor`, short ones kept, and the band in between interpolated.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    /// Slow-down of the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with.
    pub original_max_position_embeddings: usize,
}

/// A validated Llama configuration: exactly what the forward pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head (even, for rotary embeddings).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// `None` for plain RoPE.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Whether `lm_head` is the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (HF allows one id or a list).
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// A one-layer, 8-wide configuration with `vocab` tokens, for the engine and worker tests
    /// whose fake backends only need the dimensions.
    #[cfg(test)]
    pub(crate) fn tiny_for_tests(vocab: usize) -> Self {
        Self {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            vocab_size: vocab,
            max_position_embeddings: 4096,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| ConfigError::Io { path, source })?;
        Self::from_json_str(&text)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ConfigError::Json("top level is not an object".into()))?;
        Self::from_json(obj)
    }

    /// Validates a parsed `config.json` object.
    pub fn from_json(c: &Map<String, Value>) -> Result<Self, ConfigError> {
        check_architecture(c)?;
        let hidden_size = req_usize(c, "hidden_size")?;
        let heads = req_usize(c, "num_attention_heads")?;
        let kv_heads = opt_usize(c, "num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("is {kv_heads}, which does not divide num_attention_heads = {heads}"),
            ));
        }
        let head_dim = match opt_usize(c, "head_dim")? {
            Some(d) => d,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(invalid(
                    "head_dim",
                    format!(
                    "is absent and hidden_size {hidden_size} is not a multiple of {heads} heads"
                ),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("is {head_dim}; rotary embeddings need it even"),
            ));
        }
        let rms_norm_eps = opt_f64(c, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(invalid(
                "rms_norm_eps",
                format!("is {rms_norm_eps}; it must be positive"),
            ));
        }
        let (rope_theta, rope_scaling) = parse_rope(c)?;
        let tie_word_embeddings = match c.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("tie_word_embeddings", "is not a boolean")),
        };
        let eos_token_ids = match c.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| as_token(v, "eos_token_id"))
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => vec![as_token(v, "eos_token_id")?],
        };
        let bos_token_id = match c.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_token(v, "bos_token_id")?),
        };
        let vocab_size = req_usize(c, "vocab_size")?;
        let cfg = Self {
            hidden_size,
            intermediate_size: req_usize(c, "intermediate_size")?,
            num_hidden_layers: req_usize(c, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings,
            vocab_size,
            max_position_embeddings: opt_usize(c, "max_position_embeddings")?.unwrap_or(2048),
            bos_token_id,
            eos_token_ids,
        };
        for (field, &id) in cfg
            .bos_token_id
            .iter()
            .map(|b| ("bos_token_id", b))
            .chain(cfg.eos_token_ids.iter().map(|e| ("eos_token_id", e)))
        {
            if id as usize >= vocab_size {
                return Err(invalid(
                    field,
                    format!("{id} is outside the vocabulary of {vocab_size}"),
                ));
            }
        }
        Ok(cfg)
    }

    /// Heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (and value) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The rotary inverse frequencies `1 / theta^(2i / head_dim)` for `i < head_dim / 2`, with
    /// Llama 3 scaling applied when configured (the formula of transformers'
    /// `_compute_llama3_parameters`). Computed in f64.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return base;
        };
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// Refuses anything that is not a bias-free, SiLU-gated Llama.
fn check_architecture(c: &Map<String, Value>) -> Result<(), ConfigError> {
    match c.get("model_type") {
        Some(Value::String(t)) if t == "llama" => {}
        Some(v) => {
            return Err(unsupported(
                "model_type",
                v,
                "only \"llama\" is implemented",
            ))
        }
        None => return Err(ConfigError::Missing("model_type")),
    }
    if let Some(v) = c.get("hidden_act") {
        if v.as_str() != Some("silu") {
            return Err(unsupported(
                "hidden_act",
                v,
                "only \"silu\" (SwiGLU) is implemented",
            ));
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        match c.get(field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(v) => return Err(unsupported(field, v, "biases are not implemented")),
        }
    }
    Ok(())
}

/// Reads `rope_theta` and the scaling, from the top level or from `rope_parameters`.
fn parse_rope(c: &Map<String, Value>) -> Result<(f64, Option<Llama3RopeScaling>), ConfigError> {
    let (params, prefix): (&Map<String, Value>, &str) = match c.get("rope_parameters") {
        None | Some(Value::Null) => (c, ""),
        Some(Value::Object(p)) => (p, "rope_parameters."),
        Some(_) => return Err(invalid("rope_parameters", "is not an object")),
    };
    let theta_field = format!("{prefix}rope_theta");
    let rope_theta = match params.get("rope_theta") {
        None | Some(Value::Null) => 10000.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| invalid(&theta_field, "is not a number"))?,
    };
    if !(rope_theta > 1.0 && rope_theta.is_finite()) {
        return Err(invalid(
            theta_field,
            format!("is {rope_theta}; it must be a finite number above 1"),
        ));
    }
    // Under `rope_parameters` the scaling fields sit beside the theta; at the top level they
    // are in `rope_scaling`.
    let (scaling, sprefix) = if prefix.is_empty() {
        match c.get("rope_scaling") {
            None | Some(Value::Null) => return Ok((rope_theta, None)),
            Some(Value::Object(s)) => (s, "rope_scaling."),
            Some(_) => return Err(invalid("rope_scaling", "is not an object or null")),
        }
    } else {
        (params, prefix)
    };
    let type_value = scaling.get("rope_type").or_else(|| scaling.get("type"));
    let rope_type = match type_value {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(unsupported(
                format!("{sprefix}rope_type"),
                v,
                "expected a string",
            ))
        }
    };
    match rope_type {
        "default" => Ok((rope_theta, None)),
        "llama3" => {
            let f = |name: &str| -> Result<f64, ConfigError> {
                let field = format!("{sprefix}{name}");
                let v = scaling.get(name).ok_or_else(|| {
                    invalid(&field, "is missing (required by rope_type \"llama3\")")
                })?;
                let x = v
                    .as_f64()
                    .ok_or_else(|| invalid(&field, "is not a number"))?;
                if !(x > 0.0 && x.is_finite()) {
                    return Err(invalid(field, format!("is {x}; it must be positive")));
                }
                Ok(x)
            };
            let s = Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            };
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(invalid(
                    format!("{sprefix}high_freq_factor"),
                    format!(
                        "is {}; it must exceed low_freq_factor {}",
                        s.high_freq_factor, s.low_freq_factor
                    ),
                ));
            }
            Ok((rope_theta, Some(s)))
        }
        _ => Err(unsupported(
            format!("{sprefix}rope_type"),
            type_value.expect("a named type"),
            "only \"default\" and \"llama3\" are implemented",
        )),
    }
}

fn req_usize(c: &Map<String, Value>, field: &'static str) -> Result<usize, ConfigError> {
    let v = opt_usize(c, field)?.ok_or(ConfigError::Missing(field))?;
    if v == 0 {
        return Err(invalid(field, "is 0; it must be positive"));
    }
    Ok(v)
}

fn opt_usize(c: &Map<String, Value>, field: &'static str) -> Result<Option<usize>, ConfigError> {
    match c.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| invalid(field, format!("is {v}; expected a non-negative integer"))),
    }
}

fn opt_f64(c: &Map<String, Value>, field: &'static str) -> Result<Option<f64>, ConfigError> {
    match c.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(field, format!("is {v}; expected a number"))),
    }
}

fn as_token(v: &Value, field: &str) -> Result<u32, ConfigError> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| invalid(field, format!("contains {v}, which is not a token id")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaShape;
    use serde_json::json;

    fn parse(v: Value) -> Result<LlamaConfig, ConfigError> {
        LlamaConfig::from_json(v.as_object().unwrap())
    }

    fn smollm() -> Value {
        LlamaShape::preset("smollm2-135m").unwrap().config_json()
    }

    #[test]
    fn synthetic_presets_parse() {
        let c = parse(smollm()).unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (576, 1536, 30)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (9, 3, 64)
        );
        assert_eq!(
            (c.vocab_size, c.rope_theta, c.tie_word_embeddings),
            (49152, 100000.0, true)
        );
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert_eq!(c.group_size(), 3);
        let l = parse(LlamaShape::preset("llama-3.1-8b").unwrap().config_json()).unwrap();
        let s = l.rope_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
    }

    #[test]
    fn head_dim_defaults_and_eos_list() {
        let mut v = smollm();
        v.as_object_mut().unwrap().remove("head_dim");
        v["eos_token_id"] = json!([2, 0]);
        let c = parse(v).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.eos_token_ids, vec![2, 0]);
    }

    #[test]
    fn rope_parameters_nesting_equals_top_level() {
        let top = parse(LlamaShape::preset("llama-3.1-8b").unwrap().config_json()).unwrap();
        let mut v = LlamaShape::preset("llama-3.1-8b").unwrap().config_json();
        let o = v.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        assert_eq!(parse(v).unwrap(), top);
        let mut d = smollm();
        d.as_object_mut().unwrap().remove("rope_theta");
        d["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 100000.0});
        assert_eq!(parse(d).unwrap(), parse(smollm()).unwrap());
    }

    #[test]
    fn llama3_inv_freq_matches_transformers() {
        let c = parse(LlamaShape::preset("llama-3.1-8b").unwrap().config_json()).unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        // High frequencies (short wavelengths) are unchanged, the lowest are divided by 8.
        assert_eq!(f[0], 1.0);
        let plain = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - plain / 8.0).abs() < 1e-15 * plain);
        // Inside the smoothed band (wavelengths 2048..8192): the value of transformers'
        // formula evaluated independently in Python.
        assert!((f[31] - 0.0008567514129196321).abs() < 1e-15, "{}", f[31]);
        assert!((f[20] - 1.0 / 500000f64.powf(40.0 / 128.0)).abs() < 1e-18);
    }

    fn err(v: Value) -> String {
        parse(v).unwrap_err().to_string()
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let mut v = smollm();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(err(v).contains("`rope_scaling.rope_type` = \"yarn\" is not supported"));
        let mut v = smollm();
        v["attention_bias"] = json!(true);
        assert!(err(v).contains("`attention_bias` = true"));
        let mut v = smollm();
        v["mlp_bias"] = json!(true);
        assert!(err(v).contains("`mlp_bias`"));
        let mut v = smollm();
        v["model_type"] = json!("mistral");
        assert!(err(v).contains("`model_type` = \"mistral\""));
        let mut v = smollm();
        v["hidden_act"] = json!("gelu");
        assert!(err(v).contains("`hidden_act` = \"gelu\""));
        let mut v = smollm();
        v["rope_parameters"] = json!({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0});
        assert!(err(v).contains("`rope_parameters.rope_type` = \"linear\""));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let mut v = smollm();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(v).contains("`hidden_size` is missing"));
        let mut v = smollm();
        v["num_key_value_heads"] = json!(4);
        assert!(err(v).contains("`num_key_value_heads`"));
        let mut v = smollm();
        v["vocab_size"] = json!(-3);
        assert!(err(v).contains("`vocab_size`"));
        let mut v = smollm();
        v["eos_token_id"] = json!([2, "x"]);
        assert!(err(v).contains("`eos_token_id`"));
        let mut v = smollm();
        v["eos_token_id"] = json!(50000);
        assert!(err(v).contains("outside the vocabulary"));
        let mut v = LlamaShape::preset("llama-3.1-8b").unwrap().config_json();
        v["rope_scaling"].as_object_mut().unwrap().remove("factor");
        assert!(err(v).contains("`rope_scaling.factor` is missing"));
        assert!(LlamaConfig::from_json_str("[1]")
            .unwrap_err()
            .to_string()
            .contains("not a JSON object"));
    }
}
