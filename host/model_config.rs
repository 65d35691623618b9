//! Triton's model configuration: `config.pbtxt` (parsed by [`crate::pbtxt`]) → the JSON that
//! `TRITONBACKEND_ModelConfig` returns, plus the facts the host itself needs (tensors, batch
//! size, decoupling, instances).
//!
//! What Triton does, and so what this does: protobuf field names; repeated fields as arrays
//! (`input`, `output`, `instance_group`, `dims`, `gpus`, ...); map fields as objects
//! (`parameters` → `{"key": {"string_value": "..."}}`); enums as their names (`"TYPE_STRING"`,
//! `"KIND_GPU"`); defaults of the scalar fields printed (protobuf's
//! `always_print_primitive_fields`); `name` filled from the model directory (an explicit name
//! must match it); an unknown field rejected; instance groups normalized (`name` =
//! `<model>_<index>`, `count` 1, `KIND_AUTO` resolved, `KIND_GPU` without `gpus` → every
//! visible GPU) and validated against the GPUs the host pretends to have.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as Json};

use crate::pbtxt::{self, Message, Scalar, Value};

/// What the host pretends about devices.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    /// GPU ids that exist (Triton's "GPUs with at least the minimum compute capability").
    pub gpus: Vec<i32>,
    /// Rewrite every instance group to `KIND_CPU` (`--instance-kind cpu`).
    pub force_cpu: bool,
}

/// One instance Triton would create.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSpec {
    /// `<group name>` when the group's count is 1, else `<group name>_<i>` (Triton's rule).
    pub name: String,
    /// `KIND_CPU`, `KIND_GPU`, `KIND_MODEL`.
    pub kind: String,
    pub device_id: i32,
    /// Triton's host policy name: `cpu`, `gpu_<id>`, `model`, or the group's `host_policy`.
    pub host_policy: String,
}

/// A declared input or output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// Triton's data type name without `TYPE_` in the wire form: `BYTES`, `INT32`, ...
    pub datatype: String,
    pub dims: Vec<i64>,
    pub optional: bool,
}

/// The normalized configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The JSON `TRITONBACKEND_ModelConfig` hands out.
    pub json: Json,
    pub name: String,
    pub backend: String,
    pub max_batch_size: i64,
    pub decoupled: bool,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub instances: Vec<InstanceSpec>,
}

impl ModelConfig {
    /// Parses `text` (a `config.pbtxt`) for the model directory named `dir_name`.
    pub fn from_pbtxt(text: &str, dir_name: &str, devices: &Devices) -> Result<Self> {
        let msg = pbtxt::parse(text).context("config.pbtxt")?;
        let json = to_json(&msg, "ModelConfig", "")?;
        Self::from_json(json, dir_name, devices)
    }

    /// Normalizes and validates a configuration already in JSON form.
    pub fn from_json(mut json: Json, dir_name: &str, devices: &Devices) -> Result<Self> {
        let obj = json
            .as_object_mut()
            .context("the model configuration is not an object")?;
        match obj.get("name").and_then(Json::as_str) {
            None | Some("") => {
                obj.insert("name".into(), json!(dir_name));
            }
            Some(n) if n != dir_name => bail!(
                "model configuration name '{n}' does not match the model directory '{dir_name}'"
            ),
            Some(_) => {}
        }
        let name = dir_name.to_string();
        fill_defaults(obj, MODEL_CONFIG_DEFAULTS);
        if !obj.contains_key("version_policy") {
            obj.insert(
                "version_policy".into(),
                json!({"latest": {"num_versions": 1}}),
            );
        }
        let backend = obj["backend"].as_str().unwrap_or("").to_string();
        if backend.is_empty() {
            bail!("must specify 'backend' for '{name}'");
        }
        let max_batch_size = obj["max_batch_size"].as_i64().unwrap_or(0);
        if max_batch_size < 0 {
            bail!("max_batch_size must be >= 0 for '{name}', got {max_batch_size}");
        }
        let decoupled = obj
            .get("model_transaction_policy")
            .and_then(|p| p.get("decoupled"))
            .and_then(Json::as_bool)
            .unwrap_or(false);
        let inputs = tensors(obj, "input", &name)?;
        let outputs = tensors(obj, "output", &name)?;
        let instances = normalize_instance_groups(obj, &name, devices)?;
        Ok(Self {
            json,
            name,
            backend,
            max_batch_size,
            decoupled,
            inputs,
            outputs,
            instances,
        })
    }

