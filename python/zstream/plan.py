"""Residency planning: what stays on the compute device, what streams, and what a step should cost.

The plan is made once at load. Under a memory budget it keeps the non-block weights (embeddings, final norm,
head) resident first, then a ring of ``prefetch + 1`` slots for streamed blocks, then as many whole blocks as
still fit; everything else streams every forward pass. ``predicted_step_s`` is the streamed bytes over the
link bandwidth measured in this process (``measure_h2d_gbps`` / the disk read timed at load).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

from .errors import OutOfMemoryError

OFFLOADS = ("auto", "none", "cpu", "nvme", "ats")

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, float, str, None]) -> Optional[int]:
    """``20 * 2**30``, ``"20GiB"``, ``"16 GB"`` -> bytes; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a byte count cannot be negative: {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size: use bytes or e.g. '20GiB', '16GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Plan:
    """Where every weight lives, and what a forward pass moves."""

    offload: str                   # "none", "cpu", "nvme" or "ats" (never "auto": resolved at load)
    device: str                    # "cuda:0", "cpu"
    dtype: torch.dtype             # compute dtype
    block_bytes: list[int]         # bytes streamed for each block (checkpoint dtype, as it crosses the link)
    outer_bytes: int               # embeddings, final norm, head
    resident_blocks: list[int]
    streamed_blocks: list[int]
    ring_slots: int                # device slots for streamed blocks (prefetch + 1), 0 if nothing streams
    kv_reserve_bytes: int          # KV cache + activations reserved at load (batch/sequence given to load)
    budget_bytes: Optional[int]    # memory budget on the compute device; None = unlimited (CPU)
    link: str = ""                 # what limits streaming: "pinned host-to-device", "disk (O_DIRECT)", ...
    link_gbps: Optional[float] = None  # measured in this process
    notes: list[str] = field(default_factory=list)
    quantization: Optional[str] = None  # e.g. "int4, group 64, asymmetric"; None: weights as in the checkpoint
    unquantized_block_bytes: Optional[list[int]] = None  # block_bytes before quantization (checkpoint dtype)

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross the link every forward pass."""
        return sum(self.block_bytes[i] for i in self.streamed_blocks)

    @property
    def resident_bytes(self) -> int:
        return self.outer_bytes + sum(self.block_bytes[i] for i in self.resident_blocks)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * max((self.block_bytes[i] for i in self.streamed_blocks), default=0)

    @property
    def predicted_step_s(self) -> Optional[float]:
        """Transfer-bound time of one forward pass: streamed bytes over the measured link bandwidth."""
        if not self.streamed_blocks:
            return 0.0
        if not self.link_gbps:
            return None
        return self.streamed_bytes / (self.link_gbps * 1e9)

    def summary(self) -> str:
        pred = self.predicted_step_s
        lines = [
            f"offload={self.offload} device={self.device} dtype={str(self.dtype).replace('torch.', '')}",
            f"resident: outer weights + {len(self.resident_blocks)}/{self.num_blocks} blocks "
            f"= {fmt_bytes(self.resident_bytes)}",
            f"streamed: {len(self.streamed_blocks)} blocks = {fmt_bytes(self.streamed_bytes)} per forward pass"
            + (f", through a ring of {self.ring_slots} slots ({fmt_bytes(self.ring_bytes)})"
               if self.ring_slots else ""),
            f"reserved for KV cache and activations: {fmt_bytes(self.kv_reserve_bytes)}"
            + (f" of a {fmt_bytes(self.budget_bytes)} budget" if self.budget_bytes is not None else ""),
        ]
        if self.quantization is not None and self.unquantized_block_bytes is not None:
            before = sum(self.unquantized_block_bytes[i] for i in self.streamed_blocks)
            lines.append(f"quantized {self.quantization}: blocks {fmt_bytes(sum(self.block_bytes))} "
                         f"(from {fmt_bytes(sum(self.unquantized_block_bytes))}); streamed per pass "
                         f"{fmt_bytes(self.streamed_bytes)} instead of {fmt_bytes(before)}"
                         + (f" ({self.streamed_bytes / before:.3f}x)" if before else ""))
        if self.streamed_blocks:
            link = f"{self.link_gbps:.1f} GB/s" if self.link_gbps else "not measured"
            lines.append(f"link: {self.link} {link}; predicted step (transfer bound): "
                         + (f"{pred * 1e3:.1f} ms" if pred is not None else "unknown"))
        lines += self.notes
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def choose_residency(block_bytes: list[int], outer_bytes: int, budget: Optional[int], ring_slots: int,
                     reserve: int, *, where: str) -> tuple[list[int], list[int]]:
    """(resident blocks, streamed blocks) under ``budget``. Raises OutOfMemoryError naming what would fit."""
    n = len(block_bytes)
    if budget is None or outer_bytes + sum(block_bytes) + reserve <= budget:
        return list(range(n)), []
    ring = ring_slots * max(block_bytes, default=0)
    avail = budget - outer_bytes - reserve - ring
    if avail < 0:
        need = outer_bytes + reserve + ring
        raise OutOfMemoryError(
            f"{where}: the budget of {fmt_bytes(budget)} cannot hold even the non-block weights "
            f"({fmt_bytes(outer_bytes)}), the KV cache and activations ({fmt_bytes(reserve)}) and a ring of "
            f"{ring_slots} block slots ({fmt_bytes(ring)}): give gpu_memory of at least {fmt_bytes(need)}, "
            f"a smaller batch or sequence, or prefetch=1")
    resident: list[int] = []
    for i in range(n):
        if block_bytes[i] <= avail:
            resident.append(i)
            avail -= block_bytes[i]
        else:
            break
    return resident, [i for i in range(n) if i not in set(resident)]


def measure_h2d_gbps(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Pinned host-to-device copy bandwidth, measured now (median of ``repeats`` copies)."""
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
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


def measure_disk_gbps(store, blocks: List[List[str]], inflight: int = 2) -> float:
    """O_DIRECT sequential read of ``blocks`` (lists of tensor names) into the store's reused, already pinned pool
    slots, ``inflight`` blocks at a time as the engine reads them, with no GPU work: the disk limit of the nvme
    path. The first ``inflight`` blocks are read once beforehand so that the slots exist."""
    for t in [store.fetch(n) for n in blocks[:inflight]]:
        t.wait()
        t.release()
    nbytes, t0 = 0, time.perf_counter()
    pending = [store.fetch(n) for n in blocks[:inflight]]
    for k in range(len(blocks)):
        t = pending.pop(0)
        t.wait()
        nbytes += t.read_bytes
        t.release()
        if k + inflight < len(blocks):
            pending.append(store.fetch(blocks[k + inflight]))
    return nbytes / (time.perf_counter() - t0) / 1e9


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be pinned without swapping), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
