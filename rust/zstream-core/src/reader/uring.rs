//! The io_uring reader: `O_DIRECT` reads, `queue_depth` of them in flight, into an arena.
//!
//! Arenas that are read into again and again (the store's slot pool) are registered with the ring as fixed
//! buffers once, so the kernel skips pinning their pages on every read. One-shot arenas use plain reads.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{opcode, types, IoUring};

use super::pread::short;
use super::{check_cancel, probe_once, FaultKind, ReadCtx};
use crate::arena::Arena;
use crate::checkpoint::{Checkpoint, Shard};
use crate::error::{Error, Result};
use crate::plan::{Chunk, ReadPlan};

/// The kernel caps one registered buffer at 1 GiB: larger arenas take several table entries.
const FIXED_ENTRY_BYTES: usize = 1 << 30;
/// Table entries per ring: enough for a ring of pool slots of a few GiB each.
const FIXED_TABLE_LEN: usize = 64;

static PROBE: OnceLock<Result<(), String>> = OnceLock::new();

/// user_data of cancel requests (slots are small integers).
const CANCEL_TAG: u64 = u64::MAX;

/// Whether io_uring works in this process (probed once: setup, one NOP submitted and reaped).
pub fn available() -> Result<(), String> {
    probe_once(&PROBE, || {
        let mut ring = IoUring::new(2).map_err(|e| describe_setup_error(&e))?;
        let nop = opcode::Nop::new().build().user_data(7);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }.map_err(|_| "submission queue full".to_string())?;
        ring.submit_and_wait(1).map_err(|e| format!("io_uring_enter failed: {e}"))?;
        let reaped = ring.completion().next().map(|c| (c.user_data(), c.result()));
        match reaped {
            Some((7, res)) if res >= 0 => Ok(()),
            Some((_, res)) => Err(format!("NOP completed with {res}")),
            None => Err("NOP did not complete".to_string()),
        }
    })
}

fn describe_setup_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not implemented (old kernel, gVisor or seccomp)".into(),
        Some(libc::EPERM) => "io_uring_setup is not permitted (kernel.io_uring_disabled or seccomp)".into(),
        _ => format!("io_uring_setup failed: {e}"),
    }
}

#[derive(Clone, Copy)]
struct FixedEntry {
    arena_id: u64,
    last_use: u64,
}

/// One ring, owned by one thread, with its table of registered buffers.
pub struct Ring {
    uring: IoUring,
    depth: u32,
    /// `None` where the kernel refused a sparse buffer table (older than 5.13): plain reads only.
    fixed: Option<Vec<Option<FixedEntry>>>,
    clock: u64,
}

/// One read in flight.
#[derive(Clone, Copy)]
struct Op {
    chunk: usize,
    /// Bytes of the chunk already in.
    done: usize,
    /// Using the buffered descriptor (after a short read left an unaligned remainder, or O_DIRECT was refused).
    buffered: bool,
}

impl Ring {
    pub fn new(depth: u32) -> Result<Ring> {
        available().map_err(|reason| Error::ReaderUnavailable { reader: "uring", reason })?;
        let ring = IoUring::new(depth.next_power_of_two())
            .map_err(|e| Error::ReaderUnavailable { reader: "uring", reason: describe_setup_error(&e) })?;
        let fixed =
            ring.submitter().register_buffers_sparse(FIXED_TABLE_LEN as u32).ok().map(|()| vec![None; FIXED_TABLE_LEN]);
        Ok(Ring { uring: ring, depth, fixed, clock: 0 })
    }

    /// Make sure `arena` is in the fixed-buffer table; returns its first table index, or `None` when it cannot be
    /// registered (no table, or the kernel refused: memlock limit). Least recently used arenas are evicted.
    fn ensure_fixed(&mut self, arena: &Arena) -> Option<u32> {
        self.clock += 1;
        let clock = self.clock;
        let table = self.fixed.as_mut()?;
        let need = arena.len().div_ceil(FIXED_ENTRY_BYTES);
        if need > table.len() {
            return None;
        }
        if let Some(i) = table.iter().position(|e| e.is_some_and(|e| e.arena_id == arena.id())) {
            for e in table[i..i + need].iter_mut().flatten() {
                e.last_use = clock;
            }
            return Some(i as u32);
        }
        loop {
            if let Some(start) = (0..=table.len() - need).find(|&s| table[s..s + need].iter().all(Option::is_none)) {
                let iovecs: Vec<libc::iovec> = (0..need)
                    .map(|k| {
                        let off = k * FIXED_ENTRY_BYTES;
                        libc::iovec {
                            // SAFETY: off < arena.len(), so the pointer stays inside the arena.
                            iov_base: unsafe { arena.as_ptr().add(off) }.cast(),
                            iov_len: (arena.len() - off).min(FIXED_ENTRY_BYTES),
                        }
                    })
                    .collect();
                // SAFETY: the iovecs cover live arena memory. The kernel holds its own page references for
                // registered buffers, and ReadFixed is only issued for an entry whose arena id matches a live
                // arena, so a stale entry of a dropped arena is never written through.
                let ok = unsafe { self.uring.submitter().register_buffers_update(start as u32, &iovecs, None) }.is_ok();
                if !ok {
                    return None;
                }
                for e in &mut table[start..start + need] {
                    *e = Some(FixedEntry { arena_id: arena.id(), last_use: clock });
                }
                return Some(start as u32);
            }
            // Evict the least recently used arena.
            let victim = table.iter().flatten().min_by_key(|e| e.last_use).map(|e| e.arena_id)?;
            let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
            for (i, e) in table.iter_mut().enumerate() {
                if e.is_some_and(|e| e.arena_id == victim) {
                    // SAFETY: an empty iovec clears the entry.
                    unsafe { self.uring.submitter().register_buffers_update(i as u32, &[empty], None) }.ok()?;
                    *e = None;
                }
            }
        }
    }

