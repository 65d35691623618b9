//! GGUF (llama architecture) → Hugging Face Llama checkpoint in BF16: tensor names, shapes and
//! row order as `transformers`' `LlamaForCausalLM` expects them, and `config.json`,
//! `generation_config.json`, the tokenizer files and a model card from the GGUF metadata.
//!
//! Why the q/k rows move: llama.cpp's converter permutes the rows of each q and k projection
//! head from Hugging Face's "rotate_half" rope layout (the two halves of a head rotate together)
//! to its own interleaved layout (adjacent pairs rotate together). Undoing it is
//! [`unpermute_rows`]; without it the model runs but babbles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};

use super::{tokenizer, FetchError, CONVERTER_VERSION, STAMP_FILE};
use crate::container::{header_reserve, OutputDir, SafetensorsWriter};
use crate::gguf::{GgmlType, GgufFile};
use crate::model::synth::f32_to_bf16;
use crate::model::LlamaShape;

/// Where a GGUF came from, recorded in the model card and the stamp file.
#[derive(Clone, Debug)]
pub struct Source {
    /// The model's name, for the model card's title ("SmolLM2-135M-Instruct").
    pub name: String,
    /// Human-readable origin of the GGUF file (package, file).
    pub description: String,
    /// sha256 of the GGUF file.
    pub sha256: String,
    /// The model the GGUF was made from, with a link.
    pub model: String,
    /// The model's license (an SPDX-like id, as Hugging Face model cards state it).
    pub license: String,
}

/// One tensor of the written checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertedTensor {
    /// Hugging Face name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The GGUF tensor it was made from.
    pub gguf_name: String,
    /// Its type in the GGUF.
    pub gguf_type: GgmlType,
    /// Values that BF16 could not hold exactly (changed by the rounding).
    pub rounded: u64,
}

/// What [`convert_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Every tensor, in the order stored.
    pub tensors: Vec<ConvertedTensor>,
    /// Total parameters.
    pub parameters: u64,
    /// Size of `model.safetensors`.
    pub safetensors_bytes: u64,
    /// The `config.json` written.
    pub config: Value,
    /// Tokens in the vocabulary of the tokenizer written.
    pub vocab: usize,
    /// Number of BPE merges.
    pub merges: usize,
    /// Wall time of the conversion.
    pub elapsed: Duration,
}

/// The hyperparameters of a llama GGUF, validated.
struct Hyper {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    context: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    vocab: usize,
    bos: u32,
    eos: u32,
    pad: Option<u32>,
}

