"""The batch planner's model against GPU runs already measured: a retro-fit check, not a new benchmark.

    python3 benches/planner_retrofit.py calibrate --out calib.json      # on the GPU: bloom-7b1's compute model
    python3 benches/planner_retrofit.py check calib.json                # anywhere: predicted vs measured

``calibrate`` times one bloom-7b1 block (random fp16 weights of the real shapes) and the per-pass work on this
device (``streaming.calibrate.calibrate_compute``) over batches 1-64, prompt 512, 32 new tokens: no checkpoint is read.
``check`` predicts, with that compute model, every bloom-7b1 ``none``/``cpu`` row of
``benches/results/h100-2026-11-26.json`` (each at the link bandwidth measured in its own run) and the
``--max-batch`` search of run 12 (``raw/h100-2026-11-26-run12-max_batch.json``, 16 GiB), and prints measured /
predicted for each. The compute model comes from another session on another machine of the same kind, so the
comparison includes that machine-to-machine spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List

import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import ComputeModel, ModelSizes, ThroughputModel, choose_batch
from zstream.planning.facts import facts_from_shapes
from zstream.streaming.calibrate import calibrate_compute

ROOT = Path(__file__).resolve().parent.parent
COMBINED = ROOT / "benches" / "results" / "h100-2026-11-26.json"
RUN12 = ROOT / "benches" / "results" / "raw" / "h100-2026-11-26-run12-max_batch.json"


def bloom() -> tuple[Any, ModelSizes]:
    family = family_for(zstream.synthetic.PRESETS["bloom-7b1"])
    return family, ModelSizes.of(facts_from_shapes(family, torch.float16))


def calibrate(out: Path) -> None:
    family, _ = bloom()
    model = calibrate_compute(family, "cuda", torch.float16, max_batch=64, prompt=512, gen=32)
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "compute": model.to_dict()}, indent=1))
    for s in model.samples:
        print(s)
    print(model.decode_block, model.decode_outer, model.prefill_block, model.prefill_outer, sep="\n")


def check(calib: Path, step_overhead_s: float) -> List[Dict[str, Any]]:
    _, sizes = bloom()
    compute = ComputeModel.from_dict(json.loads(calib.read_text())["compute"])
    out: List[Dict[str, Any]] = []
    print(f"{'source':42} {'offload':7} {'budget':>6} {'batch':>5} {'res':>3} {'step ms':>8} {'pred':>7} {'ratio':>6} "
          f"{'prefill ms':>10} {'pred':>7} {'ratio':>6}")
    rows = [r for r in json.loads(COMBINED.read_text()) if r["model"] == "bloom-7b1" and r["system"] == "zstream"
            and r["offload"] in ("none", "cpu") and r["streamed_blocks"] is not None
            and r.get("weights", "fp16") == "fp16"]  # the calibration is of fp16 blocks
    for r in rows:
        tm = ThroughputModel(compute, sizes.block_bytes, r["bound_gbps"], 3, step_overhead_s,
                             device_sync=True)  # (that bench synchronised the device after each step)
        step, _, _ = tm.decode_step(r["batch"], r["resident_blocks"], r["prompt"] + r["gen"] / 2)
        prefill, _, _ = tm.prefill(r["batch"], r["resident_blocks"], r["prompt"])
        out.append({"source": r["source"], "offload": r["offload"], "gpu_memory": r["gpu_memory"],
                    "batch": r["batch"], "resident_blocks": r["resident_blocks"],
                    "decode_step_s": r["decode_step_s"], "predicted_decode_step_s": step,
                    "prefill_s": r["prefill_s"], "predicted_prefill_s": prefill})
        print(f"{r['source'][16:58]:42} {r['offload']:7} {r['gpu_memory'] or '-':>6} {r['batch']:5d} "
              f"{r['resident_blocks']:3d} {r['decode_step_s'] * 1e3:8.1f} {step * 1e3:7.1f} "
              f"{r['decode_step_s'] / step:6.2f} {r['prefill_s'] * 1e3:10.1f} {prefill * 1e3:7.1f} "
              f"{r['prefill_s'] / prefill:6.2f}")

    run12 = json.loads(RUN12.read_text())["meta"]
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=run12["h2d_gbps"],
                        stream="cpu", step_overhead_s=step_overhead_s, device_sync=True)
    print(f"\nrun 12, --max-batch at 16GiB (link {run12['h2d_gbps']:.2f} GB/s): predicted max batch "
          f"{plan.max_batch('none')} without offload, {plan.max_batch('cpu')} with (measured 7 and 36)")
    print(plan.summary())
    print(f"{'offload':7} {'batch':>5} {'res':>3} {'tok/s':>7} {'pred':>7} {'ratio':>6} {'step ms':>8} {'pred':>7} "
          f"{'ratio':>6}")
    for offload in ("none", "cpu"):
        for r in run12[f"max_batch_{offload}"]:
            c = plan.candidate(r["batch"], r["resident_blocks"])
            assert c is not None, r
            out.append({"source": "run12-max_batch", "offload": offload, "gpu_memory": "16GiB", "batch": r["batch"],
                        "resident_blocks": r["resident_blocks"], "tokens_per_s": r["tokens_per_s"],
                        "predicted_tokens_per_s": c.tokens_per_s, "decode_step_s": r["decode_step_s"],
                        "predicted_decode_step_s": c.decode_step_s})
            print(f"{offload:7} {r['batch']:5d} {r['resident_blocks']:3d} {r['tokens_per_s']:7.1f} "
                  f"{c.tokens_per_s:7.1f} {r['tokens_per_s'] / c.tokens_per_s:6.2f} {r['decode_step_s'] * 1e3:8.1f} "
                  f"{c.decode_step_s * 1e3:7.1f} {r['decode_step_s'] / c.decode_step_s:6.2f}")
    ratios = [r["decode_step_s"] / r["predicted_decode_step_s"] for r in out]
    print(f"\ndecode step, measured / predicted over {len(ratios)} rows: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")
    best = max((r for r in out if r["source"] == "run12-max_batch"), key=lambda r: r["tokens_per_s"])
    if plan.best is not None:
        print(f"run 12's measured best: batch {best['batch']} ({best['offload']}), {best['tokens_per_s']:.0f} tok/s; "
              f"predicted best: batch {plan.best.batch} ({plan.best.offload}, {plan.best.resident_blocks} resident), "
              f"{plan.best.tokens_per_s:.0f} tok/s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("check")
    k.add_argument("calib", type=Path)
    k.add_argument("--step-overhead-ms", type=float, default=0.0)
    k.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.cmd == "calibrate":
        calibrate(a.out)
    else:
        rows = check(a.calib, a.step_overhead_ms / 1e3)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
