//! Parsing and validating one safetensors header.
//!
//! Layout: `u64` little-endian header length N, then N bytes of JSON, then the data section. Each tensor entry
//! gives `dtype`, `shape` and `data_offsets` relative to the data section. Everything here is checked before
//! a single tensor byte is trusted: a bad header must become an error naming the file, never a wrong tensor.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Headers larger than this are refused before allocating for them (safetensors uses the same cap).
pub const MAX_HEADER_LEN: u64 = 100 << 20;

/// One tensor as a header describes it, with offsets made absolute in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first byte in the file.
    pub offset: u64,
    pub nbytes: u64,
}

/// A parsed header: entries sorted by offset, plus where the data section starts.
#[derive(Debug, Clone)]
pub struct Header {
    pub data_start: u64,
    pub entries: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Read the length prefix: the number of header bytes that follow it.
pub fn header_len(path: &Path, prefix: [u8; 8], file_size: u64) -> Result<u64> {
    if file_size < 8 {
        return Err(Error::checkpoint(path, format!("file is {file_size} bytes, too short for a safetensors header")));
    }
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_LEN {
        return Err(Error::checkpoint(path, format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte cap")));
    }
    if n.checked_add(8).is_none_or(|end| end > file_size) {
        return Err(Error::checkpoint(
            path,
            format!("header length {n} runs past the end of the {file_size}-byte file (truncated download?)"),
        ));
    }
    Ok(n)
}

/// Parse and validate the JSON header of a file of `file_size` bytes whose header is `json`.
pub fn parse_header(path: &Path, json: &[u8], file_size: u64) -> Result<Header> {
    let data_start = 8 + json.len() as u64;
    let data_len = file_size - data_start;
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| Error::checkpoint(path, format!("header is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Error::checkpoint(path, "header JSON is not an object"));
    }
    // serde_json keeps only the last of two equal keys; read the pairs again, in order, to refuse duplicates (a bit
    // flip in a name can make two entries share one, and then a tensor silently goes missing).
    let Pairs(map) =
        serde_json::from_slice(json).map_err(|e| Error::checkpoint(path, format!("header is not valid JSON: {e}")))?;
    let mut seen = std::collections::HashSet::with_capacity(map.len());
    for (name, _) in &map {
        if !seen.insert(name.as_str()) {
            return Err(Error::checkpoint(path, format!("tensor {name:?} appears twice in the header")));
        }
    }

    let mut entries = Vec::with_capacity(map.len());
    let mut metadata = BTreeMap::new();
    for (name, v) in map {
        if name == "__metadata__" {
            let m: BTreeMap<String, String> = serde_json::from_value(v)
                .map_err(|e| Error::checkpoint(path, format!("__metadata__ must map strings to strings: {e}")))?;
            metadata = m;
            continue;
        }
        let raw: RawEntry = serde_json::from_value(v)
            .map_err(|e| Error::checkpoint(path, format!("tensor {name:?}: malformed entry: {e}")))?;
        let dtype: Dtype = raw
            .dtype
            .parse()
            .map_err(|()| Error::checkpoint(path, format!("tensor {name:?}: unknown dtype {:?}", raw.dtype)))?;
        let (begin, end) = raw.data_offsets;
        if begin > end {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name:?}: data_offsets [{begin}, {end}] are reversed"),
            ));
        }
        if end > data_len {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?}: data_offsets [{begin}, {end}] run past the {data_len}-byte data section \
                     (truncated file?)"
                ),
            ));
        }
        let expected = raw
            .shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::checkpoint(path, format!("tensor {name:?}: shape {:?} overflows", raw.shape)))?;
        if expected != end - begin {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?}: dtype {dtype} x shape {:?} is {expected} bytes but data_offsets span {}",
                    raw.shape,
                    end - begin
                ),
            ));
        }
        if raw.shape.iter().any(|&d| i64::try_from(d).is_err()) || largest_stride(&raw.shape).is_none() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?}: shape {:?} has a dimension or stride past 2^63 (DLPack shapes and strides are \
                     int64)",
                    raw.shape
                ),
            ));
        }
        let shape = raw
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::checkpoint(path, format!("tensor {name:?}: dimension does not fit in memory")))?;
        entries.push(TensorEntry { name, dtype, shape, offset: data_start + begin, nbytes: end - begin });
    }

    entries.sort_by_key(|a| (a.offset, a.nbytes));
    // Empty tensors occupy no bytes and may sit anywhere; among the others, each must start at or after the
    // furthest end so far (comparing neighbours only would let an empty tensor in between hide an overlap).
    let mut furthest: Option<&TensorEntry> = None;
    for b in entries.iter().filter(|e| e.nbytes > 0) {
        if let Some(a) = furthest {
            if a.offset + a.nbytes > b.offset {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensors {:?} and {:?} overlap (bytes {}..{} and {}..{} of the file)",
                        a.name,
                        b.name,
                        a.offset,
                        a.offset + a.nbytes,
                        b.offset,
                        b.offset + b.nbytes
                    ),
                ));
            }
        }
        if furthest.is_none_or(|a| b.offset + b.nbytes > a.offset + a.nbytes) {
            furthest = Some(b);
        }
    }
    Ok(Header { data_start, entries, metadata })
}

