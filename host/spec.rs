//! `requests.json`: what the host submits, and the tensor wire formats.
//!
//! The file is either a list of request specs or an object `{"requests": [...],
//! "unload_after_responses": n, "timeout_s": t}` (docs/test-host.md has the full format).
//! Inputs are encoded here exactly as Triton hands them to a backend: little-endian elements,
//! BYTES as a little-endian `u32` length followed by the bytes, optionally split across several
//! buffers. [`core_check`] applies the checks Triton's core makes before a request reaches the
//! backend (unless the request sets `skip_core_checks`, to test the backend's own defences).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::model_config::ModelConfig;

/// A whole run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub requests: Vec<RequestSpec>,
    /// Unload (ModelInstanceFinalize, ModelFinalize, Finalize) once this many responses arrived.
    #[serde(default)]
    pub unload_after_responses: Option<u64>,
    /// Seconds to wait for every request's FINAL before declaring a violation.
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

/// One request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub id: String,
    #[serde(default)]
    pub inputs: BTreeMap<String, InputSpec>,
    /// Requested outputs; absent = every output the config declares (as Triton does).
    #[serde(default)]
    pub outputs: Option<Vec<String>>,
    /// Request parameters: strings, integers, booleans, doubles.
    #[serde(default)]
    pub parameters: BTreeMap<String, Json>,
    /// Submit this long after the run starts.
    #[serde(default)]
    pub delay_ms: u64,
    /// Mark the request cancelled once it received this many responses (0: right after the
    /// Execute call that delivered it returns).
    #[serde(default)]
    pub cancel_after_responses: Option<u64>,
    /// Mark the request cancelled this long after it was submitted.
    #[serde(default)]
    pub cancel_after_ms: Option<u64>,
    /// Deliver the request even if Triton's core would reject it (wrong type, shape, size,
    /// undeclared input): tests the backend's own validation.
    #[serde(default)]
    pub skip_core_checks: bool,
    /// `TRITONBACKEND_RequestFlags` (sequence start/end bits).
    #[serde(default)]
    pub flags: u32,
    /// `TRITONBACKEND_RequestCorrelationId`.
    #[serde(default)]
    pub correlation_id: u64,
    /// Set Triton's VERBOSE log level to this just before the request is submitted, as a
    /// client's `/v2/logging` call changes it while the server runs.
    #[serde(default)]
    pub log_verbose: Option<u32>,
    /// Submit only once another request got this many responses (and `delay_ms` passed): to
    /// make a request arrive while another one is known to be streaming.
    #[serde(default)]
    pub after: Option<After>,
}

/// "After request `id` got `responses` responses".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct After {
    pub id: String,
    pub responses: u64,
}

/// One input tensor.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Wire data type (`BYTES`, `INT32`, ...); default: the config's.
    #[serde(default)]
    pub datatype: Option<String>,
    /// Shape; default `[1, n]` with a batch dimension (`max_batch_size > 0`), else `[n]`.
    #[serde(default)]
    pub shape: Option<Vec<i64>>,
    /// Elements (nested arrays are flattened). BYTES: strings or `{"hex": "..."}`; floats may
    /// be `"nan"`, `"inf"`, `"-inf"`.
    #[serde(default)]
    pub data: Vec<Json>,
    /// The exact buffer bytes, hex (overrides `data`): for deliberately malformed tensors.
    #[serde(default)]
    pub raw_hex: Option<String>,
    /// Deliver the bytes in this many buffers (split at arbitrary byte offsets).
    #[serde(default)]
    pub split_buffers: Option<u32>,
    /// Where `TRITONBACKEND_InputBuffer` says the buffers are: `CPU` (default), `CPU_PINNED` or
    /// `GPU` (as when a client uses CUDA shared memory). The bytes are in host memory whatever
    /// it says: a backend must not read a buffer reported as GPU memory as CPU memory.
    #[serde(default)]
    pub memory_type: Option<String>,
}

