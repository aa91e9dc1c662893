"""Rows of ``zstream bench --predict`` replayed through this build's planner, from the calibration each row stored.

    python3 benches/replay_predictions.py benches/results/raw/h200-2026-12-04-run1[3-9]-bench_*.json
    python3 benches/replay_predictions.py --busy-factor FILES...   # older calibrations: the CPUs' slow-down beside
                                                                   # the link recomputed from their own shared probe

Each row's prediction was made by a calibration timed in the row's own process and kept in the JSON
(``meta.compute_models[row.predicted_compute]``). Replaying it through ``choose_batch`` with the row's batch,
residency, KV placement, CPU layers, micro-batch and link gives the prediction this build's model makes from the same
timings: a change to the model is checked against every run already measured, without the GPU. With the build that
made the row, the replay equals the stored prediction (the test of this script checks that). Quantized rows are
listed but not replayed (their sizes come from the packed checkpoint, not from the config).

``--busy-factor``: a calibration from before format 5 has no ``cpu_busy_factor``; it is recomputed here from the
calibration's own shared probe and host-compute samples, as ``calibrate_compute`` now computes it
(docs/performance.md, item 25).

Beside each row: the stored prediction's prefill and decode step, measured over predicted (``prefill``, ``step``),
the replayed decode step (``step ms``) and the measured prefill over the replayed one (``re-pre``).

``--prefill seconds`` (or ``relative``): the prefill's fits taken again from the calibration's stored samples in
seconds, as this build's calibration fits them (``calibrate.prefill_fit``, format 14 on), or in relative error, as
formats 13 and before did (docs/performance.md item 44).

``--eager whole``: the eager step's extra over its blocks and outer work (``ComputeModel.decode_eager_extra``, format
16 on) taken again from the stored samples as this build's calibration takes it: each point's whole step's median
less its parts' medians (``calibrate.eager_extra_fit``, format 17), where format 16 took the median of each round's
difference (docs/performance.md item 47).

``--step-wait tokens``: the rows replayed as a generation runs its decode loop, each step waiting for its tokens
only (this build's bench); by default each row is replayed as its steps were timed (before ``step_wait`` was
recorded, the bench synchronised the whole device after each step: ``ThroughputModel.device_sync``).

``--cpu-fit seconds``: the host-compute decode block fitted again from its stored points in seconds instead of
relative error, as the prefill is (item 57: tried, not adopted).

``--cpu-rounds min`` (or ``low2``, the second lowest): the CPUs' decode points (host-compute blocks, split pairs)
refitted from each point's rounds by that statistic instead of their median, and the busy factor with them: what a
calibration that keeps the least disturbed rounds of a CPU point would have predicted (item 30). ``--cpu-rounds
calm``: from the median of the rounds this build's calibration keeps (``calibrate.calm_rounds``, item 31; it also
times the CPUs' points again where rounds were dropped, which a replay cannot); its rounds are scored on the slower
half of the points since format 19 (item 59). ``calm-every``: scored on every point, as formats 7-18 did; ``late``:
the rounds after the first two (item 59: tried, not adopted); ``calm-fastest``, ``calm-slowest``: the calm rounds'
extremes.

``--pool-lease`` (a diagnostic): each CPU point taken from every calibration of the row's file, one lease, as the
median of all the rounds they kept (``--cpu-rounds`` picks which), calibrations made after the row included: how
far the CPU rows would come from a calibration that sampled the lease's CPUs for longer (item 61).

``--band``: each row attended on the CPUs replayed from its calm rounds' slowest and fastest as well, and a count of
the rows whose measured tokens/s fell within that band, above or below it (item 56: whether any statistic of the
calibration's rounds could have predicted them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import ComputeModel, Linear3, ModelSizes, choose_batch
from zstream.planning.facts import facts_from_shapes
from zstream.streaming.calibrate import (
    CALM_ROUND_TOLERANCE,
    _cpu_busy_factor,
    calm_rounds,
    eager_extra_fit,
    prefill_fit,
    prefill_points,
)


def preset_of(meta: Dict[str, Any]) -> str:
    """The synthetic preset a bench JSON's model was made from (``opt-30b-in-memory`` -> ``opt-30b``; a path to the
    preset's cached checkpoint -> its directory's name)."""
    name = Path(str(meta.get("model", ""))).name
    found = [p for p in zstream.synthetic.PRESETS if name == p or name.startswith(p + "-")]
    if not found:
        raise SystemExit(f"{name!r}: not a synthetic preset's checkpoint; give --preset")
    return max(found, key=len)


def dtype_of(key: str) -> torch.dtype:
    """The dtype a calibration was timed in, from its key (``streaming.calibrate.compute_key`` names it)."""
    names = [w for w in key.split() if w in ("float16", "bfloat16", "float32")]
    if not names:
        raise SystemExit(f"no dtype in the calibration key {key[:80]!r}...")
    return getattr(torch, names[0])


def busy_factor(compute: ComputeModel, family: Any, dtype: torch.dtype) -> Optional[float]:
    """``cpu_busy_factor`` from a stored calibration's samples: its busy shared windows (their calls counted from
    the bytes the CPUs read, where an older probe did not record them) against its host-compute block at the
    probe's point, the largest batch x keys timed."""
    host = [s for s in compute.samples if s.get("kv_offload") == "host-compute" and s.get("phase") == "decode"]
    if not host:
        return None
    top = max(host, key=lambda s: (s["batch"] * s["keys"], s["keys"]))
    per_call = top["batch"] * top["keys"] * family.num_kv_heads * family.head_dim * 2 * dtype.itemsize
    busy = [{**s, "calls": s.get("calls") or s["cpu_bytes"] / per_call} for s in compute.samples
            if s.get("phase") == "shared" and s.get("link_busy")]
    return _cpu_busy_factor(host, busy, top["batch"] * top["keys"])


