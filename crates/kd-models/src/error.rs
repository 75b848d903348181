//! Typed model errors: checkpoint problems name every key at fault.
use std::path::PathBuf;

/// Everything that can go wrong building, loading or importing a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A checkpoint does not fit the model; nothing was loaded.
    #[error("{path}: checkpoint does not match the model ({})", describe(.missing, .unexpected, .mismatched))]
    KeyMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// Keys the model needs that the file lacks.
        missing: Vec<String>,
        /// Keys in the file the model does not have.
        unexpected: Vec<String>,
        /// (key, model shape, file shape).
        mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    /// A file that is not what it should be.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A bad configuration value.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn describe(
    missing: &[String],
    unexpected: &[String],
    mismatched: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    let mut parts = Vec::new();
    let list = |v: &[String]| {
        let head: Vec<&str> = v.iter().take(12).map(String::as_str).collect();
        let more = if v.len() > 12 {
            format!(", … {} more", v.len() - 12)
        } else {
            String::new()
        };
        format!("{}{}", head.join(", "), more)
    };
    if !missing.is_empty() {
        parts.push(format!(
            "{} missing key(s): {}",
            missing.len(),
            list(missing)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected key(s): {}",
            unexpected.len(),
            list(unexpected)
        ));
    }
    if !mismatched.is_empty() {
        let m: Vec<String> = mismatched
            .iter()
            .take(12)
            .map(|(k, a, b)| format!("{k} model {a:?} vs file {b:?}"))
            .collect();
        parts.push(format!(
            "{} mis-shaped key(s): {}",
            mismatched.len(),
            m.join(", ")
        ));
    }
    parts.join("; ")
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
        let path = path.into();
        move |source| ModelError::Io { path, source }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