/// Reads a requests file (a list, or an object with `requests`).
pub fn parse_run(text: &str) -> Result<RunSpec> {
    let v: Json = serde_json::from_str(text).context("requests file is not JSON")?;
    let run = if v.is_array() {
        RunSpec {
            requests: serde_json::from_value(v).context("requests")?,
            ..RunSpec::default()
        }
    } else {
        serde_json::from_value(v).context("requests file")?
    };
    let mut ids = std::collections::BTreeSet::new();
    for r in &run.requests {
        if !ids.insert(r.id.as_str()) {
            bail!("request id '{}' is used twice", r.id);
        }
    }
    for r in &run.requests {
        if let Some(a) = &r.after {
            if a.id == r.id || !ids.contains(a.id.as_str()) {
                bail!(
                    "request '{}': after.id '{}' must name another request",
                    r.id,
                    a.id
                );
            }
        }
    }
    Ok(run)
}

/// Triton's data type names, indexed by `TRITONSERVER_DataType`.
pub const DATATYPES: [&str; 15] = [
    "INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
];

/// `TRITONSERVER_DataType` of a wire name.
pub fn datatype_code(name: &str) -> Option<u32> {
    DATATYPES
        .iter()
        .position(|&d| d == name)
        .filter(|&i| i != 0)
        .map(|i| i as u32)
}

/// The wire name of a `TRITONSERVER_DataType`.
pub fn datatype_name(code: u32) -> String {
    DATATYPES
        .get(code as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("TYPE_{code}"))
}

/// Bytes per element; 0 for BYTES (variable) and INVALID.
pub fn element_size(code: u32) -> usize {
    match code {
        1 | 2 | 6 => 1,
        3 | 7 | 10 | 14 => 2,
        4 | 8 | 11 => 4,
        5 | 9 | 12 => 8,
        _ => 0,
    }
}

/// Product of the dimensions; `None` if one is negative or it overflows.
pub fn element_count(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| {
        if d < 0 {
            None
        } else {
            acc.checked_mul(d as u64)
        }
    })
}

/// An input ready to be handed out.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedInput {
    pub name: String,
    pub datatype: u32,
    pub shape: Vec<i64>,
    /// One entry per buffer; together the tensor's bytes.
    pub buffers: Vec<Vec<u8>>,
    /// The `TRITONSERVER_MemoryType` the buffers are reported in.
    pub memory_type: u32,
}

impl EncodedInput {
    /// The tensor's bytes, all buffers joined.
    pub fn bytes(&self) -> Vec<u8> {
        self.buffers.concat()
    }
}

/// Encodes every input of `req`.
pub fn encode_inputs(req: &RequestSpec, config: &ModelConfig) -> Result<Vec<EncodedInput>> {
    req.inputs
        .iter()
        .map(|(name, spec)| {
            encode_input(name, spec, config)
                .with_context(|| format!("request '{}', input '{name}'", req.id))
        })
        .collect()
}

fn encode_input(name: &str, spec: &InputSpec, config: &ModelConfig) -> Result<EncodedInput> {
    let dtype_name = match (&spec.datatype, config.input(name)) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.datatype.clone(),
        (None, None) => bail!("not declared in the model config: give its 'datatype'"),
    };
    let datatype =
        datatype_code(&dtype_name).with_context(|| format!("unknown datatype '{dtype_name}'"))?;
    let mut elements = Vec::new();
    flatten(&spec.data, &mut elements);
    let bytes = match &spec.raw_hex {
        Some(h) => from_hex(h).context("raw_hex")?,
        None => {
            let mut out = Vec::new();
            for (i, e) in elements.iter().enumerate() {
                encode_element(datatype, e, &mut out)
                    .with_context(|| format!("element {i} ({e})"))?;
            }
            out
        }
    };
    let shape = match &spec.shape {
        Some(s) => s.clone(),
        None => {
            let n = if spec.raw_hex.is_some() && elements.is_empty() {
                1
            } else {
                elements.len() as i64
            };
            if config.max_batch_size > 0 {
                vec![1, n]
            } else {
                vec![n]
            }
        }
    };
    if spec.raw_hex.is_none() {
        match element_count(&shape) {
            Some(n) if n == elements.len() as u64 => {}
            _ => bail!(
                "shape {shape:?} does not hold the {} elements given (use raw_hex for a \
                 deliberately inconsistent tensor)",
                elements.len()
            ),
        }
    }
    let n = spec.split_buffers.unwrap_or(1).max(1) as usize;
    let memory_type = match spec.memory_type.as_deref() {
        None | Some("CPU") => 0,
        Some("CPU_PINNED") => 1,
        Some("GPU") => 2,
        Some(other) => bail!("memory_type '{other}': expected CPU, CPU_PINNED or GPU"),
    };
    Ok(EncodedInput {
        name: name.to_string(),
        datatype,
        shape,
        buffers: split(&bytes, n),
        memory_type,
    })
}

