//! What the integration tests share: safetensors files of U8 tensors written byte by byte (so each test can work out
//! every file offset by hand), a scratch directory, and the readers worth trying on this machine. Each test file is
//! its own binary and uses part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::Path;

use zstream_core::reader::uring;
use zstream_core::ReaderKind;

/// A scratch directory under cargo's target dir (a real filesystem, where O_DIRECT works; /tmp may be tmpfs).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// How the header's JSON is padded with trailing spaces, which the format allows.
#[derive(Debug, Clone, Copy)]
pub enum HeaderPad {
    None,
    /// One space if needed to make the JSON's length odd: every data offset then lies off any even boundary.
    ToOddLength,
    /// As many as put the data at this file offset.
    DataAt(u64),
}

/// `u64le(json.len()) ++ json` for U8 tensors of these lengths laid end to end in the given order.
pub fn u8_header(tensors: &[(&str, u64)], pad: HeaderPad) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for &(name, len) in tensors {
        let entry = serde_json::json!({"dtype": "U8", "shape": [len], "data_offsets": [offset, offset + len]});
        header.insert(name.to_owned(), entry);
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    match pad {
        HeaderPad::ToOddLength if json.len() % 2 == 0 => json.push(b' '),
        HeaderPad::None | HeaderPad::ToOddLength => {}
        HeaderPad::DataAt(start) => {
            let spaces = usize::try_from(start).unwrap().checked_sub(8 + json.len()).expect("the header fits");
            json.resize(json.len() + spaces, b' ');
        }
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes
}

/// Write a safetensors file of these U8 tensors, end to end in the given order; returns the file offset of the data.
pub fn write_u8_tensors(path: &Path, tensors: &[(&str, &[u8])], pad: HeaderPad) -> u64 {
    let lengths: Vec<(&str, u64)> = tensors.iter().map(|&(name, data)| (name, data.len() as u64)).collect();
    let mut bytes = u8_header(&lengths, pad);
    let data_start = bytes.len() as u64;
    for (_, data) in tensors {
        bytes.extend_from_slice(data);
    }
    std::fs::write(path, bytes).unwrap();
    data_start
}

/// `readers`, and io_uring with them where it works in this process (containers may refuse its syscalls).
pub fn and_uring_if_it_works(mut readers: Vec<ReaderKind>) -> Vec<ReaderKind> {
    if uring::available().is_ok() {
        readers.push(ReaderKind::Uring);
    }
    readers
}
