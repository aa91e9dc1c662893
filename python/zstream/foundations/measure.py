"""Measurements of the machine that bound streaming: the host-to-device link, the disk, host memory.

Every bandwidth is measured several times and reported as a ``Rate``: the median, and the spread (lowest and
highest) of the samples, so a reader can tell a steady limit from a noisy one. Shared machines are noisy; one
sample is not a measurement.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .store import WeightStore


@dataclass(frozen=True)
class Rate:
    """A bandwidth in GB/s: the median of ``samples`` measurements, and their lowest and highest."""

    gbps: float
    low: float
    high: float
    samples: int

    @classmethod
    def of(cls, nbytes: Sequence[float], seconds: Sequence[float]) -> Rate:
        rates = [b / s / 1e9 for b, s in zip(nbytes, seconds)]
        return cls(statistics.median(rates), min(rates), max(rates), len(rates))

    @property
    def spread(self) -> float:
        """(highest - lowest) / median: 0.02 is a steady limit, 0.5 a noisy one."""
        return (self.high - self.low) / self.gbps if self.gbps else 0.0

    def __str__(self) -> str:
        return f"{self.gbps:.2f} GB/s (median of {self.samples}: {self.low:.2f}-{self.high:.2f})"


def measure_h2d(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> Rate:  # GPU only
    """Pinned host-to-device copies of ``nbytes``, timed with CUDA events, ``repeats`` times after a warm-up."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Rate.of([nbytes] * repeats, times)


