//! `zstream._core.Ticket`: a background read into a pool slot.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use zstream_core::{Job, Store as CoreStore};

use crate::dlpack::{job_capsules, job_flat, DLDevice, KDL_CPU};
use crate::interrupt::wait_job;

/// A read in flight. `wait()` returns the tensors (as DLPack capsules); `release()` gives up the ticket's hold on
/// its slot, which returns to the pool once no tensor views it any more.
#[pyclass(module = "zstream._core", frozen)]
pub struct Ticket {
    pub(crate) job: std::sync::Mutex<Option<Arc<Job>>>,
    pub(crate) store: Arc<CoreStore>,
    pub(crate) names: Vec<String>,
}

impl Ticket {
    fn job(&self) -> PyResult<Arc<Job>> {
        self.job
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("ticket was released"))
    }
}

#[pymethods]
impl Ticket {
    /// Block until the read is done (GIL released; Ctrl-C cancels it) and return `{name: capsule}`.
    #[pyo3(signature = (timeout=None, device_type=KDL_CPU, device_id=0))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
        device_type: i32,
        device_id: i32,
    ) -> PyResult<Bound<'py, PyDict>> {
        let job = self.job()?;
        wait_job(py, &job, timeout)?;
        job_capsules(py, &self.store, &job, &self.names, DLDevice { device_type, device_id })
    }

    /// Like `wait`, but return the slot as one flat U8 capsule (the planned bytes) and each tensor's offset in it.
    #[pyo3(signature = (timeout=None, device_type=KDL_CPU, device_id=0))]
    fn wait_flat(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        device_type: i32,
        device_id: i32,
    ) -> PyResult<(Py<PyAny>, Vec<usize>)> {
        let job = self.job()?;
        wait_job(py, &job, timeout)?;
        job_flat(py, &job, DLDevice { device_type, device_id })
    }

    /// Whether the read has finished (successfully or not).
    fn done(&self) -> PyResult<bool> {
        Ok(self.job()?.is_done())
    }

    /// Stop the read between I/Os; `wait()` then raises.
    fn cancel(&self) -> PyResult<()> {
        self.job()?.cancel();
        Ok(())
    }

    /// Hand the slot back. Tensors already returned keep it alive until they are freed; the slot is reused only
    /// after that. Releasing a running read cancels it. Idempotent.
    fn release(&self, py: Python<'_>) {
        let job = self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(job) = job {
            job.cancel();
            // The worker drops its own reference once the kernel is done with the slot.
            py.detach(move || drop(job));
        }
    }

    #[getter]
    fn released(&self) -> bool {
        self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_none()
    }

    /// Bytes this read moves from disk (aligned extents, gaps included).
    #[getter]
    fn read_bytes(&self) -> PyResult<u64> {
        Ok(self.job()?.read_bytes())
    }

    /// (queued, started, finished) in `time.monotonic_ns()` nanoseconds; 0 for what has not happened yet.
    #[getter]
    fn times(&self) -> PyResult<(u64, u64, u64)> {
        let t = self.job()?.times();
        Ok((t.queued, t.started, t.finished))
    }

    /// The reader that served this ticket ("uring", "pread" or "mmap").
    #[getter]
    fn reader(&self) -> PyResult<&'static str> {
        Ok(self.job()?.reader.name())
    }

    /// Why the slot is not pinned although pinning was asked for, if so.
    #[getter]
    fn pin_error(&self) -> PyResult<Option<String>> {
        Ok(self.job()?.buffer.pin_error.get().cloned())
    }

    fn __repr__(&self) -> String {
        let state = match self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            None => "released",
            Some(j) if j.is_done() => "done",
            Some(_) => "reading",
        };
        format!("<Ticket of {} tensors, {state}>", self.names.len())
    }
}
