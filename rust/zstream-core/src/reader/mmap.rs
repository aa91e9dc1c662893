//! The mmap reader: map each shard read-only and copy the wanted ranges into the arena.
//!
//! Before copying, the shard's current size is checked against the plan, so a file truncated after `open` gives
//! an error rather than a SIGBUS in the common case. (A truncation racing with the copy can still fault; the
//! streaming path does not use this reader.)

use std::os::fd::AsRawFd;

use super::{check_cancel, ReadCtx};
use crate::arena::Arena;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::plan::ReadPlan;

struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly what mmap returned.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

// SAFETY: a read-only mapping; threads only read from it.
unsafe impl Sync for Mapping {}

pub fn read(ckpt: &Checkpoint, plan: &ReadPlan, arena: &Arena, ctx: &ReadCtx<'_>) -> Result<()> {
    let (opts, cancel) = (ctx.opts, ctx.cancel);
    let mut maps: Vec<Option<Mapping>> = (0..ckpt.shards.len()).map(|_| None).collect();
    // (source pointer, destination offset, length) copies.
    let mut copies: Vec<(usize, usize, usize)> = Vec::new();
    for e in &plan.extents {
        let shard = &ckpt.shards[e.file];
        let size = shard.file.metadata().map_err(|source| Error::Read {
            path: shard.path.clone(),
            offset: 0,
            len: 0,
            source,
        })?;
        let size = size.len();
        if size < e.needed_end {
            return Err(Error::Truncated { path: shard.path.clone(), file_end: size, needed_end: e.needed_end });
        }
        if maps[e.file].is_none() {
            let len = size as usize;
            // SAFETY: a shared read-only mapping of an open file; the result is checked.
            let ptr = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, shard.file.as_raw_fd(), 0)
            };
            if ptr == libc::MAP_FAILED {
                let source = std::io::Error::last_os_error();
                return Err(Error::Read { path: shard.path.clone(), offset: 0, len: size, source });
            }
            maps[e.file] = Some(Mapping { ptr, len });
        }
        let m = maps[e.file].as_ref().expect("mapped above");
        let len = (e.needed_end - e.file_start) as usize;
        let mut off = 0usize;
        while off < len {
            let n = (len - off).min(opts.chunk_size.max(1 << 20));
            copies.push((m.ptr as usize + e.file_start as usize + off, e.arena_offset + off, n));
            off += n;
        }
    }
    let base = arena.as_ptr() as usize;
    let copy = |&(src, dst, n): &(usize, usize, usize)| -> Result<()> {
        check_cancel(cancel)?;
        // SAFETY: src..src+n is inside a live mapping (size checked above); dst..dst+n is inside the arena at a
        // range no other copy touches (extents are disjoint in the arena).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, (base + dst) as *mut u8, n) };
        Ok(())
    };
    let threads = opts.threads.min(copies.len()).max(1);
    if threads == 1 {
        return copies.iter().try_for_each(copy);
    }
    let per = copies.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = copies.chunks(per).map(|part| s.spawn(move || part.iter().try_for_each(copy))).collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or(Err(Error::Internal("mmap copy thread panicked".into()))))
    })
}
