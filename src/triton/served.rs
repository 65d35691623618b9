//! What a loaded model serves with, independent of Triton's handles: the weights (loaded and
//! checked once per model, shared by its instances), the tokenizer, the limits, and the step
//! from checked inputs to an engine request. No FFI here.

use std::path::Path;
use std::sync::Arc;

use super::backend_config::BackendSettings;
use super::config::ModelConfig;
use super::error::TritonError;
use super::inputs::{GenerateInputs, Prompt, RawInput};
use crate::container::Checkpoint;
use crate::device::cpu::CpuOptions;
use crate::device::cuda::{self, CudaOptions, PlanChoice};
use crate::device::{backend_on, Backend, DeviceKind, Selected};
use crate::engine::text::{model_eos_tokens, TextTokenizer};
use crate::engine::{Detokenizer, Engine, EngineOptions, Request, SamplingParams};
use crate::model::weights::{LlamaWeights, WeightMode};
use crate::model::LlamaConfig;

/// A model ready to serve.
pub(super) struct Served {
    /// config.json.
    pub cfg: LlamaConfig,
    weights: Arc<LlamaWeights>,
    /// The tokenizer (tokenizer.json and tokenizer_config.json).
    pub tokenizer: Arc<TextTokenizer>,
    eos: Vec<u32>,
    /// Tokens per sequence, prompt included.
    pub context: usize,
    /// KV-cache slots per instance.
    pub max_sequences: usize,
    /// Tokens for a request without `max_tokens`.
    pub default_max_tokens: usize,
    /// Whether tensors carry a batch dimension (`max_batch_size` ≥ 1).
    pub batched: bool,
    /// Whether a non-streaming response leaves the prompt out when the request does not say
    /// (the `exclude_input_in_output` parameter).
    exclude_input_default: bool,
    /// Bytes of the weights as stored in the version folder (compressed tensors as encoded).
    pub weight_stored_bytes: u64,
    /// Bytes the same tensors take in their original dtype (BF16).
    pub weight_bf16_bytes: u64,
    /// The `kv_cache_bytes` parameter (the CUDA engine sizes its slab from it).
    kv_cache_bytes: Option<u64>,
    /// The `plan` parameter and the weights directory (where `auto` keeps tuning tables).
    plan: PlanChoice,
    weights_dir: std::path::PathBuf,
}

/// Where an instance's engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// The CPU engine.
    Cpu,
    /// The CUDA engine on this GPU; `required` (the `device: gpu` parameter) makes a missing GPU
    /// an error instead of a fallback to the CPU.
    Gpu {
        /// Device ordinal.
        ordinal: usize,
        /// Fail rather than fall back.
        required: bool,
    },
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("context", &self.context)
            .field("max_sequences", &self.max_sequences)
            .field("default_max_tokens", &self.default_max_tokens)
            .finish_non_exhaustive()
    }
}

/// A request turned into engine terms.
#[derive(Debug)]
pub(super) struct Prepared {
    /// What the engine runs.
    pub request: Request,
    /// One response per token.
    pub stream: bool,
    /// Text a non-streaming response starts with (the prompt, unless excluded).
    pub echo_text: String,
    /// Ids a non-streaming response starts with.
    pub echo_ids: Vec<u32>,
}

fn files_err(dir: &Path, e: impl std::error::Error + Send + Sync + 'static) -> TritonError {
    TritonError::ModelFiles {
        dir: dir.display().to_string(),
        source: Box::new(e),
    }
}

/// Bytes of KV cache one sequence of `context` tokens needs on the CPU engine (f32 keys and
/// values in every layer).
pub(super) fn kv_bytes_per_sequence(cfg: &LlamaConfig, context: usize) -> u64 {
    (cfg.num_hidden_layers * cfg.kv_dim() * 2 * 4) as u64 * context as u64
}

impl Served {
    /// Loads config.json, the tokenizer and every weight of `config.weights_dir` (each tensor
    /// checksum-verified, compressed ones decoded once), and works out the limits.
    pub fn load(config: &ModelConfig, settings: &BackendSettings) -> Result<Self, TritonError> {
        let dir = &config.weights_dir;
        let cfg = LlamaConfig::from_dir(dir).map_err(|e| files_err(dir, e))?;
        let tokenizer = TextTokenizer::from_dir(dir).map_err(|e| files_err(dir, e))?;
        let eos =
            model_eos_tokens(&cfg.eos_token_ids, dir, &tokenizer).map_err(|e| files_err(dir, e))?;
        let ckpt = Checkpoint::open(dir).map_err(|e| files_err(dir, e))?;
        let weight_stored_bytes = ckpt
            .entries()
            .iter()
            .map(|e| ckpt.stored_bytes(e) as u64)
            .sum();
        let weight_bf16_bytes = ckpt
            .entries()
            .iter()
            .map(|e| e.original_bytes() as u64)
            .sum();
        let weights =
            LlamaWeights::load(&ckpt, &cfg, WeightMode::Decoded).map_err(|e| files_err(dir, e))?;

        let context = config
            .max_sequence_length
            .unwrap_or(cfg.max_position_embeddings);
        if context > cfg.max_position_embeddings {
            return Err(TritonError::config(
                "parameters.max_sequence_length",
                format!(
                    "{context} is more than the model's max_position_embeddings ({})",
                    cfg.max_position_embeddings
                ),
            ));
        }
        let mut max_sequences = config.max_concurrent_sequences;
        if let Some(budget) = config.kv_cache_bytes {
            let per = kv_bytes_per_sequence(&cfg, context);
            let fit = usize::try_from(budget / per).unwrap_or(usize::MAX);
            if fit == 0 {
                return Err(TritonError::config(
                    "parameters.kv_cache_bytes",
                    format!(
                        "{budget} bytes do not hold one sequence of {context} tokens ({per} \
                         bytes); raise it or lower max_sequence_length"
                    ),
                ));
            }
            max_sequences = max_sequences.min(fit);
        }
        Ok(Self {
            weights: Arc::new(weights),
            tokenizer: Arc::new(tokenizer),
            eos,
            context,
            max_sequences,
            default_max_tokens: settings.default_max_tokens,
            batched: config.max_batch_size > 0,
            weight_stored_bytes,
            weight_bf16_bytes,
            exclude_input_default: config.exclude_input_in_output,
            kv_cache_bytes: config.kv_cache_bytes,
            plan: config.plan,
            weights_dir: config.weights_dir.clone(),
            cfg,
        })
    }

