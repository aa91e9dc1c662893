//! Rust errors -> the Python exceptions of `zstream.errors` (one hierarchy, defined in Python, raised from here).

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use zstream_core::Error;

static ZSTREAM_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CHECKPOINT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static READ_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static READ_TIMEOUT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static OOM_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn raise(py: Python<'_>, cell: &PyOnceLock<Py<PyType>>, class: &str, args: String) -> PyErr {
    match cell.import(py, "zstream.errors", class) {
        Ok(ty) => match ty.call1((args,)) {
            Ok(obj) => PyErr::from_value(obj),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

fn raise_read(py: Python<'_>, msg: String, errno: Option<i32>, file: Option<String>, offset: Option<u64>) -> PyErr {
    raise_read_as(py, &READ_ERROR, "ReadError", msg, errno, file, offset)
}

fn raise_read_as(
    py: Python<'_>,
    cell: &PyOnceLock<Py<PyType>>,
    class: &str,
    msg: String,
    errno: Option<i32>,
    file: Option<String>,
    offset: Option<u64>,
) -> PyErr {
    match cell.import(py, "zstream.errors", class) {
        Ok(ty) => match ty.call1((msg, errno, file, offset)) {
            Ok(obj) => PyErr::from_value(obj),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// Convert a core error into the matching Python exception. Needs the GIL (it may import `zstream.errors`).
pub fn to_pyerr(py: Python<'_>, err: &Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Checkpoint { .. } => raise(py, &CHECKPOINT_ERROR, "CheckpointError", msg),
        Error::Read { path, offset, source, .. } => {
            raise_read(py, msg, source.raw_os_error(), Some(path.display().to_string()), Some(*offset))
        }
        Error::Truncated { path, file_end, .. } => {
            raise_read(py, msg, None, Some(path.display().to_string()), Some(*file_end))
        }
        Error::Cancelled => raise_read(py, msg, None, None, None),
        Error::Timeout(_) => raise(py, &READ_TIMEOUT_ERROR, "ReadTimeoutError", msg),
        Error::IoTimeout { path, offset, .. } => raise_read_as(
            py,
            &READ_TIMEOUT_ERROR,
            "ReadTimeoutError",
            msg,
            Some(libc::ETIMEDOUT),
            Some(path.display().to_string()),
            Some(*offset),
        ),
        Error::UnknownTensor(_) => PyKeyError::new_err(msg),
        Error::InvalidArgument(_) => PyValueError::new_err(msg),
        Error::Alloc { .. } | Error::Pin { .. } => raise(py, &OOM_ERROR, "OutOfMemoryError", msg),
        Error::ReaderUnavailable { .. } | Error::Internal(_) => raise(py, &ZSTREAM_ERROR, "ZStreamError", msg),
    }
}

/// `?`-friendly conversion for results of the core.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_pyerr(py, &e))
    }
}
