//! Every reader returns exactly the bytes of each tensor, for random checkpoints with unaligned offsets, several
//! shards, empty tensors, and every placement the planner makes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use zstream_core::reader::fault::FaultKind;
use zstream_core::{Error, ReadOptions, ReaderKind, Store, StoreOptions};

mod common;
use common::{and_uring_if_it_works, tmpdir, u8_header, write_u8_tensors, HeaderPad};

/// Write a safetensors file of U8 tensors of pseudo-random bytes with the given sizes, every data offset unaligned;
/// returns (name, bytes) pairs.
fn write_shard(path: &Path, prefix: &str, sizes: &[usize], seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = || {
        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) as u8
    };
    let tensors: Vec<(String, Vec<u8>)> =
        sizes.iter().enumerate().map(|(i, &n)| (format!("{prefix}.{i}"), (0..n).map(|_| next()).collect())).collect();
    let views: Vec<(&str, &[u8])> = tensors.iter().map(|(name, data)| (name.as_str(), data.as_slice())).collect();
    write_u8_tensors(path, &views, HeaderPad::ToOddLength);
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
    let dir = tmpdir();
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
    let dir = tmpdir();
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
        let dir = tmpdir();
        let all = write_shard(&dir.path().join("r.safetensors"), "r", &sizes, sizes.len() as u64);
        let chosen: Vec<(String, Vec<u8>)> = pick.iter().map(|i| all[i.index(all.len())].clone()).collect();
        let read = ReadOptions { chunk_size: chunk_pages * 4096, max_gap: 0, ..ReadOptions::default() };
        check_all_readers(dir.path(), &chosen, StoreOptions { read, ..StoreOptions::default() });
    }
}

/// The readers that ask the fault injector before each I/O: the pread pool, and io_uring where it works here.
fn injectable_readers() -> Vec<ReaderKind> {
    and_uring_if_it_works(vec![ReaderKind::Pread, ReaderKind::PreadCached])
}

#[test]
fn short_and_interrupted_reads_are_resumed_to_the_exact_bytes() {
    let dir = tmpdir();
    let path = dir.path().join("f.safetensors");
    let t = write_shard(&path, "f", &[3 << 20, 100_003, 77], 4);
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    // Small chunks, so a read takes many I/Os and the faults land in the middle of it.
    let read = ReadOptions { chunk_size: 64 << 10, threads: 1, ..ReadOptions::default() };
    let store = Store::open(&path, StoreOptions { read, ..StoreOptions::default() }).unwrap();
    for reader in injectable_readers() {
        for (fault, after, count) in
            [(FaultKind::ShortRead, 0, 3), (FaultKind::ShortRead, 5, 40), (FaultKind::Eintr, 1, 4)]
        {
            store.faults.arm(fault, after, count);
            let job = store.read_blocking(&names, reader).unwrap();
            // SAFETY: the job finished; nothing writes the arena any more.
            let bytes = unsafe { job.buffer.as_slice() };
            for (p, (name, want)) in job.placed.iter().zip(&t) {
                let got = &bytes[p.arena_offset..p.arena_offset + want.len()];
                assert!(got == want.as_slice(), "{reader:?} {fault:?}: tensor {name} differs");
            }
            assert_eq!(store.faults.next(), None, "{reader:?} {fault:?}: every armed fault fired");
        }
    }
}

#[test]
fn a_failed_io_is_an_error_naming_the_file_and_offset() {
    let dir = tmpdir();
    let path = dir.path().join("e.safetensors");
    let t = write_shard(&path, "e", &[1 << 20], 5);
    // One I/O in flight at a time, so the I/Os come in order: chunks 0, 1, 2 (short: half of it), then the rest of 2.
    let chunk = 256u64 << 10;
    let read = ReadOptions { chunk_size: chunk as usize, threads: 1, queue_depth: 1, ..ReadOptions::default() };
    let store = Store::open(&path, StoreOptions { read, ..StoreOptions::default() }).unwrap();
    // The extent starts at the page holding the tensor's first byte; its chunks follow from there.
    let start = store.tensor(&t[0].0).unwrap().offset / 4096 * 4096;
    for reader in injectable_readers() {
        for (short_first, offset, len) in
            [(false, start + 2 * chunk, chunk), (true, start + 2 * chunk + chunk / 2, chunk / 2)]
        {
            if short_first {
                store.faults.arm(FaultKind::ShortRead, 2, 1);
                store.faults.arm(FaultKind::Eio, 0, 1);
            } else {
                store.faults.arm(FaultKind::Eio, 2, 1);
            }
            let err = store.read_blocking(&[t[0].0.as_str()], reader).unwrap_err();
            match &err {
                Error::Read { path: p, offset: o, len: l, source } => {
                    assert!(
                        p.ends_with("e.safetensors") && source.raw_os_error() == Some(libc::EIO),
                        "{reader:?}: {err}"
                    );
                    assert_eq!((*o, *l), (offset, len), "{reader:?}, short first: {short_first}");
                }
                other => panic!("{reader:?}: {other}"),
            }
            store.faults.clear();
        }
    }
}