CPU_ROUNDS = {"median": statistics.median, "min": min, "low2": lambda xs: sorted(xs)[min(1, len(xs) - 1)],
              "calm": statistics.median,  # "calm": the median of the rounds ``calibrate.calm_rounds`` keeps
              "calm-every": statistics.median,  # the same, every point scoring a round (formats 7-18, item 31)
              "late": statistics.median,  # the rounds after the first LATE_FROM (a warm-up dropped)
              "calm-fastest": min, "calm-slowest": max}  # the calm rounds' extremes: ``--band``'s edges
LATE_FROM = 2


def kept_rounds(rounds_by_point: List[List[float]], how: str, tolerance: float) -> Optional[List[int]]:
    """The rounds (indices) a refit by ``how`` keeps; None for all. "calm": this build's ``calibrate.calm_rounds``
    (its rounds scored on the slower half of the points, item 59); "calm-every": scored on every point, as formats
    7-18 did (item 31); "late": every round from the third on, as if the first two were a warm-up."""
    if how in ("calm", "calm-every", "calm-fastest", "calm-slowest"):
        return calm_rounds(rounds_by_point, tolerance, **({"scored_share": 1.0} if how == "calm-every" else {}))
    if how == "late":
        n = min(len(r) for r in rounds_by_point)
        return list(range(min(LATE_FROM, n - 1), n))
    return None


def cpu_points(compute: ComputeModel) -> List[Dict[str, Any]]:
    """The CPUs' decode points of ``compute`` that kept their rounds: host-compute blocks, split pairs."""
    return [s for s in compute.samples if s.get("kv_offload") in ("host-compute", "split")
            and s.get("phase") == "decode" and s.get("block_rounds_s")]


