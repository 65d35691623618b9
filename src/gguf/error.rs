//! Errors of the GGUF reader. Every variant names the file, and the metadata key or tensor where
//! there is one, so that a user can tell what part of which file is at fault.

use std::path::PathBuf;

/// What can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// An operating-system error opening or mapping the file.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error. Part of the message rather than a `source()`, so that a
        /// printed error chain does not repeat it.
        error: std::io::Error,
    },
    /// A file whose structure is not valid GGUF: bad magic, unsupported version, truncated,
    /// inconsistent counts or offsets.
    #[error("{}: not a valid GGUF file: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset where it was found.
        msg: String,
    },
    /// A metadata entry that is missing or has the wrong type for what the caller needs.
    #[error("{}: metadata `{key}`: {msg}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor that is missing, or whose data cannot be read or dequantized.
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
}
