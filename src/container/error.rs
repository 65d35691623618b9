//! Errors of the container layer. Every variant names the file, and where there is one the
//! tensor, so that a user can tell which part of a checkpoint is at fault.

use std::path::PathBuf;

/// What can go wrong reading or writing a checkpoint directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// An operating-system error on a file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file that is not a valid safetensors file (truncated, bad header, bad offsets).
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A checkpoint directory that lacks something it needs or is inconsistent.
    #[error("{}: {msg}", path.display())]
    Checkpoint {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor whose stored data is damaged: checksum mismatch or inconsistent parts.
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Corrupt {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A compressed file written by a newer (or unknown) version of the format.
    #[error("{}: unweight format version {found} is not supported (this build reads versions 1 to {supported})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// A tensor of a dtype the operation cannot handle.
    #[error("{}: tensor `{tensor}`: unsupported dtype {dtype}", path.display())]
    UnsupportedDtype {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype it has.
        dtype: String,
    },
    /// A tensor name that the checkpoint does not contain.
    #[error("{}: no tensor named `{tensor}`", path.display())]
    NoSuchTensor {
        /// The checkpoint directory.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
}

impl ContainerError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A checkpoint-level error.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A corrupt-tensor error.
    pub fn corrupt(path: impl Into<PathBuf>, tensor: &str, msg: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}
