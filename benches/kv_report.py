"""The KV cache's placements on the H200 (issue 17): tokens/s against batch for each placement, the batch planner's
prediction beside each measured row, and the planner's prediction for a GH200.

    python3 benches/kv_report.py                 # writes benches/results/kv_h200_2026-12-04.json and the figure
    python3 benches/kv_report.py --no-plot       # the JSON only (no matplotlib needed)

Inputs (bloom-7b1 fp16, a 16 GiB budget, prompt 512, gen 32, micro-batches of 16, each batch planned on its own;
``bash benches/gpu_session.sh bench-kv`` with ``KV_MICRO=16 KV_PREDICT=1 KV_OFFLOADS=none,host,host-compute,split``):
``raw/h200-2026-12-04-run3-bench_kv.json`` (batches 8-64, one process: the measured curves),
``raw/h200-2026-12-04-run4-bench_kv.json`` (batches 8 and 16 again with their predictions, and the planner's own
choice, ``KV_PLANNED=128``) and ``raw/h200-2026-12-04-run5-bench_kv.json`` (batches 8 and 64 with the planner that
times the host cache's prefill). Each prediction is the planner's, calibrated on the card in the row's own process.
The GH200 prediction takes the H100's compute model of bloom-7b1 (``raw/h100-2026-11-26-planner-calibration.json``:
the H200 runs did not keep theirs) at the GH200's link.

Outputs: ``benches/results/kv_h200_2026-12-04.json`` and ``docs/img/kv_tokens_vs_batch.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import ComputeModel, ModelSizes, choose_batch
from zstream.planning.facts import facts_from_shapes

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "benches" / "results" / "raw"
RUNS = {run: RAW / f"h200-2026-12-04-run{run}-bench_kv.json" for run in (3, 4, 5)}
CALIBRATION = RAW / "h100-2026-11-26-planner-calibration.json"
OUT = ROOT / "benches" / "results" / "kv_h200_2026-12-04.json"
FIGURE = ROOT / "docs" / "img" / "kv_tokens_vs_batch.png"
GH200_LINK_GBPS = 375.0  # host-to-device copies over NVLink-C2C (ANCHORS: 375-380 measured)


def sizes() -> ModelSizes:
    family = family_for(zstream.synthetic.PRESETS["bloom-7b1"])
    return ModelSizes.of(facts_from_shapes(family, torch.float16))


KEPT = ("kv_offload", "batch", "resident_blocks", "micro_batch", "prefill_s", "decode_step_s", "tokens_per_s",
        "bound_gbps", "predicted_tokens_per_s", "predicted_decode_step_s", "predicted_prefill_s", "planned")


def measured_rows() -> List[Dict[str, Any]]:
    """Every row of the three runs, with its run and measured / predicted where it was predicted."""
    out = []
    for run, path in RUNS.items():
        for r in json.loads(path.read_text())["rows"]:
            row = {"run": run, **{k: r[k] for k in KEPT if k in r}}
            if r.get("predicted_tokens_per_s"):
                row["predicted_over_measured"] = r["predicted_tokens_per_s"] / r["tokens_per_s"]
            out.append(row)
    return out


def gh200(compute: ComputeModel) -> Dict[str, Any]:
    """The planner's best plan at 16 GiB with the KV cache on the device and brought up from host memory, at the
    GH200's link: the seed's experiment 2 (offload allowed batch 32 against 16, 1.5x the throughput)."""
    out: Dict[str, Any] = {"link_gbps": GH200_LINK_GBPS, "compute": "H100 80GB (the GH200's GPU is an H100 or H200)"}
    for kv in ("none", "host"):
        plan = choose_batch(sizes(), compute, budget=parse_bytes("16GiB"), prompt=512, gen=32,
                            link_gbps=GH200_LINK_GBPS, stream="cpu", max_batch=64, kv_offloads=(kv,),
                            micro_batch_sizes=(None, 8, 16, 32))
        assert plan.best is not None
        out[kv] = {"best": plan.best.to_dict(), "max_batch": plan.max_batch()}
    out["host_over_none"] = out["host"]["best"]["tokens_per_s"] / out["none"]["best"]["tokens_per_s"]
    return out


def plot(rows: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    names = {"none": "cache on the device", "host": "cache brought up from host memory",
             "host-compute": "attention on the host's CPUs", "split": "split between them"}
    for kv, label in names.items():
        mine = sorted((r for r in rows if r["kv_offload"] == kv and r["run"] == 3), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=label)
        pred = [r for r in rows if r["kv_offload"] == kv and r["run"] == 5 and "predicted_tokens_per_s" in r]
        ax.scatter([r["batch"] for r in pred], [r["predicted_tokens_per_s"] for r in pred], marker="x",
                   color=ax.lines[-1].get_color())
    chosen = [r for r in rows if r.get("planned")]
    ax.scatter([r["batch"] for r in chosen], [r["tokens_per_s"] for r in chosen], marker="*", s=120, color="black",
               label="the planner's choice, measured (every block resident)")
    ax.scatter([], [], marker="x", color="gray", label="planner's prediction (run 5)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("tokens/s (prompt 512, 32 new tokens)")
    ax.set_title("bloom-7b1 fp16 on an H200 with a 16 GiB budget", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args()
    rows = measured_rows()
    for r in rows:
        pred = r.get("predicted_tokens_per_s")
        print(f"run {r['run']} {r['kv_offload']:>12} batch {r['batch']:3d} resident {r['resident_blocks']:2d}: step "
              f"{r['decode_step_s'] * 1e3:6.1f} ms, {r['tokens_per_s']:6.1f} tok/s"
              + (f"; predicted {pred:6.1f} tok/s (predicted / measured {r['predicted_over_measured']:.3f})"
                 if pred else ""))
    prediction = gh200(ComputeModel.from_dict(json.loads(CALIBRATION.read_text())["compute"]))
    for kv in ("none", "host"):
        b = prediction[kv]["best"]
        print(f"GH200 predicted, kv {kv}: best batch {b['batch']}, {b['resident_blocks']} resident, micro "
              f"{b.get('micro_batch')}, {b['tokens_per_s']:.1f} tok/s; largest batch {prediction[kv]['max_batch']}")
    print(f"GH200 predicted: host / none = {prediction['host_over_none']:.2f}x")
    meta = json.loads(RUNS[3].read_text())["meta"]
    OUT.write_text(json.dumps({"meta": meta, "rows": rows, "gh200_prediction": prediction}, indent=1))
    if not a.no_plot:
        plot(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
