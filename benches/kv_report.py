"""The KV cache's placements on the H200 (issue 17): tokens/s against batch for each placement, the batch planner's
prediction beside each measured row, and the planner's prediction for a GH200.

    python3 benches/kv_report.py                 # writes benches/results/kv_h200_2026-12-03.json and the figure
    python3 benches/kv_report.py --no-plot       # the JSON only (no matplotlib needed)

Inputs: ``raw/h200-2026-12-03-run3-bench_kv.json`` (``bash benches/gpu_session.sh bench-kv``: bloom-7b1 fp16, a
16 GiB budget, prompt 512, gen 32, batches 8-64, the KV cache on the device, brought up from host memory ("host"),
and attended to on the host's CPUs ("host-compute"), each batch planned on its own) and the H100's compute model of
bloom-7b1 (``raw/h100-2026-11-26-planner-calibration.json``, ``benches/planner_retrofit.py calibrate``). The H200's
own calibration was cut off with its device time; the H100's (same SMs, less memory bandwidth) stands in for it, and
it has no timing of attention on the CPUs, so "host-compute" rows get no prediction.

Outputs: ``benches/results/kv_h200_2026-12-03.json`` and ``docs/img/kv_tokens_vs_batch.png``.
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
BENCH = RAW / "h200-2026-12-03-run3-bench_kv.json"
CALIBRATION = RAW / "h100-2026-11-26-planner-calibration.json"
OUT = ROOT / "benches" / "results" / "kv_h200_2026-12-03.json"
FIGURE = ROOT / "docs" / "img" / "kv_tokens_vs_batch.png"
GH200_LINK_GBPS = 375.0  # host-to-device copies over NVLink-C2C (ANCHORS: 375-380 measured)


def sizes() -> ModelSizes:
    family = family_for(zstream.synthetic.PRESETS["bloom-7b1"])
    return ModelSizes.of(facts_from_shapes(family, torch.float16))


def predictions(rows: List[Dict[str, Any]], compute: ComputeModel) -> List[Dict[str, Any]]:
    """Each measured row beside the planner's candidate of the same batch, residency and placement, at the link
    bandwidth measured in the row's own load."""
    out = []
    for r in rows:
        row = {k: r[k] for k in ("kv_offload", "batch", "resident_blocks", "prefill_s", "decode_step_s",
                                 "tokens_per_s", "bound_gbps")}
        if r["kv_offload"] != "host-compute":
            plan = choose_batch(sizes(), compute, budget=parse_bytes(r["gpu_memory"]), prompt=512, gen=32,
                                link_gbps=r["bound_gbps"], stream="cpu", max_batch=r["batch"],
                                kv_offloads=(r["kv_offload"],))
            c = plan.candidate(r["batch"], r["resident_blocks"], r["kv_offload"])
            if c is not None:
                row.update(predicted_tokens_per_s=c.tokens_per_s, predicted_decode_step_s=c.decode_step_s,
                           measured_over_predicted=r["tokens_per_s"] / c.tokens_per_s)
        out.append(row)
    return out


def gh200(compute: ComputeModel) -> Dict[str, Any]:
    """The planner's best plan at 16 GiB with the KV cache on the device and brought up from host memory, at the
    GH200's link: the seed's experiment 2 (offload allowed batch 32 against 16, 1.5x the throughput)."""
    out: Dict[str, Any] = {"link_gbps": GH200_LINK_GBPS, "compute": "H100 80GB (the GH200's GPU is an H100 or H200)"}
    for kv in ("none", "host"):
        plan = choose_batch(sizes(), compute, budget=parse_bytes("16GiB"), prompt=512, gen=32,
                            link_gbps=GH200_LINK_GBPS, stream="cpu", max_batch=64, kv_offloads=(kv,))
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
             "host-compute": "attention on the host's CPUs"}
    for kv, label in names.items():
        mine = sorted((r for r in rows if r["kv_offload"] == kv), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=label)
        pred = [r for r in mine if "predicted_tokens_per_s" in r]
        if pred:
            note = " (copies ahead, which the measured build lacked)" if kv == "host" else ""
            ax.plot([r["batch"] for r in pred], [r["predicted_tokens_per_s"] for r in pred], linestyle=":",
                    color=ax.lines[-1].get_color(), label=f"{label}: planner{note}")
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
    bench = json.loads(BENCH.read_text())
    compute = ComputeModel.from_dict(json.loads(CALIBRATION.read_text())["compute"])
    rows = predictions(bench["rows"], compute)
    for r in rows:
        pred = r.get("predicted_tokens_per_s")
        print(f"{r['kv_offload']:>12} batch {r['batch']:3d} resident {r['resident_blocks']:2d}: step "
              f"{r['decode_step_s'] * 1e3:6.1f} ms, {r['tokens_per_s']:6.1f} tok/s"
              + (f"; predicted {pred:6.1f} tok/s (measured / predicted {r['measured_over_predicted']:.3f})"
                 if pred else ""))
    prediction = gh200(compute)
    for kv in ("none", "host"):
        b = prediction[kv]["best"]
        print(f"GH200 predicted, kv {kv}: best batch {b['batch']}, {b['resident_blocks']} resident, "
              f"{b['tokens_per_s']:.1f} tok/s; largest batch {prediction[kv]['max_batch']}")
    print(f"GH200 predicted: host / none = {prediction['host_over_none']:.2f}x")
    OUT.write_text(json.dumps({"meta": bench["meta"], "rows": rows, "gh200_prediction": prediction}, indent=1))
    if not a.no_plot:
        plot(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
