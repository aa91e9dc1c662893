//! Arbitrary bytes as a whole safetensors file: length prefix, JSON header, data section.
//! Never panics; every accepted header satisfies the layout invariants the readers rely on.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zstream_core::safetensors::{header_len, parse_header};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let file_size = data.len() as u64;
    let mut prefix = [0u8; 8];
    let n = data.len().min(8);
    prefix[..n].copy_from_slice(&data[..n]);
    let Ok(len) = header_len(path, prefix, file_size) else { return };
    // header_len promised 8 + len <= file_size.
    assert!(len.checked_add(8).is_some_and(|end| end <= file_size), "header_len accepted {len} for {file_size}");
    let json = &data[8..8 + len as usize];
    let Ok(h) = parse_header(path, json, file_size) else { return };

    assert_eq!(h.data_start, 8 + len);
    for e in &h.entries {
        assert!(e.offset >= h.data_start, "{}: offset {} before data start {}", e.name, e.offset, h.data_start);
        let end = e.offset.checked_add(e.nbytes).expect("offset + nbytes overflows");
        assert!(end <= file_size, "{}: ends at {end}, past the {file_size}-byte file", e.name);
        let elems = e.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)).expect("shape overflows");
        assert_eq!(e.nbytes, e.dtype.size() as u64 * elems, "{}: nbytes vs dtype x shape", e.name);
        assert_ne!(e.name, "__metadata__");
        assert!(e.shape.iter().all(|&d| i64::try_from(d).is_ok()), "{}: dimension past 2^63 (DLPack is int64)", e.name);
    }
    let mut names = HashSet::new();
    for e in &h.entries {
        assert!(names.insert(e.name.as_str()), "{:?} appears twice", e.name);
    }
    for w in h.entries.windows(2) {
        assert!((w[0].offset, w[0].nbytes) <= (w[1].offset, w[1].nbytes), "entries not sorted");
    }
    // Non-empty entries must not overlap, pairwise (not only neighbours: empty entries sit between them).
    let nonempty: Vec<_> = h.entries.iter().filter(|e| e.nbytes > 0).collect();
    for w in nonempty.windows(2) {
        assert!(
            w[0].offset + w[0].nbytes <= w[1].offset,
            "tensors {:?} [{}, {}) and {:?} [{}, {}) overlap",
            w[0].name,
            w[0].offset,
            w[0].offset + w[0].nbytes,
            w[1].name,
            w[1].offset,
            w[1].offset + w[1].nbytes
        );
    }
});
