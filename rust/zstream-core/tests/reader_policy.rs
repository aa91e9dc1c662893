//! The decisions around the readers, each against something independent of the code that makes it: which reader
//! `auto` picks (from what the page cache holds, evicted and filled here with `posix_fadvise` and plain reads), which
//! options are accepted (the documented ranges, at each boundary), reader names, and how a hung I/O ends (by the
//! I/O timeout, or at once when cancelled).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use zstream_core::plan::{plan, Want};
use zstream_core::reader::fault::{FaultInjector, FaultKind, ReadCtx};
use zstream_core::reader::{page_cache_holds, read_into, uring, ReaderState};
use zstream_core::{Checkpoint, Error, ReadOptions, ReaderKind, Store, StoreOptions};

mod common;
use common::{and_uring_if_it_works, tmpdir, write_u8_tensors, HeaderPad};

const PAGE: u64 = 4096;
/// Where each tensor of the test file lies: a pad, the tensor the tests read, and a cold tail after it.
const PAD_LEN: u64 = 16 * PAGE + 1600;
const BODY_LEN: u64 = 32 * PAGE;
const TAIL_LEN: u64 = 256 * PAGE;

/// A safetensors file whose data starts at file offset 4096 (the header is padded), so the body tensor starts at
/// 17 pages + 1600 bytes: off a page boundary, and with 17 pages of file before its first page. Synced, so that its
/// pages are clean and can be evicted.
fn write_checkpoint(dir: &Path) -> PathBuf {
    let path = dir.join("policy.safetensors");
    let data: Vec<u8> = (0..PAD_LEN + BODY_LEN + TAIL_LEN).map(|i| (i % 253) as u8).collect();
    let (pad, rest) = data.split_at(PAD_LEN as usize);
    let (body, tail) = rest.split_at(BODY_LEN as usize);
    let data_start = write_u8_tensors(&path, &[("pad", pad), ("body", body), ("tail", tail)], HeaderPad::DataAt(PAGE));
    assert_eq!(data_start, PAGE);
    std::fs::File::open(&path).unwrap().sync_all().unwrap();
    path
}

/// Drop `[start, start+len)` of the file from the page cache (`len` 0: to the end). Its pages are clean (synced).
fn evict(path: &Path, start: u64, len: u64) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: fadvise on an open descriptor has no memory-safety preconditions.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), start as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Bring `[start, start+len)` into the page cache with a plain read, then evict whatever readahead brought after it.
fn warm(path: &Path, start: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, start).unwrap();
    evict(path, (start + len).div_ceil(PAGE) * PAGE, 0);
}

fn body_plan(ckpt: &Checkpoint, align: u64) -> zstream_core::plan::ReadPlan {
    let t = ckpt.get("body").unwrap();
    plan(&[Want { file: t.shard, offset: t.offset, len: t.nbytes }], align, 0)
}

#[test]
fn page_cache_holds_a_read_only_when_nearly_all_its_pages_are_cached() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let ckpt = Checkpoint::open(&path).unwrap();
    let body = ckpt.get("body").unwrap();
    assert_eq!(body.offset % PAGE, 1600, "the layout these checks rely on");
    // Aligned to 512, the extent starts off a page boundary: the check must map from the page below it.
    let plan512 = body_plan(&ckpt, 512);
    assert_ne!(plan512.extents[0].file_start % PAGE, 0);

    evict(&path, 0, 0);
    assert!(!page_cache_holds(&ckpt, &plan512), "a cold file");
    warm(&path, body.offset, body.nbytes / 2);
    assert!(!page_cache_holds(&ckpt, &plan512), "half of the body cached");
    warm(&path, body.offset, body.nbytes);
    assert!(page_cache_holds(&ckpt, &plan512), "all of the body cached, the tail after it cold");
    assert!(page_cache_holds(&ckpt, &body_plan(&ckpt, PAGE)));
    // The body spans 33 pages and the bar is 95%: 32 cached are enough, 31 are not.
    let middle = (body.offset + body.nbytes / 2).div_ceil(PAGE) * PAGE;
    evict(&path, middle, 2 * PAGE);
    assert!(!page_cache_holds(&ckpt, &plan512), "two pages of 33 evicted");
    warm(&path, body.offset, body.nbytes);
    evict(&path, middle, PAGE);
    assert!(page_cache_holds(&ckpt, &plan512), "one page of 33 evicted");
    // A plan with no bytes to read holds nothing.
    let empty = plan(&[Want { file: 0, offset: body.offset, len: 0 }], PAGE, 0);
    assert!(!page_cache_holds(&ckpt, &empty));
}

