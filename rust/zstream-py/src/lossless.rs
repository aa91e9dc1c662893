//! `zstream._core.lossless_encode` / `lossless_decode`: the lossless weight code of `zstream_core::lossless`, over
//! little-endian bytes (the Python side views torch tensors as bytes). Both run with the GIL released.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use zstream_core::lossless;

use crate::error::IntoPyResult;

/// Little-endian bytes as `T`s: borrowed where the host is little-endian and the bytes are aligned for `T` (the
/// usual case: Python's bytes and numpy's buffers are), copied otherwise.
fn view<T: Copy + Default, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> std::borrow::Cow<'_, [T]> {
    if cfg!(target_endian = "little") && bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        // SAFETY: the pointer is aligned for T, the length is whole Ts, every bit pattern is a valid u16/u32 (the
        // only Ts used), and the slice borrows `bytes` for its lifetime.
        let slice = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / N) };
        return std::borrow::Cow::Borrowed(slice);
    }
    std::borrow::Cow::Owned(bytes.chunks_exact(N).map(|b| from(b.try_into().expect("N bytes"))).collect())
}

/// `T`s as little-endian bytes, borrowed on a little-endian host.
fn bytes_of<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: any initialized memory may be viewed as bytes; the view borrows `values`.
        let slice = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
        return std::borrow::Cow::Borrowed(slice);
    }
    std::borrow::Cow::Owned(values.iter().flat_map(|&v| to(v)).collect())
}

/// A coded tensor's four parts, as Python bytes: u32 words, u32 offsets (group bases, then u16 lane starts), u8 raw
/// bytes, u16 table.
type Parts = (Py<PyBytes>, Py<PyBytes>, Py<PyBytes>, Py<PyBytes>);

/// `(words, offsets, raw, table)` of 16-bit words `data` (little-endian bytes) coded over `lanes` lanes, each as
/// little-endian bytes: u32 words, u32 offsets, u8 raw bytes, u16 table.
#[pyfunction]
pub fn lossless_encode(py: Python<'_>, data: &[u8], lanes: usize) -> PyResult<Parts> {
    let words = view(data, u16::from_le_bytes);
    let enc = py.detach(|| lossless::encode(&words, lanes)).py_err(py)?;
    Ok((
        PyBytes::new(py, &bytes_of(&enc.words, u32::to_le_bytes)).unbind(),
        PyBytes::new(py, &bytes_of(&enc.offsets, u32::to_le_bytes)).unbind(),
        PyBytes::new(py, &enc.raw).unbind(),
        PyBytes::new(py, &bytes_of(&enc.table, u16::to_le_bytes)).unbind(),
    ))
}

/// The 16-bit words (little-endian bytes) that `lossless_encode` coded over `lanes` lanes, from its four outputs.
#[pyfunction]
pub fn lossless_decode(
    py: Python<'_>,
    words: &[u8],
    offsets: &[u8],
    lanes: usize,
    raw: &[u8],
    table: &[u8],
) -> PyResult<Py<PyBytes>> {
    let (w, o, t) =
        (view(words, u32::from_le_bytes), view(offsets, u32::from_le_bytes), view(table, u16::from_le_bytes));
    let mut out = vec![0u16; raw.len()];
    py.detach(|| lossless::decode(&w, &o, lanes, raw, &t, &mut out)).py_err(py)?;
    Ok(PyBytes::new(py, &bytes_of(&out, u16::to_le_bytes)).unbind())
}