    /// The declared input `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    /// The declared output `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// How a field of a known message maps to JSON.
#[derive(Clone, Copy)]
enum Kind {
    /// A scalar; `Int`/`Bool` force the JSON type, `Str` a string, `Enum` an enum name.
    Str,
    Int,
    Bool,
    Enum,
    /// A repeated scalar.
    RepeatedInt,
    RepeatedStr,
    /// A nested message of the named type ("" = no schema: generic conversion).
    Msg(&'static str),
    RepeatedMsg(&'static str),
    /// `map<string, string>`.
    MapStr,
    /// `map<string, ModelParameter>`.
    MapParam,
}

/// The schema of the messages the host validates strictly (Triton's model_config.proto);
/// `None` for a field the message does not have.
fn field_kind(message: &str, field: &str) -> Option<Kind> {
    use Kind::*;
    Some(match (message, field) {
        ("ModelConfig", "name" | "platform" | "backend" | "runtime" | "default_model_filename") => {
            Str
        }
        ("ModelConfig", "max_batch_size") => Int,
        ("ModelConfig", "input") => RepeatedMsg("ModelInput"),
        ("ModelConfig", "output") => RepeatedMsg("ModelOutput"),
        ("ModelConfig", "instance_group") => RepeatedMsg("ModelInstanceGroup"),
        ("ModelConfig", "model_transaction_policy") => Msg("ModelTransactionPolicy"),
        ("ModelConfig", "parameters") => MapParam,
        ("ModelConfig", "cc_model_filenames" | "metric_tags") => MapStr,
        ("ModelConfig", "batch_input" | "batch_output" | "model_warmup") => RepeatedMsg(""),
        (
            "ModelConfig",
            "version_policy"
            | "optimization"
            | "dynamic_batching"
            | "sequence_batching"
            | "ensemble_scheduling"
            | "model_operations"
            | "model_repository_agents"
            | "response_cache",
        ) => Msg(""),
        ("ModelInput", "name") => Str,
        ("ModelInput", "data_type" | "format") => Enum,
        ("ModelInput", "dims") => RepeatedInt,
        ("ModelInput", "reshape") => Msg("ModelTensorReshape"),
        (
            "ModelInput",
            "is_shape_tensor" | "allow_ragged_batch" | "optional" | "is_non_linear_format_io",
        ) => Bool,
        ("ModelOutput", "name" | "label_filename") => Str,
        ("ModelOutput", "data_type") => Enum,
        ("ModelOutput", "dims") => RepeatedInt,
        ("ModelOutput", "reshape") => Msg("ModelTensorReshape"),
        ("ModelOutput", "is_shape_tensor" | "is_non_linear_format_io") => Bool,
        ("ModelTensorReshape", "shape") => RepeatedInt,
        ("ModelInstanceGroup", "name" | "host_policy") => Str,
        ("ModelInstanceGroup", "kind") => Enum,
        ("ModelInstanceGroup", "count") => Int,
        ("ModelInstanceGroup", "gpus") => RepeatedInt,
        ("ModelInstanceGroup", "profile") => RepeatedStr,
        ("ModelInstanceGroup", "passive") => Bool,
        ("ModelInstanceGroup", "rate_limiter") => Msg(""),
        ("ModelInstanceGroup", "secondary_devices") => RepeatedMsg(""),
        ("ModelTransactionPolicy", "decoupled") => Bool,
        ("ModelParameter", "string_value") => Str,
        _ => return None,
    })
}

/// Field names that are repeated wherever they appear in messages without a schema here.
const GENERIC_REPEATED: &[&str] = &[
    "dims",
    "gpus",
    "shape",
    "preferred_batch_size",
    "control_input",
    "control",
    "state",
    "initial_state",
    "step",
    "input_map",
    "output_map",
    "agents",
    "target_name",
    "source_input",
    "profile",
    "graph",
    "cuda_graph_spec",
    "input",
    "output",
    "int32_false_true",
    "fp32_false_true",
    "bool_false_true",
];

/// Scalar fields and their defaults, printed when absent (`always_print_primitive_fields`).
type Defaults = &'static [(&'static str, fn() -> Json)];

const MODEL_CONFIG_DEFAULTS: Defaults = &[
    ("name", || json!("")),
    ("platform", || json!("")),
    ("backend", || json!("")),
    ("runtime", || json!("")),
    ("max_batch_size", || json!(0)),
    ("input", || json!([])),
    ("output", || json!([])),
    ("batch_input", || json!([])),
    ("batch_output", || json!([])),
    ("instance_group", || json!([])),
    ("default_model_filename", || json!("")),
    ("cc_model_filenames", || json!({})),
    ("metric_tags", || json!({})),
    ("parameters", || json!({})),
    ("model_warmup", || json!([])),
];

const INPUT_DEFAULTS: Defaults = &[
    ("name", || json!("")),
    ("data_type", || json!("TYPE_INVALID")),
    ("format", || json!("FORMAT_NONE")),
    ("dims", || json!([])),
    ("is_shape_tensor", || json!(false)),
    ("allow_ragged_batch", || json!(false)),
    ("optional", || json!(false)),
    ("is_non_linear_format_io", || json!(false)),
];

const OUTPUT_DEFAULTS: Defaults = &[
    ("name", || json!("")),
    ("data_type", || json!("TYPE_INVALID")),
    ("dims", || json!([])),
    ("label_filename", || json!("")),
    ("is_shape_tensor", || json!(false)),
    ("is_non_linear_format_io", || json!(false)),
];

const GROUP_DEFAULTS: Defaults = &[
    ("name", || json!("")),
    ("kind", || json!("KIND_AUTO")),
    ("count", || json!(1)),
    ("gpus", || json!([])),
    ("secondary_devices", || json!([])),
    ("profile", || json!([])),
    ("passive", || json!(false)),
    ("host_policy", || json!("")),
];

fn fill_defaults(obj: &mut Map<String, Json>, defaults: Defaults) {
    for (k, v) in defaults {
        if !obj.contains_key(*k) {
            obj.insert((*k).to_string(), v());
        }
    }
}

/// Converts `msg` of type `message` ("" = unknown schema) to JSON; `path` names it in errors.
fn to_json(msg: &Message, message: &str, path: &str) -> Result<Json> {
    let mut obj = Map::new();
    for (name, value) in &msg.fields {
        let here = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        let kind = if message.is_empty() {
            None
        } else {
            Some(
                field_kind(message, name)
                    .with_context(|| format!("{message} has no field named \"{name}\" ({here})"))?,
            )
        };
        match kind {
            Some(Kind::MapStr | Kind::MapParam) => {
                let Value::Message(entry) = value else {
                    bail!("{here}: expected a {{ key: ... value: ... }} entry");
                };
                let key = entry
                    .all("key")
                    .next()
                    .and_then(scalar_string)
                    .with_context(|| format!("{here}: map entry without a string key"))?;
                let val = match (kind, entry.all("value").next()) {
                    (Some(Kind::MapParam), Some(Value::Message(m))) => {
                        to_json(m, "ModelParameter", &format!("{here}[{key}]"))?
                    }
                    (Some(Kind::MapParam), None) => json!({"string_value": ""}),
                    (Some(Kind::MapStr), Some(v)) => {
                        json!(scalar_string(v)
                            .with_context(|| format!("{here}[{key}]: expected a string"))?)
                    }
                    (Some(Kind::MapStr), None) => json!(""),
                    _ => bail!("{here}[{key}]: malformed map value"),
                };
                obj.entry(name.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("map field is an object")
                    .insert(key, val);
            }
            Some(k @ (Kind::RepeatedInt | Kind::RepeatedStr | Kind::RepeatedMsg(_))) => {
                let v = convert(value, k, &here)?;
                obj.entry(name.clone())
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .with_context(|| format!("{here}: mixed repeated and single values"))?
                    .push(v);
            }
            Some(k) => {
                if obj.contains_key(name) {
                    bail!("{here}: non-repeated field given more than once");
                }
                obj.insert(name.clone(), convert(value, k, &here)?);
            }
            None => {
                let v = match value {
                    Value::Message(m) => to_json(m, "", &here)?,
                    Value::Scalar(s) => generic_scalar(s),
                };
                let repeated = GENERIC_REPEATED.contains(&name.as_str());
                match obj.get_mut(name) {
                    Some(Json::Array(a)) if repeated => a.push(v),
                    Some(existing) => {
                        // A field seen twice without a schema is repeated.
                        let prev = existing.take();
                        *existing = json!([prev, v]);
                    }
                    None if repeated => {
                        obj.insert(name.clone(), json!([v]));
                    }
                    None => {
                        obj.insert(name.clone(), v);
                    }
                }
            }
        }
    }
    if let Some(defaults) = match message {
        "ModelInput" => Some(INPUT_DEFAULTS),
        "ModelOutput" => Some(OUTPUT_DEFAULTS),
        "ModelInstanceGroup" => Some(GROUP_DEFAULTS),
        "ModelTransactionPolicy" => Some(&[("decoupled", (|| json!(false)) as fn() -> Json)][..]),
        "ModelParameter" => Some(&[("string_value", (|| json!("")) as fn() -> Json)][..]),
        _ => None,
    } {
        fill_defaults(&mut obj, defaults);
    }
    Ok(Json::Object(obj))
}

fn convert(value: &Value, kind: Kind, here: &str) -> Result<Json> {
    match (kind, value) {
        (Kind::Msg(t) | Kind::RepeatedMsg(t), Value::Message(m)) => to_json(m, t, here),
        (Kind::Msg(_) | Kind::RepeatedMsg(_), Value::Scalar(_)) => {
            bail!("{here}: expected a message {{ ... }}")
        }
        (_, Value::Message(_)) => bail!("{here}: expected a scalar, got a message"),
        (Kind::Str | Kind::RepeatedStr, Value::Scalar(s)) => {
            Ok(json!(scalar_string(&Value::Scalar(s.clone()))
                .with_context(|| format!("{here}: expected a string"))?))
        }
        (Kind::Int | Kind::RepeatedInt, Value::Scalar(Scalar::Num(t))) => Ok(json!(parse_int(t)
            .with_context(
            || format!("{here}: expected an integer, got {t}")
        )?)),
        (Kind::Int | Kind::RepeatedInt, Value::Scalar(_)) => {
            bail!("{here}: expected an integer")
        }
        (Kind::Bool, Value::Scalar(Scalar::Ident(t))) if t == "true" || t == "True" || t == "t" => {
            Ok(json!(true))
        }
        (Kind::Bool, Value::Scalar(Scalar::Ident(t)))
            if t == "false" || t == "False" || t == "f" =>
        {
            Ok(json!(false))
        }
        (Kind::Bool, Value::Scalar(Scalar::Num(t))) if t == "1" || t == "0" => Ok(json!(t == "1")),
        (Kind::Bool, Value::Scalar(_)) => bail!("{here}: expected true or false"),
        (Kind::Enum, Value::Scalar(Scalar::Ident(t))) => Ok(json!(t)),
        (Kind::Enum, Value::Scalar(Scalar::Num(t))) => Ok(json!(
            parse_int(t).with_context(|| format!("{here}: expected an enum value, got {t}"))?
        )),
        (Kind::Enum, Value::Scalar(Scalar::Str(_))) => {
            bail!("{here}: expected an enum name, got a string")
        }
        (Kind::MapStr | Kind::MapParam, _) => unreachable!("maps are handled by the caller"),
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::Scalar(Scalar::Str(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn parse_int(t: &str) -> Option<i64> {
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else {
        body.parse::<i64>().ok()?
    };
    Some(if neg { -v } else { v })
}

fn generic_scalar(s: &Scalar) -> Json {
    match s {
        Scalar::Str(b) => json!(String::from_utf8_lossy(b)),
        Scalar::Num(t) => {
            if let Some(i) = parse_int(t) {
                json!(i)
            } else {
                let f = t
                    .trim_end_matches(['f', 'F'])
                    .parse::<f64>()
                    .unwrap_or(f64::NAN);
                if f.is_finite() {
                    json!(f)
                } else {
                    json!(t)
                }
            }
        }
        Scalar::Ident(t) if t == "true" => json!(true),
        Scalar::Ident(t) if t == "false" => json!(false),
        Scalar::Ident(t) => json!(t),
    }
}

/// The wire name of a config data type (`TYPE_STRING` → `BYTES`, `TYPE_INT32` → `INT32`).
pub fn wire_datatype(config_type: &str) -> Option<&'static str> {
    Some(match config_type {
        "TYPE_BOOL" => "BOOL",
        "TYPE_UINT8" => "UINT8",
        "TYPE_UINT16" => "UINT16",
        "TYPE_UINT32" => "UINT32",
        "TYPE_UINT64" => "UINT64",
        "TYPE_INT8" => "INT8",
        "TYPE_INT16" => "INT16",
        "TYPE_INT32" => "INT32",
        "TYPE_INT64" => "INT64",
        "TYPE_FP16" => "FP16",
        "TYPE_FP32" => "FP32",
        "TYPE_FP64" => "FP64",
        "TYPE_STRING" => "BYTES",
        "TYPE_BF16" => "BF16",
        _ => return None,
    })
}

fn tensors(obj: &Map<String, Json>, field: &str, model: &str) -> Result<Vec<TensorSpec>> {
    let mut out: Vec<TensorSpec> = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, t) in obj[field].as_array().into_iter().flatten().enumerate() {
        let name = t["name"].as_str().unwrap_or("").to_string();
        if name.is_empty() {
            bail!("model '{model}': {field}[{i}] must specify 'name'");
        }
        if !seen.insert(name.clone()) {
            bail!("model '{model}': {field} '{name}' is declared twice");
        }
        let dt = t["data_type"].as_str().unwrap_or("TYPE_INVALID");
        let datatype = wire_datatype(dt)
            .with_context(|| format!("model '{model}': {field} '{name}' has data type {dt}"))?;
        let dims: Vec<i64> = t["dims"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Json::as_i64)
            .collect();
        if let Some(d) = dims.iter().find(|&&d| d < -1 || d == 0) {
            bail!("model '{model}': {field} '{name}' has invalid dimension {d}");
        }
        out.push(TensorSpec {
            name,
            datatype: datatype.to_string(),
            dims,
            optional: t["optional"].as_bool().unwrap_or(false),
        });
    }
    Ok(out)
}

/// Triton's `NormalizeInstanceGroup` + `ValidateInstanceGroup`, then the instances
/// `TritonModelInstance::CreateInstances` would make.
fn normalize_instance_groups(
    obj: &mut Map<String, Json>,
    model: &str,
    devices: &Devices,
) -> Result<Vec<InstanceSpec>> {
    let groups = obj
        .get_mut("instance_group")
        .and_then(Json::as_array_mut)
        .context("instance_group is not a list")?;
    if groups.is_empty() {
        let mut g = Map::new();
        fill_defaults(&mut g, GROUP_DEFAULTS);
        groups.push(Json::Object(g));
    }
    let mut instances = Vec::new();
    for (i, g) in groups.iter_mut().enumerate() {
        let g = g.as_object_mut().context("instance_group entry")?;
        if g["name"].as_str().unwrap_or("").is_empty() {
            g.insert("name".into(), json!(format!("{model}_{i}")));
        }
        let gname = g["name"].as_str().unwrap_or("").to_string();
        if devices.force_cpu {
            g.insert("kind".into(), json!("KIND_CPU"));
            g.insert("gpus".into(), json!([]));
        }
        let mut kind = g["kind"].as_str().unwrap_or("KIND_AUTO").to_string();
        let gpus: Vec<i64> = g["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Json::as_i64)
            .collect();
        if kind == "KIND_AUTO" {
            kind = if !gpus.is_empty() || !devices.gpus.is_empty() {
                "KIND_GPU".into()
            } else {
                "KIND_CPU".into()
            };
            g.insert("kind".into(), json!(kind));
        }
        let gpus = if kind == "KIND_GPU" && gpus.is_empty() {
            let all: Vec<i64> = devices.gpus.iter().map(|&d| i64::from(d)).collect();
            g.insert("gpus".into(), json!(all));
            all
        } else {
            gpus
        };
        let count = g["count"].as_i64().unwrap_or(1);
        if count < 1 {
            bail!("instance group {gname} of model {model} must have count >= 1, got {count}");
        }
        match kind.as_str() {
            "KIND_GPU" => {
                if gpus.is_empty() {
                    bail!(
                        "instance group {gname} of model {model} has kind KIND_GPU but no GPUs \
                         are available"
                    );
                }
                for &d in &gpus {
                    if !devices.gpus.iter().any(|&v| i64::from(v) == d) {
                        bail!(
                            "instance group {gname} of model {model} specifies invalid or \
                             unsupported gpu id {d}. GPUs with at least the minimum required \
                             CUDA compute compatibility of 6.0 are: {:?} (the host's --gpus; \
                             --instance-kind cpu rewrites the group to KIND_CPU)",
                            devices.gpus
                        );
                    }
                }
            }
            "KIND_CPU" | "KIND_MODEL" => {}
            other => bail!("instance group {gname} of model {model} has unknown kind {other}"),
        }
        let policy = g["host_policy"].as_str().unwrap_or("").to_string();
        for c in 0..count {
            let name = if count > 1 {
                format!("{gname}_{c}")
            } else {
                gname.clone()
            };
            match kind.as_str() {
                "KIND_GPU" => {
                    for &d in &gpus {
                        instances.push(InstanceSpec {
                            name: name.clone(),
                            kind: kind.clone(),
                            device_id: d as i32,
                            host_policy: if policy.is_empty() {
                                format!("gpu_{d}")
                            } else {
                                policy.clone()
                            },
                        });
                    }
                }
                _ => instances.push(InstanceSpec {
                    name,
                    kind: kind.clone(),
                    device_id: 0,
                    host_policy: if !policy.is_empty() {
                        policy.clone()
                    } else if kind == "KIND_CPU" {
                        "cpu".into()
                    } else {
                        "model".into()
                    },
                }),
            }
        }
    }
    Ok(instances)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
        backend: "unweight"
        max_batch_size: 1
        model_transaction_policy { decoupled: true }
        input [
          { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true },
          { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }
        ]
        output [ { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] } ]
        instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
        parameters { key: "max_sequence_length" value: { string_value: "8192" } }
        parameters { key: "device" value: { string_value: "auto" } }
    "#;

    fn gpus(n: i32) -> Devices {
        Devices {
            gpus: (0..n).collect(),
            force_cpu: false,
        }
    }

    #[test]
    fn json_like_triton() {
        let c = ModelConfig::from_pbtxt(CONFIG, "m", &gpus(1)).unwrap();
        let j = &c.json;
        assert_eq!(j["name"], "m");
        assert_eq!(j["backend"], "unweight");
        assert_eq!(j["max_batch_size"], 1);
        assert_eq!(j["model_transaction_policy"], json!({"decoupled": true}));
        assert_eq!(j["input"][0]["data_type"], "TYPE_STRING");
        assert_eq!(j["input"][0]["dims"], json!([1]));
        assert_eq!(j["input"][0]["optional"], true);
        assert_eq!(j["input"][0]["format"], "FORMAT_NONE");
        assert_eq!(j["output"][0]["dims"], json!([-1]));
        assert_eq!(j["output"][0]["label_filename"], "");
        assert_eq!(
            j["parameters"],
            json!({"max_sequence_length": {"string_value": "8192"},
                   "device": {"string_value": "auto"}})
        );
        assert_eq!(j["instance_group"][0]["name"], "m_0");
        assert_eq!(j["instance_group"][0]["kind"], "KIND_GPU");
        assert_eq!(j["instance_group"][0]["gpus"], json!([0]));
        assert_eq!(j["batch_input"], json!([]));
        assert_eq!(j["version_policy"], json!({"latest": {"num_versions": 1}}));
        assert!(c.decoupled);
        assert_eq!(c.inputs[0].datatype, "BYTES");
        assert_eq!(
            c.instances,
            [InstanceSpec {
                name: "m_0".into(),
                kind: "KIND_GPU".into(),
                device_id: 0,
                host_policy: "gpu_0".into()
            }]
        );
    }

    #[test]
    fn instance_groups() {
        let cpu = Devices {
            gpus: vec![],
            force_cpu: true,
        };
        let c = ModelConfig::from_pbtxt(CONFIG, "m", &cpu).unwrap();
        assert_eq!(c.json["instance_group"][0]["kind"], "KIND_CPU");
        assert_eq!(c.json["instance_group"][0]["gpus"], json!([]));
        assert_eq!(c.instances[0].kind, "KIND_CPU");
        assert_eq!(c.instances[0].host_policy, "cpu");

        let e = ModelConfig::from_pbtxt(CONFIG, "m", &gpus(0)).unwrap_err();
        assert!(
            format!("{e:#}").contains("invalid or unsupported gpu id 0"),
            "{e:#}"
        );

        let two =
            "backend: \"b\" instance_group [ { count: 2 kind: KIND_GPU }, { kind: KIND_CPU } ]";
        let c = ModelConfig::from_pbtxt(two, "m", &gpus(2)).unwrap();
        let names: Vec<_> = c
            .instances
            .iter()
            .map(|i| (i.name.as_str(), i.kind.as_str(), i.device_id))
            .collect();
        assert_eq!(
            names,
            [
                ("m_0_0", "KIND_GPU", 0),
                ("m_0_0", "KIND_GPU", 1),
                ("m_0_1", "KIND_GPU", 0),
                ("m_0_1", "KIND_GPU", 1),
                ("m_1", "KIND_CPU", 0)
            ]
        );
        // No group: one, on the GPUs when there are any.
        let c = ModelConfig::from_pbtxt("backend: \"b\"", "m", &gpus(0)).unwrap();
        assert_eq!(c.instances[0].kind, "KIND_CPU");
        let c = ModelConfig::from_pbtxt("backend: \"b\"", "m", &gpus(1)).unwrap();
        assert_eq!(c.instances[0].kind, "KIND_GPU");
    }

    #[test]
    fn rejects_what_triton_rejects() {
        let e = ModelConfig::from_pbtxt("backend: \"b\" bogus: 1", "m", &gpus(0)).unwrap_err();
        assert!(
            format!("{e:#}").contains("no field named \"bogus\""),
            "{e:#}"
        );
        let e = ModelConfig::from_pbtxt("backend: \"b\" input { nam: \"x\" }", "m", &gpus(0))
            .unwrap_err();
        assert!(format!("{e:#}").contains("input.nam"), "{e:#}");
        let e = ModelConfig::from_pbtxt("name: \"x\" backend: \"b\"", "m", &gpus(0)).unwrap_err();
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
        let e = ModelConfig::from_pbtxt("max_batch_size: 1", "m", &gpus(0)).unwrap_err();
        assert!(format!("{e:#}").contains("must specify 'backend'"), "{e:#}");
        let e = ModelConfig::from_pbtxt(
            "backend: \"b\" max_batch_size: 1 max_batch_size: 2",
            "m",
            &gpus(0),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("more than once"), "{e:#}");
    }

    #[test]
    fn generic_messages_pass_through() {
        let c = ModelConfig::from_pbtxt(
            "backend: \"b\" dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 100 }",
            "m",
            &gpus(0),
        )
        .unwrap();
        assert_eq!(
            c.json["dynamic_batching"],
            json!({"preferred_batch_size": [4], "max_queue_delay_microseconds": 100})
        );
    }
}