#[test]
fn auto_picks_the_cache_then_io_uring_then_the_pread_pool() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let mut ckpt = Checkpoint::open(&path).unwrap();
    let body = ckpt.get("body").unwrap().clone();
    let p = body_plan(&ckpt, PAGE);
    let uring_works = uring::available().is_ok();

    warm(&path, body.offset, body.nbytes);
    assert_eq!(ReaderKind::Auto.resolve(&ckpt, &p).unwrap(), ReaderKind::PreadCached);
    evict(&path, 0, 0);
    let cold = if uring_works { ReaderKind::Uring } else { ReaderKind::Pread };
    assert_eq!(ReaderKind::Auto.resolve(&ckpt, &p).unwrap(), cold);
    // A shard that refuses O_DIRECT (tmpfs) is read by the pread pool, even where io_uring works.
    assert!(ckpt.shards[0].direct.is_some(), "the test file sits where O_DIRECT works");
    ckpt.shards[0].direct = None;
    assert_eq!(ReaderKind::Auto.resolve(&ckpt, &p).unwrap(), ReaderKind::Pread);

    // Readers named explicitly are kept; io_uring is refused, with the reason, where it cannot work.
    for k in [ReaderKind::Pread, ReaderKind::Mmap, ReaderKind::PreadCached] {
        assert_eq!(k.resolve(&ckpt, &p).unwrap(), k);
    }
    match ReaderKind::Uring.resolve(&ckpt, &p) {
        Ok(k) => assert!(uring_works && k == ReaderKind::Uring),
        Err(e) => assert!(!uring_works && matches!(e, Error::ReaderUnavailable { reader: "uring", .. })),
    }
}

#[test]
fn reader_names_round_trip_and_unknown_ones_are_refused() {
    let all = [ReaderKind::Auto, ReaderKind::Uring, ReaderKind::Pread, ReaderKind::Mmap, ReaderKind::PreadCached];
    let names: Vec<&str> = all.iter().map(|k| k.name()).collect();
    assert_eq!(names, ["auto", "uring", "pread", "mmap", "pread-cached"]);
    for k in all {
        assert_eq!(k.name().parse::<ReaderKind>().unwrap(), k);
    }
    let err = "nvme".parse::<ReaderKind>().unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains("\"nvme\"")), "{err}");
}

#[test]
fn options_are_accepted_exactly_in_their_documented_ranges() {
    let d = ReadOptions::default();
    let cases: [(&str, ReadOptions, bool); 20] = [
        ("queue_depth", ReadOptions { queue_depth: 0, ..d }, false),
        ("queue_depth", ReadOptions { queue_depth: 1, ..d }, true),
        ("queue_depth", ReadOptions { queue_depth: 4096, ..d }, true),
        ("queue_depth", ReadOptions { queue_depth: 4097, ..d }, false),
        ("chunk_size", ReadOptions { chunk_size: 0, ..d }, false),
        ("chunk_size", ReadOptions { chunk_size: 4096, ..d }, true),
        ("chunk_size", ReadOptions { chunk_size: 6144, ..d }, false),
        ("chunk_size", ReadOptions { chunk_size: 1 << 30, ..d }, true),
        ("chunk_size", ReadOptions { chunk_size: (1 << 30) + 4096, ..d }, false),
        ("chunk_size", ReadOptions { chunk_size: 512, align: 512, ..d }, true),
        ("tensor_align", ReadOptions { tensor_align: 0, ..d }, true),
        ("tensor_align", ReadOptions { tensor_align: 3, ..d }, false),
        ("tensor_align", ReadOptions { tensor_align: 256, ..d }, true),
        ("tensor_align", ReadOptions { tensor_align: 4096, ..d }, true),
        ("tensor_align", ReadOptions { tensor_align: 8192, ..d }, false),
        ("threads", ReadOptions { threads: 0, ..d }, false),
        ("threads", ReadOptions { threads: 1, ..d }, true),
        ("threads", ReadOptions { threads: 256, ..d }, true),
        ("threads", ReadOptions { threads: 257, ..d }, false),
        ("default", d, true),
    ];
    for (field, opts, ok) in cases {
        match opts.validate() {
            Ok(()) => assert!(ok, "{field} accepted: {opts:?}"),
            Err(Error::InvalidArgument(m)) => assert!(!ok && m.starts_with(field), "{field}: {m}"),
            Err(e) => panic!("{field}: {e}"),
        }
    }
}

