//! The one helper every long call goes through: wait with the GIL released, and turn Ctrl-C into
//! `KeyboardInterrupt` within about 50 ms (polars does the same).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use zstream_core::{Error, Job};

use crate::error::to_pyerr;

const POLL: Duration = Duration::from_millis(50);

/// Wait for `job`. On Ctrl-C the job is cancelled, drained (the kernel must be done with its arena) and
/// `KeyboardInterrupt` is raised. With a `timeout` (seconds), a job still running then raises
/// `ReadTimeoutError` and keeps running.
pub fn wait_job(py: Python<'_>, job: &Arc<Job>, timeout: Option<f64>) -> PyResult<()> {
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
    loop {
        let slice = deadline.map_or(POLL, |d| d.saturating_duration_since(Instant::now()).min(POLL));
        let job2 = Arc::clone(job);
        if let Some(result) = py.detach(move || job2.wait(slice)) {
            return result.map_err(|e| to_pyerr(py, &e));
        }
        if let Err(interrupt) = py.check_signals() {
            job.cancel();
            let job2 = Arc::clone(job);
            py.detach(move || while job2.wait(POLL).is_none() {});
            return Err(interrupt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(to_pyerr(py, &Error::Timeout(timeout.unwrap_or(0.0))));
        }
    }
}