def refit_cpu_points(compute: ComputeModel, family: Any, dtype: torch.dtype, how: str,
                     tolerance: float = CALM_ROUND_TOLERANCE) -> None:
    """The CPUs' decode points of ``compute`` refitted from their rounds by ``CPU_ROUNDS[how]`` (in place): the
    host-compute decode block, the split pair, and the busy factor (which divides by the host-compute block). With
    "calm", from the rounds a calibration of this build keeps (its ``calm_rounds`` over the stored rounds; a
    calibration of format 7 or later stored them already), ``tolerance`` its ``CALM_ROUND_TOLERANCE``."""
    pick = CPU_ROUNDS[how]
    for s, rounds in _kept(compute, how, tolerance):
        s["block_s"] = pick(rounds)
    _refit_cpu_fits(compute, family, dtype)


def _kept(compute: ComputeModel, how: str, tolerance: float) -> List[Tuple[Dict[str, Any], List[float]]]:
    points = cpu_points(compute)
    kept = kept_rounds([s["block_rounds_s"] for s in points], how, tolerance) if points else None
    return [(s, s["block_rounds_s"] if kept is None else [s["block_rounds_s"][i] for i in kept]) for s in points]


def _refit_cpu_fits(compute: ComputeModel, family: Any, dtype: torch.dtype) -> None:
    def fit(kv: str) -> Optional[Linear3]:
        pts = [(s["batch"], s["keys"], s["block_s"]) for s in compute.samples
               if s.get("kv_offload") == kv and s.get("phase") == "decode"]
        return Linear3.fit(pts) if pts else None
    host = fit("host-compute")
    if host is not None and "host-compute" in compute.kv_blocks:
        compute.kv_blocks["host-compute"] = (host, compute.kv_blocks["host-compute"][1])
    if compute.split_pair is not None:
        compute.split_pair = fit("split")
    if compute.cpu_busy_factor is not None:
        compute.cpu_busy_factor = busy_factor(compute, family, dtype)


PointKey = Tuple[str, int, int]  # (kv_offload, batch, keys)


def lease_points(models: List[Dict[str, Any]], how: str = "median",
                 tolerance: float = CALM_ROUND_TOLERANCE) -> Dict[PointKey, float]:
    """Each CPU point's time over every calibration of one file (one lease): the median of all the rounds the
    calibrations kept of it (``how`` as ``--cpu-rounds`` picks the rounds: "calm" and its kin keep each
    calibration's calm rounds, "late" the rounds after the first two, the others every round). A diagnostic, not a
    prediction: a row's pooled point includes calibrations made after it. It says how far the rows would come from
    a calibration that sampled the lease's CPUs for longer."""
    pooled: Dict[PointKey, List[float]] = {}
    for m in models:
        for s, rounds in _kept(ComputeModel.from_dict(m), how, tolerance):
            pooled.setdefault((s["kv_offload"], s["batch"], s["keys"]), []).extend(rounds)
    return {k: statistics.median(v) for k, v in pooled.items()}


def use_lease_points(compute: ComputeModel, family: Any, dtype: torch.dtype, pooled: Dict[PointKey, float]) -> None:
    """The CPUs' decode points of ``compute`` set to the lease's pooled times (``lease_points``), refitted."""
    for s in cpu_points(compute):
        s["block_s"] = pooled.get((s["kv_offload"], s["batch"], s["keys"]), s["block_s"])
    _refit_cpu_fits(compute, family, dtype)


def refit_cpu_block_in_seconds(compute: ComputeModel) -> None:
    """The host-compute decode block of ``compute`` fitted again from its stored points in seconds instead of relative
    error (in place): the fit then passes nearer its slowest, largest-batch points, where the rows run, at the cost
    of the small batches (item 57; the prefill is fitted so since format 14)."""
    pts = [(s["batch"], s["keys"], s["block_s"]) for s in compute.samples
           if s.get("kv_offload") == "host-compute" and s.get("phase") == "decode"]
    if pts and "host-compute" in compute.kv_blocks:
        compute.kv_blocks["host-compute"] = (Linear3.fit(pts, relative=False), compute.kv_blocks["host-compute"][1])