/// Read the body with one injected hang under `opts`, cancelling after `cancel_after` if given.
fn read_through_a_hang(reader: ReaderKind, opts: ReadOptions, cancel_after: Option<Duration>) -> (Error, Duration) {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let store = Store::open(&path, StoreOptions { read: opts, ..StoreOptions::default() }).unwrap();
    store.faults.arm(FaultKind::Hang, 0, 1);
    let start = Instant::now();
    let job = store.submit(&["body"], reader, false, None).unwrap();
    if let Some(after) = cancel_after {
        std::thread::sleep(after);
        job.cancel();
    }
    let err = job.wait(Duration::from_secs(60)).expect("the read ended").unwrap_err();
    (err.duplicate(), start.elapsed())
}

#[test]
fn a_hung_io_ends_at_the_io_timeout_or_at_once_when_cancelled() {
    let readers = and_uring_if_it_works(vec![ReaderKind::Pread]);
    for reader in readers {
        let timeout = Duration::from_millis(300);
        let opts = ReadOptions { io_timeout: Some(timeout), ..ReadOptions::default() };
        let (err, took) = read_through_a_hang(reader, opts, None);
        // The hang is the body's first I/O: its extent starts at the page holding the body's first byte.
        let first_io = (PAGE + PAD_LEN) / PAGE * PAGE;
        let at_first_io = |offset: u64| offset == first_io;
        assert!(
            matches!(&err, Error::IoTimeout { path, offset, .. } if path.ends_with("policy.safetensors") && at_first_io(*offset)),
            "{reader:?}: {err}"
        );
        assert!(took >= timeout, "{reader:?}: a hang ended after {took:?}, before the {timeout:?} I/O timeout");

        let opts = ReadOptions { io_timeout: Some(Duration::from_secs(20)), ..ReadOptions::default() };
        let (err, took) = read_through_a_hang(reader, opts, Some(Duration::from_millis(50)));
        assert!(matches!(err, Error::Cancelled), "{reader:?}: {err}");
        assert!(took < Duration::from_secs(20), "{reader:?}: cancelling did not end the hang ({took:?})");
    }
}

#[test]
fn o_direct_reads_leave_the_page_cache_cold_and_cached_reads_fill_it() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let p = body_plan(&store.ckpt, PAGE);
    let direct = and_uring_if_it_works(vec![ReaderKind::Pread]);
    for reader in direct {
        evict(&path, 0, 0);
        store.read_blocking(&["body"], reader).unwrap();
        assert!(!page_cache_holds(&store.ckpt, &p), "{reader:?} went through the page cache");
    }
    for reader in [ReaderKind::PreadCached, ReaderKind::Mmap] {
        evict(&path, 0, 0);
        store.read_blocking(&["body"], reader).unwrap();
        assert!(page_cache_holds(&store.ckpt, &p), "{reader:?} did not read through the page cache");
    }
}

/// Lines of `/proc/self/maps` that map the file at `path`.
fn mappings_of(path: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = path.to_str().unwrap();
    maps.lines().filter(|l| l.ends_with(name)).count()
}

