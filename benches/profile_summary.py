"""Where a decode step's time goes, from a ``zstream bench --profile`` trace: per marked step (and the prefill), its
wall time, how long the GPU computed in it and waited between its kernels, how long the host ran before the GPU's
first kernel of the step and after its last, the copy engines' busy time, the time the host spent in the CUDA
runtime (launches, graph replays, copies issued), and its kernels (issue 17: the graphed and eager batch-7 steps
ran 0.3-0.6 ms longer than their calibrations timed, docs/performance.md items 45, 47 and 50).

    python3 benches/profile_summary.py TRACE.json[.gz] [--skip 1] [--json OUT]
    python3 benches/profile_summary.py TRACE.json[.gz] --kernels zstream.prefill    (a window's kernels by name)

``--skip``: decode steps left out of the medians at the start (the first records a CUDA graph where the step is
graphed, and the card's clock recovers from the prefill over the next few).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from zstream.interfaces.bench import PROFILE_PREFILL, PROFILE_STEP

KERNEL_CATS = ("kernel", "gpu_memset")   # the GPU computing (a memset is the step's own work)
COPY_CATS = ("gpu_memcpy",)              # the copy engines (a ring's copies run beside the step)

Interval = Tuple[float, float]


def covered(intervals: List[Interval], lo: float, hi: float) -> float:
    """The length of [lo, hi] that ``intervals`` cover, overlaps counted once."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def windows(events: List[Dict[str, Any]]) -> List[Tuple[str, float, float]]:
    """The marked windows, (name, start, end) in microseconds, in time order: the host's marks only (the profiler
    also draws each on the GPU's timeline)."""
    marks = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
             if e.get("ph") == "X" and e.get("cat") == "user_annotation"
             and (e["name"] == PROFILE_PREFILL or e["name"].startswith(PROFILE_STEP))]
    return sorted(marks, key=lambda m: m[1])


def summarize_window(events: List[Dict[str, Any]], lo: float, hi: float) -> Dict[str, float]:
    """One window's times in ms (see the module's doc)."""
    def spans(cats: Tuple[str, ...]) -> List[Interval]:
        return [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
                if e.get("ph") == "X" and e.get("cat") in cats]
    kernels = [s for s in spans(KERNEL_CATS) if s[1] > lo and s[0] < hi]
    first = min((a for a, _ in kernels), default=None)
    last = max((b for _, b in kernels), default=None)
    busy = covered(kernels, lo, hi)
    return {"wall_ms": (hi - lo) / 1e3,
            "gpu_busy_ms": busy / 1e3,
            # between the step's first kernel and its last, the GPU waiting for launches
            "gaps_ms": (min(last, hi) - max(first, lo) - busy) / 1e3 if first is not None else float("nan"),
            "copy_busy_ms": covered(spans(COPY_CATS), lo, hi) / 1e3,
            "lead_ms": (max(first, lo) - lo) / 1e3 if first is not None else float("nan"),
            "tail_ms": (hi - min(last, hi)) / 1e3 if last is not None else float("nan"),
            "runtime_ms": covered(spans(("cuda_runtime", "cuda_driver")), lo, hi) / 1e3,
            "kernels": float(len(kernels))}


def summarize(trace: Dict[str, Any], skip: int = 1) -> Dict[str, Any]:
    """The prefill's window, each step's, and the medians of the steps after the first ``skip``."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    marked = windows(events)
    if not marked:
        raise SystemExit("no zstream marks in this trace: was it written by zstream bench --profile?")
    rows = {name: summarize_window(events, lo, hi) for name, lo, hi in marked}
    steps = [rows[n] for n, _, _ in marked if n.startswith(PROFILE_STEP)][skip:]
    median = {k: statistics.median(s[k] for s in steps) for k in steps[0]} if steps else {}
    return {"prefill": rows.get(PROFILE_PREFILL), "steps": [rows[n] for n, _, _ in marked if n != PROFILE_PREFILL],
            "median_step": median, "skipped": skip}


def kernels_by_name(events: List[Dict[str, Any]], window: str) -> List[Tuple[str, int, float]]:
    """(kernel name, calls, ms) in the marked ``window`` (the prefill's mark, or a step's), the longest total first:
    which kernels a window ran, and how often (item 55: three GEMMs of bloom-7b1 on SM80 kernels, 3.5x slower than
    the others' Hopper ones, where two blocks' tensors sat 8 bytes off)."""
    spans = [(lo, hi) for name, lo, hi in windows(events) if name == window]
    if not spans:
        raise SystemExit(f"no window {window!r} in this trace")
    lo, hi = spans[0]
    calls: Dict[str, List[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in KERNEL_CATS and lo <= float(e["ts"]) < hi:
            calls.setdefault(e["name"], []).append(float(e.get("dur", 0.0)))
    return sorted(((n, len(d), sum(d) / 1e3) for n, d in calls.items()), key=lambda r: -r[2])


def profiled_row(bench: Dict[str, Any]) -> Dict[str, float]:
    """The timed row the profile ran again (``meta.profiled_row``): its median decode step and its prediction, ms."""
    want = bench["meta"]["profiled_row"]
    row = next(r for r in bench["rows"] if r["batch"] == want["batch"] and r["offload"] == want["offload"]
               and r.get("kv_offload", "none") == want["kv_offload"])
    pred = row.get("predicted_decode_step_s")
    return {"decode_step_ms": row["decode_step_s"] * 1e3,
            "predicted_decode_step_ms": pred * 1e3 if pred is not None else float("nan")}


def _line(name: str, r: Optional[Dict[str, float]]) -> str:
    if not r:
        return f"{name:>12}  -"
    return (f"{name:>12} {r['wall_ms']:9.3f} {r['gpu_busy_ms']:9.3f} {r['gaps_ms']:8.3f} {r['copy_busy_ms']:9.3f} "
            f"{r['lead_ms']:8.3f} {r['tail_ms']:8.3f} {r['runtime_ms']:9.3f} {r['kernels']:8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--skip", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--bench", default=None, help="the bench JSON of the same run: its profiled row's prediction")
    p.add_argument("--kernels", default=None, metavar="WINDOW",
                   help=f"list the kernels of one window instead ({PROFILE_PREFILL}, or {PROFILE_STEP}N)")
    a = p.parse_args()
    opener = gzip.open if a.trace.endswith(".gz") else open
    with opener(a.trace, "rt") as f:
        trace = json.load(f)
    if a.kernels:
        for name, calls, ms in kernels_by_name(trace["traceEvents"] if isinstance(trace, dict) else trace, a.kernels):
            print(f"{ms:9.3f} ms {calls:5d}  {name[:100]}")
        return
    out = summarize(trace, a.skip)
    print(f"{'ms':>12} {'wall':>9} {'gpu busy':>9} {'gaps':>8} {'copies':>9} {'lead':>8} {'tail':>8} {'runtime':>9} "
          f"{'kernels':>8}")
    print(_line("prefill", out["prefill"]))
    for i, s in enumerate(out["steps"]):
        print(_line(f"step {i}", s))
    print(_line(f"median {a.skip}+", out["median_step"]))
    if a.bench:
        out["row"] = profiled_row(json.loads(Path(a.bench).read_text()))
        r = out["row"]
        print(f"the timed row: median step {r['decode_step_ms']:.3f} ms, predicted {r['predicted_decode_step_ms']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
