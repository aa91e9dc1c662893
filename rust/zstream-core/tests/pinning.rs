//! Pinning against a stand-in CUDA runtime: `cudaHostRegister` and `cudaHostUnregister` replaced by functions that
//! record every call, so what the core asks of CUDA (register once per flags, re-register on new flags, unregister
//! before unmapping, carry on unpinned when refused) is checked on a machine without a GPU. This is its own test
//! binary because the runtime is installed once per process and the unit tests need a process without one.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

use zstream_core::arena::{page_size, pinned_bytes, Arena, PinState};
use zstream_core::pin::{cuda_host_api, flags, install_cuda_host_api, HostRegisterFn, HostUnregisterFn};
use zstream_core::store::{Buffer, SlotPool};
use zstream_core::{Error, ReaderKind, Store, StoreOptions};

mod common;
use common::{tmpdir, write_u8_tensors, HeaderPad};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Register { size: usize, flags: u32 },
    Unregister,
}

/// Every call the stand-in runtime saw, with the address it was given.
static CALLS: Mutex<Vec<(usize, Call)>> = Mutex::new(Vec::new());
/// The stand-in refuses to register a range of exactly this many bytes.
static REFUSED_SIZE: AtomicUsize = AtomicUsize::new(0);
/// cudaErrorMemoryAllocation, what a real refusal (RLIMIT_MEMLOCK) returns.
const REFUSAL_CODE: c_int = 2;

unsafe extern "C" fn register(ptr: *mut c_void, size: usize, flags: c_uint) -> c_int {
    if size == REFUSED_SIZE.load(Ordering::SeqCst) {
        return REFUSAL_CODE;
    }
    CALLS.lock().unwrap().push((ptr as usize, Call::Register { size, flags }));
    0
}

unsafe extern "C" fn unregister(ptr: *mut c_void) -> c_int {
    CALLS.lock().unwrap().push((ptr as usize, Call::Unregister));
    0
}

/// Install the stand-in (once) and serialize the tests: they share the call log and the pinned-bytes counter.
fn runtime() -> MutexGuard<'static, ()> {
    static INSTALL: Once = Once::new();
    static SERIAL: Mutex<()> = Mutex::new(());
    INSTALL.call_once(|| {
        let (reg, unreg) = (register as HostRegisterFn as usize, unregister as HostUnregisterFn as usize);
        assert!(cuda_host_api().is_none());
        // SAFETY: zero addresses are refused before anything is installed.
        assert!(!unsafe { install_cuda_host_api(0, unreg) });
        // SAFETY: the stand-ins have exactly the runtime's signatures and live as long as the process.
        assert!(unsafe { install_cuda_host_api(reg, unreg) });
        // SAFETY: as above; the first installation wins, so this one is refused.
        assert!(!unsafe { install_cuda_host_api(reg, unreg) });
        assert!(cuda_host_api().is_some());
    });
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn calls_at(ptr: *mut u8) -> Vec<Call> {
    CALLS.lock().unwrap().iter().filter(|(p, _)| *p == ptr as usize).map(|(_, c)| *c).collect()
}

#[test]
fn an_arena_registers_once_per_flags_and_unregisters_when_dropped() {
    let _serial = runtime();
    let before = pinned_bytes();
    let arena = Arena::new(3 * page_size() + 1).unwrap();
    let (ptr, len) = (arena.as_ptr(), arena.len());
    assert_eq!(arena.pin_state(), PinState::Unpinned);

    assert!(arena.pin(flags::MAPPED).unwrap());
    assert!(arena.pin(flags::MAPPED).unwrap(), "the same flags again: already pinned");
    assert_eq!(calls_at(ptr), [Call::Register { size: len, flags: flags::MAPPED }]);
    assert_eq!(arena.pin_state(), PinState::Pinned(flags::MAPPED));
    assert_eq!(pinned_bytes(), before + len as u64);

    // New flags: CUDA cannot change a registration, so the arena is unregistered and registered again.
    assert!(arena.pin(flags::PORTABLE).unwrap());
    assert_eq!(
        calls_at(ptr),
        [
            Call::Register { size: len, flags: flags::MAPPED },
            Call::Unregister,
            Call::Register { size: len, flags: flags::PORTABLE }
        ]
    );
    assert_eq!(arena.pin_state(), PinState::Pinned(flags::PORTABLE));
    assert_eq!(pinned_bytes(), before + len as u64);

    drop(arena);
    assert_eq!(calls_at(ptr).last(), Some(&Call::Unregister), "CUDA must forget the range before it is unmapped");
    assert_eq!(pinned_bytes(), before);
}

