"""Where a "split" decode step's time goes (issue 17; docs/performance.md item 20). Runs 8-11 of 2026-12-04 measured
"split" steps 9-28% longer than the planner's sum of their parts (the CPUs' layers timed alone, the device layers,
the link), while "host-compute" rows, every layer on the CPUs and nothing on the link, came within 5% at batches 8
and 16. This times, on one loaded model, the engine's own split layout ("odd": layers 1, 3, ... on the CPUs, the
others brought up) against every layer on the CPUs ("all"), alternating round by round, and splits each CPU layer's
time in two with host clocks (no added synchronisation):

- ``wait_s``: its cache's ``update``. The q, k, v copy down waits for the device to finish what was queued before
  (with "odd", the layer before it, which waited for its cache to come up);
- ``attend_s``: the rest of its attention, the CPUs reading the layer's cache and the output sent up.

Each round also times what the calibration times for those steps, in the same process (``calibrated``): its
host-compute decode block, its device block, its split pair and its pass's outer work (``calibrate._BlockTimer``) at
the steps' mean context and a micro-batch's rows, and from them an "all" step as the planner adds it up, and an
"odd" one where the pairs cover every layer (item 57: the stored
"host-compute" rows of 2026-12-05 and -06 stepped a median 5-7% faster than their calibrations said at batches 8 and
16, 4% slower at 64).

    python3 benches/split_anatomy.py CHECKPOINT --gpu-memory 16GiB --batch 16,64 --micro-batch 16 --rounds 2 \\
        --json out.json

Prints per batch and layout the median decode step, and the CPU layers' wait and attention per step and per layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from zstream.interfaces.bench import run_one
from zstream.planning.residency import cpu_layers_of
from zstream.streaming import cache as cache_mod
from zstream.streaming.calibrate import _BlockTimer
from zstream.streaming.weights import attention_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from split_layout_ab import engine_layout, in_turn, load_split, run_all  # a sibling script

LAYOUTS = {"odd": cpu_layers_of, "all": lambda n, count: list(range(n))}


class CpuLayerClock:
    """Host time in the CPU layers' ``update`` and ``attend`` of decode steps (a prompt's layers are not counted)."""

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.attend_s = 0.0
        self.calls = 0
        self._update = cache_mod.HostComputeLayerCache.update
        self._attend = cache_mod.HostComputeLayerCache.attend

    def __enter__(self) -> CpuLayerClock:
        clock, update, attend = self, self._update, self._attend

        def timed_update(layer: Any, k: Any, v: Any, start: int) -> Any:
            t = time.perf_counter()
            out = update(layer, k, v, start)
            if start > 0:
                clock.wait_s += time.perf_counter() - t
            return out

        def timed_attend(layer: Any, q: Any, k: Any, v: Any, ctx: Any) -> Any:
            t = time.perf_counter()
            out = attend(layer, q, k, v, ctx)
            if ctx.start > 0:
                clock.attend_s += time.perf_counter() - t
                clock.calls += 1
            return out

        cache_mod.HostComputeLayerCache.update = timed_update  # type: ignore[method-assign]
        cache_mod.HostComputeLayerCache.attend = timed_attend  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        cache_mod.HostComputeLayerCache.update = self._update  # type: ignore[method-assign]
        cache_mod.HostComputeLayerCache.attend = self._attend  # type: ignore[method-assign]


def calibrated(timer: _BlockTimer, num_blocks: int, cpu_layers: int, batch: int, micro: int,
               context: int) -> Dict[str, Optional[float]]:
    """What the calibration times for the decode steps at ``context`` keys, at a micro-batch's rows: a host-compute
    block, a device block, a "split" pair (a layer brought up, then one on the CPUs, as the engine interleaves
    them), the pass's outer work; and the steps they add up to for each micro-batch (the decode loop's own work, a
    fraction of a millisecond, left out): "all", every block on the CPUs; "odd", the split's pairs where they cover
    every layer (its cache's first wait left out; None where some layers are brought up unpaired)."""
    block, outer = timer.time_block(micro, 1, context, "host-compute"), timer.time_outer(micro, 1, context)
    pair = timer.time_kv("split", micro, 1, context)
    parts = -(-batch // micro)
    return {"block_s": block, "device_block_s": timer.time_block(micro, 1, context), "pair_s": pair,
            "outer_s": outer, "decode_step_s": parts * (num_blocks * block + outer),
            "odd_step_s": parts * (cpu_layers * pair + outer) if 2 * cpu_layers == num_blocks else None}


def run_batch(path: str, batch: int, a: argparse.Namespace) -> Dict[str, Any]:
    model = load_split(path, batch, a)
    n, cpu = model.family.num_blocks, model.plan.kv_cpu_layers
    micro = a.micro_batch if a.micro_batch and a.micro_batch < batch else batch
    context = a.prompt + a.gen // 2  # the decode steps' mean
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in (*LAYOUTS, "calibrated")}
    timer = None
    try:
        # sampled as calibrate_compute samples (5 ms, the CPUs' blocks over 50), seed 0, plain weights
        timer = _BlockTimer(model.family, model.device, model.dtype, a.prompt + a.gen, 0.005, 0, None)
        for _, name in in_turn([*LAYOUTS, "calibrated"], a.rounds):
            if name == "calibrated":
                with torch.inference_mode(), attention_kernels(model.device):  # as the calibration times
                    runs[name].append(calibrated(timer, n, cpu, batch, micro, context))
                continue
            with engine_layout(LAYOUTS[name]), CpuLayerClock() as clock:
                res = run_one(model, batch, a.prompt, a.gen)
            steps = a.gen - 1
            runs[name].append({"decode_step_s": res["decode_step_s"], "wait_s": clock.wait_s / steps,
                               "attend_s": (clock.attend_s - clock.wait_s) / steps,
                               "cpu_layer_calls": clock.calls / steps})
    finally:
        if timer is not None:
            timer.close()
        model.close()
    out: Dict[str, Any] = {"batch": batch, "num_blocks": n, "cpu_layers": cpu, "micro_batch": a.micro_batch,
                           "context": context}
    for name, reps in runs.items():
        med = {k: statistics.median(x[k] for x in reps) if reps[0][k] is not None else None for k in reps[0]}
        if name == "calibrated":
            out[name] = {**med, "rounds": reps}
            continue
        layers = len(LAYOUTS[name](n, cpu))
        out[name] = {**med, "layers_on_cpus": layers, "wait_per_layer_s": med["wait_s"] / layers,
                     "attend_per_layer_s": med["attend_s"] / layers, "rounds": reps}
    c = out["calibrated"]
    out["all_over_calibrated_step"] = out["all"]["decode_step_s"] / c["decode_step_s"]
    out["odd_over_calibrated_step"] = out["odd"]["decode_step_s"] / c["odd_step_s"] if c["odd_step_s"] else None
    return out


def main(argv: Any = None) -> int:
    return run_all(argv, __doc__ or "", 2, run_batch, lambda r: [
        f"batch {r['batch']} {name}: step {x['decode_step_s'] * 1e3:.1f} ms; {x['layers_on_cpus']} layers on the "
        f"CPUs wait {x['wait_s'] * 1e3:.1f} ms ({x['wait_per_layer_s'] * 1e3:.2f} a layer), attend "
        f"{x['attend_s'] * 1e3:.1f} ms ({x['attend_per_layer_s'] * 1e3:.2f} a layer)"
        for name, x in ((n, r[n]) for n in LAYOUTS)] + [
        f"batch {r['batch']} calibrated at {r['context']} keys: host-compute block {c['block_s'] * 1e3:.2f} ms, device "
        f"block {c['device_block_s'] * 1e3:.2f}, split pair {c['pair_s'] * 1e3:.2f}, outer {c['outer_s'] * 1e3:.2f}; "
        f"an \"all\" step {c['decode_step_s'] * 1e3:.1f} ms, measured {r['all_over_calibrated_step']:.3f}x that"
        + (f"; an \"odd\" step {c['odd_step_s'] * 1e3:.1f} ms, measured {r['odd_over_calibrated_step']:.3f}x"
           if c["odd_step_s"] else "")
        for c in (r["calibrated"],)])


if __name__ == "__main__":
    raise SystemExit(main())