#[test]
fn the_mmap_reader_unmaps_what_it_mapped() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path()).canonicalize().unwrap();
    let store = Store::open(&path, StoreOptions::default()).unwrap();
    let job = store.read_blocking(&["pad", "body", "tail"], ReaderKind::Mmap).unwrap();
    // SAFETY: the job finished; nothing writes the arena any more.
    let bytes = unsafe { job.buffer.as_slice() };
    let tail = job.placed[2].arena_offset;
    let first = (PAD_LEN + BODY_LEN) % 253;
    assert_eq!(bytes[tail..tail + 3], [first as u8, (first + 1) as u8, (first + 2) as u8]);
    assert_eq!(mappings_of(&path), 0, "a mapping of the shard outlived the read");
}

#[test]
fn a_file_cut_short_after_open_is_reported_where_it_ends() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let ckpt = Checkpoint::open(&path).unwrap();
    let body = ckpt.get("body").unwrap().clone();
    let cut = body.offset + 5 * PAGE;
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
    // The readers themselves, past the store's check before a read (a file can shrink after that check too).
    let p = body_plan(&ckpt, PAGE);
    let arena = zstream_core::arena::Arena::new(p.arena_len).unwrap();
    let (opts, cancel, faults) = (ReadOptions::default(), AtomicBool::new(false), FaultInjector::default());
    let ctx = ReadCtx { opts: &opts, cancel: &cancel, faults: &faults };
    let readers = and_uring_if_it_works(vec![ReaderKind::Pread, ReaderKind::PreadCached, ReaderKind::Mmap]);
    for reader in readers {
        let err = read_into(reader, &ckpt, &p, &arena, &mut ReaderState::default(), false, &ctx).unwrap_err();
        match err {
            Error::Truncated { file_end, needed_end, .. } => {
                assert_eq!(needed_end, body.offset + body.nbytes, "{reader:?}");
                // The mmap reader sees the size; the others see where reads stopped.
                assert_eq!(file_end, cut, "{reader:?}");
            }
            other => panic!("{reader:?}: {other}"),
        }
    }
}

#[test]
fn no_reader_writes_past_its_plan_even_when_reads_come_back_short() {
    let dir = tmpdir();
    let path = write_checkpoint(dir.path());
    let ckpt = Checkpoint::open(&path).unwrap();
    let p = body_plan(&ckpt, PAGE);
    // The arena is a page larger than the plan, and that page holds a canary the reads must leave alone. The file
    // goes on after the body (the tail), so a read that asked for too much would get bytes to write there.
    let arena = zstream_core::arena::Arena::new(p.arena_len + PAGE as usize).unwrap();
    let canary = p.arena_len..p.arena_len + PAGE as usize;
    let opts = ReadOptions { chunk_size: 8 * PAGE as usize, threads: 1, ..ReadOptions::default() };
    let (cancel, faults) = (AtomicBool::new(false), FaultInjector::default());
    let ctx = ReadCtx { opts: &opts, cancel: &cancel, faults: &faults };
    let readers = and_uring_if_it_works(vec![ReaderKind::Pread, ReaderKind::PreadCached]);
    for reader in readers {
        // SAFETY: no read is in flight; the range lies inside the arena.
        unsafe { std::ptr::write_bytes(arena.as_ptr().add(canary.start), 0xAA, canary.len()) };
        faults.arm(FaultKind::ShortRead, 0, 1000);
        read_into(reader, &ckpt, &p, &arena, &mut ReaderState::default(), false, &ctx).unwrap();
        faults.clear();
        // SAFETY: the read finished; nothing writes the arena any more.
        let bytes = unsafe { arena.as_slice() };
        assert!(bytes[canary.clone()].iter().all(|&b| b == 0xAA), "{reader:?} wrote past the plan's end");
        let at = p.placements[0];
        let want: Vec<u8> = (PAD_LEN..PAD_LEN + BODY_LEN).map(|i| (i % 253) as u8).collect();
        assert!(bytes[at..at + BODY_LEN as usize] == want[..], "{reader:?}: the body's bytes");
    }
}
