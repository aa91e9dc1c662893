//! The checkpoint index: which files a path or directory stands for, what the index file may name, where each
//! tensor lives, and the shard checks made before a read. Files are written byte by byte here, with the JSON
//! spelled out, so that every expected offset can be worked out by hand: 8 (length prefix) + JSON length + the
//! tensor's `data_offsets[0]`.

use std::io::Write;
use std::path::Path;

use zstream_core::{Checkpoint, Dtype, Error};

mod common;
use common::tmpdir;

/// Write `u64le(json.len()) ++ json ++ data_len bytes of 0xAB`.
fn write_raw(path: &Path, json: &str, data_len: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(json.as_bytes()).unwrap();
    f.write_all(&vec![0xAB; data_len]).unwrap();
}

const A_JSON: &str = r#"{"a.w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"a.b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#;
const B_JSON: &str = r#"{"__metadata__":{"format":"pt"},"b.w":{"dtype":"F32","shape":[5],"data_offsets":[0,20]}}"#;

/// Two shards: a.safetensors (a.w, a.b: 11 data bytes) and b.safetensors (b.w: 20 data bytes).
fn two_shards(dir: &Path) {
    write_raw(&dir.join("a.safetensors"), A_JSON, 11);
    write_raw(&dir.join("b.safetensors"), B_JSON, 20);
}

/// (name, dtype, shape, shard, absolute offset, bytes) of one tensor.
type Row<'a> = (&'a str, Dtype, &'a [usize], usize, u64, u64);

fn open_err(path: &Path) -> String {
    Checkpoint::open(path).unwrap_err().to_string()
}

#[test]
fn directory_without_index_lists_tensors_by_hand() {
    let dir = tmpdir();
    two_shards(dir.path());
    // Not a shard: another extension, and a directory whose name ends in .safetensors.
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    std::fs::create_dir(dir.path().join("sub.safetensors")).unwrap();

    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.shards.len(), 2);
    assert_eq!(c.shards[0].path, dir.path().join("a.safetensors"));
    assert_eq!(c.shards[1].path, dir.path().join("b.safetensors"));
    let a_data = 8 + A_JSON.len() as u64;
    let b_data = 8 + B_JSON.len() as u64;
    assert_eq!(c.shards[0].size, a_data + 11);
    assert_eq!(c.shards[1].size, b_data + 20);
    assert!(c.shards[0].metadata.is_empty());
    assert_eq!(c.shards[1].metadata.get("format").map(String::as_str), Some("pt"));

    // Shard order, then file order.
    let got: Vec<Row> =
        c.tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.shard, t.offset, t.nbytes)).collect();
    assert_eq!(
        got,
        vec![
            ("a.w", Dtype::F16, &[2usize, 2][..], 0, a_data, 8),
            ("a.b", Dtype::U8, &[3][..], 0, a_data + 8, 3),
            ("b.w", Dtype::F32, &[5][..], 1, b_data, 20),
        ]
    );

    assert_eq!(c.len(), 3);
    assert!(!c.is_empty());
    assert_eq!(c.nbytes(), 8 + 3 + 20);
    assert!(c.contains("a.b"));
    assert!(!c.contains("a.x"));
    assert_eq!(c.index("a.w").unwrap(), 0);
    assert_eq!(c.index("b.w").unwrap(), 2);
    assert_eq!(c.get("a.b").unwrap().offset, a_data + 8);
    assert_eq!(c.get("b.w").unwrap().shard, 1);
    assert!(matches!(c.get("nope"), Err(Error::UnknownTensor(n)) if n == "nope"));
    assert!(matches!(c.index("nope"), Err(Error::UnknownTensor(n)) if n == "nope"));
}

#[test]
fn single_file_and_empty_checkpoint() {
    let dir = tmpdir();
    let path = dir.path().join("only.safetensors");
    write_raw(&path, "{}", 0);
    let c = Checkpoint::open(&path).unwrap();
    assert_eq!((c.len(), c.nbytes(), c.shards.len()), (0, 0, 1));
    assert!(c.is_empty());
    assert!(!c.contains(""));

    write_raw(&path, A_JSON, 11);
    let c = Checkpoint::open(&path).unwrap();
    assert_eq!((c.len(), c.nbytes()), (2, 11));
    assert!(!c.is_empty());
}

