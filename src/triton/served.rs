//! What a loaded model serves with, independent of Triton's handles: the CPU engine's weights
//! (loaded and checked once per model, shared by its CPU instances, and only held when the model
//! has or may fall back to a CPU instance: a GPU instance streams its weights from the stored
//! file to the device, tensor by tensor, with no host copy), the tokenizer, the limits, and the
//! step from checked inputs to an engine request. No FFI here.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::backend_config::BackendSettings;
use super::config::{DeviceChoice, InstanceKind, ModelConfig};
use super::error::TritonError;
use super::inputs::{GenerateInputs, Prompt, RawInput};
use crate::container::Checkpoint;
use crate::device::cpu::{CpuBackend, CpuOptions};
use crate::device::cuda::{self, CudaOptions, PlanChoice};
use crate::device::{backend_on, Backend, DeviceError, DeviceKind, Selected};
use crate::engine::text::{model_eos_tokens, TextTokenizer};
use crate::engine::{Detokenizer, Engine, EngineOptions, Request, SamplingParams};
use crate::model::weights::{LlamaWeights, WeightMode};
use crate::model::LlamaConfig;

/// A model ready to serve.
pub(super) struct Served {
    /// config.json.
    pub cfg: LlamaConfig,
    /// The CPU engine's weights (decoded BF16), shared by the CPU instances: loaded by
    /// [`Served::load`] when the model has or may fall back to a CPU instance, else on the first
    /// CPU engine asked for (a GPU instance falling back); `None` while no CPU instance needs
    /// them.
    cpu_weights: Mutex<Option<Arc<LlamaWeights>>>,
    /// The tokenizer (tokenizer.json and tokenizer_config.json).
    pub tokenizer: Arc<TextTokenizer>,
    eos: Vec<u32>,
    /// Tokens per sequence, prompt included.
    pub context: usize,
    /// Sequences running at once per instance (`max_concurrent_sequences`).
    pub max_sequences: usize,
    /// Prompt tokens prefilled per engine step at most (`max_prefill_tokens`).
    max_prefill_tokens: usize,
    /// The engine's pacing of long prompts against running streams (`max_step_slowdown`).
    max_step_slowdown: Option<f64>,
    /// Prompts the engine never paces (`short_prompt_tokens`).
    short_prompt_tokens: usize,
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
    /// The `kv_cache_bytes` parameter (the block pool of either engine's paged cache).
    kv_cache_bytes: Option<u64>,
    /// The `kv_cache_fraction` parameter (the CUDA engine without `kv_cache_bytes`).
    kv_cache_fraction: f64,
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

/// The load log's memory summary: weights X GiB (BF16 would be Y GiB), KV capacity N tokens,
/// that is M sequences at the configured maximum length.
pub(super) fn memory_line(backend: &dyn Backend, context: usize) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let w = backend.weight_memory();
    let kv = backend.kv_usage();
    format!(
        "weights {:.2} GiB (BF16 would be {:.2} GiB), KV capacity {} tokens, that is {} \
         sequences of {context} tokens",
        w.bytes as f64 / GIB,
        w.bf16_bytes as f64 / GIB,
        kv.capacity_tokens(),
        kv.total_blocks / kv.blocks_for(context).max(1),
    )
}