impl Hyper {
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Converts a llama-architecture GGUF into the new checkpoint directory `out` (replacing a
/// non-empty one only if `replace`). The directory appears only when everything is written and
/// the tokenizer has loaded back and round-tripped.
pub fn convert_gguf(
    g: &GgufFile,
    out: &Path,
    source: &Source,
    replace: bool,
) -> Result<ConvertReport, FetchError> {
    let start = Instant::now();
    let hp = read_hyper(g)?;
    let tied = g.tensor("output.weight").is_none();
    let shape = LlamaShape {
        name: "gguf",
        hidden: hp.hidden,
        intermediate: hp.ffn,
        layers: hp.layers,
        heads: hp.heads,
        kv_heads: hp.kv_heads,
        vocab: hp.vocab,
        tie_embeddings: tied,
        rope_theta: hp.rope_theta,
        max_positions: hp.context,
        rms_norm_eps: hp.rms_norm_eps,
        llama3_rope_scaling: false,
        bos: hp.bos,
        eos: hp.eos,
    };
    let plan = plan_tensors(g, &shape)?;
    let dir = OutputDir::create(None, out, replace)?;

    let st_path = dir.path().join("model.safetensors");
    let st_meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let layout: Vec<_> = plan
        .iter()
        .map(|t| (t.name.as_str(), Dtype::BF16, t.shape.as_slice()))
        .collect();
    let mut writer = SafetensorsWriter::create(&st_path, header_reserve(&layout, &st_meta))?;
    let mut tensors = Vec::with_capacity(plan.len());
    for mut t in plan {
        let (name, gname) = (&t.name, &t.gguf_name);
        let mut values = g.dequantize(gname)?;
        if let Some(heads) = permuted_heads(name, &hp) {
            values = unpermute_rows(&values, heads, hp.hidden).ok_or_else(|| {
                g.tensor_error(gname, "rows cannot be split into heads of even size")
            })?;
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(g
                .tensor_error(
                    gname,
                    format!("element {i} is {} after dequantization", values[i]),
                )
                .into());
        }
        let bf16: Vec<u16> = values.par_iter().map(|&v| f32_to_bf16(v)).collect();
        let rounded = values
            .par_iter()
            .zip(&bf16)
            .filter(|(v, b)| (u32::from(**b) << 16) != v.to_bits())
            .count();
        let bytes: Vec<u8> = bf16.iter().flat_map(|b| b.to_le_bytes()).collect();
        writer.add(name, Dtype::BF16, &t.shape, &bytes)?;
        t.rounded = rounded as u64;
        tensors.push(t);
    }
    writer.finish(&st_meta)?;
    let safetensors_bytes = std::fs::metadata(&st_path)
        .map_err(|e| FetchError::io(&st_path, e))?
        .len();

    let config = config_json(&shape, &hp);
    write_json(&dir.path().join("config.json"), &config)?;
    let mut gen = json!({"bos_token_id": hp.bos, "eos_token_id": hp.eos});
    if let Some(pad) = hp.pad {
        gen["pad_token_id"] = json!(pad);
    }
    write_json(&dir.path().join("generation_config.json"), &gen)?;
    let tok = tokenizer::write_files(g, dir.path(), hp.context)?;
    let card = model_card(g, source, &hp, &tensors, &tok);
    write_text(&dir.path().join("README.md"), &card)?;
    let stamp = json!({
        "converter_version": CONVERTER_VERSION,
        "written_by": format!("unweight {} fetch-test-model", env!("CARGO_PKG_VERSION")),
        "source": source.description,
        "gguf_sha256": source.sha256,
    });
    write_json(&dir.path().join(STAMP_FILE), &stamp)?;
    let dir = dir.commit()?;
    let parameters = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    Ok(ConvertReport {
        dir,
        tensors,
        parameters,
        safetensors_bytes,
        config,
        vocab: tok.vocab,
        merges: tok.merges,
        elapsed: start.elapsed(),
    })
}

/// Reorders the rows of a q or k projection from GGUF's per-head interleaved layout to Hugging
/// Face's: within each head of `head_dim` rows, the output rows are the input rows 0, 2, 4, ...
/// followed by 1, 3, 5, ... (the inverse of llama.cpp's `permute`, which reshapes the rows to
/// `(heads, 2, head_dim / 2)` and swaps the last two axes). `data` is row-major with `cols`
/// columns. `None` if the rows do not split into `heads` heads of an even number of rows.
pub fn unpermute_rows<T: Copy>(data: &[T], heads: usize, cols: usize) -> Option<Vec<T>> {
    if cols == 0 || heads == 0 || !data.len().is_multiple_of(cols) {
        return None;
    }
    let rows = data.len() / cols;
    if !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for r in 0..head_dim {
            // HF row a * half + b of a head is GGUF row 2 * b + a.
            let src = h * head_dim + 2 * (r % half) + r / half;
            out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
        }
    }
    Some(out)
}

/// The head count a tensor's rows are permuted by, for q (attention heads) and k (kv heads).
fn permuted_heads(hf_name: &str, hp: &Hyper) -> Option<usize> {
    if hf_name.ends_with(".self_attn.q_proj.weight") {
        Some(hp.heads)
    } else if hf_name.ends_with(".self_attn.k_proj.weight") {
        Some(hp.kv_heads)
    } else {
        None
    }
}

/// Per-layer tensors: Hugging Face suffix after `model.layers.N.`, GGUF suffix after `blk.N.`.
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The GGUF name of a Hugging Face Llama tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let (_, g) = LAYER_TENSORS.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Every checkpoint tensor (`rounded` still 0) after checking that the GGUF has
/// exactly these tensors with these shapes.
fn plan_tensors(g: &GgufFile, shape: &LlamaShape) -> Result<Vec<ConvertedTensor>, FetchError> {
    let convert_err = |msg: String| FetchError::Convert {
        path: g.path().to_path_buf(),
        msg,
    };
    let mut plan = Vec::new();
    for (name, dims) in shape.tensors() {
        let gname =
            gguf_name(&name).ok_or_else(|| convert_err(format!("no GGUF name for `{name}`")))?;
        let info = g.tensor(&gname).ok_or_else(|| {
            convert_err(format!(
                "tensor `{gname}` (Hugging Face `{name}`) is missing"
            ))
        })?;
        let have: Vec<u64> = info.row_major_shape();
        if have.len() != dims.len() || have.iter().zip(&dims).any(|(&a, &b)| a != b as u64) {
            return Err(convert_err(format!(
                "tensor `{gname}` has row-major shape {have:?} (ggml dims {:?}); `{name}` needs {dims:?} from the metadata",
                info.dims
            )));
        }
        plan.push(ConvertedTensor {
            gguf_type: info.ggml_type,
            name,
            shape: dims,
            gguf_name: gname,
            rounded: 0,
        });
    }
    let wanted: HashSet<&str> = plan.iter().map(|p| p.gguf_name.as_str()).collect();
    let extra: Vec<&str> = g
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !wanted.contains(n))
        .collect();
    if !extra.is_empty() {
        return Err(convert_err(format!(
            "{} tensor(s) have no Hugging Face Llama counterpart this converter knows: {}",
            extra.len(),
            extra.join(", ")
        )));
    }
    Ok(plan)
}

