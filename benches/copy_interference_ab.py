"""Does a streamed block's copy slow the resident blocks it overlaps? (issue 17; docs/performance.md item 54.)

The planner's eager batch-7 choice with one of bloom-7b1's 30 blocks streamed has stepped 1.09-1.12x its
prediction in every run that made it, where the same step with every block resident and graphed came within
1.02-1.08: the streamed block's copy (384 MiB over the link, through a ring of one slot) runs while the resident
blocks compute, and the calibration times those blocks with the link idle. Alternating in one process, this times a
decode pass's worth of blocks (``--blocks``, the model's count) at each ``--batch`` over prompt + gen keys alone,
and with one block's bytes copying host-to-device on a stream of their own beside them, as the engine's ring issues
it: each way's blocks timed on the device's clock (CUDA events), the copy's time alone and beside the blocks too.

    python3 benches/copy_interference_ab.py bloom-7b1 --batch 7 --prompt 512 --gen 32 --rounds 9 --json out.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ab_args import ab_parser, ab_setup
from zstream.foundations.store import host_buffer
from zstream.streaming.cache import KVCache
from zstream.streaming.weights import attention_kernels


class Clock:
    """Seconds of work queued on ``stream``, by CUDA events on a GPU, by the host's clock (synchronous) on the CPU."""

    def __init__(self, device: torch.device, stream: Optional[torch.cuda.Stream]) -> None:
        self.cuda = device.type == "cuda"
        self.stream = stream
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.begin.record(self.stream)
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record(self.stream)
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        return self.begin.elapsed_time(self.end) / 1e3 if self.cuda else self.t1 - self.t0


def time_ways(fam: Any, dev: torch.device, dtype: torch.dtype, B: int, S: int, blocks: int,
              rounds: int) -> Dict[str, Any]:
    """Batch ``B``'s pass of ``blocks`` decode blocks over ``S`` keys, alone and beside one block's copy, and the
    copy alone, ``rounds`` rounds alternating (see the module's doc)."""
    shapes = fam.expected_shapes()
    names = fam.block_tensors(0)
    # one block's weights (as the calibration's): a pass's calls over them read HBM as its blocks do (they outgrow L2)
    weights = {local: torch.randn(shapes[ckpt], dtype=torch.float32).mul_(0.02).to(dev, dtype)
               for local, ckpt in names.items()}
    block_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    host = host_buffer(block_bytes, pin=dev.type == "cuda")                 # (block_bytes,) uint8, pinned
    landing = torch.empty(block_bytes, dtype=torch.uint8, device=dev)
    cache = KVCache(1, B, S, fam.num_kv_heads, fam.head_dim, dtype, dev)
    hidden = torch.randn(B, 1, fam.hidden_size, dtype=dtype, device=dev)     # (B, 1, C)
    cache.extend(torch.ones(B, S - 1, dtype=torch.long, device=dev))
    mask, _ = cache.extend(torch.ones(B, 1, dtype=torch.long, device=dev))
    ctx = fam.context(mask, 1, dtype)
    cuda = dev.type == "cuda"
    compute = torch.cuda.current_stream(dev) if cuda else None
    copies = torch.cuda.Stream(dev) if cuda else None
    blocks_clock, copy_clock = Clock(dev, compute), Clock(dev, copies)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def copy() -> None:
        with torch.cuda.stream(copies) if cuda else contextlib.nullcontext():
            copy_clock.start()
            landing.copy_(host, non_blocking=True)
            copy_clock.stop()

    def run_blocks() -> None:
        blocks_clock.start()
        for _ in range(blocks):
            fam.block(weights, hidden, cache.layer(0), ctx)
        blocks_clock.stop()

    ways: Dict[str, Callable[[], None]] = {"alone": run_blocks, "beside a copy": lambda: (copy(), run_blocks()),
                                           "copy alone": copy}
    times: Dict[str, List[float]] = {"blocks alone": [], "blocks beside a copy": [], "copy beside the blocks": [],
                                     "copy alone": []}
    with torch.inference_mode(), attention_kernels(dev):
        for way in ways.values():  # warm-up: kernels, the allocator
            way()
        sync()
        for _ in range(rounds):
            for name, way in ways.items():
                sync()
                way()
                sync()
                if name == "alone":
                    times["blocks alone"].append(blocks_clock.seconds())
                elif name == "beside a copy":
                    times["blocks beside a copy"].append(blocks_clock.seconds())
                    times["copy beside the blocks"].append(copy_clock.seconds())
                else:
                    times["copy alone"].append(copy_clock.seconds())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": B, "keys": S, "blocks": blocks, "block_bytes": block_bytes,
            "ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
            "median_ms": {k: m * 1e3 for k, m in med.items()},
            "blocks_slowdown": med["blocks beside a copy"] / med["blocks alone"],
            "copy_gbps_alone": block_bytes / med["copy alone"] / 1e9,
            "copy_gbps_beside": block_bytes / med["copy beside the blocks"] / 1e9}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = ab_parser(__doc__, batch="7", rounds=9, gen_help="each block attends to prompt + gen keys")
    p.add_argument("--blocks", type=int, default=None, help="blocks a pass (default: the model's)")
    a = p.parse_args(argv)
    dev, dtype, fam, batches = ab_setup(a)
    blocks, S = a.blocks or fam.num_blocks, a.prompt + a.gen
    out: Dict[str, Any] = {"model": a.model, "device": str(dev), "rounds": a.rounds, "by_batch": {}}
    for B in batches:
        r = out["by_batch"][B] = time_ways(fam, dev, dtype, B, S, blocks, a.rounds)
        med = r["median_ms"]
        print(f"{blocks} blocks at batch {B}, {S} keys: alone {med['blocks alone']:.3f} ms, beside a copy of "
              f"{r['block_bytes'] / 2**20:.0f} MiB {med['blocks beside a copy']:.3f} ms ({r['blocks_slowdown']:.3f}x); "
              f"the copy alone {r['copy_gbps_alone']:.1f} GB/s, beside the blocks {r['copy_gbps_beside']:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
