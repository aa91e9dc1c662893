//! Pinning host memory for CUDA without linking CUDA.
//!
//! The Python layer finds `cudaHostRegister` / `cudaHostUnregister` in the CUDA runtime that torch has already
//! loaded and hands their addresses to [`install_cuda_host_api`]. Until then (or on a machine without CUDA)
//! pinning is a no-op that says so, and the wheel works everywhere.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

pub type HostRegisterFn = unsafe extern "C" fn(ptr: *mut c_void, size: usize, flags: c_uint) -> c_int;
pub type HostUnregisterFn = unsafe extern "C" fn(ptr: *mut c_void) -> c_int;

/// `cudaHostRegister` flags (cuda_runtime_api.h).
pub mod flags {
    pub const PORTABLE: u32 = 0x01;
    pub const MAPPED: u32 = 0x02;
}

#[derive(Clone, Copy)]
pub struct CudaHostApi {
    pub register: HostRegisterFn,
    pub unregister: HostUnregisterFn,
}

static CUDA_HOST_API: OnceLock<CudaHostApi> = OnceLock::new();

/// Install the runtime's entry points. The first installation wins; later calls are ignored (one process has
/// one CUDA runtime).
///
/// # Safety
/// `register` and `unregister` must be the addresses of `cudaHostRegister` and `cudaHostUnregister` of a CUDA
/// runtime that stays loaded for the life of the process.
pub unsafe fn install_cuda_host_api(register: usize, unregister: usize) -> bool {
    if register == 0 || unregister == 0 {
        return false;
    }
    // SAFETY: the caller guarantees these are the runtime's functions with exactly these C signatures.
    let api = unsafe {
        CudaHostApi {
            register: std::mem::transmute::<usize, HostRegisterFn>(register),
            unregister: std::mem::transmute::<usize, HostUnregisterFn>(unregister),
        }
    };
    CUDA_HOST_API.set(api).is_ok()
}

pub fn cuda_host_api() -> Option<CudaHostApi> {
    CUDA_HOST_API.get().copied()
}
