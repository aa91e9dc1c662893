"""A ``zstream bench --trace`` of a "split" or "host-compute" row, summed up per traced decode step: the streamed
blocks' compute on the CPUs' layers and on the device's, the gaps between blocks, the weights' copies; and the
calibration's time for one CPU layer (alone, and with the busy factor) from the bench JSON the row is in.

    python3 benches/trace_summary.py TRACE.json BENCH.json [--preset opt-30b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zstream
from replay_predictions import preset_of
from zstream.foundations.models import family_for
from zstream.planning.batch import ComputeModel, micro_batches
from zstream.planning.residency import cpu_layers_of


def step_summaries(events: List[Dict[str, Any]], cpu: set, streamed: int) -> List[Dict[str, float]]:
    """Per traced step (``streamed`` compute events each): ms on the CPUs' layers, on the device's, the pass's span
    over its streamed blocks and the gaps in it; the CPU layers' median."""
    compute = sorted((e for e in events if e.get("ph") == "X" and e["tid"] == 3), key=lambda e: e["ts"])
    out = []
    for k in range(0, len(compute) - streamed + 1, streamed):
        step = compute[k:k + streamed]
        on_cpus = [e["dur"] / 1e3 for e in step if int(e["name"].split()[1]) in cpu]
        device = [e["dur"] / 1e3 for e in step if int(e["name"].split()[1]) not in cpu]
        span = (step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]) / 1e3
        out.append({"cpu_layers": len(on_cpus), "cpu_ms": sum(on_cpus),
                    "cpu_layer_median_ms": statistics.median(on_cpus) if on_cpus else 0.0,
                    "device_ms": sum(device), "span_ms": span, "gaps_ms": span - sum(on_cpus) - sum(device)})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("bench")
    p.add_argument("--preset", help="the synthetic preset (default: from the bench JSON's model name)")
    a = p.parse_args(argv)
    doc = json.loads(Path(a.bench).read_text())
    row = next(r for r in doc["rows"] if r.get("kv_offload") in ("split", "host-compute"))
    family = family_for(zstream.synthetic.PRESETS[a.preset or preset_of(doc["meta"])])
    n = family.num_blocks
    cpu = set(cpu_layers_of(n, row["kv_cpu_layers"]) if row["kv_offload"] == "split" else range(n))
    events = json.loads(Path(a.trace).read_text())["traceEvents"]
    for s in step_summaries(events, cpu, row["streamed_blocks"]):
        print(" ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    copies = [e["dur"] / 1e3 for e in events if e.get("ph") == "X" and e["tid"] == 2]
    print(f"copies {len(copies)}, median {statistics.median(copies):.2f} ms")
    cm = ComputeModel.from_dict(doc["meta"]["compute_models"][row["predicted_compute"]])
    context = row["prompt"] + row["gen"] / 2
    parts = micro_batches(row["batch"], row.get("micro_batch"))
    alone, busy = (sum(cm.decode_block_s(b, context, "host-compute", link_busy=share) for b in parts)
                   for share in (0.0, 1.0))  # the link copying beside none of it, and all of it
    print(f"calibrated CPU layer: {alone * 1e3:.1f} ms alone, {busy * 1e3:.1f} with the busy factor "
          f"{cm.cpu_busy_factor or 1.0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
