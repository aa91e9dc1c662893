//! Arbitrary bytes as `model.safetensors.index.json` beside two small valid shards, then `Checkpoint::open` on the
//! directory: it must come back Ok or Err, never panic. The shards are written once per process and reused; only
//! the index file is rewritten per input.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use zstream_core::checkpoint::INDEX_FILE;
use zstream_core::Checkpoint;

/// A valid safetensors file holding `tensors` (name, dtype, shape, byte length), laid out back to back.
fn shard(tensors: &[(&str, &str, &[u64], u64)]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for (name, dtype, shape, n) in tensors {
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        json += &format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            shape.join(","),
            off + n
        );
        off += n;
    }
    json.push('}');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend((0..off).map(|i| i as u8));
    out
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Kept for the life of the process (libFuzzer exits without running destructors anyway).
        let d = tempfile::Builder::new().prefix("zstream-fuzz-index-").tempdir().expect("tempdir").keep();
        std::fs::write(
            d.join("model-00001-of-00002.safetensors"),
            shard(&[("a.weight", "F32", &[2, 2], 16), ("a.bias", "F16", &[2], 4), ("empty", "U8", &[0], 0)]),
        )
        .unwrap();
        std::fs::write(d.join("model-00002-of-00002.safetensors"), shard(&[("b.weight", "BF16", &[3], 6)])).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join(INDEX_FILE), data).expect("write index");
    let _ = Checkpoint::open(d);
});
