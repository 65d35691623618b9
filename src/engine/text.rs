//! Text in and out of a model directory: the Hugging Face tokenizer (`tokenizer.json`) and the
//! chat template and special tokens of `tokenizer_config.json`.
//!
//! The chat template is the Jinja template the model ships, rendered with minijinja the way
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string
//! methods), so a model's own conventions (SmolLM2's ChatML and default system message, for
//! one) come from its files, not from code here.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::detok::Detokenizer;
use super::EngineError;

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer and chat template.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn tok_err(what: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(what.to_string())
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(tok_err(format!(
                "{}: no tokenizer.json (the model directory needs one for text)",
                dir.display()
            )));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| tok_err(format!("{}: {e}", cfg_path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| tok_err(format!("{}: {e}", cfg_path.display())))?
        } else {
            Value::Null
        };
        let chat_template = match &cfg["chat_template"] {
            Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let special = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        Ok(Self {
            tokenizer,
            chat_template,
            bos_token: special(&cfg["bos_token"]),
            eos_token: special(&cfg["eos_token"]),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS
    /// where the model wants one). Special tokens written in the text are recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token string (special tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The end-of-sequence token named by tokenizer_config.json, as an id.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the model's chat template over `messages`, ending with the assistant's turn
    /// opening when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            tok_err("tokenizer_config.json has no chat_template; use a plain prompt")
        })?;
        render_template(
            source,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

/// End-of-sequence tokens from every place a Hugging Face model names them: config.json (given
/// as `config_eos`), generation_config.json in `dir` and the tokenizer's `eos_token`; sorted,
/// without duplicates.
pub fn model_eos_tokens(
    config_eos: &[u32],
    dir: &std::path::Path,
    tokenizer: &TextTokenizer,
) -> Result<Vec<u32>, EngineError> {
    let mut eos = config_eos.to_vec();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| tok_err(format!("{}: invalid JSON: {e}", path.display())))?;
        match &v["eos_token_id"] {
            serde_json::Value::Null => {}
            serde_json::Value::Number(n) => eos.extend(n.as_u64().map(|x| x as u32)),
            serde_json::Value::Array(a) => eos.extend(
                a.iter()
                    .filter_map(serde_json::Value::as_u64)
                    .map(|x| x as u32),
            ),
            other => {
                return Err(tok_err(format!(
                    "{}: eos_token_id {other} is not a token id or a list of them",
                    path.display()
                )))
            }
        }
    }
    eos.extend(tokenizer.eos_token_id());
    eos.sort_unstable();
    eos.dedup();
    Ok(eos)
}

/// Renders a Hugging Face chat template (public for tests of templates without a tokenizer).
pub fn render_template(
    source: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, EngineError> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let tmpl = env
        .template_from_str(source)
        .map_err(|e| tok_err(format!("chat template: {e:#}")))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| tok_err(format!("chat template: {e:#}")))
}

impl Detokenizer for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer.decode(ids, true).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its tokenizer_config.json ships it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_default_system_message() {
        let out = render_template(SMOLLM2, &[ChatMessage::user("Hi?")], true, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let sys = ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        };
        let out =
            render_template(SMOLLM2, &[sys, ChatMessage::user("Hi?")], false, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}";
        assert_eq!(
            render_template(t, &[ChatMessage::user("  x ")], false, None, None).unwrap(),
            "x"
        );
        let sys = ChatMessage {
            role: "system".into(),
            content: String::new(),
        };
        let e = render_template(t, &[sys], false, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("first must be user"), "{e}");
    }
}
