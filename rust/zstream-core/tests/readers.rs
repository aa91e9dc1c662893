//! Every reader returns exactly the bytes of each tensor, for random checkpoints with unaligned offsets, several
//! shards, empty tensors, and every placement the planner makes.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;
use zstream_core::{Error, ReadOptions, ReaderKind, Store, StoreOptions};

/// Write a safetensors file of U8 tensors with the given sizes; returns (name, bytes) pairs.
fn write_shard(path: &Path, prefix: &str, sizes: &[usize], seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) as u8
    };
    let tensors: Vec<(String, Vec<u8>)> =
        sizes.iter().enumerate().map(|(i, &n)| (format!("{prefix}.{i}"), (0..n).map(|_| next()).collect())).collect();
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, data) in &tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "U8", "shape": [data.len()], "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    // An odd header length leaves every data offset unaligned.
    let mut json = serde_json::to_vec(&header).unwrap();
    if json.len() % 2 == 0 {
        json.push(b' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&json).unwrap();
    for (_, d) in &tensors {
        f.write_all(d).unwrap();
    }
    tensors
}

fn check_all_readers(dir: &Path, tensors: &[(String, Vec<u8>)], opts: StoreOptions) {
    let store = Store::open(dir, opts).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    for kind in [ReaderKind::Uring, ReaderKind::Pread, ReaderKind::Mmap, ReaderKind::Auto] {
        for pooled in [false, true] {
            let job = store.submit(&names, kind, pooled, None).unwrap();
            job.wait(std::time::Duration::from_secs(60)).expect("finished").unwrap();
            // SAFETY: the job finished; nothing writes the arena any more.
            let bytes = unsafe { job.buffer.as_slice() };
            for (p, (name, want)) in job.placed.iter().zip(tensors) {
                let got = &bytes[p.arena_offset..p.arena_offset + want.len()];
                assert!(got == want.as_slice(), "{kind:?} pooled={pooled}: tensor {name} differs");
            }
        }
    }
}

#[test]
fn sharded_checkpoint_round_trips() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut all = write_shard(&dir.path().join("a.safetensors"), "a", &[0, 1, 4095, 4097, 3 << 20, 7], 1);
    all.extend(write_shard(&dir.path().join("b.safetensors"), "b", &[123_457, 0, 65_537], 2));
    check_all_readers(dir.path(), &all, StoreOptions::default());
    // Tiny chunks and a shallow queue force many resubmissions.
    let read = ReadOptions { queue_depth: 2, chunk_size: 4096, threads: 3, ..ReadOptions::default() };
    check_all_readers(dir.path(), &all, StoreOptions { read, max_slots: Some(1), ..StoreOptions::default() });
    // Tensors shifted to 256-byte boundaries (the ats layout): reads leave O_DIRECT where addresses disagree.
    let read = ReadOptions { tensor_align: 256, ..ReadOptions::default() };
    check_all_readers(dir.path(), &all, StoreOptions { read, ..StoreOptions::default() });
}

#[test]
fn truncated_after_open_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("t.safetensors");
    let t = write_shard(&path, "t", &[100_000, 200_000], 3);
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 150_000).unwrap();
    for kind in [ReaderKind::Uring, ReaderKind::Pread, ReaderKind::Mmap] {
        let err = store.read_blocking(&[t[1].0.as_str()], kind).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{kind:?}: {err}");
        assert!(err.to_string().contains("t.safetensors"), "{err}");
    }
    // The first tensor is still whole and still readable.
    store.read_blocking(&[t[0].0.as_str()], ReaderKind::Uring).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn random_checkpoints(sizes in prop::collection::vec(0usize..300_000, 1..12), pick in prop::collection::vec(any::<prop::sample::Index>(), 1..8), chunk_pages in 1usize..64) {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let all = write_shard(&dir.path().join("r.safetensors"), "r", &sizes, sizes.len() as u64);
        let chosen: Vec<(String, Vec<u8>)> = pick.iter().map(|i| all[i.index(all.len())].clone()).collect();
        let read = ReadOptions { chunk_size: chunk_pages * 4096, max_gap: 0, ..ReadOptions::default() };
        check_all_readers(dir.path(), &chosen, StoreOptions { read, ..StoreOptions::default() });
    }
}