#[test]
fn an_alignment_the_device_refuses_falls_back_to_buffered_reads() {
    // O_DIRECT needs at least the device's logical block (512 bytes); 64-byte aligned I/Os are refused with EINVAL,
    // and each reader must then go through the page cache instead of failing.
    let dir = tmpdir();
    let mut all = write_shard(&dir.path().join("a.safetensors"), "a", &[64 * 1000 + 3, 200_000, 5], 6);
    all.truncate(2);
    let read = ReadOptions { align: 64, chunk_size: 64 * 1024, max_gap: 0, ..ReadOptions::default() };
    let store = Store::open(dir.path(), StoreOptions { read, ..StoreOptions::default() }).unwrap();
    let (plan, _) = store.plan(&["a.0", "a.1"]).unwrap();
    assert!(plan.extents.iter().any(|e| e.file_start % 512 != 0), "some I/O starts off a 512-byte boundary");
    check_all_readers(dir.path(), &all, StoreOptions { read, ..StoreOptions::default() });
}

/// Pinned memory of this process in bytes (`VmPin`): what io_uring's registered buffers hold.
fn pinned_by_process() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmPin:")).expect("VmPin");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_pool_slot_past_one_gib_is_read_through_several_registered_buffers() {
    // The kernel registers at most 1 GiB per fixed buffer, so a slot of more takes several table entries, and a
    // chunk that straddles two of them must be read without one. A sparse file: only the marked pages hold data.
    const GIB: u64 = 1 << 30;
    let dir = tmpdir();
    let path = dir.path().join("big.safetensors");
    let len = GIB + (5 << 20) + 7;
    let header = u8_header(&[("big", len)], HeaderPad::None);
    let data_start = header.len() as u64;
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&header, 0).unwrap();
    f.set_len(data_start + len).unwrap();
    // The tensor's byte k lands at arena byte (data_start % 4096) + k. Marks: the start, across arena byte 1 GiB (in
    // the chunk that straddles two buffers), in the first chunk of the second buffer, and the end.
    let lead = data_start % 4096;
    let marks: Vec<(u64, Vec<u8>)> = [0, GIB - lead - 3000, GIB - lead + (2 << 20) + 11, len - 6000]
        .iter()
        .map(|&k| (k, (0..6000u64).map(|i| (i * 31 + k) as u8 | 1).collect()))
        .collect();
    for (k, bytes) in &marks {
        f.write_all_at(bytes, data_start + k).unwrap();
    }
    drop(f);
    // 3 MiB chunks do not divide 1 GiB: one of them straddles the boundary between two registered buffers.
    let read = ReadOptions { chunk_size: 3 << 20, ..ReadOptions::default() };
    let store = Store::open(&path, StoreOptions { read, workers: 1, ..StoreOptions::default() }).unwrap();
    let job = store.submit(&["big"], ReaderKind::Uring, true, None).unwrap();
    job.wait(std::time::Duration::from_secs(120)).expect("finished").unwrap();
    // Other tests of this process pin a few MiB at most, and they come and go: the slot alone passes 1 GiB.
    let pinned = pinned_by_process();
    assert!(pinned >= job.buffer.len() as u64, "the slot was not registered with the ring: {pinned} bytes pinned");
    // SAFETY: the job finished; nothing writes the arena any more.
    let bytes = unsafe { job.buffer.as_slice() };
    let at = job.placed[0].arena_offset;
    for (k, want) in &marks {
        let k = *k as usize;
        assert!(&bytes[at + k..at + k + want.len()] == want.as_slice(), "the marked bytes at tensor byte {k}");
        if k > 0 {
            assert!(bytes[at + k - 100..at + k].iter().all(|&b| b == 0), "the hole before tensor byte {k}");
        }
    }
}
