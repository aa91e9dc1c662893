//! DLPack export: a tensor in an arena becomes a `"dltensor"` capsule that `torch.from_dlpack` adopts with no copy.
//!
//! torch 2.11 refuses a non-zero `byte_offset` and `kDLCUDAHost` capsules, so the offset goes into `data` and host
//! memory goes out as `kDLCPU` (pinned arenas still report `is_pinned()`, since CUDA knows the range). The
//! capsule's context holds an `Arc` of the arena's buffer: the memory lives until torch frees the last tensor.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use zstream_core::store::Buffer;
use zstream_core::{Dtype, Job, Store as CoreStore};

pub const KDL_CPU: i32 = 1;
pub const KDL_CUDA: i32 = 2;

const CAPSULE_NAME: &CStr = c"dltensor";

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What keeps a tensor's memory alive, and its shape array.
struct Context {
    _buffer: Arc<Buffer>,
    _shape: Vec<i64>,
}

unsafe extern "C" fn delete_managed(managed: *mut DLManagedTensor) {
    if managed.is_null() {
        return;
    }
    // SAFETY: `managed` and its context were made by `Box::into_raw` in `export` and are freed only here, once
    // (the consumer calls the deleter exactly once, or the capsule destructor does when nobody consumed it).
    unsafe {
        let managed = Box::from_raw(managed);
        drop(Box::from_raw(managed.manager_ctx.cast::<Context>()));
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the GIL held on our capsule. A consumer renames the capsule to
    // "used_dltensor" and owns the tensor; only an unconsumed capsule still holds it.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr()).cast::<DLManagedTensor>();
            delete_managed(managed);
        }
    }
}

/// Export `buffer[offset..]` as a tensor of `dtype` and `shape` on `device`.
pub fn export(
    py: Python<'_>,
    buffer: &Arc<Buffer>,
    offset: usize,
    dtype: Dtype,
    shape: &[usize],
    device: DLDevice,
) -> PyResult<Py<PyAny>> {
    assert!(offset <= buffer.len(), "tensor offset inside its arena");
    let mut shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let (code, bits) = dtype.dlpack();
    let shape_ptr = if shape.is_empty() { std::ptr::null_mut() } else { shape.as_mut_ptr() };
    let ndim = shape.len() as i32;
    // Moving the Vec into the context keeps its heap array, so `shape_ptr` stays valid.
    let ctx = Box::into_raw(Box::new(Context { _buffer: Arc::clone(buffer), _shape: shape }));
    let managed = Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            // SAFETY: offset <= len, so the pointer stays inside (or one past) the arena.
            data: unsafe { buffer.as_ptr().add(offset) }.cast(),
            device,
            ndim,
            dtype: DLDataType { code, bits, lanes: 1 },
            shape: shape_ptr,
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        },
        manager_ctx: ctx.cast(),
        deleter: Some(delete_managed),
    }));
    // SAFETY: a valid pointer, a static name and a destructor that handles both consumed and unconsumed capsules.
    let capsule = unsafe { ffi::PyCapsule_New(managed.cast(), CAPSULE_NAME.as_ptr(), Some(capsule_destructor)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not made, so nothing else owns `managed`.
        unsafe { delete_managed(managed) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new, owned reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) }.unbind())
}

/// The planned part of a finished job's arena as one U8 capsule, and where each requested tensor starts in it.
pub(crate) fn job_flat(py: Python<'_>, job: &Arc<Job>, device: DLDevice) -> PyResult<(Py<PyAny>, Vec<usize>)> {
    let capsule = export(py, &job.buffer, 0, Dtype::U8, &[job.plan.arena_len], device)?;
    Ok((capsule, job.placed.iter().map(|p| p.arena_offset).collect()))
}

/// `{name: capsule}` for a finished job of `store`.
pub(crate) fn job_capsules<'py>(
    py: Python<'py>,
    store: &CoreStore,
    job: &Arc<Job>,
    names: &[String],
    device: DLDevice,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (name, placed) in names.iter().zip(&job.placed) {
        let t = &store.ckpt.tensors[placed.tensor];
        out.set_item(name, export(py, &job.buffer, placed.arena_offset, t.dtype, &t.shape, device)?)?;
    }
    Ok(out)
}
