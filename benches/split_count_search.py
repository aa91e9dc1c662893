"""The planner's count of "split" layers on the CPUs against every count, on the calibrations stored from the H200.

    python3 benches/split_count_search.py benches/results/raw/h200-2026-12-04-run1[3-8]-bench_kv*.json \
        benches/results/raw/h200-2026-12-04-run21-bench_kv_all.json [--json OUT]

For every split calibration in the files (``meta.compute_models``), over a grid of batches, micro-batches,
residencies and contexts: the decode step at the count ``ThroughputModel.best_split`` picks, over the shortest step
of every count from 0 to the blocks (``missed`` where longer, ``worst`` the largest such ratio); and the time
``choose_batch`` takes to plan every placement of bloom-7b1 under 16 GiB up to batch 64 (median of ``--repeat``).
Run on two builds (a ``git worktree`` of each), it says what a change to the search buys and costs
(docs/performance.md, item 34). The build's own ``best_split`` is called as that build defines it. And for each
measured split row: its step at its own count of CPU layers (measured and predicted) beside the step predicted at the
count ``best_split`` picks from the row's calibration.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import ComputeModel, ModelSizes, ThroughputModel, choose_batch
from zstream.planning.facts import facts_from_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_predictions import preset_of

GRID = dict(batch=(1, 8, 16, 32, 48, 64, 96, 128), micro=(None, 16), context=(100, 528, 2000))


def search_against_every_count(tm: ThroughputModel, n: int, sizes: ModelSizes) -> Dict[str, Any]:
    """The grid's points, those where the picked count steps longer than the best count, the worst ratio."""
    points, missed, worst = 0, 0, 1.0
    for batch, micro, context in itertools.product(*GRID.values()):
        if micro is not None and micro >= batch:
            continue
        layer = sizes.kv_layer_bytes(batch, context)
        for resident in sorted({0, n // 5, 2 * n // 5, 3 * n // 5, 4 * n // 5, n}):
            step = [tm.split_step(batch, resident, context, layer, micro, c) for c in range(n + 1)]
            picked = step[tm.best_split(batch, resident, context, layer, micro)]
            points += 1
            if picked > min(step) * (1 + 1e-9):
                missed, worst = missed + 1, max(worst, picked / min(step))
    return {"points": points, "missed": missed, "worst": worst}


def rows_at_the_planners_count(doc: Dict[str, Any], sizes: ModelSizes) -> List[Dict[str, Any]]:
    """Each measured split row of a bench JSON: its count of CPU layers and step (measured, and predicted by its own
    calibration), and the count ``best_split`` picks from that calibration with its predicted step."""
    out = []
    for row in doc["rows"]:
        stored = doc["meta"].get("compute_models", {}).get(row.get("predicted_compute"))
        if row.get("kv_offload") != "split" or stored is None or row.get("quantize") or "kv_cpu_layers" not in row:
            continue  # (rows of a bench older than run 10 of 2026-12-04 do not record their count)
        tm = ThroughputModel(ComputeModel.from_dict(stored), sizes.block_bytes, row["predicted_link_gbps"],
                             device_sync=row.get("step_wait") != "tokens")  # as the row's steps were timed
        batch, resident = row["batch"], row["resident_blocks"]
        micro = row["micro_batch"] if row.get("micro_batch") and row["micro_batch"] < batch else None
        context = row["prompt"] + row["gen"] / 2
        layer = sizes.kv_layer_bytes(batch, round(context))
        best = tm.best_split(batch, resident, context, layer, micro)
        out.append({"batch": batch, "micro_batch": micro, "resident": resident, "cpu_layers": row["kv_cpu_layers"],
                    "measured_step_s": row["decode_step_s"],
                    "predicted_step_s": tm.split_step(batch, resident, context, layer, micro, row["kv_cpu_layers"]),
                    "best_split": best, "best_step_s": tm.split_step(batch, resident, context, layer, micro, best)})
    return out


def plan_seconds(sizes: ModelSizes, compute: ComputeModel, repeat: int) -> float:
    """Median wall time of planning every placement (micro-batches of 16 too) up to batch 64 under 16 GiB."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0, stream="cpu",
                     max_batch=64, kv_offloads=("none", "host", "host-compute", "split"),
                     micro_batch_sizes=(None, 16))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--repeat", type=int, default=3, help="plannings timed per calibration (their median; 0: none)")
    p.add_argument("--preset", help="the synthetic preset the files' model was made from (default: from its name)")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    print(f"best_split{inspect.signature(ThroughputModel.best_split)}")
    out: List[Dict[str, Any]] = []
    rows: List[Dict[str, Any]] = []
    for path in a.files:
        doc = json.loads(path.read_text())
        preset = a.preset or preset_of(doc["meta"])
        sizes = ModelSizes.of(facts_from_shapes(family_for(zstream.synthetic.PRESETS[preset]), torch.float16))
        for key, stored in doc["meta"].get("compute_models", {}).items():
            if "split" not in key:
                continue
            compute = ComputeModel.from_dict(stored)
            tm = ThroughputModel(compute, sizes.block_bytes, doc["meta"].get("h2d_gbps") or 55.0)
            r = {"file": path.name, "preset": preset, **search_against_every_count(tm, sizes.num_blocks, sizes),
                 "plan_s": plan_seconds(sizes, compute, a.repeat) if preset == "bloom-7b1" and a.repeat else None}
            out.append(r)
            plan = f"{r['plan_s']:.2f} s" if r["plan_s"] is not None else "-"
            print(f"{path.name:44} {r['points']:5d} points, {r['missed']:5d} missed, worst {r['worst']:.3f}x; "
                  f"planning {plan}")
        for r in rows_at_the_planners_count(doc, sizes):
            rows.append({"file": path.name, **r})
            print(f"{path.name:44} split row at batch {r['batch']}, {r['cpu_layers']} on the CPUs: step "
                  f"{r['measured_step_s'] * 1e3:.1f} ms measured, {r['predicted_step_s'] * 1e3:.1f} predicted; the "
                  f"planner's count {r['best_split']}: {r['best_step_s'] * 1e3:.1f} predicted "
                  f"({r['best_step_s'] / r['predicted_step_s']:.3f}x)")
    points, missed = sum(r["points"] for r in out), sum(r["missed"] for r in out)
    times = [r["plan_s"] for r in out if r["plan_s"] is not None]
    print(f"all: {missed} of {points} points missed the best count, worst {max(r['worst'] for r in out):.3f}x"
          + (f"; planning bloom-7b1 median {statistics.median(times):.2f} s" if times else ""))
    if a.json:
        a.json.write_text(json.dumps({"calibrations": out, "split_rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