impl Served {
    /// Loads config.json and the tokenizer, opens the checkpoint, and works out the limits. The
    /// CPU engine's weights (every tensor checksum-verified, compressed ones decoded once) are
    /// loaded now unless every instance will run on a GPU (`parameters.device: gpu`, or only
    /// `KIND_GPU` groups and a usable GPU): GPU instances stream theirs from the file at
    /// instance load, and a corrupt tensor fails that instead, naming the tensor.
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
        let gpu_only = config.device == DeviceChoice::Gpu
            || (config.device == DeviceChoice::Auto
                && !config.instance_groups.is_empty()
                && config
                    .instance_groups
                    .iter()
                    .all(|g| g.kind == InstanceKind::Gpu)
                && cuda::probe().is_ok());
        let cpu_weights = if gpu_only {
            None
        } else {
            Some(Arc::new(
                LlamaWeights::load(&ckpt, &cfg, WeightMode::Decoded)
                    .map_err(|e| files_err(dir, e))?,
            ))
        };
        drop(ckpt);

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
        // The CPU engine's cache is paged: the budget bounds the tokens held by all sequences
        // together, not the number of sequences; it must hold one sequence of the full length.
        let max_sequences = config.max_concurrent_sequences;
        if let Some(budget) = config.kv_cache_bytes {
            let per = CpuBackend::kv_bytes_per_token(&cfg) * context as u64;
            if budget < per {
                return Err(TritonError::config(
                    "parameters.kv_cache_bytes",
                    format!(
                        "{budget} bytes do not hold one sequence of {context} tokens ({per} \
                         bytes); raise it or lower max_sequence_length"
                    ),
                ));
            }
        }
        Ok(Self {
            cpu_weights: Mutex::new(cpu_weights),
            tokenizer: Arc::new(tokenizer),
            eos,
            context,
            max_sequences,
            max_prefill_tokens: config.max_prefill_tokens,
            max_step_slowdown: config.max_step_slowdown,
            short_prompt_tokens: config.short_prompt_tokens,
            default_max_tokens: settings.default_max_tokens,
            batched: config.max_batch_size > 0,
            weight_stored_bytes,
            weight_bf16_bytes,
            exclude_input_default: config.exclude_input_in_output,
            kv_cache_bytes: config.kv_cache_bytes,
            kv_cache_fraction: config.kv_cache_fraction,
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
            kv_cache_bytes: self.kv_cache_bytes,
            kernel: None,
        };
        let cuda_opts = CudaOptions {
            ordinal,
            max_sequences: self.max_sequences,
            max_context: Some(self.context),
            kv_budget_bytes: self
                .kv_cache_bytes
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            kv_fraction: self.kv_cache_fraction,
            plan: self.plan.source(Some(&self.weights_dir)),
            ..CudaOptions::default()
        };
        if let (true, Err(reason)) = (required, &probe) {
            return Err(TritonError::Unavailable(format!(
                "instance {instance}: parameters.device is gpu, but GPU {ordinal} cannot be \
                 used: {reason}"
            )));
        }
        let loading = |e: DeviceError| TritonError::Internal {
            context: format!("instance {instance}: loading the model on its device"),
            source: Box::new(e),
        };
        let (backend, selected): (Box<dyn Backend>, Selected) = match probe {
            // Streamed from the stored file to the device, tensor by tensor.
            Ok(info) if kind == DeviceKind::Cuda => (
                Box::new(cuda::CudaBackend::load(&self.weights_dir, &cuda_opts).map_err(loading)?),
                Selected::Cuda(info),
            ),
            probe => backend_on(
                self.cfg.clone(),
                self.cpu_weights()?,
                kind,
                probe,
                &cpu_opts,
                &cuda_opts,
            )
            .map_err(loading)?,
        };
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
        tracing::info!(
            "instance {instance}: {}",
            memory_line(&*backend, self.context)
        );
        let eopts = EngineOptions {
            eos_token_ids: self.eos.clone(),
            max_batch: self.max_sequences,
            max_prefill_tokens: self.max_prefill_tokens,
            max_step_slowdown: self.max_step_slowdown,
            short_prompt_tokens: self.short_prompt_tokens,
        };
        let detok: Arc<dyn Detokenizer> = self.tokenizer.clone();
        Ok(Engine::new(backend, Some(detok), eopts))
    }

    /// The CPU engine's weights, loaded now if no CPU instance needed them before (one load per
    /// model, shared by every CPU instance).
    fn cpu_weights(&self) -> Result<Arc<LlamaWeights>, TritonError> {
        let mut held = self
            .cpu_weights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(w) = held.as_ref() {
            return Ok(Arc::clone(w));
        }
        let dir = &self.weights_dir;
        let ckpt = Checkpoint::open(dir).map_err(|e| files_err(dir, e))?;
        let w = Arc::new(
            LlamaWeights::load(&ckpt, &self.cfg, WeightMode::Decoded)
                .map_err(|e| files_err(dir, e))?,
        );
        *held = Some(Arc::clone(&w));
        Ok(w)
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
            stop_token_ids: g.stop_token_ids,
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
