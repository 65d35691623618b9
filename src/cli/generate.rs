//! `unweight generate`: text generation from a checkpoint directory (plain or compressed) on the
//! CPU or CUDA backend (`--device`; CUDA falls back to the CPU, saying why, when no usable GPU is
//! found), streaming the text to stdout as it is produced.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::device::cpu::CpuOptions;
use crate::device::cuda::{self, CudaOptions, PlanChoice};
use crate::device::{load_backend, Backend, DeviceKind};
use crate::engine::text::{model_eos_tokens, ChatMessage, TextTokenizer};
use crate::engine::{Engine, EngineOptions, Event, Request, SamplingParams, StopReason};
use crate::model::weights::WeightMode;

/// How the CPU backend holds the weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsArg {
    /// Decode every matrix once at load into BF16 (fastest on CPU; see docs/engine.md).
    Decoded,
    /// Keep compressed matrices compressed and decode them during each product.
    OnTheFly,
}

impl From<WeightsArg> for WeightMode {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::Decoded => WeightMode::Decoded,
            WeightsArg::OnTheFly => WeightMode::OnTheFly,
        }
    }
}

/// Arguments of `unweight generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model directory: config.json, tokenizer.json and the weights (plain or compressed).
    #[arg(long)]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own default, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Lower each generated token's logit by this much per time it was generated (OpenAI's
    /// frequency_penalty, -2 ..= 2; 0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Lower the logit of every token generated so far by this much (OpenAI's
    /// presence_penalty, -2 ..= 2; 0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Stop when the text reaches this string (repeatable; the string is not printed).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
    /// How the weights are held in memory (CPU only; CUDA always decodes at load).
    #[arg(long, value_enum, default_value = "decoded")]
    weights: WeightsArg,
    /// Where the model runs; `cuda` falls back to the CPU when no usable GPU is found.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// CUDA only: how the linear layers are stored and multiplied (`auto`: the model
    /// directory's tuning table, made at the first load; docs/cuda.md).
    #[arg(long, value_enum, default_value = "auto")]
    plan: PlanChoice,
}

/// Runs `unweight generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
    };
    sampling.validate()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let tokenizer = TextTokenizer::from_dir(&a.model)?;
    let text = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage::user(a.prompt.clone()));
        tokenizer.apply_chat_template(&messages, true)?
    } else {
        a.prompt.clone()
    };
    // A rendered template already holds its special tokens (as transformers tokenizes it).
    let prompt = tokenizer.encode(&text, !a.chat)?;
    let cpu_opts = CpuOptions {
        max_sequences: 1,
        ..CpuOptions::default()
    };
    let cuda_opts = CudaOptions {
        max_sequences: 1,
        plan: a.plan.source(Some(&a.model)),
        ..CudaOptions::default()
    };
    let probe = match a.device {
        DeviceKind::Cuda => cuda::probe(),
        DeviceKind::Cpu => Err("not asked for".into()),
    };
    let (backend, _selected) = load_backend(
        &a.model,
        a.device,
        probe,
        a.weights.into(),
        &cpu_opts,
        &cuda_opts,
    )
    .with_context(|| format!("loading {}", a.model.display()))?;
    let eos = model_eos_tokens(&backend.config().eos_token_ids, &a.model, &tokenizer)?;
    let mut eopts = EngineOptions::for_config(backend.config());
    eopts.eos_token_ids = eos;
    let mut engine = Engine::new(backend, Some(Arc::new(tokenizer)), eopts);
    let request = Request {
        prompt: prompt.clone(),
        sampling,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        min_tokens: 0,
    };
    let id = engine.add(request)?;
    let start = Instant::now();
    let (mut out_tokens, mut out_text, mut reason) =
        (Vec::new(), String::new(), StopReason::Cancelled);
    let mut stdout = std::io::stdout().lock();
    'run: while engine.has_work() {
        for ev in engine.step()? {
            let delta = match ev {
                Event::Token {
                    id: i,
                    token,
                    text_delta,
                } if i == id => {
                    out_tokens.push(token);
                    text_delta
                }
                Event::Finished {
                    id: i,
                    reason: r,
                    text_delta,
                } if i == id => {
                    reason = r;
                    if !a.json {
                        write!(stdout, "{text_delta}")?;
                    }
                    out_text.push_str(&text_delta);
                    break 'run;
                }
                _ => continue,
            };
            if !a.json {
                write!(stdout, "{delta}")?;
                stdout.flush()?;
            }
            out_text.push_str(&delta);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens_per_s = out_tokens.len() as f64 / secs.max(1e-9);
    if a.json {
        let doc = json!({
            "prompt_tokens": prompt,
            "output_tokens": out_tokens,
            "text": out_text,
            "finish_reason": reason.as_str(),
            "tokens_per_s": tokens_per_s,
        });
        writeln!(stdout, "{doc}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {} generated in {secs:.2} s ({tokens_per_s:.1} tokens/s, prefill included), stop: {reason}]",
            prompt.len(),
            out_tokens.len()
        );
    }
    Ok(())
}