def measure_memcpy(nbytes: int = 64 << 20, repeats: int = 5) -> Rate:
    """Host memory to host memory copies of ``nbytes`` (both buffers touched first): what moving a block into a
    CPU "device" slot costs, and the warm page cache's ceiling for a load."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty_like(src).fill_(0)
    return Rate.of([nbytes] * repeats, [_timed(lambda: dst.copy_(src)) for _ in range(repeats)])


def measure_copy(device: torch.device) -> Rate:
    """What a streamed block's copy into its device slot runs at: the pinned host-to-device link on a GPU, a host
    memory copy when the device is the CPU."""
    return measure_h2d(device) if device.type == "cuda" else measure_memcpy()


def measure_link(offload: str, device: torch.device, store: WeightStore, blocks: List[List[str]]) -> Tuple[str, Rate]:
    """(what bounds streaming, its rate), measured now: the copy into a device slot (pinned host-to-device on a GPU,
    a memory copy on the CPU) for offload "cpu"; for "nvme" the slower of that and O_DIRECT reads of ``blocks`` (a
    few blocks' tensor names) through the store's pool, as the engine reads them."""
    copy = measure_copy(device)
    link = ("pinned host-to-device" if device.type == "cuda" else "host memory copy"), copy
    if offload == "nvme":
        disk = measure_disk(store, blocks[:3])
        if disk.gbps < copy.gbps:
            link = "disk read (O_DIRECT)", disk
    return link


def measure_disk(store: WeightStore, blocks: List[List[str]], inflight: int = 2, rounds: int = 3) -> Rate:
    """O_DIRECT sequential reads of ``blocks`` (lists of tensor names) into the store's reused, already pinned pool
    slots, ``inflight`` blocks at a time as the engine reads them, with no GPU work: the disk limit of the nvme
    path. ``rounds`` passes over the blocks, each one sample; the first ``inflight`` blocks are read once beforehand
    so that the slots exist."""
    for t in [store.fetch(n) for n in blocks[:inflight]]:
        t.wait()
        t.release()
    nbytes: List[float] = []
    seconds: List[float] = []
    for _ in range(max(1, rounds)):
        moved, t0 = 0, time.perf_counter()
        pending = [store.fetch(n) for n in blocks[:inflight]]
        for k in range(len(blocks)):
            t = pending.pop(0)
            t.wait()
            moved += t.read_bytes
            t.release()
            if k + inflight < len(blocks):
                pending.append(store.fetch(blocks[k + inflight]))
        nbytes.append(moved)
        seconds.append(time.perf_counter() - t0)
    return Rate.of(nbytes, seconds)


def cuda_median_ms(fn: Callable[[], object], repeats: int = 3,  # GPU only
                   before: Optional[Callable[[], object]] = None) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, timed with events around each call (``before`` runs
    ahead of each, untimed: e.g. flushing the L2 cache)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be pinned without swapping), or 0 if unknown."""
    return meminfo_bytes("MemAvailable")


def meminfo_bytes(*fields: str, path: str = "/proc/meminfo") -> int:
    """The sum of ``fields`` of /proc/meminfo in bytes, 0 where unknown."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    total += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total


def flush_writeback() -> Tuple[int, float]:
    """Write every dirty page out before a measurement, and say how many bytes were pending and how long it took.

    A checkpoint just written (14 GB of bloom-7b1) can leave the kernel flushing it while a benchmark runs, taking
    CPU time and host-memory bandwidth from it; attention on all of the CPUs waits for the slowest of them. (Run 16
    of 2026-12-04, its CPUs' blocks 2x slow in the minutes after such a write, made this the suspect; run 17 found
    nothing pending, so that run had another cause. The record says which.)"""
    pending = meminfo_bytes("Dirty", "Writeback")
    t0 = time.perf_counter()
    os.sync()
    return pending, time.perf_counter() - t0


# /proc/vmstat counters that say the kernel stalled or worked beside a measurement: memory compaction (a fault or an
# allocation waiting for contiguous pages: transparent huge pages, pinning), huge-page faults, major faults; and pages
# moved under the CPUs as they read them: automatic NUMA balancing's hinting faults and migrations, khugepaged's
# collapses (the CPUs' attention ran up to a quarter faster a few steps into a row than its calibration seconds
# before: run 8 of 2026-12-06)
VMSTAT_FIELDS = ("compact_stall", "compact_fail", "thp_fault_alloc", "thp_fault_fallback", "pgmajfault",
                 "numa_hint_faults", "numa_pages_migrated", "thp_collapse_alloc")


def host_counters(stat: str = "/proc/stat", vmstat: str = "/proc/vmstat") -> Dict[str, float]:
    """What the whole host and this process did so far, to difference around a measurement (``counters_since``):
    the CPUs' busy and stolen seconds (/proc/stat: a virtual machine's vCPUs wait while the host runs others), this
    process's CPU seconds and involuntary context switches, and ``VMSTAT_FIELDS``. Missing files give no keys."""
    out: Dict[str, float] = {}
    try:
        with open(stat) as f:
            ticks = [int(x) for x in f.readline().split()[1:]]  # user nice system idle iowait irq softirq steal ...
        hz = os.sysconf("SC_CLK_TCK")
        out["cpus_busy_s"] = (sum(ticks[:3]) + sum(ticks[5:7])) / hz
        out["steal_s"] = (ticks[7] if len(ticks) > 7 else 0) / hz
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(vmstat) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name in VMSTAT_FIELDS:
                    out[name] = float(value)
    except (OSError, ValueError):
        pass
    t = os.times()
    out["process_cpu_s"] = t.user + t.system
    out["unix_s"] = time.time()  # when: to line a window up with what else was logged (the GPU's clocks)
    try:
        import resource
        out["involuntary_switches"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw)
    except (ImportError, OSError):
        pass
    return out


def counters_since(before: Dict[str, float], after: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """``host_counters`` now (or ``after``) less ``before``, key by key; with ``others_cpu_s``: the CPU seconds the
    rest of the host spent meanwhile (the CPUs' busy time less this process's), and the window's ends in Unix
    seconds (``from_unix_s``, ``to_unix_s``)."""
    now = host_counters() if after is None else after
    delta = {k: now[k] - before[k] for k in now if k in before}
    if "unix_s" in before and "unix_s" in now:
        delta.update(from_unix_s=before["unix_s"], to_unix_s=now["unix_s"])
    if "cpus_busy_s" in delta and "process_cpu_s" in delta:
        delta["others_cpu_s"] = max(0.0, delta["cpus_busy_s"] - delta["process_cpu_s"])
    return delta


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
