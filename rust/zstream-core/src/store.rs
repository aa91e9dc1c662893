//! The weight store: a checkpoint, a pool of reusable arena slots, and background workers that read into them.
//!
//! `Store::submit` plans a read of some tensors, takes an arena (a fresh one, or a pool slot for streaming), and
//! queues a [`Job`] that a worker thread carries out. The caller waits on the job; cancelling stops it between
//! I/Os and it still drains whatever the kernel holds, so an arena is never freed under a read.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::arena::Arena;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};
use crate::plan::{plan_aligned, ReadPlan, Want};
use crate::reader::{read_into, FaultInjector, ReadCtx, ReadOptions, ReaderKind, ReaderState};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An arena with an owner story: a one-shot buffer, or a pool slot that goes back to its pool when the last
/// reference (ticket or tensor) drops. A slot is never reused while anything can still see its bytes.
#[derive(Debug)]
pub struct Buffer {
    arena: Option<Arena>,
    pool: Option<Weak<SlotPool>>,
    /// Why pinning was skipped, if it was asked for and failed (the caller warns; unpinned still works).
    pub pin_error: OnceLock<String>,
}

impl Deref for Buffer {
    type Target = Arena;
    fn deref(&self) -> &Arena {
        self.arena.as_ref().expect("arena present until drop")
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let (Some(arena), Some(pool)) = (self.arena.take(), self.pool.as_ref().and_then(Weak::upgrade)) {
            pool.give_back(arena);
        }
    }
}

/// Reusable arenas for streaming reads. Bounded by `max_slots` when set: a full pool makes `acquire` wait for a
/// slot to come back.
#[derive(Debug)]
pub struct SlotPool {
    free: Mutex<Vec<Arena>>,
    returned: Condvar,
    /// Slots currently out (in tickets or tensors) plus free ones.
    total: Mutex<usize>,
    max_slots: Option<usize>,
    pin_flags: Option<u32>,
    numa_node: Option<u32>,
}

impl SlotPool {
    pub fn new(max_slots: Option<usize>, pin_flags: Option<u32>, numa_node: Option<u32>) -> Arc<SlotPool> {
        Arc::new(SlotPool {
            free: Mutex::new(Vec::new()),
            returned: Condvar::new(),
            total: Mutex::new(0),
            max_slots,
            pin_flags,
            numa_node,
        })
    }

    fn give_back(&self, arena: Arena) {
        lock(&self.free).push(arena);
        self.returned.notify_all();
    }

    /// Take a slot of at least `len` bytes: the smallest free one that fits, else a new one (replacing a free
    /// one that is too small when the pool is full), else wait until one comes back, for at most `wait`
    /// (`None`: as long as it takes). A wait that runs out is `Error::Timeout`.
    pub fn acquire(self: &Arc<Self>, len: usize, wait: Option<Duration>) -> Result<Buffer> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut free = lock(&self.free);
        loop {
            if let Some(i) = (0..free.len()).filter(|&i| free[i].len() >= len).min_by_key(|&i| free[i].len()) {
                let arena = free.swap_remove(i);
                return Ok(Buffer { arena: Some(arena), pool: Some(Arc::downgrade(self)), pin_error: OnceLock::new() });
            }
            let mut total = lock(&self.total);
            let full = self.max_slots.is_some_and(|m| *total >= m);
            if !full || !free.is_empty() {
                if full {
                    // Every free slot is too small: replace the smallest.
                    let i = (0..free.len()).min_by_key(|&i| free[i].len()).expect("non-empty");
                    drop(free.swap_remove(i));
                } else {
                    *total += 1;
                }
                drop(total);
                drop(free);
                let (arena, pin_error) =
                    new_arena(len, self.pin_flags, self.numa_node).inspect_err(|_| *lock(&self.total) -= 1)?;
                return Ok(Buffer { arena: Some(arena), pool: Some(Arc::downgrade(self)), pin_error: once(pin_error) });
            }
            drop(total);
            let slice = match deadline {
                Some(d) if Instant::now() >= d => return Err(Error::Timeout(wait.unwrap_or_default().as_secs_f64())),
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(1),
            };
            free = self.returned.wait_timeout(free, slice).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// (slots in existence, slots free)
    pub fn stats(&self) -> (usize, usize) {
        (*lock(&self.total), lock(&self.free).len())
    }
}

fn once(s: Option<String>) -> OnceLock<String> {
    let cell = OnceLock::new();
    if let Some(s) = s {
        let _ = cell.set(s);
    }
    cell
}

fn new_arena(len: usize, pin_flags: Option<u32>, numa_node: Option<u32>) -> Result<(Arena, Option<String>)> {
    let arena = Arena::new(len)?;
    if let Some(node) = numa_node {
        arena.prefer_numa_node(node);
    }
    let pin_error = match pin_flags.map(|f| arena.pin(f)) {
        Some(Err(e)) => Some(e.to_string()),
        _ => None,
    };
    Ok((arena, pin_error))
}

impl Buffer {
    /// A one-shot buffer of `len` bytes that the caller fills itself (e.g. with weights quantized at load),
    /// registered with CUDA when `pin_flags` is given. Unpinned on the last drop, like every arena; the error
    /// string says why pinning was skipped, if it was.
    pub fn host(len: usize, pin_flags: Option<u32>) -> Result<(Buffer, Option<String>)> {
        let (arena, pin_error) = new_arena(len, pin_flags, None)?;
        Ok((Buffer { arena: Some(arena), pool: None, pin_error: OnceLock::new() }, pin_error))
    }
}

/// Where one requested tensor landed.
#[derive(Debug, Clone)]
pub struct Placed {
    pub tensor: usize,
    pub arena_offset: usize,
}

/// Timings of one job in `CLOCK_MONOTONIC` nanoseconds (Python's `time.monotonic_ns()` clock), 0 = not yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobTimes {
    pub queued: u64,
    pub started: u64,
    pub finished: u64,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Default)]
