"""Residency planning: what stays on the compute device, what streams, and what a step should cost.

The plan is made once at load. Under a memory budget it keeps the non-block weights (embeddings, final norm,
head) resident first, then a ring of ``prefetch + 1`` slots for streamed blocks, then as many whole blocks as
still fit; everything else streams every forward pass. ``predicted_step_s`` is the streamed bytes over the
link bandwidth measured in this process (``measure_h2d_gbps`` / the disk read timed at load).

``plan_batch`` (at the end) predicts, for a budget, the batch and residency that maximise tokens/s from the
loader's memory arithmetic, the measured link and a compute model timed on the device (``calibrate_compute``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import OutOfMemoryError
from .quant import QuantizationError

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


# ---- the predictive batch planner ------------------------------------------------------------------------------
#
# Under a device budget the KV cache competes with resident blocks: a larger batch spreads every streamed byte over
# more tokens, but leaves room for fewer resident blocks, so more bytes stream every step. Which (batch, residency)
# gives the most tokens/s depends on the link and on how the device's compute grows with the batch. Both are
# measured (the link by the loader's own probes, the compute by timing one block of the real shapes on the device);
# the memory of a candidate is the loader's own arithmetic (``choose_residency`` over ``loading._reserve_bytes``); the
# step is the ring's schedule played out (``ThroughputModel.pass_s``).


@dataclass(frozen=True)
class Linear3:
    """``seconds = c0 + c1 * x + c2 * x * y`` with every coefficient >= 0 (a cost never falls as x or y grows).

    Decode: x = batch (one new token a row), y = context (keys attended to): c0 is reading the weights and launching
    the kernels, c1 the per-token matmul work, c2 attention over the KV cache. Prefill: x = batch * prompt new
    tokens, y = prompt: c2 is then attention's quadratic term."""

    c0: float
    c1: float
    c2: float

    def __call__(self, x: float, y: float) -> float:
        return self.c0 + self.c1 * x + self.c2 * x * y

    @classmethod
    def fit(cls, samples: Sequence[Tuple[float, float, float]]) -> Linear3:
        """Least squares over (x, y, seconds) in *relative* error, so that the fast small-batch timings weigh as much
        as the slow large ones. Non-negative by exhaustion: every subset of the three terms is fitted and the best
        fit whose coefficients are all >= 0 wins (three unknowns: eight tiny solves)."""
        if not samples or any(t <= 0 for _, _, t in samples):
            raise ValueError(f"need positive timings to fit, got {list(samples)}")
        rows = torch.tensor([[1.0, x, x * y] for x, y, _ in samples], dtype=torch.float64)
        t = torch.tensor([s[2] for s in samples], dtype=torch.float64)
        a, ones = rows / t[:, None], torch.ones(len(samples), 1, dtype=torch.float64)  # relative: (n, 3), (n, 1)
        best: Optional[Tuple[float, List[float]]] = None
        for mask in range(1, 8):
            cols = [j for j in range(3) if mask >> j & 1]
            sol = torch.linalg.lstsq(a[:, cols], ones).solution[:, 0]  # (len(cols),)
            if bool((sol < 0).any()):
                continue
            coef = [0.0, 0.0, 0.0]
            for j, v in zip(cols, sol.tolist()):
                coef[j] = v
            err = float(((a @ torch.tensor(coef, dtype=torch.float64)) - 1).pow(2).sum())
            if best is None or err < best[0] - 1e-12:
                best = (err, coef)
        if best is None:  # unreachable for positive timings: c0 alone is always a non-negative fit
            raise ValueError(f"no non-negative fit for {list(samples)}")
        return cls(*best[1])


