//! The one error type of the core. Every variant names the file (or tensor) and the fault, because the person
//! reading the message usually has a checkpoint directory of dozens of shards in front of them.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The checkpoint itself is malformed (header, index, layout). Never retryable.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// An I/O call failed while reading tensor data.
    #[error("{}: reading {len} bytes at offset {offset} failed: {source}", path.display())]
    Read { path: PathBuf, offset: u64, len: u64, source: io::Error },

    /// The file is shorter than its header says: truncated after `open`, or never complete.
    #[error("{}: file ends at byte {file_end}, but tensor data runs to byte {needed_end}", path.display())]
    Truncated { path: PathBuf, file_end: u64, needed_end: u64 },

    /// A name that no shard of the checkpoint holds.
    #[error("no tensor named {0:?} in this checkpoint")]
    UnknownTensor(String),

    /// A caller-side mistake in arguments (bad reader name, zero queue depth, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// The requested reader cannot work here (io_uring disabled by seccomp, kernel too old, ...).
    #[error("reader {reader:?} is unavailable here: {reason}")]
    ReaderUnavailable { reader: &'static str, reason: String },

    /// Anonymous memory for an arena could not be mapped.
    #[error("could not allocate a {bytes}-byte host arena: {source}")]
    Alloc { bytes: usize, source: io::Error },

    /// cudaHostRegister refused the arena (RLIMIT_MEMLOCK, out of memory, ...).
    #[error("cudaHostRegister of a {bytes}-byte arena failed with CUDA error {code}")]
    Pin { bytes: usize, code: i32 },

    /// An I/O made no progress for the store's I/O timeout (a hung device or network filesystem).
    #[error("{}: read at offset {offset} made no progress for {secs:.1} s", path.display())]
    IoTimeout { path: PathBuf, offset: u64, secs: f64 },

    /// The caller asked to stop (Ctrl-C) before the read finished.
    #[error("read cancelled")]
    Cancelled,

    /// A wait ran past its deadline; the read goes on in the background.
    #[error("timed out after {0:.3} s waiting for the read")]
    Timeout(f64),

    /// A background worker died; the store cannot serve further reads.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A copy of this error (`io::Error` is not `Clone`: the OS error code and message are kept).
    #[must_use]
    pub fn duplicate(&self) -> Error {
        let io = |e: &io::Error| {
            e.raw_os_error().map_or_else(|| io::Error::new(e.kind(), e.to_string()), io::Error::from_raw_os_error)
        };
        match self {
            Error::Checkpoint { path, msg } => Error::Checkpoint { path: path.clone(), msg: msg.clone() },
            Error::Read { path, offset, len, source } => {
                Error::Read { path: path.clone(), offset: *offset, len: *len, source: io(source) }
            }
            Error::Truncated { path, file_end, needed_end } => {
                Error::Truncated { path: path.clone(), file_end: *file_end, needed_end: *needed_end }
            }
            Error::UnknownTensor(n) => Error::UnknownTensor(n.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::ReaderUnavailable { reader, reason } => Error::ReaderUnavailable { reader, reason: reason.clone() },
            Error::Alloc { bytes, source } => Error::Alloc { bytes: *bytes, source: io(source) },
            Error::Pin { bytes, code } => Error::Pin { bytes: *bytes, code: *code },
            Error::IoTimeout { path, offset, secs } => {
                Error::IoTimeout { path: path.clone(), offset: *offset, secs: *secs }
            }
            Error::Cancelled => Error::Cancelled,
            Error::Timeout(t) => Error::Timeout(*t),
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.into(), msg: msg.into() }
    }
}