fn read_hyper(g: &GgufFile) -> Result<Hyper, FetchError> {
    let arch = g.require_str("general.architecture")?;
    if arch != "llama" {
        return Err(g
            .meta_error(
                "general.architecture",
                format!("`{arch}` is not supported (only llama)"),
            )
            .into());
    }
    let size = |key: &str| -> Result<usize, FetchError> {
        let v = g.require_u64(key)?;
        match usize::try_from(v) {
            Ok(n) if n > 0 && v <= u64::from(u32::MAX) => Ok(n),
            _ => Err(g
                .meta_error(key, format!("{v} is not a usable size"))
                .into()),
        }
    };
    let tokens = g
        .require_array("tokenizer.ggml.tokens")?
        .as_strings()
        .ok_or_else(|| g.meta_error("tokenizer.ggml.tokens", "expected an array of strings"))?;
    let vocab = tokens.len();
    let token_id = |key: &str| -> Result<Option<u32>, FetchError> {
        let Some(v) = g.get(key) else { return Ok(None) };
        match v.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            _ => Err(g
                .meta_error(
                    key,
                    format!("{v:?} is not a token id below the vocabulary size {vocab}"),
                )
                .into()),
        }
    };
    let heads = size("llama.attention.head_count")?;
    let hidden = size("llama.embedding_length")?;
    let kv_heads = match g.get("llama.attention.head_count_kv") {
        None => heads,
        Some(_) => size("llama.attention.head_count_kv")?,
    };
    let hp = Hyper {
        layers: size("llama.block_count")?,
        hidden,
        ffn: size("llama.feed_forward_length")?,
        heads,
        kv_heads,
        context: size("llama.context_length")?,
        rms_norm_eps: float(g, "llama.attention.layer_norm_rms_epsilon", None)?,
        rope_theta: float(g, "llama.rope.freq_base", Some(10000.0))?,
        vocab,
        bos: token_id("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| g.meta_error("tokenizer.ggml.bos_token_id", "missing"))?,
        eos: token_id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| g.meta_error("tokenizer.ggml.eos_token_id", "missing"))?,
        pad: token_id("tokenizer.ggml.padding_token_id")?,
    };
    if !hidden.is_multiple_of(heads) || !hp.head_dim().is_multiple_of(2) {
        return Err(g
            .meta_error(
                "llama.attention.head_count",
                format!("{heads} heads do not split {hidden} into even head widths"),
            )
            .into());
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(g
            .meta_error(
                "llama.attention.head_count_kv",
                format!("{kv_heads} does not divide the {heads} attention heads"),
            )
            .into());
    }
    for key in [
        "llama.rope.dimension_count",
        "llama.attention.key_length",
        "llama.attention.value_length",
    ] {
        if let Some(v) = g.get(key) {
            if v.as_u64() != Some(hp.head_dim() as u64) {
                return Err(g
                    .meta_error(
                        key,
                        format!(
                            "{v:?} differs from the head width {} (not supported)",
                            hp.head_dim()
                        ),
                    )
                    .into());
            }
        }
    }
    if let Some(v) = g.get("llama.vocab_size") {
        if v.as_u64() != Some(vocab as u64) {
            return Err(g
                .meta_error(
                    "llama.vocab_size",
                    format!("{v:?}, but the tokenizer has {vocab} tokens"),
                )
                .into());
        }
    }
    for key in ["llama.rope.scaling.type", "llama.rope.scaling_type"] {
        if let Some(v) = g.get(key) {
            if v.as_str() != Some("none") {
                return Err(g
                    .meta_error(key, format!("rope scaling {v:?} is not supported"))
                    .into());
            }
        }
    }
    if !(hp.rms_norm_eps > 0.0 && hp.rope_theta > 0.0) {
        return Err(g
            .meta_error(
                "llama.attention.layer_norm_rms_epsilon",
                "epsilon and rope base must be positive",
            )
            .into());
    }
    Ok(hp)
}

