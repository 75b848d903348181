//! Typed fetch errors: each names the source, the file and the expected and actual values.
use std::path::PathBuf;

/// Everything that can go wrong while fetching and installing an artifact.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}")]
    HttpStatus {
        /// The URL asked for.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The connection failed, stalled past the timeout or broke off.
    #[error("{url}: {message}")]
    Transport {
        /// The URL asked for.
        url: String,
        /// What happened.
        message: String,
    },
    /// The server answered with a web page where the file should be: a dead shared link, a
    /// login, or a download-confirmation or quota page (Box and Google Drive answer so).
    #[error("{url}: answered with an HTML page ({content_type}), not the file: the link may be dead or want a login or a confirmation; nothing was kept")]
    HtmlPage {
        /// The URL asked for.
        url: String,
        /// The Content-Type it answered with.
        content_type: String,
    },
    /// A downloaded file that is not the archive it should be (no checksum is published to
    /// catch it otherwise).
    #[error("{source_desc}: not a {kind} archive (it starts with {head}); nothing was kept")]
    NotAnArchive {
        /// Where the bytes came from.
        source_desc: String,
        /// "gzip" or "zip".
        kind: &'static str,
        /// The file's first bytes, in hex.
        head: String,
    },
    /// The transfer ended early.
    #[error("{url}: transfer ended after {got} of {expected} bytes (the partial file {part} is kept; run again to resume)")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes received in total.
        got: u64,
        /// Bytes expected.
        expected: u64,
        /// The `.part` file holding what arrived.
        part: PathBuf,
    },
    /// The file's checksum or size differs from the pinned one (boxed: the details are large
    /// and every `Result` of this crate would otherwise carry their size).
    #[error("{0}")]
    Checksum(Box<ChecksumMismatch>),
    /// An archive that cannot be read or does not hold what it should.
    #[error("{path}: malformed archive: {message}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An archive entry whose path would leave the extraction folder.
    #[error("{archive}: entry {entry:?} escapes the extraction folder (absolute path, `..` or link); refusing to extract")]
    UnsafePath {
        /// The archive.
        archive: PathBuf,
        /// The offending entry name.
        entry: String,
    },
    /// `--from DIR` did not hold the file.
    #[error(
        "{dir}: none of {expected:?} found (the --from folder must hold the archive as downloaded)"
    )]
    NotInFolder {
        /// The folder searched.
        dir: PathBuf,
        /// File names looked for.
        expected: Vec<String>,
    },
    /// Every source of an artifact failed.
    #[error("all sources of {artifact} failed:\n{}", .errors.join("\n"))]
    AllSourcesFailed {
        /// The artifact.
        artifact: String,
        /// One line per source.
        errors: Vec<String>,
    },
    /// `HF_HUB_OFFLINE=1` and the file is not cached.
    #[error("HF_HUB_OFFLINE is set and {repo}/{file} is not in the cache {cache}; unset it, or install from disk with --from DIR")]
    HubOffline {
        /// The Hub repository.
        repo: String,
        /// The file.
        file: String,
        /// The cache folder searched.
        cache: PathBuf,
    },
    /// A Hugging Face Hub error.
    #[error("Hugging Face Hub {repo}/{file}: {message}")]
    Hub {
        /// The Hub repository.
        repo: String,
        /// The file.
        file: String,
        /// The client's error.
        message: String,
    },
    /// The installed data does not read back.
    #[error("installed files do not load: {0}")]
    Data(#[from] kd_data::DataError),
    /// The teacher checkpoint does not convert.
    #[error("teacher conversion failed: {0}")]
    Model(#[from] kd_models::ModelError),
    /// A bad argument.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The argument.
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

/// What a checksum or size check found.
#[derive(Debug, thiserror::Error)]
#[error("{source_desc}: {algo} mismatch for {file}: expected {expected}, got {actual}.{hint}")]
pub struct ChecksumMismatch {
    /// Where the file came from (URL or local path).
    pub source_desc: String,
    /// The file name.
    pub file: String,
    /// "md5", "sha256" or "size".
    pub algo: &'static str,
    /// Expected value.
    pub expected: String,
    /// Actual value.
    pub actual: String,
    /// How to proceed deliberately, if at all.
    pub hint: String,
}

impl FetchError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FetchError {
        let path = path.into();
        move |source| FetchError::Io { path, source }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, FetchError>;