fn flatten(v: &[Json], out: &mut Vec<Json>) {
    for e in v {
        match e {
            Json::Array(a) => flatten(a, out),
            other => out.push(other.clone()),
        }
    }
}

/// Splits `bytes` into `n` contiguous, non-empty parts (fewer if there are fewer bytes).
pub fn split(bytes: &[u8], n: usize) -> Vec<Vec<u8>> {
    let n = n.clamp(1, bytes.len().max(1));
    let base = bytes.len() / n;
    let extra = bytes.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(bytes[at..at + len].to_vec());
        at += len;
    }
    out
}

/// Bytes from hex digits (whitespace ignored).
pub fn from_hex(h: &str) -> Result<Vec<u8>> {
    let h: String = h.chars().filter(|c| !c.is_whitespace()).collect();
    if !h.len().is_multiple_of(2) {
        bail!("odd number of hex digits");
    }
    (0..h.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&h[i..i + 2], 16).with_context(|| format!("'{}'", &h[i..i + 2]))
        })
        .collect()
}

fn float_of(e: &Json) -> Result<f64> {
    match e {
        Json::Number(n) => n.as_f64().context("not a number"),
        Json::String(s) => match s.to_ascii_lowercase().as_str() {
            "nan" => Ok(f64::NAN),
            "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
            "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
            _ => bail!("expected a number, \"nan\", \"inf\" or \"-inf\""),
        },
        _ => bail!("expected a number"),
    }
}

fn int_of(e: &Json, min: i128, max: i128) -> Result<i128> {
    let v: i128 = match e {
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                i128::from(i)
            } else if let Some(u) = n.as_u64() {
                i128::from(u)
            } else {
                bail!("expected an integer")
            }
        }
        Json::Bool(b) => i128::from(*b),
        _ => bail!("expected an integer"),
    };
    if v < min || v > max {
        bail!("{v} is out of range [{min}, {max}]");
    }
    Ok(v)
}