struct Signal {
    state: Mutex<Option<Result<(), Arc<Error>>>>,
    done: Condvar,
}

#[derive(Debug)]
pub struct Job {
    pub plan: ReadPlan,
    pub buffer: Arc<Buffer>,
    pub placed: Vec<Placed>,
    pub reader: ReaderKind,
    /// Register the arena with CUDA once the read is done (one-shot arenas).
    pin_after: Option<u32>,
    reuse: bool,
    cancel: AtomicBool,
    /// The outcome and its condition variable, in their own allocation: the worker lets go of the job (and with it,
    /// possibly, the last hold on a pool slot) before it wakes the waiter, so a released slot is back in the pool
    /// by the time the waiter can ask for another.
    signal: Arc<Signal>,
    times: Mutex<JobTimes>,
}

impl Job {
    /// Wait up to `timeout` for the job. `None` means still running.
    pub fn wait(&self, timeout: Duration) -> Option<Result<(), Arc<Error>>> {
        let signal = &self.signal;
        let state = lock(&signal.state);
        let (state, _) =
            signal.done.wait_timeout_while(state, timeout, |s| s.is_none()).unwrap_or_else(PoisonError::into_inner);
        state.clone()
    }

    pub fn is_done(&self) -> bool {
        lock(&self.signal.state).is_some()
    }

    /// Ask the job to stop between I/Os. It still completes (with `Cancelled`) once the kernel is done with it.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn times(&self) -> JobTimes {
        *lock(&self.times)
    }

    /// Bytes the job moves from disk (aligned extents).
    pub fn read_bytes(&self) -> u64 {
        self.plan.read_bytes()
    }

    /// Record the outcome, drop the worker's hold on the job, then wake the waiters.
    fn finish(self: Arc<Self>, r: Result<()>) {
        lock(&self.times).finished = monotonic_ns();
        let signal = Arc::clone(&self.signal);
        *lock(&signal.state) = Some(r.map_err(Arc::new));
        drop(self);
        signal.done.notify_all();
    }
}

/// Store-wide settings.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    pub read: ReadOptions,
    /// Background reader threads (each with its own io_uring ring).
    pub workers: usize,
    /// Cap on pool slots; `None` grows as needed.
    pub max_slots: Option<usize>,
    /// `cudaHostRegister` flags for every arena, or `None` for unpinned.
    pub pin_flags: Option<u32>,
    /// NUMA node to place arenas on (the one nearest the GPU), if any.
    pub numa_node: Option<u32>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { read: ReadOptions::default(), workers: 2, max_slots: None, pin_flags: None, numa_node: None }
    }
}

struct Workers {
    queue: Option<mpsc::Sender<Arc<Job>>>,
    handles: Vec<JoinHandle<()>>,
}

pub struct Store {
    pub ckpt: Arc<Checkpoint>,
    pub options: StoreOptions,
    pub pool: Arc<SlotPool>,
    /// Faults to inject into this store's reads (tests).
    pub faults: Arc<FaultInjector>,
    workers: Mutex<Workers>,
}

