//! `zstream._core`: thin PyO3 bindings over `zstream-core`. Each Python-facing class has its own file; errors
//! map onto `zstream.errors` in `error.rs`; every long call waits through `interrupt.rs`.

// PyO3 extracts Python arguments into owned values; borrowing them is not an option.
#![allow(clippy::needless_pass_by_value)]

mod dlpack;
mod error;
mod interrupt;
mod lossless;
mod store;
mod ticket;

use pyo3::prelude::*;

/// Hand the addresses of `cudaHostRegister` and `cudaHostUnregister` (from the CUDA runtime torch loaded) to the
/// core, which then pins arenas itself. Returns False if an API was installed before (the first one stays).
///
/// # Safety (Python side)
/// The addresses must be those two functions of a CUDA runtime that stays loaded: `zstream.cuda` finds them.
#[pyfunction]
fn install_cuda_host_api(register: usize, unregister: usize) -> bool {
    // SAFETY: the documented contract of this function; zstream.cuda passes ctypes-resolved runtime symbols.
    unsafe { zstream_core::pin::install_cuda_host_api(register, unregister) }
}

/// Whether CUDA host registration is available to the core.
#[pyfunction]
fn cuda_host_api_installed() -> bool {
    zstream_core::pin::cuda_host_api().is_some()
}

/// Bytes this process's arenas currently hold registered with CUDA.
#[pyfunction]
fn pinned_bytes() -> u64 {
    zstream_core::arena::pinned_bytes()
}

/// Bytes currently mapped by the core's host arenas, pinned or not.
#[pyfunction]
fn mapped_bytes() -> u64 {
    zstream_core::arena::mapped_bytes()
}

/// `None` if io_uring works in this process, else why not (probed once).
#[pyfunction]
fn uring_unavailable_reason() -> Option<String> {
    zstream_core::reader::uring::available().err()
}

/// A host arena's capsule, why it is not pinned (if not), and its CUDA capsule (if mapped).
type HostBuffer = (Py<PyAny>, Option<String>, Option<Py<PyAny>>);

/// `(capsule, pin_error, cuda_capsule)`: a fresh page-aligned host arena of `nbytes`, as a uint8 CPU tensor capsule,
/// registered with CUDA (`flags`) when `pin` is true and a runtime is installed. For bytes zstream makes itself
/// rather than reads (weights quantized at load); freed, and unregistered, with the last tensor that views it. With
/// `cuda_device` (and `flags` that map it), the same arena also as a CUDA capsule on that device, whose kernels read
/// and write it in place (the host address is the device's, as for the ats mode); `None` if it could not be pinned.
#[pyfunction]
#[pyo3(signature = (nbytes, *, pin, flags=0, cuda_device=None))]
fn host_buffer(py: Python<'_>, nbytes: usize, pin: bool, flags: u32, cuda_device: Option<i32>) -> PyResult<HostBuffer> {
    use crate::error::IntoPyResult;
    let (buffer, pin_error) =
        py.detach(|| zstream_core::store::Buffer::host(nbytes, pin.then_some(flags))).py_err(py)?;
    let buffer = std::sync::Arc::new(buffer);
    let device = dlpack::DLDevice { device_type: dlpack::KDL_CPU, device_id: 0 };
    let capsule = dlpack::export(py, &buffer, 0, zstream_core::Dtype::U8, &[nbytes], device)?;
    let cuda = match cuda_device {
        Some(device_id) if pin && pin_error.is_none() => {
            let device = dlpack::DLDevice { device_type: dlpack::KDL_CUDA, device_id };
            Some(dlpack::export(py, &buffer, 0, zstream_core::Dtype::U8, &[nbytes], device)?)
        }
        _ => None,
    };
    Ok((capsule, pin_error, cuda))
}

/// The DLPack device types the capsules can carry.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    m.add_class::<ticket::Ticket>()?;
    m.add_function(wrap_pyfunction!(install_cuda_host_api, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_host_api_installed, m)?)?;
    m.add_function(wrap_pyfunction!(uring_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(pinned_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(mapped_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(host_buffer, m)?)?;
    m.add_function(wrap_pyfunction!(lossless::lossless_encode, m)?)?;
    m.add_function(wrap_pyfunction!(lossless::lossless_decode, m)?)?;
    m.add("KDL_CPU", dlpack::KDL_CPU)?;
    m.add("KDL_CUDA", dlpack::KDL_CUDA)?;
    m.add("HOST_REGISTER_PORTABLE", zstream_core::pin::flags::PORTABLE)?;
    m.add("HOST_REGISTER_MAPPED", zstream_core::pin::flags::MAPPED)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