fn encode_element(datatype: u32, e: &Json, out: &mut Vec<u8>) -> Result<()> {
    match datatype {
        13 => {
            let bytes = match e {
                Json::String(s) => s.as_bytes().to_vec(),
                Json::Object(o) if o.len() == 1 && o.contains_key("hex") => {
                    from_hex(o["hex"].as_str().context("hex must be a string")?)?
                }
                _ => bail!("BYTES elements are strings or {{\"hex\": \"...\"}}"),
            };
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        1 => out.push(match e {
            Json::Bool(b) => u8::from(*b),
            _ => int_of(e, 0, 1)? as u8,
        }),
        2 => out.push(int_of(e, 0, u8::MAX.into())? as u8),
        3 => out.extend_from_slice(&(int_of(e, 0, u16::MAX.into())? as u16).to_le_bytes()),
        4 => out.extend_from_slice(&(int_of(e, 0, u32::MAX.into())? as u32).to_le_bytes()),
        5 => out.extend_from_slice(&(int_of(e, 0, u64::MAX.into())? as u64).to_le_bytes()),
        6 => {
            out.extend_from_slice(&(int_of(e, i8::MIN.into(), i8::MAX.into())? as i8).to_le_bytes())
        }
        7 => out.extend_from_slice(
            &(int_of(e, i16::MIN.into(), i16::MAX.into())? as i16).to_le_bytes(),
        ),
        8 => out.extend_from_slice(
            &(int_of(e, i32::MIN.into(), i32::MAX.into())? as i32).to_le_bytes(),
        ),
        9 => out.extend_from_slice(
            &(int_of(e, i64::MIN.into(), i64::MAX.into())? as i64).to_le_bytes(),
        ),
        10 => out.extend_from_slice(&f32_to_f16(float_of(e)? as f32).to_le_bytes()),
        11 => out.extend_from_slice(&(float_of(e)? as f32).to_le_bytes()),
        12 => out.extend_from_slice(&float_of(e)?.to_le_bytes()),
        14 => out.extend_from_slice(&f32_to_bf16(float_of(e)? as f32).to_le_bytes()),
        _ => bail!("cannot encode data type {}", datatype_name(datatype)),
    }
    Ok(())
}

/// Round-to-nearest-even BF16 (NaN stays NaN).
fn f32_to_bf16(f: f32) -> u16 {
    let b = f.to_bits();
    if f.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Round-to-nearest-even IEEE half precision.
fn f32_to_f16(f: f32) -> u16 {
    let b = f.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        r += 1;
    }
    sign | r as u16
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalize.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// The elements of a BYTES buffer; an error says where it stops making sense.
pub fn parse_bytes_elements(buf: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        if buf.len() - at < 4 {
            return Err(format!(
                "{} trailing bytes at offset {at} cannot hold an element length",
                buf.len() - at
            ));
        }
        let n = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4;
        if n > buf.len() - at {
            return Err(format!(
                "element {} declares {n} bytes at offset {} but only {} remain",
                out.len(),
                at - 4,
                buf.len() - at
            ));
        }
        out.push(&buf[at..at + n]);
        at += n;
    }
    Ok(out)
}

/// Decodes a tensor for the report: numbers as JSON numbers (non-finite floats as strings),
/// BYTES as strings (lossy; `{"hex": ...}` when not UTF-8). The error says what is malformed.
pub fn decode_tensor(datatype: u32, shape: &[i64], bytes: &[u8]) -> (Json, Option<String>) {
    let count = element_count(shape);
    if datatype == 13 {
        return match parse_bytes_elements(bytes) {
            Ok(els) => {
                let data: Vec<Json> = els
                    .iter()
                    .map(|e| match std::str::from_utf8(e) {
                        Ok(s) => Json::String(s.to_string()),
                        Err(_) => {
                            serde_json::json!({"hex": hex(e), "lossy": String::from_utf8_lossy(e)})
                        }
                    })
                    .collect();
                let problem = match count {
                    Some(n) if n == els.len() as u64 => None,
                    _ => Some(format!(
                        "BYTES buffer holds {} elements, shape {shape:?} says {}",
                        els.len(),
                        count.map_or("an invalid count".to_string(), |n| n.to_string())
                    )),
                };
                (Json::Array(data), problem)
            }
            Err(e) => (Json::Null, Some(format!("malformed BYTES buffer: {e}"))),
        };
    }
    let size = element_size(datatype);
    if size == 0 {
        return (
            Json::Null,
            Some(format!("data type {}", datatype_name(datatype))),
        );
    }
    let problem = match count {
        Some(n) if n.checked_mul(size as u64) == Some(bytes.len() as u64) => None,
        _ => Some(format!(
            "{} buffer of {} bytes, shape {shape:?} needs {}",
            datatype_name(datatype),
            bytes.len(),
            count.map_or("an invalid size".to_string(), |n| (n * size as u64)
                .to_string())
        )),
    };
    let num = |f: f64| {
        serde_json::Number::from_f64(f)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(f.to_string()))
    };
    let data: Vec<Json> = bytes
        .chunks_exact(size)
        .map(|c| match datatype {
            1 => Json::Bool(c[0] != 0),
            2 => c[0].into(),
            3 => u16::from_le_bytes([c[0], c[1]]).into(),
            4 => u32::from_le_bytes(c.try_into().expect("4")).into(),
            5 => u64::from_le_bytes(c.try_into().expect("8")).into(),
            6 => (c[0] as i8).into(),
            7 => i16::from_le_bytes([c[0], c[1]]).into(),
            8 => i32::from_le_bytes(c.try_into().expect("4")).into(),
            9 => i64::from_le_bytes(c.try_into().expect("8")).into(),
            10 => num(f64::from(f16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
            11 => num(f64::from(f32::from_le_bytes(c.try_into().expect("4")))),
            12 => num(f64::from_le_bytes(c.try_into().expect("8"))),
            _ => num(f64::from(bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))),
        })
        .collect();
    (Json::Array(data), problem)
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Why Triton's core would answer the request itself (code name, message) instead of passing
/// it to the backend; `None` if it passes. Mirrors the checks of core's
/// `InferenceRequest::Normalize`/`ValidateBytesInputs`.
pub fn core_check(
    req: &RequestSpec,
    inputs: &[EncodedInput],
    config: &ModelConfig,
) -> Option<(&'static str, String)> {
    let model = &config.name;
    let invalid = |m: String| Some(("INVALID_ARG", m));
    for i in inputs {
        if config.input(&i.name).is_none() {
            let allowed: Vec<&str> = config.inputs.iter().map(|t| t.name.as_str()).collect();
            return invalid(format!(
                "[request id: {}] unexpected inference input '{}' for model '{model}', allowed \
                 inputs are: {}",
                req.id,
                i.name,
                allowed.join(", ")
            ));
        }
    }
    let missing: Vec<&str> = config
        .inputs
        .iter()
        .filter(|t| !t.optional && !inputs.iter().any(|i| i.name == t.name))
        .map(|t| t.name.as_str())
        .collect();
    if !missing.is_empty() {
        return invalid(format!(
            "[request id: {}] expected {} inputs but got {} inputs for model '{model}'. Got \
             input(s) {:?}, but missing required input(s) {:?}. Please provide all required \
             input(s).",
            req.id,
            config.inputs.iter().filter(|t| !t.optional).count(),
            inputs.len(),
            inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            missing
        ));
    }
    if let Some(outs) = &req.outputs {
        for o in outs {
            if config.output(o).is_none() {
                return invalid(format!(
                    "[request id: {}] unexpected inference output '{o}' for model '{model}'",
                    req.id
                ));
            }
        }
    }
    let mut batch: Option<i64> = None;
    for i in inputs {
        let t = config.input(&i.name).expect("checked above");
        let dims: &[i64] = if config.max_batch_size > 0 {
            let Some((&b, rest)) = i.shape.split_first() else {
                return invalid(format!(
                    "[request id: {}] input '{}' has no batch dimension but model '{model}' has \
                     max_batch_size {}",
                    req.id, i.name, config.max_batch_size
                ));
            };
            if b < 1 || b > config.max_batch_size {
                return invalid(format!(
                    "[request id: {}] inference request batch-size must be <= {} for '{model}'",
                    req.id, config.max_batch_size
                ));
            }
            if batch.is_some_and(|x| x != b) {
                return invalid(format!(
                    "[request id: {}] input '{}' batch size does not match other inputs for \
                     '{model}'",
                    req.id, i.name
                ));
            }
            batch = Some(b);
            rest
        } else {
            &i.shape
        };
        let dname = datatype_name(i.datatype);
        if dname != t.datatype {
            return invalid(format!(
                "[request id: {}] inference input '{}' data-type is '{dname}', but model \
                 '{model}' expects '{}'",
                req.id, i.name, t.datatype
            ));
        }
        let fits = dims.len() == t.dims.len()
            && dims
                .iter()
                .zip(&t.dims)
                .all(|(&d, &c)| d >= 0 && (c == -1 || c == d));
        if !fits {
            let mut expect = t.dims.clone();
            let mut got = i.shape.clone();
            if config.max_batch_size > 0 {
                expect.insert(0, -1);
            } else {
                got = dims.to_vec();
            }
            return invalid(format!(
                "[request id: {}] unexpected shape for input '{}' for model '{model}'. Expected \
                 {expect:?}, got {got:?}",
                req.id, i.name
            ));
        }
        let count = element_count(&i.shape).unwrap_or(0);
        let bytes = i.bytes();
        if i.datatype == 13 {
            match parse_bytes_elements(&bytes) {
                Err(_) => {
                    return invalid(format!(
                        "[request id: {}] element byte size indicator exceeds the end of the \
                         buffer for input '{}'",
                        req.id, i.name
                    ))
                }
                Ok(els) if els.len() as u64 != count => {
                    return invalid(format!(
                        "[request id: {}] expected {count} string elements for inference input \
                         '{}' for model '{model}', got {}",
                        req.id,
                        i.name,
                        els.len()
                    ))
                }
                Ok(_) => {}
            }
        } else {
            let expect = count * element_size(i.datatype) as u64;
            if expect != bytes.len() as u64 {
                return invalid(format!(
                    "[request id: {}] input byte size mismatch for input '{}' for model \
                     '{model}'. Expected {expect}, got {}",
                    req.id,
                    i.name,
                    bytes.len()
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_config::Devices;
    use serde_json::json;

    fn config() -> ModelConfig {
        ModelConfig::from_pbtxt(
            r#"backend: "b" max_batch_size: 1
               input [ { name: "text_input" data_type: TYPE_STRING dims: [1] optional: true },
                       { name: "max_tokens" data_type: TYPE_INT32 dims: [1] optional: true },
                       { name: "ids" data_type: TYPE_INT32 dims: [-1] } ]
               output [ { name: "text_output" data_type: TYPE_STRING dims: [-1] } ]"#,
            "m",
            &Devices::default(),
        )
        .unwrap()
    }

    fn req(v: Json) -> RequestSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn bytes_wire_format_and_split_buffers() {
        let r = req(json!({"id": "a", "inputs": {
            "text_input": {"data": ["hé"], "split_buffers": 3},
            "ids": {"data": [[1, -2]]}}}));
        let e = encode_inputs(&r, &config()).unwrap();
        let ids = &e[0];
        assert_eq!(ids.name, "ids");
        assert_eq!(ids.shape, [1, 2]);
        assert_eq!(ids.buffers, [[1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff]]);
        let t = &e[1];
        assert_eq!(t.shape, [1, 1]);
        assert_eq!(t.buffers.len(), 3);
        assert_eq!(t.bytes(), [3, 0, 0, 0, b'h', 0xc3, 0xa9]);
        assert_eq!(
            t.buffers.iter().map(Vec::len).collect::<Vec<_>>(),
            [3, 2, 2]
        );
        assert_eq!(core_check(&r, &e, &config()), None);
    }

    #[test]
    fn hex_raw_and_invalid_utf8() {
        let r = req(json!({"id": "a", "inputs": {
            "text_input": {"data": [{"hex": "ff00"}]},
            "ids": {"raw_hex": "0100", "shape": [1, 1]}}}));
        let e = encode_inputs(&r, &config()).unwrap();
        assert_eq!(e[1].bytes(), [2, 0, 0, 0, 0xff, 0]);
        assert_eq!(e[0].bytes(), [1, 0]);
        let (code, msg) = core_check(&r, &e, &config()).unwrap();
        assert_eq!(code, "INVALID_ARG");
        assert!(
            msg.contains("input byte size mismatch for input 'ids'"),
            "{msg}"
        );
    }

    #[test]
    fn core_checks() {
        let c = config();
        let check = |v: Json| {
            let r = req(v);
            let e = encode_inputs(&r, &c).unwrap();
            core_check(&r, &e, &c).map(|(_, m)| m)
        };
        let m = check(
            json!({"id": "a", "inputs": {"ids": {"data": [1]}, "bogus": {"datatype": "INT32", "data": [1]}}}),
        );
        assert!(m.unwrap().contains("unexpected inference input 'bogus'"));
        let m = check(json!({"id": "a", "inputs": {"text_input": {"data": ["x"]}}}));
        assert!(m.unwrap().contains("missing required input(s) [\"ids\"]"));
        let m = check(
            json!({"id": "a", "inputs": {"ids": {"data": [1]}, "max_tokens": {"datatype": "FP32", "data": [1.0]}}}),
        );
        assert!(m
            .unwrap()
            .contains("data-type is 'FP32', but model 'm' expects 'INT32'"));
        let m = check(
            json!({"id": "a", "inputs": {"ids": {"data": [1]}, "text_input": {"data": ["a", "b"]}}}),
        );
        assert!(m.unwrap().contains("Expected [-1, 1], got [1, 2]"));
        let m = check(json!({"id": "a", "inputs": {"ids": {"data": [1, 2], "shape": [2, 1]}}}));
        assert!(m.unwrap().contains("batch-size must be <= 1"));
        let m = check(
            json!({"id": "a", "inputs": {"ids": {"data": [1]}, "text_input": {"raw_hex": "0500000061", "shape": [1, 1]}}}),
        );
        assert!(m.unwrap().contains("byte size indicator exceeds"));
        let m = check(json!({"id": "a", "inputs": {"ids": {"data": [1]}}, "outputs": ["nope"]}));
        assert!(m.unwrap().contains("unexpected inference output 'nope'"));
    }

    #[test]
    fn spec_errors() {
        let c = config();
        let bad = |v: Json| format!("{:#}", encode_inputs(&req(v), &c).unwrap_err());
        assert!(
            bad(json!({"id": "a", "inputs": {"max_tokens": {"data": [2147483648u64]}}}))
                .contains("out of range")
        );
        assert!(bad(
            json!({"id": "a", "inputs": {"max_tokens": {"data": [1, 2], "shape": [1, 1]}}})
        )
        .contains("does not hold"));
        assert!(bad(json!({"id": "a", "inputs": {"x": {"data": [1]}}})).contains("datatype"));
        assert!(parse_run(r#"[{"id": "a"}, {"id": "a"}]"#).is_err());
        assert!(parse_run(r#"[{"id": "a", "bogus": 1}]"#).is_err());
        let run = parse_run(r#"{"requests": [{"id": "a"}], "unload_after_responses": 3}"#).unwrap();
        assert_eq!(run.unload_after_responses, Some(3));
        // `after` names another request of the file.
        let after = |a: &str| {
            parse_run(&format!(
                r#"[{{"id": "a"}}, {{"id": "b", "after": {{"id": "{a}", "responses": 1}}}}]"#
            ))
        };
        assert!(after("a").is_ok());
        assert!(after("b")
            .unwrap_err()
            .to_string()
            .contains("another request"));
        assert!(after("zz").is_err());
        // A tensor's memory type.
        let e = encode_inputs(
            &req(json!({"id": "a", "inputs": {"ids": {"data": [1], "memory_type": "GPU"}}})),
            &config(),
        )
        .unwrap();
        assert_eq!(e[0].memory_type, 2);
        assert!(
            bad(json!({"id": "a", "inputs": {"ids": {"data": [1], "memory_type": "TPU"}}}))
                .contains("memory_type")
        );
    }

    #[test]
    fn floats_and_decoding() {
        let mut out = Vec::new();
        encode_element(11, &json!("nan"), &mut out).unwrap();
        assert!(f32::from_le_bytes(out[..4].try_into().unwrap()).is_nan());
        for f in [0.0f32, 1.0, -2.5, 65504.0, 6.1e-5, 1e-7] {
            let h = f32_to_f16(f);
            let back = f16_to_f32(h);
            assert!((back - f).abs() <= f.abs() * 1e-3 + 6e-8, "{f} -> {back}");
            assert_eq!(
                bf16_to_f32(f32_to_bf16(f)),
                f32::from_bits(f32_to_bf16(f) as u32 * 65536)
            );
        }
        let (d, p) = decode_tensor(13, &[1, 2], &[1, 0, 0, 0, b'a', 1, 0, 0, 0, 0xff]);
        assert_eq!(d[0], "a");
        assert_eq!(d[1]["hex"], "ff");
        assert_eq!(p, None);
        let (_, p) = decode_tensor(13, &[1, 1], &[5, 0, 0, 0, b'a']);
        assert!(p.unwrap().contains("declares 5 bytes"));
        let (d, p) = decode_tensor(8, &[1, 2], &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d, json!([1, -1]));
        assert_eq!(p, None);
        let (_, p) = decode_tensor(8, &[1, 3], &[1, 0, 0, 0]);
        assert!(p.unwrap().contains("needs 12"));
        let (d, _) = decode_tensor(11, &[1], &f32::INFINITY.to_le_bytes());
        assert_eq!(d, json!(["inf"]));
    }
}
