//! `zstream._core.Store`: the checkpoint index and the readers, as Python sees them.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use zstream_core::{ReadOptions, ReaderKind, Store as CoreStore, StoreOptions};

use crate::dlpack::{job_capsules, job_flat, DLDevice, KDL_CPU};
use crate::error::IntoPyResult;
use crate::interrupt::wait_job;
use crate::ticket::Ticket;

/// `read_flat`'s answer: (arena capsule, tensor offsets, why pinning failed, the same arena as kDLCPU).
type FlatResult = (Py<PyAny>, Vec<usize>, Option<String>, Option<Py<PyAny>>);

#[pyclass(module = "zstream._core", frozen)]
pub struct Store {
    /// Shared with the store's tickets, so a ticket can outlive `close()`.
    core: Arc<CoreStore>,
    default_reader: ReaderKind,
}

fn parse_reader(py: Python<'_>, reader: Option<&str>, default: ReaderKind) -> PyResult<ReaderKind> {
    reader.map_or(Ok(default), |r| r.parse::<ReaderKind>().py_err(py))
}

impl Store {
    /// Read `names` into a fresh arena and wait for it (GIL released, Ctrl-C honoured).
    fn read_job(&self, py: Python<'_>, names: Vec<String>, reader: Option<&str>) -> PyResult<Arc<zstream_core::Job>> {
        let kind = parse_reader(py, reader, self.default_reader)?;
        let core = Arc::clone(&self.core);
        let job = py
            .detach(move || {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                core.submit(&refs, kind, false, None)
            })
            .py_err(py)?;
        wait_job(py, &job, None)?;
        Ok(job)
    }
}

