//! The store's bookkeeping, each against an independent witness: the pool's choice of slot (by address), its count of
//! slots, how long a full pool makes a reader wait, the job's clock (read here with `clock_gettime` directly), the
//! bytes a job reads (worked out by hand from the file's layout), and the reader threads (counted in `/proc`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zstream_core::reader::fault::FaultKind;
use zstream_core::store::{monotonic_ns, SlotPool};
use zstream_core::{Error, ReadOptions, ReaderKind, Store, StoreOptions};

mod common;
use common::{tmpdir, write_u8_tensors, HeaderPad};

const PAGE: usize = 4096;

/// The tests here count threads and time waits: one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A safetensors file with one U8 tensor "w" of `len` bytes of 7; returns its path and the tensor's file offset.
fn write_one_tensor(dir: &Path, len: usize) -> (PathBuf, usize) {
    let path = dir.join("one.safetensors");
    let data_start = write_u8_tensors(&path, &[("w", &vec![7u8; len])], HeaderPad::None);
    (path, usize::try_from(data_start).unwrap())
}

#[test]
fn a_pool_hands_out_the_smallest_free_slot_that_fits() {
    let _serial = serial();
    let pool = SlotPool::new(None, None, None);
    let slots: Vec<_> = [2, 5, 9].iter().map(|p| pool.acquire(p * PAGE, None).unwrap()).collect();
    assert_eq!(pool.stats(), (3, 0));
    let addresses: Vec<_> = slots.iter().map(|s| s.as_ptr() as usize).collect();
    drop(slots);
    assert_eq!(pool.stats(), (3, 3));

    let four = pool.acquire(4 * PAGE, None).unwrap();
    assert_eq!(four.as_ptr() as usize, addresses[1], "the 5-page slot, not the 2 (too small) or the 9 (larger)");
    let nine = pool.acquire(6 * PAGE, None).unwrap();
    assert_eq!(nine.as_ptr() as usize, addresses[2]);
    assert_eq!(pool.stats(), (3, 1));
    let ten = pool.acquire(10 * PAGE, None).unwrap();
    assert!(ten.len() >= 10 * PAGE);
    assert_eq!(pool.stats(), (4, 1), "nothing free fits and the pool has no cap: a new slot");
}

#[test]
fn a_full_pool_replaces_a_slot_too_small_and_otherwise_waits() {
    let _serial = serial();
    let pool = SlotPool::new(Some(1), None, None);
    drop(pool.acquire(PAGE, None).unwrap());
    assert_eq!(pool.stats(), (1, 1));
    // Full, and the free slot is too small: it is replaced rather than waited for.
    let big = pool.acquire(4 * PAGE, Some(Duration::from_millis(100))).unwrap();
    assert!(big.len() >= 4 * PAGE);
    assert_eq!(pool.stats(), (1, 0));

    // Full, nothing free: a wait that runs out is a timeout, after the whole wait.
    let start = Instant::now();
    let err = pool.acquire(PAGE, Some(Duration::from_millis(200))).unwrap_err();
    assert!(matches!(err, Error::Timeout(s) if (s - 0.2).abs() < 1e-9), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(200), "gave up after {:?}", start.elapsed());

    // Full, and the slot comes back during the wait: the waiter gets it.
    let held = Arc::new(big);
    let giver = {
        let held = Arc::clone(&held);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        })
    };
    let address = held.as_ptr();
    drop(held);
    let again = pool.acquire(PAGE, Some(Duration::from_secs(10))).unwrap();
    assert_eq!(again.as_ptr(), address);
    giver.join().unwrap();
}

#[test]
fn a_slot_that_cannot_be_mapped_is_not_counted() {
    let _serial = serial();
    let pool = SlotPool::new(Some(2), None, None);
    let err = pool.acquire(1 << 60, None).unwrap_err();
    assert!(matches!(err, Error::Alloc { .. }), "{err}");
    assert_eq!(pool.stats(), (0, 0));
    let a = pool.acquire(PAGE, Some(Duration::ZERO)).unwrap();
    let b = pool.acquire(PAGE, Some(Duration::ZERO)).unwrap();
    assert_eq!(pool.stats(), (2, 0), "the failed slot left room for two");
    drop((a, b));
}

/// `CLOCK_MONOTONIC` in nanoseconds, read here independently of the store.
fn clock_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) }, 0);
    u128::try_from(ts.tv_sec).unwrap() * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap()
}

