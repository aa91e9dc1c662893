//! Injectable reader faults, for tests: EIO, short reads, EINTR, and a read that never completes.
//!
//! A store owns one injector; the io_uring and pread readers ask it before every I/O. With nothing armed, the
//! check is one relaxed atomic load. Faults fire in order of arming, each after `after` further I/Os, `count`
//! times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The I/O fails with EIO.
    Eio,
    /// The I/O returns half of what was asked (the reader must ask again for the rest).
    ShortRead,
    /// The I/O is interrupted (EINTR) and must be retried.
    Eintr,
    /// The I/O never completes (the reader's I/O timeout must end the read).
    Hang,
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eio" => Ok(FaultKind::Eio),
            "short" => Ok(FaultKind::ShortRead),
            "eintr" => Ok(FaultKind::Eintr),
            "hang" => Ok(FaultKind::Hang),
            other => Err(format!("unknown fault {other:?}: expected \"eio\", \"short\", \"eintr\" or \"hang\"")),
        }
    }
}

#[derive(Debug)]
struct Armed {
    kind: FaultKind,
    after: u64,
    count: u64,
}

#[derive(Debug, Default)]
pub struct FaultInjector {
    armed: AtomicBool,
    faults: Mutex<Vec<Armed>>,
}

impl FaultInjector {
    /// Arm `kind` to fire on `count` I/Os, starting after `after` further I/Os.
    pub fn arm(&self, kind: FaultKind, after: u64, count: u64) {
        let mut f = self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.push(Armed { kind, after, count });
        self.armed.store(true, Ordering::Release);
    }

    /// Disarm everything.
    pub fn clear(&self) {
        self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.armed.store(false, Ordering::Release);
    }

    /// Called once per I/O: the fault to apply to it, if any.
    pub fn next(&self) -> Option<FaultKind> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut faults = self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut fired = None;
        if let Some(f) = faults.first_mut() {
            if f.after > 0 {
                f.after -= 1;
            } else {
                fired = Some(f.kind);
                f.count -= 1;
                if f.count == 0 {
                    faults.remove(0);
                }
            }
        }
        if faults.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
        fired
    }
}

/// What every reader needs besides the plan and the arena.
pub struct ReadCtx<'a> {
    pub opts: &'a super::ReadOptions,
    pub cancel: &'a AtomicBool,
    pub faults: &'a FaultInjector,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_in_order_after_their_delay() {
        let f = FaultInjector::default();
        assert_eq!(f.next(), None);
        f.arm(FaultKind::Eintr, 1, 2);
        f.arm(FaultKind::Eio, 0, 1);
        let seen: Vec<_> = (0..5).map(|_| f.next()).collect();
        assert_eq!(seen, [None, Some(FaultKind::Eintr), Some(FaultKind::Eintr), Some(FaultKind::Eio), None]);
        f.arm(FaultKind::Hang, 0, 1);
        f.clear();
        assert_eq!(f.next(), None);
    }
}
