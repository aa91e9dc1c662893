"""Does the host's CPU attention slow down while the link streams? (issue 17: OPT-30B's "split" layers attended on
the CPUs took 72 ms a block in the run, where the planner's calibration, timed with the link idle, said ~23.)

Times one decode attention over an OPT-30B layer's cache in host memory (nh 56, hs 128, 528 keys of a 544-slot
cache, the engine's layout and call: ``ops.attention`` with a mask), in fp16 and fp32, a micro-batch of 16 rows:
alone, and while another thread keeps pinned host-to-device copies going on a stream of their own (what the ring
and the uplink do during a step). Prints one JSON line per case, with the copies' rate during it.

    python benches/cpu_attention_contention.py [--batch 16] [--reps 20] [--threads 4,8,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from zstream.foundations.models.common import StepContext
from zstream.foundations.models.ops import attention


def time_attention(B: int, dtype: torch.dtype, reps: int, *, zeros: bool = False, upcast: bool = False,
                   layers: int = 1) -> float:
    """Median seconds of one decode attention; ``zeros``: a cache of zeros (as the calibration's), ``upcast``: an
    fp16 cache attended in fp32 (converted on the fly), ``layers``: caches of that many layers attended in turn (one
    layer's stays in the CPUs' caches between calls; a run's 24-43 layers do not)."""
    nh, hs, L, S = 56, 128, 544, 528
    k = _host_values((layers, B, nh, L, hs), dtype, zeros)                       # (layers, B, nh, L, hs)
    v = _host_values((layers, B, nh, L, hs), dtype, zeros)
    q = torch.randn(B, nh, 1, hs).to(dtype)                                      # (B, nh, 1, hs)
    work = torch.float32 if upcast else dtype
    mask = torch.zeros(B, 1, 1, S, dtype=work)                                   # additive, every key visible
    ctx = StepContext(start=S - 1, positions=torch.full((B, 1), S - 1), mask=mask, is_causal=False)

    def once(i: int) -> None:
        attention(q.to(work), k[i, :, :, :S].to(work), v[i, :, :, :S].to(work), ctx)
    once(0)
    seconds = []
    for r in range(reps):
        t0 = time.perf_counter()
        once(r % layers)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def _host_values(shape: tuple, dtype: torch.dtype, zeros: bool) -> torch.Tensor:
    """Random values (made on the GPU where there is one: the CPU's generator makes ~150 MB/s) or zeros."""
    if zeros:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu").cpu()


class CopyLoop(threading.Thread):
    """Pinned host-to-device copies of 1 GiB, back to back on a stream of their own, until stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop, self.moved, self.seconds = threading.Event(), 0, 0.0

    def run(self) -> None:
        t0 = time.perf_counter()
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.dst.copy_(self.src, non_blocking=True)
                self.stream.synchronize()
                self.moved += self.src.numel()
        self.seconds = time.perf_counter() - t0


CASES = [("fp16", torch.float16, {}), ("fp16 40 layers", torch.float16, {"layers": 40}),
         ("fp32 40 layers", torch.float32, {"layers": 40}), ("fp16 zeros", torch.float16, {"zeros": True}),
         ("fp16 upcast", torch.float16, {"upcast": True}), ("bf16", torch.bfloat16, {})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", default="", help="comma list of torch thread counts to try (default: torch's)")
    p.add_argument("--calibration", type=int, default=0, metavar="MAX_BATCH",
                   help="also print the planner's calibration of an OPT-30B host-compute block up to MAX_BATCH")
    a = p.parse_args()
    if a.calibration:
        calibration(a.calibration)
    print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))
    for n in [int(t) for t in a.threads.split(",") if t]:
        torch.set_num_threads(n)
        s = time_attention(a.batch, torch.float16, a.reps, layers=40)
        print(json.dumps({"case": "fp16 40 layers", "threads": n, "attention_ms": round(s * 1e3, 2)}), flush=True)
    torch.set_num_threads(torch.get_num_threads() if not a.threads else max(int(t) for t in a.threads.split(",")))
    for busy in ([False, True] if torch.cuda.is_available() else [False]):
        loop = CopyLoop() if busy else None
        if loop is not None:
            loop.start()
            time.sleep(0.5)
        for name, dtype, kw in CASES:
            s = time_attention(a.batch, dtype, a.reps, **kw)
            kv_bytes = 2 * a.batch * 56 * 528 * 128 * dtype.itemsize
            print(json.dumps({"link_busy": busy, "case": name, "batch": a.batch, "threads": torch.get_num_threads(),
                              "attention_ms": round(s * 1e3, 2), "kv_read_gbps": round(kv_bytes / s / 1e9, 1)}),
                  flush=True)
        if loop is not None:
            loop.stop.set()
            loop.join()
            print(json.dumps({"copies_gbps_meanwhile": round(loop.moved / loop.seconds / 1e9, 1)}), flush=True)


def calibration(max_batch: int) -> None:
    """The planner's calibration of an OPT-30B block with its cache attended on the CPUs, as plan_batch runs it:
    its samples, to set beside the attention alone."""
    from zstream.api.synthetic import checkpoint_plan, resolve_config
    from zstream.foundations.models import family_for
    from zstream.streaming.calibrate import calibrate_compute

    config = resolve_config("opt-30b")
    family = family_for(config, [name for name, _, _ in checkpoint_plan(config)])
    model = calibrate_compute(family, "cuda", torch.float16, max_batch=max_batch, prompt=512, gen=32, rounds=3,
                              kv_offloads=("host-compute",))
    for sample in model.samples:
        if sample.get("kv_offload") or sample["phase"] == "decode":
            print(json.dumps({k: v for k, v in sample.items() if not k.endswith("rounds_s")}), flush=True)


if __name__ == "__main__":
    main()
