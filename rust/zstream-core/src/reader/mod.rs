//! The three readers that move tensor bytes from shard files into an arena.
//!
//! - [`uring`]: io_uring with `O_DIRECT`, many reads in flight, registered buffers for reused arenas. The default.
//! - [`pread`]: a thread pool of `pread`s, `O_DIRECT` where the filesystem allows it. Chosen automatically where
//!   io_uring is unavailable (seccomp, gVisor, `io_uring_disabled`) or a shard refuses `O_DIRECT` (tmpfs).
//! - [`mmap`]: copies out of a read-only mapping. Never chosen automatically; a reference and a fallback.
//!
//! All three fill exactly the bytes a [`ReadPlan`] places, so tests compare them byte for byte.

pub mod fault;
pub mod mmap;
pub mod pread;
pub mod uring;

use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::arena::Arena;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::ReadPlan;
pub use fault::{FaultInjector, FaultKind, ReadCtx};

/// Which reader to use. `Auto` resolves per read with [`ReaderKind::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReaderKind {
    Auto,
    Uring,
    Pread,
    Mmap,
    /// The pread pool through the page cache (no `O_DIRECT`): what `Auto` picks when the cache already holds a
    /// read. Unlike the mmap copy it cannot fault (SIGBUS) if a file shrinks during the copy.
    PreadCached,
}

impl ReaderKind {
    pub fn name(self) -> &'static str {
        match self {
            ReaderKind::Auto => "auto",
            ReaderKind::Uring => "uring",
            ReaderKind::Pread => "pread",
            ReaderKind::Mmap => "mmap",
            ReaderKind::PreadCached => "pread-cached",
        }
    }

    /// `Auto` becomes the pread pool through the page cache when the cache already holds the bytes (a warm
    /// checkpoint: copying from memory beats re-reading the disk with `O_DIRECT`); else io_uring where it works and
    /// every shard of
    /// the read accepts `O_DIRECT`; else the pread pool.
    pub fn resolve(self, ckpt: &Checkpoint, plan: &ReadPlan) -> Result<ReaderKind> {
        match self {
            ReaderKind::Auto => {
                if page_cache_holds(ckpt, plan) {
                    return Ok(ReaderKind::PreadCached);
                }
                let direct_everywhere = plan.extents.iter().all(|e| ckpt.shards[e.file].direct.is_some());
                Ok(if uring::available().is_ok() && direct_everywhere { ReaderKind::Uring } else { ReaderKind::Pread })
            }
            ReaderKind::Uring => {
                uring::available().map_err(|reason| Error::ReaderUnavailable { reader: "uring", reason })?;
                Ok(ReaderKind::Uring)
            }
            k => Ok(k),
        }
    }
}

impl FromStr for ReaderKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ReaderKind::Auto),
            "uring" => Ok(ReaderKind::Uring),
            "pread" => Ok(ReaderKind::Pread),
            "mmap" => Ok(ReaderKind::Mmap),
            "pread-cached" => Ok(ReaderKind::PreadCached),
            other => Err(Error::InvalidArgument(format!(
                "unknown reader {other:?}: expected \"auto\", \"uring\", \"pread\" or \"mmap\""
            ))),
        }
    }
}

/// Tuning knobs. The defaults come from measurements recorded in docs/performance.md.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// io_uring reads in flight per ring.
    pub queue_depth: u32,
    /// Bytes per I/O (a multiple of the alignment).
    pub chunk_size: usize,
    /// Threads of the pread pool and of the mmap copy.
    pub threads: usize,
    /// Neighbouring tensors whose gap is at most this many bytes are read as one extent.
    pub max_gap: u64,
    /// `O_DIRECT` alignment of offsets, lengths and addresses.
    pub align: u64,
    /// Shift each extent so its first tensor starts on this boundary (0: no shift; see `plan::plan_aligned`).
    pub tensor_align: u64,
    /// A read whose I/Os make no progress for this long fails with `Error::IoTimeout` (`None`: wait for ever,
    /// still interruptible).
    pub io_timeout: Option<Duration>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            queue_depth: 64,
            chunk_size: 1 << 20,
            threads: 8,
            max_gap: 256 << 10,
            align: 4096,
            tensor_align: 0,
            io_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl ReadOptions {
    pub fn validate(&self) -> Result<()> {
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(Error::InvalidArgument(format!("queue_depth {} is not in 1..=4096", self.queue_depth)));
        }
        if self.chunk_size == 0 || self.chunk_size as u64 % self.align != 0 || self.chunk_size > 1 << 30 {
            return Err(Error::InvalidArgument(format!(
                "chunk_size {} must be a positive multiple of {} of at most 1 GiB",
                self.chunk_size, self.align
            )));
        }
        if self.tensor_align != 0 && (!self.tensor_align.is_power_of_two() || self.tensor_align > 4096) {
            return Err(Error::InvalidArgument(format!(
                "tensor_align {} must be 0 or a power of two of at most 4096",
                self.tensor_align
            )));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(Error::InvalidArgument(format!("threads {} is not in 1..=256", self.threads)));
        }
        Ok(())
    }
}