PREFILL_FITS: Dict[str, Callable[[List[Tuple[float, float, float]]], Linear3]] = {
    "seconds": prefill_fit, "relative": Linear3.fit}  # this build's calibration's (format 14 on), and the one before


def refit_prefill(compute: ComputeModel, how: str) -> None:
    """Every prefill fit of ``compute`` taken again from its stored samples by ``PREFILL_FITS[how]`` (in place): the
    device block and the pass's outer work, each host placement's block, the split pair."""
    fit_points = PREFILL_FITS[how]
    if prefill_points(compute.samples):
        compute.prefill_block = fit_points(prefill_points(compute.samples))
        compute.prefill_outer = fit_points(prefill_points(compute.samples, what="outer_s"))

    def fit(kv: str) -> Optional[Linear3]:
        pts = prefill_points(compute.samples, kv)
        return fit_points(pts) if pts else None
    for kv, (decode, prefill) in compute.kv_blocks.items():
        compute.kv_blocks[kv] = (decode, fit(kv) or prefill)
    if compute.split_pair_prefill is not None:
        compute.split_pair_prefill = fit("split")


def replay_row(row: Dict[str, Any], meta: Dict[str, Any], preset: str, recompute_busy: bool,
               cpu_rounds: str = "median", tolerance: float = CALM_ROUND_TOLERANCE,
               step_wait: str = "row", prefill: str = "stored", eager: str = "stored",
               cpu_fit: str = "stored", pooled: Optional[Dict[PointKey, float]] = None) -> Dict[str, Any]:
    """The row's stored and replayed predictions, each over its measured tokens/s (None where not replayed), the
    replayed decode step and the measured prefill over the replayed one. ``step_wait``: "row", the loop as the row's
    steps were timed (its ``step_wait``: before it was recorded, the bench synchronised the device after each step);
    "tokens" or "device", that loop. ``prefill``: "seconds" or "relative", the prefill's fits taken again from
    the samples so (``refit_prefill``). ``eager``: "whole", the eager step's extra taken again from the samples as
    this build takes it (``calibrate.eager_extra_fit``; a calibration without whole eager steps keeps none).
    ``cpu_fit``: "seconds", the host-compute decode block fitted again in seconds (``refit_cpu_block_in_seconds``).
    ``pooled``: the CPUs' points taken from the whole lease's calibrations (``lease_points``)."""
    out = {"kv_offload": row["kv_offload"], "batch": row["batch"], "micro_batch": row.get("micro_batch"),
           "kv_cpu_layers": row.get("kv_cpu_layers"), "measured": row["tokens_per_s"],
           "stored": row.get("predicted_tokens_per_s"), "replayed": None, "replayed_step_s": None,
           # the stored prediction's phases, measured over predicted
           "prefill_ratio": _over(row.get("prefill_s"), row.get("predicted_prefill_s")),
           "step_ratio": _over(row.get("decode_step_s"), row.get("predicted_decode_step_s"))}
    if row.get("quantize") or row.get("predicted_compute") not in meta.get("compute_models", {}):
        return out
    family = family_for(zstream.synthetic.PRESETS[preset])
    compute = ComputeModel.from_dict(meta["compute_models"][row["predicted_compute"]])
    dtype = dtype_of(compute.key)
    if recompute_busy and compute.cpu_busy_factor is None:
        compute.cpu_busy_factor = busy_factor(compute, family, dtype)
    if cpu_rounds != "median":
        refit_cpu_points(compute, family, dtype, cpu_rounds, tolerance)
    if pooled is not None:
        use_lease_points(compute, family, dtype, pooled)
    if cpu_fit == "seconds":
        refit_cpu_block_in_seconds(compute)
    if prefill != "stored":
        refit_prefill(compute, prefill)
    if eager == "whole":
        compute.decode_eager_extra = eager_extra_fit(compute.samples, compute.num_blocks)
    out["busy_factor"] = compute.cpu_busy_factor
    batch, micro, kv = row["batch"], row.get("micro_batch"), row["kv_offload"]
    micro = micro if micro and micro < batch else None
    resident = row["resident_blocks"]
    plan = choose_batch(ModelSizes.of(facts_from_shapes(family, dtype)), compute,
                        budget=parse_bytes(row["gpu_memory"]) if row.get("gpu_memory") else None,
                        prompt=row["prompt"], gen=row["gen"], link_gbps=row.get("predicted_link_gbps"),
                        stream="cpu" if row.get("predicted_link_gbps") else None, max_batch=batch,
                        kv_offloads=(kv,), micro_batch_sizes=(micro,),
                        kv_cpu_layers=row.get("kv_cpu_layers") if kv == "split" else None,
                        cuda_graphs=compute.decode_graph_block is not None,  # (timed where the run asked for them)
                        device_sync=(row.get("step_wait") if step_wait == "row" else step_wait) != "tokens")
    c = plan.candidate(batch, resident, kv, micro)
    out["replayed"] = c.tokens_per_s if c is not None else None
    out["replayed_step_s"] = c.decode_step_s if c is not None else None
    out["replayed_prefill_ratio"] = _over(row.get("prefill_s"), c.prefill_s if c is not None else None)
    return out


