//! The library's one error type: every variant names what went wrong and where.

use std::path::PathBuf;

/// Errors of the postforge library. Messages name the file, the tensor key and the shapes involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (in the message, not chained, so that it prints once).
        cause: std::io::Error,
    },
    /// A file could not be parsed (corrupt safetensors, bad JSON, ...).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor does not have the shape its layer needs.
    #[error("{path}: tensor `{key}` has shape {found:?}, but the base layer needs {expected:?}")]
    Shape {
        /// The file the tensor came from.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The shape the layer needs.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor is missing.
    #[error("{path}: tensor `{key}` is missing")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
    },
    /// An invalid configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The loss or gradients became NaN or infinite during training.
    #[error("non-finite {what} ({value}) at step {step}; training stopped, last good checkpoint: {checkpoint}")]
    NonFinite {
        /// "loss" or "gradient norm".
        what: &'static str,
        /// The value seen.
        value: f64,
        /// The optimizer step at which it happened.
        step: usize,
        /// The last checkpoint kept on disk.
        checkpoint: String,
    },
    /// An adapted layer refused an operation or met bad adapter state; names the layer's module
    /// path (and, in the message, the adapter).
    #[error("{path}: {msg}")]
    Layer {
        /// The module path (`model.layers.0.self_attn.q_proj`).
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// Any other failure, described in words.
    #[error("{0}")]
    Msg(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
    /// An error of the adapted layer at module path `path`.
    pub fn layer(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Layer {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// `bail!`-style early return with an [`Error::Msg`].
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Msg(format!($($arg)*))) };
}