#[test]
fn index_file_picks_the_shards() {
    let dir = tmpdir();
    two_shards(dir.path());
    // A stray shard that the index does not name is not opened (it is not even a valid file).
    std::fs::write(dir.path().join("stray.safetensors"), b"junk").unwrap();
    let index = r#"{"metadata":{},"weight_map":{"a.w":"a.safetensors","a.b":"a.safetensors","b.w":"b.safetensors"}}"#;
    std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.shards.len(), 2);
    assert_eq!(c.len(), 3);
    assert_eq!(c.get("b.w").unwrap().shard, 1);
}

#[test]
fn index_faults_are_named() {
    let cases = [
        (r#"{"weight_map":{"a.w":"../a.safetensors"}}"#, "outside the directory"),
        (r#"{"weight_map":{"a.w":"sub/a.safetensors"}}"#, "outside the directory"),
        (r#"{"weight_map":{"a.w":".."}}"#, "outside the directory"),
        (r#"{"weight_map":{"a.w":"c.safetensors"}}"#, "c.safetensors, which is missing"),
        (r#"{"weight_map":{}}"#, "empty weight_map"),
        (r#"{"weight_map":{"a.b":"a.safetensors","a.w":"b.safetensors"}}"#, "to b.safetensors, but it is in"),
        (r#"{"weight_map":{"a.zz":"a.safetensors"}}"#, "which has no such tensor"),
        (r#"{"weight_map":[]}"#, "index is not valid"),
    ];
    for (index, needle) in cases {
        let dir = tmpdir();
        two_shards(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write_raw(&dir.path().join("sub").join("a.safetensors"), A_JSON, 11);
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let err = open_err(dir.path());
        assert!(err.contains(needle), "{index}: {err}");
        assert!(err.contains("model.safetensors.index.json"), "{index}: {err}");
    }
}

#[test]
fn directory_faults_are_named() {
    let dir = tmpdir();
    std::fs::write(dir.path().join("notes.txt"), b"hi").unwrap();
    assert!(open_err(dir.path()).contains("holds no .safetensors files"));

    // The same tensor name in two shards.
    write_raw(&dir.path().join("a.safetensors"), A_JSON, 11);
    write_raw(&dir.path().join("b.safetensors"), A_JSON, 11);
    let err = open_err(dir.path());
    assert!(err.contains("duplicate names across shards") && err.contains("a.safetensors"), "{err}");

    assert!(open_err(&dir.path().join("missing.safetensors")).contains("cannot open checkpoint"));

    // Too short for the length prefix, and a header that is not JSON.
    let short = dir.path().join("short.safetensors");
    std::fs::write(&short, [1, 0, 0]).unwrap();
    assert!(open_err(&short).contains("too short"));
    let bad = dir.path().join("bad.safetensors");
    write_raw(&bad, "{nope", 0);
    assert!(open_err(&bad).contains("not valid JSON"));
}

#[test]
fn check_shard_finds_truncation_and_replacement() {
    let dir = tmpdir();
    two_shards(dir.path());
    let c = Checkpoint::open(dir.path()).unwrap();
    let a_end = 8 + A_JSON.len() as u64 + 11;
    // Reading up to the last byte is fine; one past it is a truncated file.
    c.check_shard(0, a_end).unwrap();
    c.check_shard(0, 0).unwrap();
    match c.check_shard(0, a_end + 1) {
        Err(Error::Truncated { path, file_end, needed_end }) => {
            assert_eq!(path, dir.path().join("a.safetensors"));
            assert_eq!((file_end, needed_end), (a_end, a_end + 1));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }

    // Cut shard b short after open.
    let b = dir.path().join("b.safetensors");
    let b_end = 8 + B_JSON.len() as u64 + 20;
    c.check_shard(1, b_end).unwrap();
    std::fs::OpenOptions::new().write(true).open(&b).unwrap().set_len(b_end - 5).unwrap();
    assert!(matches!(c.check_shard(1, b_end), Err(Error::Truncated { file_end, .. }) if file_end == b_end - 5));
    c.check_shard(1, b_end - 5).unwrap();

    // Replace shard a by a new file (a re-download): a different inode under the same name.
    let fresh = dir.path().join("a.tmp");
    write_raw(&fresh, A_JSON, 11);
    std::fs::rename(&fresh, dir.path().join("a.safetensors")).unwrap();
    let err = c.check_shard(0, 1).unwrap_err().to_string();
    assert!(err.contains("was replaced") && err.contains("a.safetensors"), "{err}");
}
