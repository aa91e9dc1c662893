"""Peak device memory of stored ``zstream bench`` rows against the memory their plan budgets, this build's arithmetic.

    python3 benches/memory_replay.py benches/results/raw/h200-2026-12-05-run[1-6]-bench_*.json

A row's plan is what ``load`` keeps on the device for its batch, residency, KV placement and micro-batch: the outer
weights, the resident blocks, a ring of ``prefetch + 1`` slots where anything streams, and the reserve for the KV
cache and activations (``planning.batch.ModelSizes.memory_bytes``, the loader's own sum), with a graphed row's graph
(``residency.decode_graph_bytes``). Beside it: the row's peak (``torch.cuda.max_memory_allocated`` after its cache was
made, so it counts whatever the process still held), and, for rows from builds that record them, what the process
held before the row's load, what its calibration left behind, the pool its decode graph reserved (outside the
peak: a pool's memory is reserved, not allocated), and the peak the caching allocator reserved from the driver.
A row whose peak is over its plan says that something the plan does not count stayed allocated: run 4 of
2026-12-05 found a cuBLAS workspace for every stream a graph had been recorded on (docs/performance.md, item 36).

Only rows measured on a GPU are read (on the CPU the peak is the process's resident memory), and only unquantized,
single-process rows of a synthetic preset (their sizes come from the config alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import ModelSizes
from zstream.planning.facts import facts_from_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_predictions import preset_of

GiB = 1 << 30
RING_SLOTS = 3  # bench's default prefetch of 2, plus one


def graphed(row: Dict[str, Any]) -> bool:
    """Whether the row decoded through a CUDA graph, as the row says: its steps replayed from one (``graphed_steps``,
    since 2026-12-06), or before that its plan allowing one; rows from before either was recorded, from their
    calibration key (``... graphs``: load's cuda_graphs was on) and the plan's rule of those builds: every block
    resident, the cache on the device, no micro-batch size given (run 5 of 2026-12-05's batch 7, given 16, ran
    eagerly)."""
    if row.get("graphed_steps") is not None:
        return row["graphed_steps"] > 0
    if row.get("decode_graph") is not None:
        return bool(row["decode_graph"])
    return (str(row.get("predicted_compute", "")).endswith(" graphs") and row["streamed_blocks"] == 0
            and row.get("kv_offload", "none") == "none" and not row.get("micro_batch"))


def replay_row(row: Dict[str, Any], sizes: ModelSizes) -> Dict[str, Any]:
    """The row's peak against its plan's memory (bytes)."""
    batch, seq, kv = row["batch"], row["prompt"] + row["gen"], row.get("kv_offload") or "none"
    micro = row.get("micro_batch")
    micro = micro if micro and micro < batch else None
    resident = row["resident_blocks"]
    planned = sizes.memory_bytes(batch, resident, seq, RING_SLOTS, kv, micro)
    if graphed(row):
        planned += sizes.graph_memory(batch, seq)
    return {"kv_offload": kv, "batch": batch, "micro_batch": micro, "resident_blocks": resident,
            "graphed": graphed(row), "peak": row["peak_gpu_bytes"], "planned": planned,
            "budget": parse_bytes(row["gpu_memory"]) if row.get("gpu_memory") else None,
            "held_before_load": row.get("held_before_load_bytes"),
            "calibration_held": row.get("calibration_held_bytes"), "graph_pool": row.get("graph_pool_bytes"),
            "peak_reserved": row.get("peak_reserved_bytes")}


def replay_file(path: Path) -> List[Dict[str, Any]]:
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    if meta.get("device") != "cuda":
        return []
    try:
        preset = preset_of(meta)
    except SystemExit as e:  # not a preset's checkpoint: its sizes are not the config's alone
        print(f"{path.name}: skipped, {e}", file=sys.stderr)
        return []
    family = family_for(zstream.synthetic.PRESETS[preset])
    sizes = ModelSizes.of(facts_from_shapes(family, torch.float16))
    return [{"file": path.name, **replay_row(r, sizes)} for r in doc["rows"]
            if r.get("peak_gpu_bytes") and not r.get("quantize") and r.get("compress", "none") == "none"
            and r.get("tp", 1) == 1 and r.get("offload") in ("none", "cpu")]


def _gib(x: Optional[int]) -> str:
    return f"{x / GiB:7.2f}" if x is not None else f"{'-':>7}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="zstream bench JSON files")
    p.add_argument("--json", help="write the replayed rows here")
    a = p.parse_args(argv)
    rows = [r for f in a.files for r in replay_file(Path(f))]
    print(f"{'file':44} {'kv':>12} {'batch':>5} {'micro':>5} {'res':>3} {'graph':>5} {'peak':>7} {'planned':>7} "
          f"{'over MiB':>8} {'budget':>7} {'held':>7} {'calib':>7} {'pool':>7} {'reserved':>8}  (GiB)")
    for r in rows:
        print(f"{r['file'][:44]:44} {r['kv_offload']:>12} {r['batch']:5d} {r['micro_batch'] or '-'!s:>5} "
              f"{r['resident_blocks']:3d} {'yes' if r['graphed'] else '-':>5} {_gib(r['peak'])} {_gib(r['planned'])} "
              f"{(r['peak'] - r['planned']) / (1 << 20):8.0f} {_gib(r['budget'])} {_gib(r['held_before_load'])} "
              f"{_gib(r['calibration_held'])} {_gib(r['graph_pool'])} {_gib(r['peak_reserved']):>8}")
    over_plan = sum(r["peak"] > r["planned"] for r in rows)
    over_budget = sum(r["budget"] is not None and r["peak"] > r["budget"] for r in rows)
    print(f"peak over its plan: {over_plan} of {len(rows)} rows; over the budget: {over_budget}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