#[test]
fn a_job_reports_its_bytes_and_its_times_on_the_monotonic_clock() {
    let _serial = serial();
    let dir = tmpdir();
    let len = 3 * PAGE + 100;
    let (path, offset) = write_one_tensor(dir.path(), len);
    let store = Store::open(&path, StoreOptions::default()).unwrap();

    let before = clock_ns();
    let now = u128::from(monotonic_ns());
    assert!(before <= now && now <= clock_ns(), "monotonic_ns {now} is not CLOCK_MONOTONIC ({before})");
    let job = store.read_blocking(&["w"], ReaderKind::Pread).unwrap();
    let after = clock_ns();
    assert!(job.is_done());
    let t = job.times();
    let times = [t.queued, t.started, t.finished].map(u128::from);
    assert!(before <= times[0] && times[0] <= times[1] && times[1] <= times[2] && times[2] <= after, "{t:?}");
    // The tensor's aligned superset: from the page holding its first byte to the page boundary after its last.
    let read = (offset + len).div_ceil(PAGE) * PAGE - offset / PAGE * PAGE;
    assert_eq!(job.read_bytes(), read as u64);
}

/// A store of one tensor "w" (5 pages) whose next read hangs until `io_timeout`, with `workers` reader threads.
fn store_with_a_hung_read(dir: &Path, io_timeout: Duration, workers: usize) -> Store {
    let (path, _) = write_one_tensor(dir, 5 * PAGE);
    let read = ReadOptions { io_timeout: Some(io_timeout), ..ReadOptions::default() };
    let store = Store::open(&path, StoreOptions { read, workers, ..StoreOptions::default() }).unwrap();
    store.faults.arm(FaultKind::Hang, 0, 1);
    store
}

#[test]
fn a_cancelled_job_ends_cancelled_and_is_done_only_then() {
    let _serial = serial();
    let dir = tmpdir();
    let store = store_with_a_hung_read(dir.path(), Duration::from_secs(20), 2);
    let job = store.submit(&["w"], ReaderKind::Pread, false, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!job.is_done(), "a hung read is not done");
    assert!(job.wait(Duration::from_millis(10)).is_none());
    job.cancel();
    let outcome = job.wait(Duration::from_secs(10)).expect("cancelling ends the hang");
    assert!(matches!(outcome.unwrap_err().as_ref(), Error::Cancelled));
    assert!(job.is_done());
}

/// Threads of this process named like the store's readers (`/proc/self/task/*/comm`).
fn reader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("zstream-read-"))
        .count()
}

/// The count of reader threads once it settles on `want` (a new thread names itself after it starts), or the last
/// count seen within five seconds.
fn settled_reader_threads(want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = reader_threads();
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_store_starts_its_readers_and_stops_them_when_closed_or_dropped() {
    let _serial = serial();
    let dir = tmpdir();
    let (path, _) = write_one_tensor(dir.path(), PAGE);
    for workers in [0, 65] {
        let err = Store::open(&path, StoreOptions { workers, ..StoreOptions::default() }).err().expect("refused");
        assert!(matches!(&err, Error::InvalidArgument(m) if m.starts_with("workers")), "{err}");
    }
    let base = reader_threads();
    let one = Store::open(&path, StoreOptions { workers: 1, ..StoreOptions::default() }).unwrap();
    let many = Store::open(&path, StoreOptions { workers: 64, ..StoreOptions::default() }).unwrap();
    assert_eq!(settled_reader_threads(base + 65), base + 65);

    many.close();
    assert_eq!(reader_threads(), base + 1);
    let err = many.submit(&["w"], ReaderKind::Pread, false, None).unwrap_err();
    assert!(matches!(&err, Error::Internal(m) if m.contains("closed")), "{err}");
    many.close(); // closing twice is harmless
    drop(one);
    assert_eq!(reader_threads(), base);
}

#[test]
fn dropping_a_store_waits_for_the_reads_it_queued() {
    let _serial = serial();
    let dir = tmpdir();
    // The read hangs until its I/O timeout: a worker still holds it when the store is dropped.
    let store = store_with_a_hung_read(dir.path(), Duration::from_millis(300), 1);
    let job = store.submit(&["w"], ReaderKind::Pread, false, None).unwrap();
    drop(store);
    assert!(job.is_done(), "the store was dropped while a worker still read into its arena");
    assert!(matches!(job.wait(Duration::ZERO).expect("done").unwrap_err().as_ref(), Error::IoTimeout { .. }));
}