    /// A new engine over this model for one instance, with its own KV cache, on the device
    /// `placement` names. A GPU that cannot be used (no driver, no device, a build without
    /// kernels) means the CPU engine with a WARN log saying why, unless the GPU is required.
    pub fn engine(
        &self,
        instance: &str,
        placement: Placement,
    ) -> Result<Engine<Box<dyn Backend>>, TritonError> {
        let (kind, probe, ordinal, required) = match placement {
            Placement::Gpu { ordinal, required } => (
                DeviceKind::Cuda,
                cuda::probe_ordinal(ordinal),
                ordinal,
                required,
            ),
            Placement::Cpu => (DeviceKind::Cpu, Err(String::new()), 0, false),
        };
        let cpu_opts = CpuOptions {
            max_sequences: self.max_sequences,
            max_context: Some(self.context),
            kernel: None,
        };
        let cuda_opts = CudaOptions {
            ordinal,
            max_sequences: self.max_sequences,
            max_context: Some(self.context),
            kv_budget_bytes: self
                .kv_cache_bytes
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            plan: self.plan.source(Some(&self.weights_dir)),
            ..CudaOptions::default()
        };
        if let (true, Err(reason)) = (required, &probe) {
            return Err(TritonError::Unavailable(format!(
                "instance {instance}: parameters.device is gpu, but GPU {ordinal} cannot be \
                 used: {reason}"
            )));
        }
        let (backend, selected) = backend_on(
            self.cfg.clone(),
            Arc::clone(&self.weights),
            kind,
            probe,
            &cpu_opts,
            &cuda_opts,
        )
        .map_err(|e| TritonError::Internal {
            context: format!("instance {instance}: loading the model on its device"),
            source: Box::new(e),
        })?;
        match selected {
            Selected::Cuda(info) => tracing::info!(
                "instance {instance}: CUDA engine on GPU {ordinal} ({})",
                info.name
            ),
            Selected::Cpu {
                fallback: Some(reason),
            } => tracing::warn!(
                "instance {instance}: GPU {ordinal} cannot be used ({reason}); running on the \
                 CPU engine"
            ),
            Selected::Cpu { fallback: None } => {}
        }
        let eopts = EngineOptions {
            eos_token_ids: self.eos.clone(),
            max_batch: self.max_sequences,
            ..EngineOptions::for_config(&self.cfg)
        };
        let detok: Arc<dyn Detokenizer> = self.tokenizer.clone();
        Ok(Engine::new(backend, Some(detok), eopts))
    }

    /// Checks a request's inputs against the contract and the model and turns them into an
    /// engine request.
    pub fn prepare(&self, inputs: &[RawInput]) -> Result<Prepared, TritonError> {
        let g = GenerateInputs::parse(inputs, self.batched)?;
        let prompt: Vec<u32> = match &g.prompt {
            Prompt::Text(t) => self
                .tokenizer
                .encode(t, true)
                .map_err(|e| TritonError::InvalidInput(format!("input 'text_input': {e}")))?,
            Prompt::Ids(ids) => ids.iter().map(|&t| t as u32).collect(),
        };
        let max_tokens = g
            .max_tokens
            .unwrap_or_else(|| self.default_max_tokens.min(self.context));
        g.check_against(&prompt, max_tokens, self.cfg.vocab_size, self.context)?;
        let exclude = g.exclude_input.unwrap_or(self.exclude_input_default);
        let (echo_text, echo_ids) = if g.stream || exclude {
            (String::new(), Vec::new())
        } else {
            let text = match &g.prompt {
                Prompt::Text(t) => t.clone(),
                Prompt::Ids(_) => self
                    .tokenizer
                    .decode(&prompt)
                    .map_err(|e| TritonError::InvalidInput(format!("input 'input_ids': {e}")))?,
            };
            (text, prompt.clone())
        };
        let request = Request {
            prompt,
            sampling: SamplingParams {
                temperature: g.temperature,
                top_k: g.top_k,
                top_p: g.top_p,
                seed: g.seed,
                frequency_penalty: g.frequency_penalty,
                presence_penalty: g.presence_penalty,
            },
            max_tokens,
            stop: g.stop_words,
            ignore_eos: false,
            min_tokens: g.min_length,
        };
        request
            .validate(self.cfg.vocab_size, self.context, true)
            .map_err(|e| TritonError::InvalidInput(e.to_string()))?;
        Ok(Prepared {
            request,
            stream: g.stream,
            echo_text,
            echo_ids,
        })
    }
}