@dataclass
class ComputeModel:
    """Compute time of a forward pass on one device, fitted to timings of one block (and of the per-pass work:
    mask / ALiBi, embedding, head) of the real shapes on that device. A pass is ``num_blocks`` blocks plus the
    outer work; each block costs the same (every block has the same shapes).

    Timings are of back-to-back calls with one synchronisation at the end, as the engine issues them: a block costs
    whichever is longer, its kernels or launching them from Python."""

    num_blocks: int
    decode_block: Linear3   # x = batch, y = context
    decode_outer: Linear3   # x = batch, y = context
    prefill_block: Linear3  # x = batch * prompt, y = prompt
    prefill_outer: Linear3  # x = batch * prompt, y = prompt
    key: str = ""           # what was calibrated: family shapes, dtype, device
    samples: List[Dict[str, Any]] = field(default_factory=list)  # the timings behind the fits

    def decode_block_s(self, batch: int, context: float) -> float:
        return self.decode_block(batch, context)

    def decode_outer_s(self, batch: int, context: float) -> float:
        return self.decode_outer(batch, context)

    def prefill_block_s(self, batch: int, prompt: int) -> float:
        return self.prefill_block(batch * prompt, prompt)

    def prefill_outer_s(self, batch: int, prompt: int) -> float:
        return self.prefill_outer(batch * prompt, prompt)

    def decode_s(self, batch: int, context: float) -> float:
        """One decode step with every block resident."""
        return self.num_blocks * self.decode_block_s(batch, context) + self.decode_outer_s(batch, context)

    def prefill_s(self, batch: int, prompt: int) -> float:
        """The prefill pass with every block resident."""
        return self.num_blocks * self.prefill_block_s(batch, prompt) + self.prefill_outer_s(batch, prompt)

    def to_dict(self) -> Dict[str, Any]:
        fits = {k: [getattr(self, k).c0, getattr(self, k).c1, getattr(self, k).c2]
                for k in ("decode_block", "decode_outer", "prefill_block", "prefill_outer")}
        return {"num_blocks": self.num_blocks, "key": self.key, **fits, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ComputeModel:
        fits = {k: Linear3(*d[k]) for k in ("decode_block", "decode_outer", "prefill_block", "prefill_outer")}
        return cls(num_blocks=int(d["num_blocks"]), key=str(d.get("key", "")), samples=list(d.get("samples", [])),
                   **fits)


_COMPUTE_CACHE: Dict[str, ComputeModel] = {}  # calibrations of this process, by ComputeModel.key


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], Any], device: torch.device, min_sample_s: float) -> float:
    """Seconds per call of ``fn``: ``inner`` calls back to back (enough for ``min_sample_s``, so that timer resolution
    washes out) with one synchronisation at the end, after a warm-up call (allocator, kernel selection)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = time.perf_counter() - t0
    inner = max(1, min(50, int(min_sample_s / max(one, 1e-7))))
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def _random_weights(family: Any, names: Dict[str, str], dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> Dict[str, Tensor]:
    """{local name: random tensor of the checkpoint's shape}, N(0, 0.02): values only need to be finite (the
    kernels' speed does not depend on them); tensors a tied head shares with the embedding are shared here too."""
    shapes = family.expected_shapes()
    made: Dict[str, Tensor] = {}
    for ckpt in set(names.values()):
        t = torch.randn(shapes[ckpt], generator=gen, dtype=torch.float32).mul_(0.02)
        made[ckpt] = t.to(device=device, dtype=dtype)
    return {local: made[ckpt] for local, ckpt in names.items()}


def compute_key(family: Any, dtype: torch.dtype, device: Union[str, torch.device]) -> str:
    """What a calibration depends on: the block's shapes, the vocabulary, the dtype and the device (its name)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    shapes = family.expected_shapes()
    block = ",".join(f"{local}={list(shapes[c])}" for local, c in sorted(family.block_tensors(0).items()))
    return (f"{type(family).__name__} blocks={family.num_blocks} vocab={family.vocab_size} [{block}] "
            f"{str(dtype).replace('torch.', '')} {name}")


def calibrate_compute(family: Any, device: Union[str, torch.device], dtype: torch.dtype, *, max_batch: int,
                      prompt: int, gen: int, rounds: int = 5, min_sample_s: float = 0.005,
                      max_prefill_tokens: int = 32768, cache: Union[str, os.PathLike, None] = None,
                      seed: int = 0, quant: Any = None) -> ComputeModel:
    """Measure the compute model of ``family`` on ``device``: one block of the real shapes on random weights,
    and the per-pass work (mask, embedding, head), timed at the corners of the range the planner will ask about.

    Decode is timed at batches 1, ~sqrt(max_batch) and max_batch, each at a short and the longest context
    (prompt + gen); prefill at batches 1 and max_batch (capped at ``max_prefill_tokens`` tokens: beyond, the fit is
    linear in tokens) over half the prompt and the whole prompt. A cost grows nonlinearly between few tokens (reading
    the weights dominates) and many (the matmuls dominate), so the fit is only trusted inside that range, which is
    why the range comes from the question being asked. Every point is timed once per round, ``rounds`` rounds, and
    its median kept: on a shared host the speed of launching kernels from Python drifts by up to 2x for seconds at a
    time (seen on the H100 VM), and interleaving spreads such a spell over all points instead of one.
    ``cache``: a JSON file of calibrations by key and range, read first and written after; calibrations are also
    kept for the life of the process. ``quant`` (a ``quant.BlockQuant``): the block is timed as the engine runs a
    quantized one, its packed weights dequantized before the block's matmuls."""
    from .engine import _SDPA_BACKENDS, _local, sdpa_kernel
    from .generation import LayerCache

    dev = torch.device(device)
    max_batch = max(1, int(max_batch))
    longest = min(prompt + gen, family.max_positions)
    prompt = max(1, min(prompt, longest))
    key = (f"{compute_key(family, dtype, dev)} batch<={max_batch} prompt={prompt} gen={gen} "
           f"prefill<={max_prefill_tokens}" + (f" quant={quant.cfg.describe()}" if quant is not None else ""))
    if key in _COMPUTE_CACHE:
        return _COMPUTE_CACHE[key]
    stored: Dict[str, Any] = {}
    if cache is not None and Path(cache).exists():
        stored = json.loads(Path(cache).read_text())
        if key in stored:
            _COMPUTE_CACHE[key] = ComputeModel.from_dict(stored[key])
            return _COMPUTE_CACHE[key]

    g = torch.Generator().manual_seed(seed)
    block_w = _random_weights(family, family.block_tensors(0), dtype, dev, g)
    weights: Callable[[], Dict[str, Tensor]] = lambda: block_w  # noqa: E731
    if quant is not None:  # the block's packed form, dequantized on every call as the engine does
        names = family.block_tensors(0)
        from .store import FlatRead

        buf, layout = quant.pack({names[k]: v for k, v in block_w.items()}, names, work=dev, dest=dev)
        packed_w = _local(FlatRead(buf, layout).view(), quant.names(names), dtype)
        weights = lambda: quant.dequantize(packed_w)  # noqa: E731
    outer_w = _random_weights(family, family.outer_tensors(), dtype, dev, g)
    C, nkv, hs = family.hidden_size, family.num_kv_heads, family.head_dim

    def time_block(B: int, T: int, S: int) -> float:
        """One block over T new tokens a row (B rows), attending to S keys (the cache holds S - T before). The cache
        is as long as a real run's (prompt + gen), so attention reads the same strided views of it."""
        hidden = torch.randn(B, T, C, device=dev, dtype=dtype)                           # (B, T, C)
        L = max(S, longest)
        cache = LayerCache(torch.zeros(B, nkv, L, hs, dtype=dtype, device=dev),          # (B, nkv, L, hs)
                           torch.zeros(B, nkv, L, hs, dtype=dtype, device=dev))
        ctx = family.context(torch.ones(B, S, dtype=torch.long, device=dev), T, dtype)
        return _seconds(lambda: family.block(weights(), hidden, cache, ctx), dev, min_sample_s)

    def time_outer(B: int, T: int, S: int) -> float:
        """What a pass does besides its blocks: the context (mask, ALiBi, RoPE), the embedding, the last position's
        head."""
        ids = torch.randint(0, family.vocab_size, (B, T), device=dev)                    # (B, T)
        mask = torch.ones(B, S, dtype=torch.long, device=dev)                           # (B, S)

        def outer() -> Tensor:
            ctx = family.context(mask, T, dtype)
            h = family.embed(outer_w, ids, ctx)                                        # (B, T, C)
            return family.head(outer_w, h[:, -1:])                                     # (B, 1, vocab)
        return _seconds(outer, dev, min_sample_s)

    # (phase, batch, new tokens a row, keys attended to)
    points = [("decode", B, 1, S) for B in sorted({1, max(1, round(max_batch ** 0.5)), max_batch})
              for S in sorted({max(1, prompt // 2), longest})]
    points += [("prefill", B, P, P) for B in sorted({1, max(1, min(max_batch, max_prefill_tokens // prompt))})
               for P in sorted({max(1, prompt // 2), prompt})]
    times: Dict[Tuple[str, int, int, int], Tuple[List[float], List[float]]] = {p: ([], []) for p in points}
    kernels = sdpa_kernel(_SDPA_BACKENDS) if sdpa_kernel is not None and dev.type == "cuda" else nullcontext()
    with torch.inference_mode(), kernels:
        for _ in range(max(1, rounds)):
            for p in points:
                _, B, T, S = p
                times[p][0].append(time_block(B, T, S))
                times[p][1].append(time_outer(B, T, S))
    samples: List[Dict[str, Any]] = []
    for (phase, B, T, S), (blk, out) in times.items():
        where = {"context": S} if phase == "decode" else {"prompt": T}
        samples.append({"phase": phase, "batch": B, **where, "block_s": statistics.median(blk),
                        "outer_s": statistics.median(out), "block_rounds_s": blk, "outer_rounds_s": out})

    dec = [s for s in samples if s["phase"] == "decode"]
    pre = [s for s in samples if s["phase"] == "prefill"]
    model = ComputeModel(
        num_blocks=family.num_blocks,
        decode_block=Linear3.fit([(s["batch"], s["context"], s["block_s"]) for s in dec]),
        decode_outer=Linear3.fit([(s["batch"], s["context"], s["outer_s"]) for s in dec]),
        prefill_block=Linear3.fit([(s["batch"] * s["prompt"], s["prompt"], s["block_s"]) for s in pre]),
        prefill_outer=Linear3.fit([(s["batch"] * s["prompt"], s["prompt"], s["outer_s"]) for s in pre]),
        key=key, samples=samples)
    _COMPUTE_CACHE[key] = model
    if cache is not None:
        stored[key] = model.to_dict()
        Path(cache).write_text(json.dumps(stored, indent=1))
    return model


@dataclass
class ModelSizes:
    """What the planner needs to know of a checkpoint, in the loader's units (see ``loading.load``)."""

    block_bytes: List[int]            # per block, as it crosses the link (checkpoint dtype)
    device_block_bytes: List[int]     # per block on the device (converted to the compute dtype)
    outer_bytes: int                  # embeddings, final norm, head, on the device
    reserve: Callable[[int, int], int]  # (batch, seq) -> bytes the loader keeps for KV cache and activations
    max_positions: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @classmethod
    def of_family(cls, family: Any, block_bytes: List[int], outer_ckpt_bytes: int, dtype: torch.dtype,
                  ckpt_dtype: torch.dtype) -> ModelSizes:
        """The sizes as ``load`` computes them: converted blocks are larger on the device, the reserve is
        ``loading._reserve_bytes``."""
        from .loading import _reserve_bytes

        scale = max(1.0, dtype.itemsize / ckpt_dtype.itemsize)
        return cls(block_bytes=list(block_bytes), device_block_bytes=[int(b * scale) for b in block_bytes],
                   outer_bytes=int(outer_ckpt_bytes * scale),
                   reserve=lambda batch, seq: _reserve_bytes(family, batch, seq, dtype),
                   max_positions=family.max_positions)

    def memory_bytes(self, batch: int, resident: int, seq: int, ring_slots: int) -> int:
        """Device bytes the loader budgets for ``resident`` blocks kept and the rest streamed: outer weights,
        resident blocks, a ring of ``ring_slots`` of the largest block (only if anything streams), and the reserve."""
        n = self.num_blocks
        ring = ring_slots * max(self.device_block_bytes, default=0) if resident < n else 0
        return self.outer_bytes + sum(self.device_block_bytes[:resident]) + ring + self.reserve(batch, seq)

    def max_resident(self, budget: Optional[int], batch: int, seq: int, ring_slots: int) -> Optional[int]:
        """The most blocks ``load`` keeps resident for this batch (``choose_residency`` itself); None if not even
        the outer weights, the reserve and the ring fit."""
        try:
            resident, _ = choose_residency(self.device_block_bytes, self.outer_bytes, budget, ring_slots,
                                           self.reserve(batch, seq), where="plan")
        except OutOfMemoryError:
            return None
        return len(resident)


@dataclass
class ThroughputModel:
    """Predicted prefill and decode times of a residency, from the measured compute and the measured link.

    A pass runs the outer work and the resident blocks (the first ``resident``, as the loader keeps them), then the
    streamed ones through a ring of ``ring_slots`` device slots: the copy of streamed block j waits for the link and
    for the compute of block j - slots (its slot's previous tenant); block j's compute waits for its copy. In the
    steady state of a decode loop the ring's first slots were filled during the previous pass, and the pass ends
    when its compute is done and the next pass's first slots have landed (a step synchronises the device). When
    copies never wait for a slot this is max(streamed bytes / link, compute); with many resident blocks the link
    idles while they compute, once the ring is full, and the schedule says by how much."""

    compute: ComputeModel
    block_bytes: List[int]          # per block, as it crosses the link
    link_gbps: Optional[float]      # GB/s; None: nothing may stream
    ring_slots: int = 3             # prefetch + 1
    step_overhead_s: float = 0.0    # per pass, on top of the schedule (Python, synchronisation)

    def pass_s(self, resident: int, block_s: float, outer_s: float) -> Tuple[float, float, float]:
        """(seconds, transfer seconds, compute seconds) of one pass."""
        n = len(self.block_bytes)
        compute = n * block_s + outer_s
        if resident >= n:
            return compute + self.step_overhead_s, 0.0, compute
        if not self.link_gbps:
            raise ValueError("blocks stream, but no link bandwidth was given")
        copy = [self.block_bytes[i] / (self.link_gbps * 1e9) for i in range(resident, n)]
        s = len(copy)
        slots = min(self.ring_slots, s)
        t = outer_s + resident * block_s   # the compute stream, after the work that needs no streamed block
        link = 0.0                          # the copy stream: the ring's first slots landed last pass
        done: List[float] = []              # compute end of streamed block j
        for j in range(s):
            landed = 0.0
            if j >= slots:
                link = max(link, done[j - slots]) + copy[j]
                landed = link
            t = max(t, landed) + block_s
            done.append(t)
        for j in range(s, s + slots):       # the next pass's first blocks, into the slots freed last
            link = max(link, done[j - slots]) + copy[j - s]
        return max(t, link) + self.step_overhead_s, sum(copy), compute

    def decode_step(self, batch: int, resident: int, context: float) -> Tuple[float, float, float]:
        return self.pass_s(resident, self.compute.decode_block_s(batch, context),
                           self.compute.decode_outer_s(batch, context))

    def prefill(self, batch: int, resident: int, prompt: int) -> Tuple[float, float, float]:
        return self.pass_s(resident, self.compute.prefill_block_s(batch, prompt),
                           self.compute.prefill_outer_s(batch, prompt))


@dataclass
class Candidate:
    """One (batch, residency) that fits the budget, and what it is predicted to do."""

    batch: int
    resident_blocks: int
    num_blocks: int
    offload: str             # "none" when every block is resident, else the streaming mode ("cpu", "nvme")
    memory_bytes: int        # what the loader budgets: outer + resident weights + ring + KV cache and activations
    prefill_s: float
    decode_step_s: float     # at the mean context of the decode steps
    transfer_s: float        # of a decode step: streamed bytes over the link
    compute_s: float         # of a decode step: every block's compute and the outer work
    tokens_per_s: float      # batch * gen / (prefill + (gen - 1) decode steps), as ``zstream bench`` counts

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks

    @property
    def limit(self) -> str:
        """What bounds the decode step: the link, the compute, or the ring (the link idles while resident blocks
        compute and the slots are full)."""
        if self.transfer_s == 0.0:
            return "compute"
        if self.decode_step_s > 1.02 * max(self.transfer_s, self.compute_s):
            return "ring"
        return "link" if self.transfer_s >= self.compute_s else "compute"

    def to_dict(self) -> Dict[str, Any]:
        return {"batch": self.batch, "resident_blocks": self.resident_blocks, "offload": self.offload,
                "memory_bytes": self.memory_bytes, "prefill_s": self.prefill_s, "decode_step_s": self.decode_step_s,
                "transfer_s": self.transfer_s, "compute_s": self.compute_s, "tokens_per_s": self.tokens_per_s,
                "limit": self.limit}


@dataclass
class BatchPlan:
    """Every (batch, residency) that fits, predicted; ``best`` maximises tokens/s."""

    best: Optional[Candidate]
    table: List[Candidate]          # every candidate, by batch then resident blocks
    budget_bytes: Optional[int]
    prompt: int
    gen: int
    link_gbps: Optional[float]
    prefetch: int
    compute: ComputeModel
    device: str = ""
    dtype: Optional[torch.dtype] = None
    link: str = ""                  # what the link is ("pinned host-to-device", "disk read (O_DIRECT)", given)
    quantize: Dict[str, Any] = field(default_factory=dict)  # load's quantize arguments (empty: none, or packed)

    def candidate(self, batch: int, resident: int) -> Optional[Candidate]:
        for c in self.table:
            if c.batch == batch and c.resident_blocks == resident:
                return c
        return None

    def frontier(self) -> List[Candidate]:
        """For each batch, its best residency (the most resident blocks that fit, unless the schedule says
        otherwise)."""
        best: Dict[int, Candidate] = {}
        for c in self.table:
            if c.batch not in best or c.tokens_per_s > best[c.batch].tokens_per_s:
                best[c.batch] = c
        return [best[b] for b in sorted(best)]

    def best_with(self, offload: str) -> Optional[Candidate]:
        """The best candidate; with ``offload="none"`` the best that keeps every block resident."""
        pool = [c for c in self.table if offload != "none" or c.offload == "none"]
        return max(pool, key=lambda c: c.tokens_per_s, default=None)

    def max_batch(self, offload: Optional[str] = None) -> int:
        """The largest batch that fits; with ``offload="none"`` the largest with every block resident (0: none)."""
        pool = [c.batch for c in self.table if offload != "none" or c.offload == "none"]
        return max(pool, default=0)

    def load_kwargs(self, candidate: Optional[Candidate] = None) -> Dict[str, Any]:
        """Arguments of ``zstream.load`` that give ``candidate`` (default: the best) under the same budget."""
        c = candidate or self.best
        if c is None:
            raise OutOfMemoryError(f"nothing fits the budget of {fmt_bytes(self.budget_bytes or 0)}")
        kw: Dict[str, Any] = {"offload": c.offload, "gpu_memory": self.budget_bytes, "max_batch": c.batch,
                              "max_seq_len": self.prompt + self.gen, "prefetch": self.prefetch}
        if c.offload != "none":
            kw["max_resident_blocks"] = c.resident_blocks
        if self.device:
            kw["device"] = self.device
        if self.dtype is not None:
            kw["dtype"] = self.dtype
        kw.update(self.quantize)
        return kw

    def summary(self, rows: Optional[List[int]] = None) -> str:
        """The best choice, then the frontier at batches 1, 2, 4, ..., the largest, the best (or ``rows``)."""
        front = self.frontier()
        if not front or self.best is None:
            return f"predicted: nothing fits the budget of {fmt_bytes(self.budget_bytes or 0)}"
        b = self.best
        link = f"{self.link_gbps:.1f} GB/s" + (f" ({self.link})" if self.link else "") if self.link_gbps else "none"
        head = [f"predicted best: batch {b.batch}, {b.resident_blocks}/{b.num_blocks} blocks resident "
                f"(offload={b.offload}), {b.tokens_per_s:.1f} tokens/s; budget "
                + (fmt_bytes(self.budget_bytes) if self.budget_bytes is not None else "unlimited")
                + f", prompt {self.prompt}, gen {self.gen}, link {link}",
                f"{'batch':>5} {'resident':>8} {'offload':>7} {'memory':>10} {'prefill ms':>10} {'step ms':>8} "
                f"{'xfer ms':>8} {'comp ms':>8} {'tok/s':>8} limit"]
        wanted = set(rows) if rows is not None else (
            {1 << k for k in range(16)} | {front[-1].batch, b.batch, self.max_batch("none")})
        for c in front:
            if c.batch in wanted:
                head.append(f"{c.batch:5d} {c.resident_blocks:4d}/{c.num_blocks:<3d} {c.offload:>7} "
                            f"{fmt_bytes(c.memory_bytes):>10} {c.prefill_s * 1e3:10.1f} {c.decode_step_s * 1e3:8.1f} "
                            f"{c.transfer_s * 1e3:8.1f} {c.compute_s * 1e3:8.1f} {c.tokens_per_s:8.1f} {c.limit}")
        return "\n".join(head)

    def to_dict(self) -> Dict[str, Any]:
        """The choice, the inputs and the frontier (not every candidate), for JSON."""
        return {"best": self.best.to_dict() if self.best else None, "budget_bytes": self.budget_bytes,
                "prompt": self.prompt, "gen": self.gen, "link_gbps": self.link_gbps, "link": self.link,
                "prefetch": self.prefetch, "compute": self.compute.to_dict(),
                "frontier": [c.to_dict() for c in self.frontier()]}


def choose_batch(sizes: ModelSizes, compute: ComputeModel, *, budget: Optional[int], prompt: int, gen: int,
                 link_gbps: Optional[float], stream: Optional[str] = "cpu", prefetch: int = 2,
                 max_batch: int = 1024, step_overhead_s: float = 0.0) -> BatchPlan:
    """Every (batch, resident blocks) the loader would accept under ``budget``, with its predicted tokens/s; the
    best of them. ``stream``: the offload mode that streams ("cpu" or "nvme"), or None to keep every block resident
    (offload="none"). Batches run from 1 to the largest that fits (at most ``max_batch``); for each, every
    residency from 0 blocks to the most that fit. Tokens/s counts as ``zstream bench`` does: batch * gen tokens over
    the prefill (which gives the first token) and gen - 1 decode steps, taken at their mean context."""
    if prompt < 1 or gen < 1:
        raise ValueError(f"prompt and gen must be at least 1, not {prompt} and {gen}")
    if stream is not None and not link_gbps:
        raise ValueError(f"stream={stream!r} needs the link bandwidth (link_gbps), or stream=None")
    seq = min(prompt + gen, sizes.max_positions)
    n, slots = sizes.num_blocks, prefetch + 1
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps, slots, step_overhead_s)
    context = prompt + gen / 2  # decode steps attend to prompt + 1 .. prompt + gen - 1 keys
    table: List[Candidate] = []
    for batch, lowest, most in _fitting(sizes, budget, seq, slots, stream is not None, max_batch):
        for resident in range(lowest, most + 1):
            prefill, _, _ = tm.prefill(batch, resident, prompt)
            step, xfer, comp = tm.decode_step(batch, resident, context)
            total = prefill + (gen - 1) * step
            table.append(Candidate(batch=batch, resident_blocks=resident, num_blocks=n,
                                   offload="none" if resident == n else str(stream),
                                   memory_bytes=sizes.memory_bytes(batch, resident, seq, slots),
                                   prefill_s=prefill, decode_step_s=step, transfer_s=xfer, compute_s=comp,
                                   tokens_per_s=batch * gen / total))
    best = max(table, key=lambda c: c.tokens_per_s, default=None)
    return BatchPlan(best=best, table=table, budget_bytes=budget, prompt=prompt, gen=gen, link_gbps=link_gbps,
                     prefetch=prefetch, compute=compute)


def plan_batch(model: Any, *, gpu_memory: Union[int, str, None] = None, prompt: int = 512, gen: int = 32,
               offload: str = "cpu", device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
               prefetch: int = 2, link_gbps: Optional[float] = None, compute: Optional[ComputeModel] = None,
               max_batch: int = 1024, cache: Union[str, os.PathLike, None] = None,
               step_overhead_s: float = 0.0, quantize: Optional[str] = None, group_size: int = 64,
               symmetric: bool = False) -> BatchPlan:
    """The batch and residency that maximise tokens/s for a budget, predicted from measurements made now.

    ``model``: a checkpoint directory (only its headers are read) or a model ``zstream.load`` returned (its plan's
    sizes and link). ``gpu_memory``: the budget (default: free device memory; a loaded model's own budget).
    ``offload``: the mode that may stream ("cpu", "nvme", "auto"), or "none". The link is measured as the loader
    measures it (pinned host-to-device copies; for nvme the slower of that and an O_DIRECT read of a few blocks)
    unless ``link_gbps`` is given; the compute is calibrated on the device (``calibrate_compute``) unless given.
    ``zstream.load(path, **plan.load_kwargs())`` then loads the chosen configuration. Quantized blocks (a packed
    checkpoint, a loaded quantized model, or ``quantize=`` as ``load`` takes it) are planned with their packed bytes,
    the room ``load`` keeps for one dequantized block, and a compute model that times the dequantization too."""
    from .loading import _default_device, _measure_link, resolve_checkpoint
    from .models import family_for
    from .store import WeightStore

    if offload not in ("auto", "none", "cpu", "nvme"):
        raise ValueError(f"offload must be one of auto, none, cpu, nvme for planning, not {offload!r}")
    loaded = hasattr(model, "plan") and hasattr(model, "family")
    if loaded:
        dev = torch.device(model.plan.device)
        family, store = model.family, model.store
        dtype = model.plan.dtype
    else:
        dev = torch.device(device or _default_device())
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        path = resolve_checkpoint(model)
        from .generation import read_config

        store = WeightStore.open(path, pin=False)
        family = family_for(read_config(path), store.names())
    try:
        block_names = [family.block_tensors(i) for i in range(family.num_blocks)]
        outer_names = family.outer_tensors()
        ckpt_dtype = store.info(next(iter(outer_names.values()))).torch_dtype
        if dtype is None:
            dtype = ckpt_dtype if dev.type == "cuda" else torch.float32
        bq, packed = _block_quant(model if loaded else None, store, family, dtype, quantize, group_size, symmetric)
        if bq is not None and packed:
            block_names = [bq.names(names) for names in block_names]
        if bq is not None and not packed:  # quantized in memory at load: packed sizes from the shapes
            shapes = family.block_shapes()
            raw = [bq.nbytes(shapes, {k: ckpt_dtype.itemsize for k in shapes})] * family.num_blocks
        else:
            raw = [sum(store.info(n).nbytes for n in names.values()) for names in block_names]
        outer = sum(store.info(n).nbytes for n in set(outer_names.values()))
        sizes = ModelSizes.of_family(family, raw, outer, dtype, ckpt_dtype)
        if bq is not None:  # as load: room for one block's dequantized weights while it computes
            workspace = bq.dequantized_nbytes
            base = sizes.reserve
            sizes.reserve = lambda batch, seq: base(batch, seq) + workspace

        budget = parse_bytes(gpu_memory)
        if budget is None and loaded:
            budget = model.plan.budget_bytes
        if budget is None and dev.type == "cuda":
            budget = torch.cuda.mem_get_info(dev)[0]
        if budget is None:  # the CPU: host memory is the device's (and ``load`` keeps blocks resident only under one)
            budget = host_available_bytes() or None
        stream: Optional[str] = None
        if offload == "auto":
            stream = "nvme" if dev.type == "cpu" or host_available_bytes() < sum(raw) else "cpu"
        elif offload == "nvme" or (offload == "cpu" and dev.type == "cuda"):
            stream = offload
        if bq is not None and not packed and stream == "nvme":
            raise QuantizationError("quantize= quantizes into memory at load, so nothing quantized can stream from "
                                    "disk: plan a checkpoint written by `zstream pack` for offload='nvme'")
        # offload="cpu" on the CPU keeps every block in host memory: nothing streams (as ``load`` does)
        link = "given"
        if stream is not None and link_gbps is None:
            if loaded and model.plan.link_gbps and model.plan.offload == stream:
                link, link_gbps = model.plan.link, model.plan.link_gbps
            else:
                link, link_gbps = _measure_link(store, dev, stream, block_names[:4])
        if compute is None:  # calibrated over the batches that can run: the fit is trusted inside its range
            seq = min(prompt + gen, family.max_positions)
            fits = _fitting(sizes, budget, seq, prefetch + 1, stream is not None, max_batch)
            compute = calibrate_compute(family, dev, dtype, max_batch=max((b for b, _, _ in fits), default=1),
                                        prompt=prompt, gen=gen, cache=cache, quant=bq)
    finally:
        if not loaded:
            store.close()
    plan = choose_batch(sizes, compute, budget=budget, prompt=prompt, gen=gen, link_gbps=link_gbps, stream=stream,
                        prefetch=prefetch, max_batch=max_batch, step_overhead_s=step_overhead_s)
    plan.device, plan.dtype, plan.link = str(dev), dtype, link if stream is not None else ""
    if bq is not None and not packed and not loaded:
        plan.quantize = {"quantize": bq.cfg.name, "group_size": bq.cfg.group_size, "symmetric": bq.cfg.symmetric}
    return plan


def _block_quant(model: Any, store: Any, family: Any, dtype: torch.dtype, quantize: Optional[str], group_size: int,
                 symmetric: bool) -> Tuple[Any, bool]:
    """(the BlockQuant the loader would use, whether the store holds the packed tensors): a loaded model's own, else
    what ``loading.checkpoint_quant`` says of the checkpoint and ``quantize=``."""
    from .loading import checkpoint_quant
    from .quant import QuantConfig

    if model is not None:
        bq = getattr(model, "quant", None)
        return bq, bq is not None and model.block_tensors(0) != family.block_tensors(0)
    return checkpoint_quant(store, family, dtype, QuantConfig.parse(quantize, group_size, symmetric),
                            where="plan_batch")


def _fitting(sizes: ModelSizes, budget: Optional[int], seq: int, slots: int, stream: bool,
             max_batch: int) -> List[Tuple[int, int, int]]:
    """(batch, fewest, most resident blocks) for every batch from 1 that the loader accepts, up to ``max_batch``.
    Without streaming only "every block resident" counts. Memory grows with the batch, so the first batch that does
    not fit ends the list."""
    n, out = sizes.num_blocks, []
    for batch in range(1, max_batch + 1):
        most = sizes.max_resident(budget, batch, seq, slots)
        lowest = 0 if stream else n
        if most is None or most < lowest:
            break
        out.append((batch, lowest, most))
    return out
