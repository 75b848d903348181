//! Typed errors of the data crate: every variant names the file or folder at fault.
use std::path::PathBuf;

/// Everything that can go wrong while reading or preparing a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An expected file or folder is absent.
    #[error("missing {what}: {path} (expected {expected})")]
    Missing {
        /// What was being looked for.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What a correct layout has there.
        expected: String,
    },
    /// A binary file whose size is not a positive multiple of the record size.
    #[error("{path}: size {actual} bytes is not a positive multiple of the {record}-byte record ({expected})")]
    BadFileSize {
        /// The file.
        path: PathBuf,
        /// Its size on disk.
        actual: u64,
        /// The record size of the format.
        record: usize,
        /// A human description of the format.
        expected: String,
    },
    /// A label byte outside the data set's classes.
    #[error("{path}: record {record} has {kind} label {label}, expected 0..{num_classes}")]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// Record index inside the file.
        record: usize,
        /// "fine", "coarse" or "class".
        kind: &'static str,
        /// The offending label.
        label: u32,
        /// Number of classes.
        num_classes: usize,
    },
    /// A class folder with no images in it.
    #[error("{path}: class folder holds no images (expected *.png, *.jpg or *.jpeg)")]
    EmptyClass {
        /// The class folder.
        path: PathBuf,
    },
    /// An image whose size differs from the data set's.
    #[error("{path}: image is {width}x{height}, expected {expected_w}x{expected_h}")]
    WrongImageSize {
        /// The image file.
        path: PathBuf,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// Expected width.
        expected_w: u32,
        /// Expected height.
        expected_h: u32,
    },
    /// A file in an image folder that is not a decodable image.
    #[error("{path}: not a readable image: {reason}")]
    BadImage {
        /// The file.
        path: PathBuf,
        /// Why it could not be decoded.
        reason: String,
    },
    /// The train and test splits of an image folder disagree on the classes.
    #[error("{path}: class folders {found:?} differ from the training split's {expected:?}")]
    ClassMismatch {
        /// The split folder.
        path: PathBuf,
        /// Classes found there.
        found: Vec<String>,
        /// Classes of the training split.
        expected: Vec<String>,
    },
    /// A request that cannot be satisfied by the data (subset too large, bad parameter).
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The parameter at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.into();
        move |source| DataError::Io { path, source }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