impl Store {
    pub fn open(path: impl AsRef<std::path::Path>, options: StoreOptions) -> Result<Store> {
        options.read.validate()?;
        if options.workers == 0 || options.workers > 64 {
            return Err(Error::InvalidArgument(format!("workers {} is not in 1..=64", options.workers)));
        }
        let ckpt = Arc::new(Checkpoint::open(path)?);
        let (tx, rx) = mpsc::channel::<Arc<Job>>();
        let rx = Arc::new(Mutex::new(rx));
        let faults = Arc::new(FaultInjector::default());
        let handles = (0..options.workers)
            .map(|i| {
                let (rx, ckpt, faults) = (Arc::clone(&rx), Arc::clone(&ckpt), Arc::clone(&faults));
                let opts = options.read;
                std::thread::Builder::new()
                    .name(format!("zstream-read-{i}"))
                    .spawn(move || worker(&rx, &ckpt, &opts, &faults))
                    .map_err(|e| Error::Internal(format!("cannot start reader thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Store {
            ckpt,
            pool: SlotPool::new(options.max_slots, options.pin_flags, options.numa_node),
            options,
            faults,
            workers: Mutex::new(Workers { queue: Some(tx), handles }),
        })
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.ckpt.get(name)
    }

    /// Plan a read of `names` (duplicates allowed) without reading.
    pub fn plan(&self, names: &[&str]) -> Result<(ReadPlan, Vec<usize>)> {
        let idx = names.iter().map(|n| self.ckpt.index(n)).collect::<Result<Vec<_>>>()?;
        let wants: Vec<Want> = idx
            .iter()
            .map(|&i| {
                let t = &self.ckpt.tensors[i];
                Want { file: t.shard, offset: t.offset, len: t.nbytes }
            })
            .collect();
        let r = &self.options.read;
        Ok((plan_aligned(&wants, r.align, r.max_gap, r.tensor_align), idx))
    }

    /// Queue a read of `names`. `pooled` reads go into a reusable pool slot (streaming); others into a fresh
    /// arena that lives as long as its tensors. A full pool makes a pooled read wait for a slot for at most
    /// `slot_wait` (`None`: as long as it takes), then fail with `Error::Timeout`.
    pub fn submit(
        &self,
        names: &[&str],
        reader: ReaderKind,
        pooled: bool,
        slot_wait: Option<Duration>,
    ) -> Result<Arc<Job>> {
        let (plan, idx) = self.plan(names)?;
        for e in &plan.extents {
            self.ckpt.check_shard(e.file, e.needed_end)?;
        }
        let reader = reader.resolve(&self.ckpt, &plan)?;
        let buffer = if pooled {
            self.pool.acquire(plan.arena_len, slot_wait)?
        } else {
            // A one-shot arena is pinned after the read: registering fresh memory would fault in and zero every
            // page on one thread first, while the readers fault pages in on many threads as they fill them.
            let (arena, _) = new_arena(plan.arena_len, None, self.options.numa_node)?;
            Buffer { arena: Some(arena), pool: None, pin_error: OnceLock::new() }
        };
        let placed =
            idx.iter().zip(&plan.placements).map(|(&tensor, &arena_offset)| Placed { tensor, arena_offset }).collect();
        let job = Arc::new(Job {
            plan,
            buffer: Arc::new(buffer),
            placed,
            reader,
            pin_after: if pooled { None } else { self.options.pin_flags },
            reuse: pooled,
            cancel: AtomicBool::new(false),
            signal: Arc::new(Signal::default()),
            times: Mutex::new(JobTimes { queued: monotonic_ns(), ..JobTimes::default() }),
        });
        let workers = lock(&self.workers);
        let queue = workers.queue.as_ref().ok_or_else(|| Error::Internal("store is closed".into()))?;
        queue.send(Arc::clone(&job)).map_err(|_| Error::Internal("reader threads have stopped".into()))?;
        Ok(job)
    }

    /// Read `names` on the calling thread's behalf and wait (no interruption; bindings wait themselves).
    pub fn read_blocking(&self, names: &[&str], reader: ReaderKind) -> Result<Arc<Job>> {
        let job = self.submit(names, reader, false, None)?;
        loop {
            if let Some(r) = job.wait(Duration::from_secs(3600)) {
                return r.map(|()| job).map_err(|e| e.duplicate());
            }
        }
    }

    /// Stop the workers after the queued jobs. Called by `Drop`; idempotent.
    pub fn close(&self) {
        let mut w = lock(&self.workers);
        w.queue = None;
        for h in w.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Arc<Job>>>, ckpt: &Checkpoint, opts: &ReadOptions, faults: &FaultInjector) {
    let mut state = ReaderState::default();
    loop {
        // An error means the store closed its queue.
        let Ok(job) = lock(rx).recv() else { return };
        lock(&job.times).started = monotonic_ns();
        let r = if job.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            // A panic in a reader must not take the job's waiter down with it, nor cross into Python.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ctx = ReadCtx { opts, cancel: &job.cancel, faults };
                read_into(job.reader, ckpt, &job.plan, &job.buffer, &mut state, job.reuse, &ctx)
            }))
            .unwrap_or_else(|_| {
                state = ReaderState::default();
                Err(Error::Internal("reader thread panicked".into()))
            })
        };
        if let (Ok(()), Some(flags)) = (&r, job.pin_after) {
            if let Err(e) = job.buffer.pin(flags) {
                let _ = job.buffer.pin_error.set(e.to_string());
            }
        }
        job.finish(r);
    }
}
