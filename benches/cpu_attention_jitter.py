"""How steady is the CPUs' decode attention, call after call, as the engine calls it? (issue 17: the CPU-bound rows'
calibrations timed rounds of the same block 1-24 ms apart, run 21 of 2026-12-04, where the link-bound rows held.)

The engine calls the CPUs' attention of a host-compute layer, then runs the device's part of the block and the next
layer's launches before it calls again: the OpenMP workers of the CPUs' attention idle between calls, past the time
libgomp spins before sleeping, so each call wakes them. On a virtual machine a sleeping vCPU's wake-up goes through the
host's scheduler. This times one decode attention (the engine's call: ``ops.attention`` with a mask, over a host cache
of ``--layers`` layers attended in turn) ``--calls`` times, with ``--gap-ms`` of idling between calls, for each thread
count and OpenMP wait policy (each policy in a process of its own: libgomp reads it once). The thread counts take turns
in one process, ``--rounds`` times, so that a spell of the host (seconds long: items 53-59) falls on all of them alike;
each round starts one count further along, so no count always goes first. Prints one JSON line per case and round: mean,
quantiles, max, and the steal time /proc/stat counted meanwhile; then one summary line per case: its rounds' medians,
their median and spread.

    python benches/cpu_attention_jitter.py [--batch 16] [--threads 16,15,14,12] [--gap-ms 0,2] [--rounds 10]
                                           [--policies default,ACTIVE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional


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


def run_cases(a: argparse.Namespace, threads: List[int], gap_s: float) -> List[Dict[str, object]]:
    """Each thread count's ``a.calls`` calls in turn, ``a.rounds`` times over, in this process: one row per thread
    count and round."""
    import torch

    from zstream.foundations.models.common import StepContext
    from zstream.foundations.models.ops import attention

    B, nh, hs, L, S = a.batch, a.heads, a.head_dim, a.slots, a.slots - 16
    # every page written (a zero page reads from the CPUs' caches); the values do not change the work
    k = torch.empty(a.layers, B, nh, L, hs, dtype=torch.float16).fill_(0.01)     # (layers, B, nh, L, hs)
    v = torch.empty(a.layers, B, nh, L, hs, dtype=torch.float16).fill_(0.02)
    q = torch.randn(B, nh, 1, hs, dtype=torch.float16)                            # (B, nh, 1, hs)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.float16)                           # additive, every key visible
    ctx = StepContext(start=S - 1, positions=torch.full((B, 1), S - 1), mask=mask, is_causal=False)
    tick = os.sysconf("SC_CLK_TCK")
    rows: List[Dict[str, object]] = []
    for r in range(a.rounds):
        # the order rotates round by round: the first count of a process meets its warm-up (item 60's caveat)
        for n in threads[r % len(threads):] + threads[:r % len(threads)]:
            torch.set_num_threads(n)
            times: List[float] = []
            for i in range(a.warmup + a.calls):
                if i == a.warmup:
                    steal0 = steal_ticks()
                t = time.perf_counter()
                attention(q, k[i % a.layers, :, :, :S], v[i % a.layers, :, :, :S], ctx)
                if i >= a.warmup:
                    times.append(time.perf_counter() - t)
                end = time.perf_counter() + gap_s
                while gap_s and time.perf_counter() < end:  # the main thread busy elsewhere (launching), workers idle
                    pass
            rows.append({"threads": n, "round": r, "gap_ms": gap_s * 1e3, "calls": a.calls, "batch": B,
                         "cache_mb": B * nh * S * hs * 2 * 2 / 1e6, **quantiles(times),
                         "steal_s": (steal_ticks() - steal0) / tick, "wall_s": sum(times) + a.calls * gap_s})
    return rows


def summarise(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per policy, thread count and gap: the rounds' median calls (``p50_ms``), their median, fastest and slowest,
    and the slowest over the fastest (how far apart the host's states were for that case)."""
    cases: Dict[tuple, List[float]] = {}
    for r in rows:
        cases.setdefault((r["policy"], r["threads"], r["gap_ms"], r["batch"]), []).append(float(r["p50_ms"]))
    return [{"summary": True, "policy": p, "threads": n, "gap_ms": g, "batch": b, "rounds": len(m),
             "round_p50s_ms": m, "median_ms": statistics.median(m), "fastest_ms": min(m), "slowest_ms": max(m),
             "spread": max(m) / min(m)} for (p, n, g, b), m in cases.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)        # bloom-7b1
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=544)       # prompt 512 + gen 32
    p.add_argument("--layers", type=int, default=15)       # the split's CPU layers of bloom-7b1 at 16 GiB
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", default="16,15,14,12")
    p.add_argument("--gap-ms", default="0,2")
    p.add_argument("--rounds", type=int, default=1, help="the thread counts' turns, one after another")
    p.add_argument("--policies", default="default,ACTIVE")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # threads;gap_ms: these cases, in this process
    p.add_argument("--json", default=None, help="append the JSON lines here too")
    a = p.parse_args()
    if a.child:
        threads, gap = a.child.split(";")
        for row in run_cases(a, [int(t) for t in threads.split(",")], float(gap) / 1e3):
            print(json.dumps(row), flush=True)
        return
    shape = ["--batch", a.batch, "--heads", a.heads, "--head-dim", a.head_dim, "--slots", a.slots, "--layers",
             a.layers, "--calls", a.calls, "--warmup", a.warmup, "--rounds", a.rounds]  # what the child times
    base = [str(x) for x in shape]
    rows: List[Dict[str, object]] = []
    for policy in a.policies.split(","):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        for gap in a.gap_ms.split(","):
            out = subprocess.run([sys.executable, __file__, *base, "--child", f"{a.threads};{gap}"], env=env,
                                 capture_output=True, text=True, check=True).stdout
            for line in out.splitlines():
                if line.startswith("{"):  # (a library's warning on stdout is not a row)
                    rows.append({"policy": policy, **json.loads(line)})
                    _emit(rows[-1], a.json)
    for row in summarise(rows):
        _emit(row, a.json)


def _emit(row: Dict[str, object], path: Optional[str]) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
