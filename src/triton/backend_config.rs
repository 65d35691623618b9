//! The backend's own settings, from `tritonserver --backend-config=unweight,<key>=<value>`.
//!
//! Triton hands them to `TRITONBACKEND_Initialize` as the JSON `{"cmdline": {"<key>": "<value>"}}`,
//! together with global settings it passes to every backend (`backend-directory`,
//! `auto-complete-config`, `min-compute-capability`, `default-max-batch-size`, ...). Keys:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `default-max-tokens` | tokens generated for a request without `max_tokens` | 128 |
//!
//! A bad value of a key this backend reads is an error (Initialize fails, naming it). Other keys
//! are logged and ignored: Triton adds keys of its own, and their set changes between releases.

use serde_json::Value;

use super::error::TritonError;

/// Default of `default-max-tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 128;

/// Settings shared by every model of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    /// Tokens generated when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            default_max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

impl BackendSettings {
    /// Parses the backend configuration JSON; returns the settings and the keys it ignored.
    pub fn from_json(json: &str) -> Result<(Self, Vec<String>), TritonError> {
        let bad = |field: &str, reason: String| TritonError::Config {
            field: format!("--backend-config unweight,{field}"),
            reason,
        };
        let root: Value =
            serde_json::from_str(json).map_err(|e| bad("(all)", format!("not valid JSON: {e}")))?;
        let mut settings = Self::default();
        let mut ignored = Vec::new();
        let Some(cmdline) = root.get("cmdline") else {
            return Ok((settings, ignored));
        };
        let cmdline = cmdline
            .as_object()
            .ok_or_else(|| bad("(all)", "\"cmdline\" is not an object".into()))?;
        for (key, value) in cmdline {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match key.as_str() {
                "default-max-tokens" => {
                    settings.default_max_tokens = match text.trim().parse::<usize>() {
                        Ok(n) if n > 0 => n,
                        _ => {
                            return Err(bad(
                                key,
                                format!("expected a positive integer, got {text:?}"),
                            ))
                        }
                    }
                }
                _ => ignored.push(key.clone()),
            }
        }
        Ok((settings, ignored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_keys_and_ignores_tritons() {
        let (s, ignored) = BackendSettings::from_json(
            r#"{"cmdline": {"default-max-tokens": "32", "backend-directory": "/opt/tritonserver/backends",
                "min-compute-capability": "6.000000"}}"#,
        )
        .unwrap();
        assert_eq!(s.default_max_tokens, 32);
        assert_eq!(ignored, vec!["backend-directory", "min-compute-capability"]);
        let (s, ignored) = BackendSettings::from_json("{}").unwrap();
        assert_eq!(s, BackendSettings::default());
        assert!(ignored.is_empty());
    }

    #[test]
    fn bad_values_name_the_key() {
        for v in ["0", "-4", "many", ""] {
            let json = format!(r#"{{"cmdline": {{"default-max-tokens": "{v}"}}}}"#);
            let e = BackendSettings::from_json(&json).unwrap_err().to_string();
            assert!(e.contains("unweight,default-max-tokens"), "{e}");
        }
        assert!(BackendSettings::from_json("[").is_err());
        assert!(BackendSettings::from_json(r#"{"cmdline": 3}"#).is_err());
    }
}
