"""A ``zstream bench --trace`` of a "split" or "host-compute" row, summed up per traced decode step: the streamed
blocks' compute on the CPUs' layers and on the device's, the gaps between blocks, the weights' copies; and the
calibration's time for one CPU layer (alone, and with the busy factor) from the bench JSON the row is in.

    python3 benches/trace_summary.py TRACE.json BENCH.json [--preset opt-30b]

With ``--prefill``, a ``zstream bench --trace-prefill`` of the first streamed row: each streamed block's prefill
against the calibration's time for it, and their medians' ratio (issue 17: the prefill runs slower than predicted;
docs/performance.md items 32 and 35).
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


def prefill_summary(events: List[Dict[str, Any]], cm: ComputeModel, row: Dict[str, Any], n: int) -> Dict[str, Any]:
    """A traced prefill's streamed blocks, each against its calibrated prefill block (over the row's micro-batches;
    a split's layers on the CPUs timed as "host-compute", the others as "host"): ms each way, medians, their ratio."""
    kv = row.get("kv_offload", "none")
    cpu = set(cpu_layers_of(n, row["kv_cpu_layers"])) if kv == "split" else set()
    parts = micro_batches(row["batch"], row.get("micro_batch"))
    blocks = sorted((e for e in events if e.get("ph") == "X" and e["tid"] == 3), key=lambda e: e["ts"])
    measured, calibrated = [], []
    for e in blocks:
        i = int(e["name"].split()[1])
        kind = ("host-compute" if i in cpu else "host") if kv == "split" else kv
        measured.append(e["dur"] / 1e3)
        calibrated.append(sum(cm.prefill_block_s(b, row["prompt"], kind) for b in parts) * 1e3)
    return {"blocks": len(blocks), "measured_ms": measured, "calibrated_ms": calibrated,
            "measured_median_ms": statistics.median(measured), "calibrated_median_ms": statistics.median(calibrated),
            "ratio": statistics.median(measured) / statistics.median(calibrated)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("bench")
    p.add_argument("--preset", help="the synthetic preset (default: from the bench JSON's model name)")
    p.add_argument("--prefill", action="store_true", help="the trace is of a prefill (bench --trace-prefill)")
    a = p.parse_args(argv)
    doc = json.loads(Path(a.bench).read_text())
    if a.prefill:
        row = next(r for r in doc["rows"] if r.get("streamed_blocks"))  # (the bench traces the first streamed row)
        family = family_for(zstream.synthetic.PRESETS[a.preset or preset_of(doc["meta"])])
        cm = ComputeModel.from_dict(doc["meta"]["compute_models"][row["predicted_compute"]])
        s = prefill_summary(json.loads(Path(a.trace).read_text())["traceEvents"], cm, row, family.num_blocks)
        print(f"{row.get('kv_offload', 'none')} batch {row['batch']} x {row['prompt']}: {s['blocks']} streamed blocks' "
              f"prefill, median {s['measured_median_ms']:.2f} ms against {s['calibrated_median_ms']:.2f} ms "
              f"calibrated ({s['ratio']:.3f}x)")
        return 0
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
