//! The pread pool: `threads` workers pull chunks off a shared counter and `pread` each into the arena.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{check_cancel, hang, FaultKind, ReadCtx};
use crate::arena::Arena;
use crate::checkpoint::{Checkpoint, Shard};
use crate::error::{Error, Result};
use crate::plan::{Chunk, ReadPlan};

/// An injected short read: half of `want`, kept a multiple of `align` so that O_DIRECT still accepts it.
pub(crate) fn short(want: usize, align: u64) -> usize {
    let half = (want / 2) & !(align as usize - 1);
    if half == 0 {
        want
    } else {
        half
    }
}

/// `direct`: use `O_DIRECT` where the shard and the I/O allow it; else read through the page cache.
pub fn read(ckpt: &Checkpoint, plan: &ReadPlan, arena: &Arena, ctx: &ReadCtx<'_>, direct: bool) -> Result<()> {
    let opts = ctx.opts;
    let chunks = plan.chunks(opts.chunk_size);
    let next = AtomicUsize::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let failed = AtomicBool::new(false);
    let threads = opts.threads.min(chunks.len()).max(1);
    let base = arena.as_ptr() as usize;

    let work = || loop {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(c) = chunks.get(i) else { return };
        let r =
            check_cancel(ctx.cancel).and_then(|()| read_chunk(&ckpt.shards[c.file], c, base, plan.align, ctx, direct));
        if let Err(e) = r {
            failed.store(true, Ordering::Relaxed);
            first_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
            return;
        }
    };
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(work);
            }
        });
    }
    match first_error.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Read one chunk, resubmitting after short reads, until its needed bytes are in.
pub(crate) fn read_chunk(
    shard: &Shard,
    c: &Chunk,
    arena_base: usize,
    align: u64,
    ctx: &ReadCtx<'_>,
    direct: bool,
) -> Result<()> {
    let mut done = 0usize;
    while done < c.needed {
        let offset = c.file_offset + done as u64;
        let want = c.len - done;
        let dst = arena_base + c.arena_offset + done;
        let aligned = offset % align == 0 && want as u64 % align == 0 && dst as u64 % align == 0;
        let mut fd = match (&shard.direct, aligned && direct) {
            (Some(f), true) => f.as_raw_fd(),
            _ => shard.file.as_raw_fd(),
        };
        let n = loop {
            let mut ask = want;
            match ctx.faults.next() {
                Some(FaultKind::Eio) => {
                    let source = io::Error::from_raw_os_error(libc::EIO);
                    return Err(Error::Read { path: shard.path.clone(), offset, len: want as u64, source });
                }
                Some(FaultKind::Eintr) => continue,
                Some(FaultKind::ShortRead) => ask = short(want, align),
                Some(FaultKind::Hang) => hang(ctx, &shard.path, offset)?,
                None => {}
            }
            // SAFETY: dst..dst+ask lies inside the arena (the plan guarantees chunk bounds) and no other thread
            // writes this chunk's range; fd is open for the life of the checkpoint.
            let n = unsafe { libc::pread(fd, dst as *mut libc::c_void, ask, offset as libc::off_t) };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => {}
                // The filesystem refused this O_DIRECT read: fall back to the buffered descriptor.
                Some(libc::EINVAL) if fd != shard.file.as_raw_fd() => fd = shard.file.as_raw_fd(),
                _ => return Err(Error::Read { path: shard.path.clone(), offset, len: want as u64, source: err }),
            }
        };
        if n == 0 {
            return Err(Error::Truncated {
                path: shard.path.clone(),
                file_end: offset,
                needed_end: c.file_offset + c.needed as u64,
            });
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn a_short_read_is_half_kept_aligned_or_all_when_half_is_no_block() {
        assert_eq!(short(8192, 4096), 4096);
        assert_eq!(short(3 * 4096, 4096), 4096, "half is 6144, down to a block");
        assert_eq!(short(10_000, 512), 4608, "half is 5000, down to 9 blocks of 512");
        assert_eq!(short(4096, 4096), 4096, "half of one block is no block: the whole read");
        assert_eq!(short(7, 1), 3);
        assert_eq!(short(1, 1), 1);
    }
}
