"""How steady is the CPUs' decode attention, call after call, as the engine calls it? (issue 17: the CPU-bound rows'
calibrations timed rounds of the same block 1-24 ms apart, run 21 of 2026-12-04, where the link-bound rows held.)

The engine calls the CPUs' attention of a host-compute layer, then runs the device's part of the block and the next
layer's launches before it calls again: the OpenMP workers of the CPUs' attention idle between calls, past the
time libgomp spins before sleeping, so each call wakes them. On a virtual machine a sleeping vCPU's wake-up goes
through the host's scheduler. This times one decode attention (the engine's call: ``ops.attention`` with a mask,
over a host cache of ``--layers`` layers attended in turn) ``--calls`` times, with ``--gap-ms`` of idling between
calls, for each thread count and OpenMP wait policy (each policy in a process of its own: libgomp reads it once).
Prints one JSON line per case: mean, quantiles, max, and the steal time /proc/stat counted meanwhile.

    python benches/cpu_attention_jitter.py [--batch 16] [--threads 16,14,8] [--gap-ms 0,2] [--policies default,ACTIVE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List


def steal_ticks() -> int:
    """The host's steal time so far, in clock ticks (0 where /proc/stat has no such column)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


def quantiles(xs: List[float]) -> Dict[str, float]:
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"mean_ms": statistics.fmean(s) * 1e3, "p10_ms": pick(0.1) * 1e3, "p50_ms": pick(0.5) * 1e3,
            "p90_ms": pick(0.9) * 1e3, "p99_ms": pick(0.99) * 1e3, "max_ms": s[-1] * 1e3}


def run_case(a: argparse.Namespace, threads: int, gap_s: float) -> Dict[str, object]:
    import torch

    from zstream.foundations.models.common import StepContext
    from zstream.foundations.models.ops import attention

    torch.set_num_threads(threads)
    B, nh, hs, L, S = a.batch, a.heads, a.head_dim, a.slots, a.slots - 16
    # every page written (a zero page reads from the CPUs' caches); the values do not change the work
    k = torch.empty(a.layers, B, nh, L, hs, dtype=torch.float16).fill_(0.01)     # (layers, B, nh, L, hs)
    v = torch.empty(a.layers, B, nh, L, hs, dtype=torch.float16).fill_(0.02)
    q = torch.randn(B, nh, 1, hs, dtype=torch.float16)                            # (B, nh, 1, hs)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.float16)                           # additive, every key visible
    ctx = StepContext(start=S - 1, positions=torch.full((B, 1), S - 1), mask=mask, is_causal=False)
    times: List[float] = []
    for i in range(a.warmup + a.calls):
        if i == a.warmup:
            steal0 = steal_ticks()
        t = time.perf_counter()
        attention(q, k[i % a.layers, :, :, :S], v[i % a.layers, :, :, :S], ctx)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
        end = time.perf_counter() + gap_s
        while gap_s and time.perf_counter() < end:  # the main thread busy elsewhere (launching), the workers idle
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return {"threads": threads, "gap_ms": gap_s * 1e3, "calls": a.calls, "batch": B,
            "cache_mb": B * nh * S * hs * 2 * 2 / 1e6, **quantiles(times),
            "steal_s": (steal_ticks() - steal0) / tick, "wall_s": sum(times) + a.calls * gap_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)        # bloom-7b1
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=544)       # prompt 512 + gen 32
    p.add_argument("--layers", type=int, default=15)       # the split's CPU layers of bloom-7b1 at 16 GiB
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", default="16,14,8")
    p.add_argument("--gap-ms", default="0,2")
    p.add_argument("--policies", default="default,ACTIVE")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # threads,gap_ms: one case, in this process
    p.add_argument("--json", default=None, help="append the JSON lines here too")
    a = p.parse_args()
    if a.child:
        threads, gap = a.child.split(",")
        print(json.dumps(run_case(a, int(threads), float(gap) / 1e3)), flush=True)
        return
    shape = ["--batch", a.batch, "--heads", a.heads, "--head-dim", a.head_dim, "--slots", a.slots, "--layers",
             a.layers, "--calls", a.calls, "--warmup", a.warmup]  # what the child times (not where lines go)
    base = [str(x) for x in shape]
    for policy in a.policies.split(","):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        for threads in a.threads.split(","):
            for gap in a.gap_ms.split(","):
                out = subprocess.run([sys.executable, __file__, *base, "--child", f"{threads},{gap}"], env=env,
                                     capture_output=True, text=True, check=True).stdout
                row = {"policy": policy, **json.loads(out.strip().splitlines()[-1])}
                line = json.dumps(row)
                print(line, flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
