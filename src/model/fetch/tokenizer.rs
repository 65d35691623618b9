//! The tokenizer files of the checkpoint, built from the GGUF's vocabulary: `tokenizer.json` in
//! Hugging Face `tokenizers` format, `tokenizer_config.json` (with the GGUF chat template
//! verbatim) and `special_tokens_map.json`, laid out like SmolLM2's published files.
//!
//! GGUF `tokenizer.ggml.model = "gpt2"` is byte-level BPE: the tokens and merges are already in
//! GPT-2's byte-to-unicode alphabet, so they go into the BPE model unchanged. Tokens of type
//! control (3) or unknown (2) become special added tokens, user-defined ones (4) plain added
//! tokens, as llama.cpp treats them. The pre-tokenizer is chosen by `tokenizer.ggml.pre`:
//! `smollm` is digits split one by one, then GPT-2's byte-level split; `gpt2`/`default` the
//! byte-level split alone. Anything else is refused rather than approximated.
//!
//! The written `tokenizer.json` is loaded back with the `tokenizers` crate and must round-trip a
//! probe text, split digits as the pre-tokenizer says and map each special token to its id.

use std::collections::HashMap;
use std::path::Path;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::convert::{write_json, write_text};
use super::FetchError;
use crate::gguf::GgufFile;

/// What was written, for the report and the model card.
pub(super) struct Summary {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// BPE merges.
    pub merges: usize,
    /// Added (special or user-defined) tokens.
    pub added: usize,
    /// The GGUF pre-tokenizer name.
    pub pre: String,
}

/// llama.cpp token types.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Text the loaded tokenizer must round-trip: words, punctuation, digits, runs of spaces, a
/// newline, accents, a CJK character and an emoji (multi-byte UTF-8 through the byte alphabet).
const PROBE: &str = "Hello, world! 12345\n  x = 3.14;\tdéjà vu 東京 🙂";

#[derive(Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedToken<'a>>,
    normalizer: Option<()>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModel<'a>,
}

#[derive(Serialize)]
struct AddedToken<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: OrderedVocab<'a>,
    merges: &'a [String],
}