#[test]
fn a_refused_registration_leaves_the_arena_unpinned_and_says_why() {
    let _serial = runtime();
    let before = pinned_bytes();
    let len = 5 * page_size();
    REFUSED_SIZE.store(len, Ordering::SeqCst);

    let arena = Arena::new(len).unwrap();
    let ptr = arena.as_ptr();
    let err = arena.pin(flags::MAPPED).unwrap_err();
    assert!(matches!(err, Error::Pin { bytes, code: REFUSAL_CODE } if bytes == len), "{err:?}");
    assert!(err.to_string().contains(&format!("{len}-byte")), "{err}");
    assert_eq!(arena.pin_state(), PinState::Unpinned);
    assert_eq!(pinned_bytes(), before);
    drop(arena);
    assert_eq!(calls_at(ptr), [], "an arena that was never registered is never unregistered");

    // A buffer asked to be pinned still comes back, unpinned, with the reason (the caller warns).
    let (buffer, why) = Buffer::host(len, Some(flags::MAPPED)).unwrap();
    assert_eq!(buffer.pin_state(), PinState::Unpinned);
    assert!(why.is_some_and(|w| w.contains("cudaHostRegister")));
    let slot = SlotPool::new(Some(1), Some(flags::MAPPED), None).acquire(len, None).unwrap();
    assert_eq!(slot.pin_state(), PinState::Unpinned);
    assert!(slot.pin_error.get().is_some_and(|w| w.contains("cudaHostRegister")));
    REFUSED_SIZE.store(0, Ordering::SeqCst);
}

#[test]
fn buffers_and_pool_slots_are_pinned_with_the_flags_asked_for() {
    let _serial = runtime();
    let (buffer, why) = Buffer::host(7 * page_size(), Some(flags::PORTABLE)).unwrap();
    assert_eq!((buffer.pin_state(), why), (PinState::Pinned(flags::PORTABLE), None));
    let (buffer, why) = Buffer::host(7 * page_size(), None).unwrap();
    assert_eq!((buffer.pin_state(), why), (PinState::Unpinned, None));

    let pool = SlotPool::new(Some(1), Some(flags::MAPPED), None);
    let slot = pool.acquire(9 * page_size(), Some(Duration::from_secs(5))).unwrap();
    assert_eq!((slot.pin_state(), slot.pin_error.get()), (PinState::Pinned(flags::MAPPED), None));
    let ptr = slot.as_ptr();
    drop(slot);
    // Back in the pool, still registered: a streaming slot is pinned once for its whole life.
    let again = pool.acquire(9 * page_size(), Some(Duration::from_secs(5))).unwrap();
    assert_eq!(again.as_ptr(), ptr);
    assert_eq!(calls_at(ptr), [Call::Register { size: again.len(), flags: flags::MAPPED }]);
}

#[test]
fn a_store_pins_the_one_shot_arenas_it_reads_into() {
    let _serial = runtime();
    let dir = tmpdir();
    let path = dir.path().join("p.safetensors");
    let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write_u8_tensors(&path, &[("w", &data)], HeaderPad::None);

    let store = Store::open(&path, StoreOptions { pin_flags: Some(flags::MAPPED), ..StoreOptions::default() }).unwrap();
    let job = store.read_blocking(&["w"], ReaderKind::Pread).unwrap();
    assert_eq!(job.buffer.pin_state(), PinState::Pinned(flags::MAPPED));
    assert_eq!(job.buffer.pin_error.get(), None);
    // SAFETY: the job finished; nothing writes the arena any more.
    let got = unsafe { &job.buffer.as_slice()[job.placed[0].arena_offset..][..data.len()] };
    assert!(got == data.as_slice(), "the pinned arena holds the tensor");
}