/// A JSON object's members in order, duplicates kept.
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<Pairs, A::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(0));
                while let Some(pair) = m.next_entry()? {
                    out.push(pair);
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The first stride torch gives a contiguous tensor of `shape` (DLPack hands it none), `None` past `i64::MAX`.
/// Torch takes `stride[i] = stride[i + 1] * max(shape[i + 1], 1)`, so an empty tensor's shape, which passes the size
/// check, can still overflow it.
fn largest_stride(shape: &[u64]) -> Option<i64> {
    shape.iter().skip(1).try_fold(1i64, |acc, &d| acc.checked_mul(i64::try_from(d.max(1)).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, data_len: u64) -> Result<Header> {
        parse_header(Path::new("x.safetensors"), json.as_bytes(), 8 + json.len() as u64 + data_len)
    }

    #[test]
    fn valid_header_gets_absolute_offsets() {
        let json = r#"{"b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}}"#;
        let h = parse(json, 8).unwrap();
        assert_eq!(h.entries[0].name, "a");
        assert_eq!(h.entries[1].offset, 8 + json.len() as u64 + 4);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn faults_are_named() {
        let cases = [
            (r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}"#, "x shape"),
            (r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,40]}}"#, "run past"),
            (r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,4]}}"#, "unknown dtype"),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                "overlap",
            ),
            (r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#, "reversed"),
            (r"[1,2]", "not an object"),
            (r#"{"a":"#, "not valid JSON"),
            (r#"{"a":{"dtype":"U8","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#, "overflows"),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                "appears twice",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"e":{"dtype":"U8","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[5,7]}}"#,
                "overlap",
            ),
            (r#"{"a":{"dtype":"U8","shape":[0,18446744073709551615],"data_offsets":[0,0]}}"#, "past 2^63"),
            // The first dimension is in no stride, and is checked all the same.
            (r#"{"a":{"dtype":"U8","shape":[9223372036854775808,0],"data_offsets":[0,0]}}"#, "past 2^63"),
            // Each dimension fits int64; the first stride, (2^63 - 1)^2, does not.
            (
                r#"{"a":{"dtype":"U8","shape":[0,9223372036854775807,9223372036854775807],"data_offsets":[0,0]}}"#,
                "stride past 2^63",
            ),
        ];
        for (json, needle) in cases {
            let err = parse(json, 8).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
            assert!(err.starts_with("x.safetensors: "), "{err}");
        }
    }

    #[test]
    fn header_length_checks() {
        let p = Path::new("f");
        assert!(header_len(p, 100u64.to_le_bytes(), 50).unwrap_err().to_string().contains("past the end"));
        assert!(header_len(p, u64::MAX.to_le_bytes(), 50).unwrap_err().to_string().contains("cap"));
        assert!(header_len(p, [0; 8], 4).unwrap_err().to_string().contains("too short"));
        assert_eq!(header_len(p, 10u64.to_le_bytes(), 18).unwrap(), 10);
    }

    #[test]
    fn header_length_boundaries() {
        let p = Path::new("f");
        // An 8-byte file with an empty header is long enough (the JSON check comes later).
        assert_eq!(header_len(p, [0; 8], 8).unwrap(), 0);
        assert!(header_len(p, [0; 8], 7).unwrap_err().to_string().contains("too short"));
        // Exactly at the 100 MiB cap is allowed, one byte more is not.
        let cap: u64 = 104_857_600;
        assert_eq!(header_len(p, cap.to_le_bytes(), cap + 8).unwrap(), cap);
        assert!(header_len(p, (cap + 1).to_le_bytes(), cap + 9).unwrap_err().to_string().contains("cap"));
        // The header may end exactly at the end of the file, not one byte past it.
        assert_eq!(header_len(p, 10u64.to_le_bytes(), 18).unwrap(), 10);
        assert!(header_len(p, 11u64.to_le_bytes(), 18).unwrap_err().to_string().contains("past the end"));
    }

    #[test]
    fn entries_by_hand() {
        // Offsets are absolute: 8 (length prefix) + the JSON's length + data_offsets[0].
        let json = r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[4,16]},"s":{"dtype":"I64","shape":[],"data_offsets":[16,24]},"e":{"dtype":"F32","shape":[0,7],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let d = 8 + json.len() as u64;
        let h = parse(json, 24).unwrap();
        assert_eq!(h.data_start, d);
        assert!(h.metadata.is_empty());
        let got: Vec<(&str, Dtype, &[usize], u64, u64)> =
            h.entries.iter().map(|e| (e.name.as_str(), e.dtype, e.shape.as_slice(), e.offset, e.nbytes)).collect();
        // Sorted by (offset, length): the empty tensor first, then b, w, s.
        assert_eq!(
            got,
            vec![
                ("e", Dtype::F32, &[0usize, 7][..], d, 0),
                ("b", Dtype::U8, &[4][..], d, 4),
                ("w", Dtype::Bf16, &[2, 3][..], d + 4, 12),
                ("s", Dtype::I64, &[][..], d + 16, 8),
            ]
        );
    }

    #[test]
    fn empty_tensors_may_sit_inside_others() {
        // "e" has no bytes; its offset inside "a" is no overlap.
        let json = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"e":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}"#;
        let h = parse(json, 8).unwrap();
        assert_eq!(h.entries.len(), 2);
    }

    #[test]
    fn overlap_with_the_latest_tensor_is_found() {
        // a = 0..4, b = 4..5 (adjacent, fine), c = 4..6 overlaps b but not a: the check must compare c with the
        // furthest end so far (b's), not with a's.
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]},"c":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
        let d = 8 + json.len() as u64;
        let err = parse(json, 8).unwrap_err().to_string();
        let want = format!(
            "x.safetensors: tensors \"b\" and \"c\" overlap (bytes {}..{} and {}..{} of the file)",
            d + 4,
            d + 5,
            d + 4,
            d + 6
        );
        assert_eq!(err, want);
    }
}