    pub fn read(
        &mut self,
        ckpt: &Checkpoint,
        plan: &ReadPlan,
        arena: &Arena,
        reuse: bool,
        ctx: &ReadCtx<'_>,
    ) -> Result<()> {
        let chunks = plan.chunks(ctx.opts.chunk_size);
        let fixed_base = if reuse { self.ensure_fixed(arena) } else { None };
        let depth = (self.depth as usize).min(chunks.len().max(1));
        let base = arena.as_ptr() as usize;

        let mut slots: Vec<Option<Op>> = vec![None; depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut retry: Vec<Op> = Vec::new();
        // Completions made up by injected faults (EIO, EINTR), handled like the kernel's.
        let mut synthetic: Vec<(u64, i32)> = Vec::new();
        // Slots of injected hangs: never submitted, ended by the I/O timeout.
        let mut hung: Vec<usize> = Vec::new();
        let mut next = 0usize;
        let mut in_kernel = 0usize;
        let mut failure: Option<Error> = None;
        let mut last_progress = Instant::now();
        let mut cancelled_in_kernel = false;

        loop {
            // Fill the queue, unless a failure or a cancel means we only drain what the kernel still holds.
            if failure.is_none() {
                if let Err(e) = check_cancel(ctx.cancel) {
                    failure = Some(e);
                }
            }
            while failure.is_none() && !free.is_empty() && (!retry.is_empty() || next < chunks.len()) {
                let op = retry.pop().unwrap_or_else(|| {
                    next += 1;
                    Op { chunk: next - 1, done: 0, buffered: false }
                });
                let slot = free.pop().expect("checked non-empty");
                slots[slot] = Some(op);
                let c = &chunks[op.chunk];
                let mut limit = c.len - op.done;
                match ctx.faults.next() {
                    Some(FaultKind::Eio) => synthetic.push((slot as u64, -libc::EIO)),
                    Some(FaultKind::Eintr) => synthetic.push((slot as u64, -libc::EINTR)),
                    Some(FaultKind::Hang) => hung.push(slot),
                    fault => {
                        if fault == Some(FaultKind::ShortRead) {
                            limit = short(limit, plan.align);
                        }
                        let sqe = build_sqe(&ckpt.shards[c.file], c, op, limit, base, fixed_base, plan.align)
                            .user_data(slot as u64);
                        // SAFETY: the SQE points into the arena at this chunk's own range, which stays valid: this
                        // function does not return while any read is in the kernel (failures drain first).
                        unsafe { self.uring.submission().push(&sqe) }.expect("queue has room: in flight <= entries");
                        in_kernel += 1;
                    }
                }
            }
            if in_kernel == 0 && synthetic.is_empty() && (hung.is_empty() || failure.is_some()) {
                break;
            }
            // Wait in short slices, so that a cancel or a stalled device is noticed.
            if synthetic.is_empty() {
                let ts = Timespec::from(Duration::from_millis(20));
                let args = SubmitArgs::new().timespec(&ts);
                match self.uring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                    }
                    Err(e) => return Err(Error::Internal(format!("io_uring_enter failed: {e}"))),
                }
            } else if in_kernel > 0 {
                self.uring.submit().map_err(|e| Error::Internal(format!("io_uring_enter failed: {e}")))?;
            }
            let mut completions: Vec<(u64, i32)> =
                self.uring.completion().map(|c| (c.user_data(), c.result())).collect();
            completions.retain(|&(ud, _)| ud != CANCEL_TAG);
            in_kernel -= completions.len();
            completions.append(&mut synthetic);
            if !completions.is_empty() {
                last_progress = Instant::now();
            }
            for (slot, res) in completions {
                let slot = slot as usize;
                let mut op = slots[slot].take().expect("completion for a slot in use");
                free.push(slot);
                let c = &chunks[op.chunk];
                let shard = &ckpt.shards[c.file];
                if res < 0 {
                    let errno = -res;
                    match errno {
                        libc::EINTR | libc::EAGAIN => retry.push(op),
                        libc::EINVAL if !op.buffered => {
                            op.buffered = true;
                            retry.push(op);
                        }
                        libc::ECANCELED if failure.is_some() => {}
                        _ => {
                            failure.get_or_insert(Error::Read {
                                path: shard.path.clone(),
                                offset: c.file_offset + op.done as u64,
                                len: (c.len - op.done) as u64,
                                source: io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                    continue;
                }
                let n = res as usize;
                if n == 0 && op.done < c.needed {
                    failure.get_or_insert(Error::Truncated {
                        path: shard.path.clone(),
                        file_end: c.file_offset + op.done as u64,
                        needed_end: c.file_offset + c.needed as u64,
                    });
                    continue;
                }
                op.done += n;
                if op.done < c.needed {
                    // A short read: ask for the rest (an unaligned rest goes through the buffered descriptor).
                    retry.push(op);
                }
            }
            // No progress for the I/O timeout: end the read, and ask the kernel to give up what it still holds.
            let stalled = ctx.opts.io_timeout.is_some_and(|t| last_progress.elapsed() >= t);
            if stalled && failure.is_none() {
                let slot = hung.first().copied().or_else(|| slots.iter().position(Option::is_some)).unwrap_or(0);
                let (path, offset) = slots[slot].map_or_else(
                    || (ckpt.shards[0].path.clone(), 0),
                    |op| {
                        (ckpt.shards[chunks[op.chunk].file].path.clone(), chunks[op.chunk].file_offset + op.done as u64)
                    },
                );
                let secs = ctx.opts.io_timeout.unwrap_or_default().as_secs_f64();
                failure = Some(Error::IoTimeout { path, offset, secs });
            }
            if failure.is_some() {
                for slot in hung.drain(..) {
                    slots[slot] = None;
                    free.push(slot);
                }
                if in_kernel > 0 && !cancelled_in_kernel {
                    for (slot, op) in slots.iter().enumerate() {
                        if op.is_some() {
                            let cancel = opcode::AsyncCancel::new(slot as u64).build().user_data(CANCEL_TAG);
                            // SAFETY: a cancel request references no memory.
                            if unsafe { self.uring.submission().push(&cancel) }.is_err() {
                                break;
                            }
                        }
                    }
                    cancelled_in_kernel = true;
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn build_sqe(
    shard: &Shard,
    c: &Chunk,
    op: Op,
    len: usize,
    base: usize,
    fixed_base: Option<u32>,
    align: u64,
) -> io_uring::squeue::Entry {
    let offset = c.file_offset + op.done as u64;
    let dst = base + c.arena_offset + op.done;
    let aligned = offset % align == 0 && len as u64 % align == 0 && dst as u64 % align == 0;
    let fd = match (&shard.direct, aligned && !op.buffered) {
        (Some(f), true) => f.as_raw_fd(),
        _ => shard.file.as_raw_fd(),
    };
    let start = c.arena_offset + op.done;
    let entry = start / FIXED_ENTRY_BYTES;
    let same_entry = (start + len - 1) / FIXED_ENTRY_BYTES == entry;
    match fixed_base {
        Some(first) if same_entry => {
            opcode::ReadFixed::new(types::Fd(fd), dst as *mut u8, len as u32, (first as usize + entry) as u16)
                .offset(offset)
                .build()
        }
        _ => opcode::Read::new(types::Fd(fd), dst as *mut u8, len as u32).offset(offset).build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_setup_says_why_in_words() {
        let why = |errno| describe_setup_error(&io::Error::from_raw_os_error(errno));
        assert_eq!(why(libc::ENOSYS), "io_uring_setup is not implemented (old kernel, gVisor or seccomp)");
        assert_eq!(why(libc::EPERM), "io_uring_setup is not permitted (kernel.io_uring_disabled or seccomp)");
        let other = why(libc::ENOMEM);
        assert!(other.starts_with("io_uring_setup failed: ") && other.contains("memory"), "{other}");
    }

    #[test]
    fn fixed_buffers_are_registered_once_and_the_least_recently_used_go_first() {
        let mut ring = Ring::new(4).unwrap();
        assert!(ring.fixed.is_some(), "this kernel gives a sparse buffer table (5.13 and later)");
        let arenas: Vec<Arena> = (0..=FIXED_TABLE_LEN).map(|_| Arena::new(4096).unwrap()).collect();
        for (i, a) in arenas[..FIXED_TABLE_LEN].iter().enumerate() {
            assert_eq!(ring.ensure_fixed(a), Some(i as u32), "arena {i} takes the next free entry");
        }
        // Known arenas keep their entry, and using one makes it recent.
        assert_eq!(ring.ensure_fixed(&arenas[5]), Some(5));
        assert_eq!(ring.ensure_fixed(&arenas[0]), Some(0));
        // The table is full: a new arena takes the entry of the least recently used (arena 1, not 0 or 5).
        assert_eq!(ring.ensure_fixed(&arenas[FIXED_TABLE_LEN]), Some(1));
        // Arena 1 comes back: the least recently used now is arena 2.
        assert_eq!(ring.ensure_fixed(&arenas[1]), Some(2));
        assert_eq!(ring.ensure_fixed(&arenas[FIXED_TABLE_LEN]), Some(1));
    }
}