/// A float metadata value as the decimal its writer meant: an f32 `1e-5` is stored as
/// 9.99999974e-6, and `config.json` should say 1e-5, so an f32 goes through its shortest
/// round-trip decimal.
fn float(g: &GgufFile, key: &str, default: Option<f64>) -> Result<f64, FetchError> {
    use crate::gguf::Value;
    match (g.get(key), default) {
        (None, Some(d)) => Ok(d),
        (Some(Value::F32(x)), _) => Ok(x.to_string().parse().unwrap_or(f64::from(*x))),
        (Some(Value::F64(x)), _) => Ok(*x),
        _ => Ok(g.require_f64(key)?),
    }
}

/// `config.json` as `LlamaShape` writes it, with what the GGUF says and nothing it does not.
fn config_json(shape: &LlamaShape, hp: &Hyper) -> Value {
    let mut c = shape.config_json();
    if let Some(obj) = c.as_object_mut() {
        // Not recorded in a GGUF; transformers' default applies.
        obj.remove("initializer_range");
        if let Some(pad) = hp.pad {
            obj.insert("pad_token_id".into(), json!(pad));
        }
    }
    c
}

fn model_card(
    g: &GgufFile,
    source: &Source,
    hp: &Hyper,
    tensors: &[ConvertedTensor],
    tok: &tokenizer::Summary,
) -> String {
    let gguf_name = g
        .get("general.name")
        .and_then(|v| v.as_str())
        .unwrap_or("(none)");
    let mut by_type: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
    for t in tensors {
        let e = by_type.entry(t.gguf_type.name()).or_default();
        e.0 += 1;
        e.1 += t.shape.iter().product::<usize>() as u64;
        e.2 += t.rounded;
    }
    let types: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, elems, rounded))| {
            format!(
                "- {ty}: {n} tensor{}, {elems} values, {rounded} of them changed by the rounding to BF16",
                if *n == 1 { "" } else { "s" }
            )
        })
        .collect();
    let lm_head = if tensors.iter().any(|t| t.name == "lm_head.weight") {
        "a separate `lm_head.weight` (untied, as in the GGUF)"
    } else {
        "no `lm_head.weight`: the output projection is tied to the token embedding, as in the GGUF"
    };
    format!(
        r#"---
license: {license}
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- gguf-reconstruction
---

# {name}: BF16 reconstruction from a quantized GGUF

**These are not the original weights.** This checkpoint was rebuilt by `unweight fetch-test-model`
from a quantized GGUF file of {model}: every tensor was dequantized to f32 exactly as llama.cpp
does it, then rounded to BF16 (round to nearest, ties to even). The quantization error is baked
in. In a Q4_1 tensor each block of 32 consecutive weights holds only 16 distinct values, so the
model is somewhat less accurate than the original and its weight statistics are those of a 4-bit
reconstruction, not of trained BF16 weights. Use it to test software end to end, not to judge the
model.

## Source

- Model: {model}
- License: {license} (the model's license, under which the GGUF is redistributed)
- GGUF: {description}
- GGUF sha256: `{sha}`
- GGUF version {version}, `general.name` = "{gguf_name}"

## What was done

Tensors by their type in the GGUF:
{types}

- GGUF tensor names mapped to Hugging Face Llama names, ggml dimensions reversed to row-major
  shapes, and the rows of every `q_proj` / `k_proj` un-permuted: llama.cpp stores them
  interleaved per head for its rope; within each head of {head_dim} rows the Hugging Face rows are
  the GGUF rows 0, 2, 4, ... followed by 1, 3, 5, ... (q by {heads} heads, k by {kv_heads}).
- {lm_head}.
- `config.json` and `generation_config.json` from the GGUF metadata ({layers} layers, hidden
  {hidden}, MLP {ffn}, {heads} heads, {kv_heads} key/value heads, rope base {theta}, RMSNorm epsilon
  {eps}, context {context}).
- `tokenizer.json` rebuilt in Hugging Face `tokenizers` format from the GGUF vocabulary ({vocab}
  tokens, {merges} merges, {added} special tokens) with pre-tokenizer `{pre}`; the chat template
  in `tokenizer_config.json` is copied verbatim from the GGUF.
"#,
        name = source.name,
        gguf_name = gguf_name,
        license = source.license,
        model = source.model,
        description = source.description,
        sha = source.sha256,
        version = g.version(),
        types = types.join("\n"),
        head_dim = hp.head_dim(),
        heads = hp.heads,
        kv_heads = hp.kv_heads,
        layers = hp.layers,
        hidden = hp.hidden,
        ffn = hp.ffn,
        theta = hp.rope_theta,
        eps = hp.rms_norm_eps,
        context = hp.context,
        vocab = tok.vocab,
        merges = tok.merges,
        added = tok.added,
        pre = tok.pre,
    )
}