#[pymethods]
impl Store {
    /// Open a `.safetensors` file or checkpoint directory; every header is read and validated here.
    #[staticmethod]
    #[pyo3(signature = (path, *, reader="auto", queue_depth=None, chunk_size=None, threads=None, workers=None,
                        max_slots=None, pin_flags=None, numa_node=None, tensor_align=None, io_timeout=60.0))]
    #[allow(clippy::too_many_arguments)] // a Python keyword-only signature
    fn open(
        py: Python<'_>,
        path: std::path::PathBuf,
        reader: &str,
        queue_depth: Option<u32>,
        chunk_size: Option<usize>,
        threads: Option<usize>,
        workers: Option<usize>,
        max_slots: Option<usize>,
        pin_flags: Option<u32>,
        numa_node: Option<u32>,
        tensor_align: Option<u64>,
        io_timeout: Option<f64>,
    ) -> PyResult<Store> {
        let io_timeout = match io_timeout {
            Some(t) if t > 0.0 && t.is_finite() => Some(std::time::Duration::from_secs_f64(t)),
            Some(t) => return Err(pyo3::exceptions::PyValueError::new_err(format!("io_timeout {t} is not > 0"))),
            None => None,
        };
        let default_reader = reader.parse::<ReaderKind>().py_err(py)?;
        let d = ReadOptions::default();
        let read = ReadOptions {
            queue_depth: queue_depth.unwrap_or(d.queue_depth),
            chunk_size: chunk_size.unwrap_or(d.chunk_size),
            threads: threads.unwrap_or(d.threads),
            tensor_align: tensor_align.unwrap_or(0),
            io_timeout,
            ..d
        };
        let opts = StoreOptions { read, workers: workers.unwrap_or(2), max_slots, pin_flags, numa_node };
        let inner = py.detach(move || CoreStore::open(path, opts)).py_err(py)?;
        Ok(Store { core: Arc::new(inner), default_reader })
    }

    /// Tensor names in file order (shard by shard).
    fn names(&self) -> Vec<String> {
        self.core.ckpt.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The `__metadata__` of every shard header, merged; the first shard that sets a key wins.
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        let mut merged = std::collections::BTreeMap::new();
        for shard in &self.core.ckpt.shards {
            for (k, v) in &shard.metadata {
                merged.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        merged
    }

    /// `(dtype, shape, nbytes, file, offset)` of one tensor; `offset` is absolute in `file`.
    fn info(&self, py: Python<'_>, name: &str) -> PyResult<(&'static str, Vec<usize>, u64, String, u64)> {
        let t = self.core.tensor(name).py_err(py)?;
        let file = self.core.ckpt.shards[t.shard].path.display().to_string();
        Ok((t.dtype.name(), t.shape.clone(), t.nbytes, file, t.offset))
    }

    fn __len__(&self) -> usize {
        self.core.ckpt.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.core.ckpt.contains(name)
    }

    /// The shard files, in order.
    #[getter]
    fn files(&self) -> Vec<String> {
        self.core.ckpt.shards.iter().map(|s| s.path.display().to_string()).collect()
    }

    /// Total tensor bytes.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.core.ckpt.nbytes()
    }

    /// `(slots in existence, slots free)` of the streaming pool.
    #[getter]
    fn pool_stats(&self) -> (usize, usize) {
        self.core.pool.stats()
    }

    /// Bytes a read of `names` moves from disk, and the arena bytes it needs: `(read_bytes, arena_bytes, extents)`.
    fn plan(&self, py: Python<'_>, names: Vec<String>) -> PyResult<(u64, usize, usize)> {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (plan, _) = self.core.plan(&refs).py_err(py)?;
        Ok((plan.read_bytes(), plan.arena_len, plan.extents.len()))
    }

    /// Read `names` into a fresh arena and return `{name: capsule}`. The GIL is released while reading, and
    /// Ctrl-C raises KeyboardInterrupt promptly. `pin_error` is set when pinning was asked for and failed.
    #[pyo3(signature = (names, *, reader=None, device_type=KDL_CPU, device_id=0))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        names: Vec<String>,
        reader: Option<&str>,
        device_type: i32,
        device_id: i32,
    ) -> PyResult<(Bound<'py, PyDict>, Option<String>)> {
        let job = self.read_job(py, names.clone(), reader)?;
        let out = job_capsules(py, &self.core, &job, &names, DLDevice { device_type, device_id })?;
        Ok((out, job.buffer.pin_error.get().cloned()))
    }

    /// Like `read`, but return the whole arena as one flat U8 capsule plus each tensor's byte offset in it:
    /// `(capsule, offsets, pin_error)`. The engine copies a whole block to the GPU in one transfer this way.
    /// With a CUDA `device_type`, `host_too` adds a second, kDLCPU capsule of the same arena (the ats mode copies
    /// from it for prefill and reads the CUDA one in place for decode).
    #[pyo3(signature = (names, *, reader=None, device_type=KDL_CPU, device_id=0, host_too=false))]
    #[allow(clippy::too_many_arguments)] // a Python keyword-only signature
    fn read_flat(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        reader: Option<&str>,
        device_type: i32,
        device_id: i32,
        host_too: bool,
    ) -> PyResult<FlatResult> {
        let job = self.read_job(py, names, reader)?;
        let (capsule, offsets) = job_flat(py, &job, DLDevice { device_type, device_id })?;
        let host =
            if host_too { Some(job_flat(py, &job, DLDevice { device_type: KDL_CPU, device_id: 0 })?.0) } else { None };
        Ok((capsule, offsets, job.buffer.pin_error.get().cloned(), host))
    }

    /// Start reading `names` into a pool slot in the background; several tickets may be in flight. Waits (GIL
    /// released, interruptible) only when the pool is at `max_slots` and every slot is in use.
    #[pyo3(signature = (names, *, reader=None))]
    fn fetch(&self, py: Python<'_>, names: Vec<String>, reader: Option<&str>) -> PyResult<Ticket> {
        let kind = parse_reader(py, reader, self.default_reader)?;
        loop {
            let (core, refs) = (Arc::clone(&self.core), names.clone());
            // Wait for a free slot in short slices, so that Ctrl-C is seen in between.
            let submitted = py.detach(move || {
                let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                core.submit(&refs, kind, true, Some(std::time::Duration::from_millis(50)))
            });
            match submitted {
                Ok(job) => {
                    return Ok(Ticket { job: std::sync::Mutex::new(Some(job)), store: Arc::clone(&self.core), names })
                }
                Err(zstream_core::Error::Timeout(_)) => py.check_signals()?,
                Err(e) => return Err(crate::error::to_pyerr(py, &e)),
            }
        }
    }

    /// For tests: make the next reads fail. `kind` is "eio", "short", "eintr" or "hang"; the fault fires on `count`
    /// I/Os after `after` more I/Os, in the io_uring and pread readers.
    #[pyo3(signature = (kind, *, after=0, count=1))]
    fn inject_fault(&self, kind: &str, after: u64, count: u64) -> PyResult<()> {
        let kind: zstream_core::reader::FaultKind = kind.parse().map_err(pyo3::exceptions::PyValueError::new_err)?;
        self.core.faults.arm(kind, after, count.max(1));
        Ok(())
    }

    /// Disarm injected faults.
    fn clear_faults(&self) {
        self.core.faults.clear();
    }

    /// Stop the reader threads. Tensors already read stay valid. Idempotent.
    fn close(&self, py: Python<'_>) {
        let core = Arc::clone(&self.core);
        py.detach(move || core.close());
    }

    /// The reader "auto" resolves to for a read of every tensor of this checkpoint.
    fn auto_reader(&self, py: Python<'_>) -> PyResult<&'static str> {
        let all: Vec<&str> = self.core.ckpt.tensors.iter().map(|t| t.name.as_str()).collect();
        let (plan, _) = self.core.plan(&all).py_err(py)?;
        Ok(ReaderKind::Auto.resolve(&self.core.ckpt, &plan).py_err(py)?.name())
    }

    fn __repr__(&self) -> String {
        let c = &self.core.ckpt;
        format!("<Store {} ({} tensors in {} shards, {} bytes)>", c.root.display(), c.len(), c.shards.len(), c.nbytes())
    }
}
