//! Llama architecture shapes: the presets the project measures on, the Hugging Face tensor names
//! and sizes they imply, and the `config.json` that describes them.

use serde_json::{json, Value};

/// The dimensions of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaShape {
    /// Preset name.
    pub name: &'static str,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// Context length.
    pub max_positions: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether to write Llama-3.1's "llama3" rope scaling.
    pub llama3_rope_scaling: bool,
    /// Beginning- and end-of-sequence token ids.
    pub bos: u32,
    /// End-of-sequence token id.
    pub eos: u32,
}

impl LlamaShape {
    /// Every preset, by name.
    pub const PRESETS: [&'static str; 4] =
        ["tiny", "smollm2-135m", "llama-3.1-8b", "llama-3.1-70b"];

    /// A preset by name: `tiny` (a few MB, for tests), `smollm2-135m`, `llama-3.1-8b`,
    /// `llama-3.1-70b`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "tiny" => Self {
                name: "tiny",
                hidden: 256,
                intermediate: 688,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 1024,
                tie_embeddings: false,
                rope_theta: 10000.0,
                max_positions: 2048,
                rms_norm_eps: 1e-5,
                llama3_rope_scaling: false,
                bos: 1,
                eos: 2,
            },
            "smollm2-135m" => Self {
                name: "smollm2-135m",
                hidden: 576,
                intermediate: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                vocab: 49152,
                tie_embeddings: true,
                rope_theta: 100000.0,
                max_positions: 8192,
                rms_norm_eps: 1e-5,
                llama3_rope_scaling: false,
                bos: 1,
                eos: 2,
            },
            "llama-3.1-8b" => Self {
                name: "llama-3.1-8b",
                hidden: 4096,
                intermediate: 14336,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                vocab: 128256,
                tie_embeddings: false,
                rope_theta: 500000.0,
                max_positions: 131072,
                rms_norm_eps: 1e-5,
                llama3_rope_scaling: true,
                bos: 128000,
                eos: 128001,
            },
            "llama-3.1-70b" => Self {
                name: "llama-3.1-70b",
                hidden: 8192,
                intermediate: 28672,
                layers: 80,
                heads: 64,
                kv_heads: 8,
                vocab: 128256,
                tie_embeddings: false,
                rope_theta: 500000.0,
                max_positions: 131072,
                rms_norm_eps: 1e-5,
                llama3_rope_scaling: true,
                bos: 128000,
                eos: 128001,
            },
            _ => return None,
        })
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every weight tensor of the model in Hugging Face naming, with its shape, in the order a
    /// checkpoint stores them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (self.hidden, self.intermediate, self.head_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * d, h],
            ));
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * d, h],
            ));
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * d, h],
            ));
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * d],
            ));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        out
    }

    /// Total parameters.
    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The Hugging Face `config.json` of this shape (BF16 weights).
    pub fn config_json(&self) -> Value {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "torch_dtype": "bfloat16",
        });
        if self.llama3_rope_scaling {
            c["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            });
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_8b_preset_has_8_billion_parameters() {
        let p = LlamaShape::preset("llama-3.1-8b").unwrap().parameters();
        assert_eq!(
            p, 8_030_261_248,
            "Llama-3.1-8B has 8,030,261,248 parameters"
        );
    }

    #[test]
    fn llama_70b_preset_has_70_billion_parameters() {
        let s = LlamaShape::preset("llama-3.1-70b").unwrap();
        assert_eq!(s.head_dim(), 128);
        assert_eq!(
            s.parameters(),
            70_553_706_496,
            "Llama-3.1-70B has 70,553,706,496 parameters"
        );
    }

    #[test]
    fn smollm2_preset_has_135_million_parameters() {
        let p = LlamaShape::preset("smollm2-135m").unwrap().parameters();
        assert_eq!(p, 134_515_008, "SmolLM2-135M has 134,515,008 parameters");
    }
}