/// Per-thread reader state that outlives one read: the io_uring ring and its registered buffers.
#[derive(Default)]
pub struct ReaderState {
    pub ring: Option<uring::Ring>,
}

/// Fill `arena` as `plan` lays out, with reader `kind` (already resolved). `reuse` marks an arena that will be
/// read into again (a pool slot): io_uring registers such arenas as fixed buffers once.
pub fn read_into(
    kind: ReaderKind,
    ckpt: &Checkpoint,
    plan: &ReadPlan,
    arena: &Arena,
    state: &mut ReaderState,
    reuse: bool,
    ctx: &ReadCtx<'_>,
) -> Result<()> {
    assert!(plan.arena_len <= arena.len(), "arena smaller than its plan");
    match kind {
        ReaderKind::Uring | ReaderKind::Auto => {
            if state.ring.is_none() {
                state.ring = Some(uring::Ring::new(ctx.opts.queue_depth)?);
            }
            let ring = state.ring.as_mut().expect("ring was just created");
            ring.read(ckpt, plan, arena, reuse, ctx)
        }
        ReaderKind::Pread => pread::read(ckpt, plan, arena, ctx, true),
        ReaderKind::PreadCached => pread::read(ckpt, plan, arena, ctx, false),
        ReaderKind::Mmap => mmap::read(ckpt, plan, arena, ctx),
    }
}

/// An injected hang: wait until cancelled or until the I/O timeout, as a real hung I/O would be ended.
pub(crate) fn hang(ctx: &ReadCtx<'_>, path: &std::path::Path, offset: u64) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        check_cancel(ctx.cancel)?;
        if let Some(limit) = ctx.opts.io_timeout {
            if start.elapsed() >= limit {
                return Err(Error::IoTimeout { path: path.to_path_buf(), offset, secs: limit.as_secs_f64() });
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether at least 95% of the pages a plan reads are in the page cache (`mincore` over a mapping of each extent).
pub fn page_cache_holds(ckpt: &Checkpoint, plan: &ReadPlan) -> bool {
    let page = crate::arena::page_size() as u64;
    let (mut resident, mut total) = (0u64, 0u64);
    for e in &plan.extents {
        let shard = &ckpt.shards[e.file];
        let end = e.needed_end.min(shard.size);
        let start = e.file_start - e.file_start % page;
        if end <= start {
            continue;
        }
        let len = (end - start) as usize;
        // SAFETY: a read-only shared mapping of an open file within its size at open; unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                shard.file.as_raw_fd(),
                start as i64,
            )
        };
        if ptr == libc::MAP_FAILED {
            return false;
        }
        let mut vec = vec![0u8; len.div_ceil(page as usize)];
        // SAFETY: `vec` has one byte per page of the mapping, as mincore requires.
        let ok = unsafe { libc::mincore(ptr, len, vec.as_mut_ptr()) } == 0;
        // SAFETY: exactly the mapping made above.
        unsafe { libc::munmap(ptr, len) };
        if !ok {
            return false;
        }
        resident += vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
        total += vec.len() as u64;
    }
    total > 0 && resident * 100 >= total * 95
}

pub(crate) fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Probe once whether io_uring works here.
pub(crate) fn probe_once(
    cell: &OnceLock<Result<(), String>>,
    f: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    cell.get_or_init(f).clone()
}