pub(super) fn write_text(path: &Path, text: &str) -> Result<(), FetchError> {
    std::fs::write(path, text).map_err(|e| FetchError::io(path, e))
}

pub(super) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), FetchError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    write_text(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_two_heads_by_hand() {
        // Two heads of 4 rows, one column: GGUF rows per head [0 1 2 3] -> HF [0 2 1 3].
        let gguf: Vec<u32> = (0..8).collect();
        assert_eq!(
            unpermute_rows(&gguf, 2, 1).unwrap(),
            vec![0, 2, 1, 3, 4, 6, 5, 7]
        );
        // One head of 6 rows, two columns: rows [0 2 4 1 3 5].
        let gguf: Vec<u32> = (0..12).collect();
        assert_eq!(
            unpermute_rows(&gguf, 1, 2).unwrap(),
            vec![0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols), i.e.
        // GGUF row h*hd + 2*b + a is HF row h*hd + a*hd/2 + b.
        let (heads, hd, cols) = (3, 8, 5);
        let hf: Vec<usize> = (0..heads * hd * cols).collect();
        let mut gguf = vec![0; hf.len()];
        for h in 0..heads {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    let (dst, src) = (h * hd + 2 * b + a, h * hd + a * hd / 2 + b);
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads, cols).unwrap(), hf);
    }

    #[test]
    fn unpermute_rejects_shapes_that_do_not_split() {
        assert!(unpermute_rows(&[0u8; 12], 2, 0).is_none());
        assert!(unpermute_rows(&[0u8; 12], 0, 1).is_none());
        assert!(unpermute_rows(&[0u8; 12], 5, 1).is_none()); // 12 rows, 5 heads
        assert!(unpermute_rows(&[0u8; 12], 4, 1).is_none()); // heads of 3 rows
        assert!(unpermute_rows(&[0u8; 13], 1, 2).is_none()); // not whole rows
    }

    #[test]
    fn hf_to_gguf_names() {
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").unwrap(),
            "blk.12.attn_output.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").unwrap(),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.norm.weight").unwrap(),
            "output_norm.weight"
        );
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
    }
}