/// The vocabulary as a JSON object in id order (as Hugging Face writes it), which a map type
/// would not keep.
struct OrderedVocab<'a>(&'a [String]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (id, tok) in self.0.iter().enumerate() {
            m.serialize_entry(tok, &id)?;
        }
        m.end()
    }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": true})
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`
/// from the GGUF's tokenizer metadata, and checks the result by loading it.
pub(super) fn write_files(g: &GgufFile, dir: &Path, max_len: usize) -> Result<Summary, FetchError> {
    let model = g.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(g
            .meta_error(
                "tokenizer.ggml.model",
                format!("`{model}` is not supported (only gpt2, byte-level BPE)"),
            )
            .into());
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let pre_tokenizer = match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(false, true)],
        }),
        "gpt2" | "default" => byte_level(false, true),
        other => {
            return Err(g
                .meta_error(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{other}` is not supported (smollm, gpt2)"),
                )
                .into())
        }
    };
    for key in [
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ] {
        if g.get(key).and_then(|v| v.as_bool()) == Some(true) {
            return Err(g
                .meta_error(
                    key,
                    "true is not supported (the written tokenizer adds no tokens)",
                )
                .into());
        }
    }
    let tokens = g
        .require_array("tokenizer.ggml.tokens")?
        .as_strings()
        .ok_or_else(|| g.meta_error("tokenizer.ggml.tokens", "expected an array of strings"))?;
    let types = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.to_i64s())
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                g.meta_error(
                    "tokenizer.ggml.token_type",
                    "expected one integer per token",
                )
            })?,
    };
    let merges = g
        .require_array("tokenizer.ggml.merges")?
        .as_strings()
        .ok_or_else(|| g.meta_error("tokenizer.ggml.merges", "expected an array of strings"))?;

    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        if let Some(first) = ids.insert(tok, id) {
            return Err(g
                .meta_error(
                    "tokenizer.ggml.tokens",
                    format!("token {tok:?} appears as {first} and {id}"),
                )
                .into());
        }
    }
    for (i, m) in merges.iter().enumerate() {
        let ok = m.split_once(' ').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && !b.contains(' ')
                && ids.contains_key(a)
                && ids.contains_key(b)
                && {
                    let joined = format!("{a}{b}");
                    ids.contains_key(joined.as_str())
                }
        });
        if !ok {
            return Err(g
                .meta_error(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({m:?}) is not two vocabulary tokens joining into one"),
                )
                .into());
        }
    }

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| matches!(t, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(id, (tok, &t))| AddedToken {
            id: id as u32,
            content: tok,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: t != TYPE_USER_DEFINED,
        })
        .collect();
    let doc = TokenizerJson {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer: None,
        pre_tokenizer,
        post_processor: byte_level(true, false),
        decoder: byte_level(true, true),
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: false,
            vocab: OrderedVocab(tokens),
            merges,
        },
    };
    let tok_path = dir.join("tokenizer.json");
    let text = serde_json::to_string_pretty(&doc).expect("tokenizer.json serializes") + "\n";
    write_text(&tok_path, &text)?;

    // tokenizer_config.json and special_tokens_map.json, as transformers writes them.
    let name_of = |key: &str| -> Option<&str> {
        g.get(key)
            .and_then(|v| v.as_u64())
            .and_then(|id| tokens.get(id as usize))
            .map(String::as_str)
    };
    let template = match g.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| g.meta_error("tokenizer.chat_template", "expected a string"))?,
        ),
    };
    let mut decoder = Map::new();
    for t in &doc.added_tokens {
        decoder.insert(
            t.id.to_string(),
            json!({"content": t.content, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": t.special}),
        );
    }
    // The special tokens a chat template uses are the ones transformers lists as additional.
    let additional: Vec<&str> = doc
        .added_tokens
        .iter()
        .filter(|t| t.special && template.is_some_and(|tpl| tpl.contains(t.content)))
        .map(|t| t.content)
        .collect();
    let mut special_map = Map::new();
    if !additional.is_empty() {
        special_map.insert("additional_special_tokens".into(), json!(additional));
    }
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(name) = name_of(key) {
            special_map.insert(field.into(), json!(name));
        }
    }
    let mut config = special_map.clone();
    config.insert("add_prefix_space".into(), json!(false));
    config.insert("added_tokens_decoder".into(), Value::Object(decoder));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(max_len));
    config.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    config.insert("vocab_size".into(), json!(tokens.len()));
    if let Some(tpl) = template {
        config.insert("chat_template".into(), json!(tpl));
    }
    write_json(&dir.join("tokenizer_config.json"), &Value::Object(config))?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &Value::Object(special_map),
    )?;

    check_tokenizer(&tok_path, &doc.added_tokens, pre == "smollm")?;
    Ok(Summary {
        vocab: tokens.len(),
        merges: merges.len(),
        added: doc.added_tokens.len(),
        pre: pre.to_string(),
    })
}

/// Loads the written tokenizer and checks it: [`PROBE`] round-trips, digits come out one per
/// token when `digits_split`, and every added token encodes to its own id.
fn check_tokenizer(
    path: &Path,
    added: &[AddedToken<'_>],
    digits_split: bool,
) -> Result<(), FetchError> {
    let fail = |msg: String| FetchError::Tokenizer {
        path: path.to_path_buf(),
        msg,
    };
    let tk =
        tokenizers::Tokenizer::from_file(path).map_err(|e| fail(format!("does not load: {e}")))?;
    let enc = tk
        .encode(PROBE, false)
        .map_err(|e| fail(format!("encoding {PROBE:?}: {e}")))?;
    let back = tk
        .decode(enc.get_ids(), false)
        .map_err(|e| fail(format!("decoding: {e}")))?;
    if back != PROBE {
        return Err(fail(format!("{PROBE:?} decodes back as {back:?}")));
    }
    if digits_split {
        if let Some(t) = enc
            .get_tokens()
            .iter()
            .find(|t| t.chars().any(|c| c.is_ascii_digit()) && t.len() > 1)
        {
            return Err(fail(format!(
                "token {t:?} holds a digit with other characters; digits must be split"
            )));
        }
    }
    for t in added {
        let e = tk
            .encode(t.content, false)
            .map_err(|e| fail(format!("encoding {:?}: {e}", t.content)))?;
        if e.get_ids() != [t.id] {
            return Err(fail(format!(
                "{:?} encodes as {:?}, not [{}]",
                t.content,
                e.get_ids(),
                t.id
            )));
        }
    }
    Ok(())
}
