//! `unweight-triton-host`: a stand-in for `tritonserver` that loads a Triton backend
//! (`libtriton_<name>.so`) exactly as Triton does, provides the server side of Triton's C API,
//! drives the backend's entry points with requests from a JSON file, and enforces Triton's
//! ownership and lifecycle rules (docs/test-host.md).
//!
//! It knows Triton, not any particular backend. Exit status: 0 = no rule broken, 1 = at least
//! one violation (listed in the report), 2 = usage or setup error (bad arguments, bad
//! config.pbtxt or requests file, the library does not load).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod guard;
mod ledger;
mod model_config;
mod pbtxt;
mod run;
mod server;
mod spec;
mod sys;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use model_config::{Devices, ModelConfig};

#[derive(Parser)]
#[command(
    name = "unweight-triton-host",
    version,
    about = "A test stand-in for tritonserver: loads a Triton backend with dlopen(RTLD_NOW | \
             RTLD_LOCAL), serves requests from a JSON file and checks Triton's rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum InstanceKind {
    /// Keep the config's instance groups.
    Config,
    /// Rewrite every instance group to KIND_CPU (no GPU here).
    Cpu,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// The model repository (the directory holding <model>/config.pbtxt and <model>/<version>/).
    #[arg(long)]
    repository: PathBuf,
    /// The model's directory name in the repository.
    #[arg(long)]
    model: String,
    /// The version folder Triton loads.
    #[arg(long, default_value_t = 1)]
    version: u64,
    /// `cpu` rewrites every instance group to KIND_CPU.
    #[arg(long, value_enum, default_value = "config")]
    instance_kind: InstanceKind,
    /// GPUs the host pretends exist (ids 0..N); default: the /dev/nvidiaN devices present.
    #[arg(long)]
    gpus: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the backend, serve the requests, unload, and write the report.
    Run {
        /// The backend shared object (libtriton_<name>.so).
        #[arg(long)]
        backend: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// `--backend-config k=v` as tritonserver's `--backend-config=<backend>,k=v`
        /// (repeatable).
        #[arg(long = "backend-config", value_name = "K=V")]
        backend_config: Vec<String>,
        /// The requests file (docs/test-host.md); none = load and unload only.
        #[arg(long)]
        requests: Option<PathBuf>,
        /// Write the report here (default: stdout).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print each response's text_output to stdout as it arrives.
        #[arg(long)]
        print_stream: bool,
        /// Echo the backend's log messages and every violation to stderr as they happen.
        #[arg(long)]
        log: bool,
        /// Enable VERBOSE logging (TRITONSERVER_LogIsEnabled(VERBOSE)).
        #[arg(long, default_value_t = 0)]
        log_verbose: u32,
        /// Seconds to wait for every FINAL (overrides the requests file's timeout_s).
        #[arg(long)]
        timeout: Option<f64>,
        /// Unload once this many responses arrived (overrides the requests file).
        #[arg(long)]
        unload_after_responses: Option<u64>,
        /// Most requests per Execute call (0 = every request that is due).
        #[arg(long, default_value_t = 0)]
        max_requests_per_execute: usize,
        /// TRITONBACKEND_ApiVersion reported to the backend, MAJOR.MINOR.
        #[arg(long, default_value = "1.19")]
        api_version: String,
        /// Do not require statistics to be reported before a request is released.
        #[arg(long)]
        allow_missing_statistics: bool,
    },
    /// Print the model configuration JSON TRITONBACKEND_ModelConfig would return.
    Config {
        #[command(flatten)]
        model: ModelArgs,
    },
}

fn devices(m: &ModelArgs) -> Devices {
    let n = m.gpus.unwrap_or_else(|| {
        (0..64)
            .take_while(|i| std::path::Path::new(&format!("/dev/nvidia{i}")).exists())
            .count() as u32
    });
    Devices {
        gpus: (0..n as i32).collect(),
        force_cpu: matches!(m.instance_kind, InstanceKind::Cpu),
    }
}

fn parse_version(s: &str) -> Result<(u32, u32)> {
    let (a, b) = s
        .split_once('.')
        .with_context(|| format!("--api-version {s}: expected MAJOR.MINOR"))?;
    Ok((a.parse()?, b.parse()?))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match dispatch(cli) {
        Ok(violations) => ExitCode::from(u8::from(violations)),
        Err(e) => {
            eprintln!("unweight-triton-host: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// One line on stderr, and the violations: what a human or a CI log needs at a glance.
fn summarize(report: &serde_json::Value) {
    let n = |k: &str| report[k].as_array().map_or(0, Vec::len);
    eprintln!(
        "unweight-triton-host: {} requests, {} responses, {} violations, {} warnings",
        n("requests"),
        report["total_responses"],
        n("violations"),
        n("warnings")
    );
    for v in report["violations"].as_array().into_iter().flatten() {
        eprintln!("  VIOLATION {}", v.as_str().unwrap_or_default());
    }
}

/// Runs the command; `Ok(true)` when the run broke a rule.
fn dispatch(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Config { model } => {
            let dir = model.repository.join(&model.model);
            let text = std::fs::read_to_string(dir.join("config.pbtxt"))
                .with_context(|| format!("reading {}", dir.join("config.pbtxt").display()))?;
            let c = ModelConfig::from_pbtxt(&text, &model.model, &devices(&model))?;
            println!("{}", serde_json::to_string_pretty(&c.json)?);
            Ok(false)
        }
        Command::Run {
            backend,
            model,
            backend_config,
            requests,
            report,
            print_stream,
            log,
            log_verbose,
            timeout,
            unload_after_responses,
            max_requests_per_execute,
            api_version,
            allow_missing_statistics,
        } => {
            let mut cfg = BTreeMap::new();
            for kv in backend_config {
                let Some((k, v)) = kv.split_once('=') else {
                    bail!("--backend-config {kv}: expected K=V");
                };
                cfg.insert(k.to_string(), v.to_string());
            }
            let mut run = match &requests {
                Some(p) => spec::parse_run(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )
                .with_context(|| format!("{}", p.display()))?,
                None => spec::RunSpec::default(),
            };
            if unload_after_responses.is_some() {
                run.unload_after_responses = unload_after_responses;
            }
            let timeout = timeout.or(run.timeout_s).unwrap_or(600.0);
            if !(timeout > 0.0 && timeout.is_finite()) {
                bail!("--timeout must be a positive number of seconds");
            }
            let args = run::RunArgs {
                backend,
                repository: model.repository.clone(),
                model: model.model.clone(),
                version: model.version,
                devices: devices(&model),
                backend_config: cfg,
                run,
                report,
                print_stream,
                log_to_stderr: log,
                log_verbose,
                api_version: parse_version(&api_version)?,
                timeout: Duration::from_secs_f64(timeout),
                max_requests_per_execute,
                require_statistics: !allow_missing_statistics,
            };
            let (report, violations) = run::run(args)?;
            summarize(&report);
            Ok(violations)
        }
    }
}