def _over(measured: Optional[float], predicted: Optional[float]) -> Optional[float]:
    return measured / predicted if measured and predicted else None


def _line(r: Dict[str, Any]) -> str:
    def ratio(x: Optional[float]) -> str:
        return f"{x / r['measured']:7.3f}" if x else f"{'-':>7}"

    def plain(x: Optional[float]) -> str:
        return f"{x:7.3f}" if x else f"{'-':>7}"
    busy = r.get("busy_factor")
    return (f"{r['file'][:44]:44} {r['kv_offload']:>12} {r['batch']:5d} {r['micro_batch'] or '-'!s:>5} "
            f"{r['kv_cpu_layers'] or 0!s:>4} {ratio(r['stored'])} {ratio(r['replayed'])} "
            f"{f'{busy:.3f}' if busy else '-':>6} {plain(r.get('prefill_ratio'))} {plain(r.get('step_ratio'))} "
            f"{plain(r['replayed_step_s'] * 1e3 if r.get('replayed_step_s') else None)} "
            f"{plain(r.get('replayed_prefill_ratio'))}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="zstream bench --predict JSON files")
    p.add_argument("--preset", help="the synthetic preset of the rows' model (default: from the JSON's model name)")
    p.add_argument("--busy-factor", action="store_true",
                   help="recompute cpu_busy_factor for calibrations stored without it")
    p.add_argument("--cpu-rounds", choices=sorted(CPU_ROUNDS), default="median",
                   help="refit the CPUs' decode points from their rounds by this statistic (default: as stored)")
    p.add_argument("--calm-tolerance", type=float, default=CALM_ROUND_TOLERANCE,
                   help="with --cpu-rounds calm or calm-every: how far from the calmest round a round is still calm")
    p.add_argument("--step-wait", choices=("row", "tokens", "device"), default="row",
                   help="the decode loop replayed: as each row's steps were timed (default), or as a generation "
                        "waits (tokens: what this build's bench measures), or synchronising the device each step")
    p.add_argument("--prefill", choices=("stored", *PREFILL_FITS), default="stored",
                   help="the prefill's fits as stored (default), or taken again from the samples in seconds (as "
                        "this build's calibration fits them) or in relative error (as formats 13 and before did)")
    p.add_argument("--eager", choices=("stored", "whole"), default="stored",
                   help="the eager step's extra as stored (default), or taken again from the samples as this build's "
                        "calibration takes it (each point's whole step's median less its parts')")
    p.add_argument("--cpu-fit", choices=("stored", "seconds"), default="stored",
                   help="the host-compute decode block's fit as stored (default, in relative error), or fitted again "
                        "from its points in seconds")
    p.add_argument("--band", action="store_true",
                   help="the rows attended on the CPUs replayed from their calm rounds' fastest and slowest too: "
                        "how many ran within that band, faster or slower")
    p.add_argument("--pool-lease", action="store_true",
                   help="a diagnostic: each CPU point from every calibration in the row's file (its lease), the "
                        "median of the rounds they kept (--cpu-rounds picks which), later calibrations included")
    p.add_argument("--json", help="write the replayed rows here")
    a = p.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    print(f"{'file':44} {'kv':>12} {'batch':>5} {'micro':>5} {'cpu':>4} {'stored':>7} {'replay':>7} {'busy':>6} "
          f"{'prefill':>7} {'step':>7} {'step ms':>7} {'re-pre':>7}")
    for f in a.files:
        doc = json.loads(Path(f).read_text())
        preset = a.preset or preset_of(doc["meta"])
        pooled = (lease_points(list(doc["meta"].get("compute_models", {}).values()), a.cpu_rounds, a.calm_tolerance)
                  if a.pool_lease else None)
        for row in doc["rows"]:
            if row.get("predicted_tokens_per_s") is None:
                continue
            r = {"file": Path(f).name, **replay_row(row, doc["meta"], preset, a.busy_factor, a.cpu_rounds,
                                                    a.calm_tolerance, a.step_wait, a.prefill, a.eager, a.cpu_fit,
                                                    pooled)}
            if a.band and row["kv_offload"] in ("host-compute", "split"):
                r["band"] = [replay_row(row, doc["meta"], preset, a.busy_factor, edge, a.calm_tolerance,
                                        a.step_wait, a.prefill, a.eager, a.cpu_fit)["replayed"]
                             for edge in ("calm-slowest", "calm-fastest")]
            rows.append(r)
            print(_line(r))
    replayed = [r["replayed"] / r["measured"] for r in rows if r["replayed"]]
    if replayed:
        near = sum(abs(x - 1) <= 0.10 for x in replayed)
        print(f"replayed within 10% of measured: {near} of {len(replayed)} rows")
    for what, key in (("stored", "prefill_ratio"), ("replayed", "replayed_prefill_ratio")):
        prefills = [r[key] for r in rows if r.get(key)]
        if prefills:
            print(f"prefill measured / predicted ({what}): median {statistics.median(prefills):.3f} over "
                  f"{len(prefills)} rows, {sum(x > 1 for x in prefills)} of them slower than predicted, "
                  f"{sum(abs(x - 1) <= 0.10 for x in prefills)} within 10%")
    if a.band:
        b = band_counts(rows)
        print(f"the CPUs' rows within their calm rounds' band (tokens/s from the slowest to the fastest): "
              f"{b['within']} of {b['rows']}; faster than the fastest {b['faster']}, "
              f"slower than the slowest {b['slower']}; out of any such prediction's 10% {b['out_of_reach']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def band_counts(rows: List[Dict[str, Any]], tolerance: float = 0.10) -> Dict[str, int]:
    """Of the rows with a ``band`` (tokens/s replayed from their calm rounds' slowest and fastest), how many
    measured within it, above it (faster than any calm round would predict) and below it; and how many no
    prediction within the band could have come within ``tolerance`` of (``out_of_reach``: the band and the
    predictions within ``tolerance`` of the row's tokens/s do not meet)."""
    banded = [r for r in rows if r.get("band") and None not in r["band"]]
    faster = sum(r["measured"] > r["band"][1] for r in banded)
    slower = sum(r["measured"] < r["band"][0] for r in banded)
    out = sum(r["band"][1] < (1 - tolerance) * r["measured"] or r["band"][0] > (1 + tolerance) * r["measured"]
              for r in banded)
    return {"rows": len(banded), "within": len(banded) - faster - slower, "faster": faster, "slower": slower,
            "out_of_reach": out}


if __name__ == "__main__":
    sys.exit(main())
