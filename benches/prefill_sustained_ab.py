"""A prefill block timed as the calibration times it against the same block run as a pass runs it, in one process
(issue 17; docs/performance.md item 32): the calibration's sample (``calibrate._seconds`` over ``min_sample_s``:
one call or a few after a warm-up) against ``--blocks`` calls back to back, a whole pass of them (the GPU loaded for
0.1-1.4 s, long enough for its power cap to lower the clock).

    python3 benches/prefill_sustained_ab.py bloom-7b1 --batch 1,8,16,64 --prompt 512 --rounds 3 --json out.json

The model is a preset's shapes (or a config.json) on random weights, one block of them; nothing is read from disk.
The two ways alternate, round by round, so that the host's drift falls on both. Prints each batch's block (ms)
both ways and their ratio: about 1.07 where the prefill ran slower than calibrated for its clock (item 32's
prediction), about 1 where it did not.

Three more ways tell why a block sampled from an idle GPU ran faster than one in a pass at the same SM clock (run 3
of 2026-12-05: 2.67 ms at batch 8 in the first round, 3.15-3.22 in the later ones, 3.03-3.07 in a pass; item 35):
the sample taken right after ``--preload-s`` of the largest batch's block back to back ("after load": the GPU's
recent work), after ``--idle-s`` of sleep ("after idle"), and after ``torch.cuda.empty_cache()`` ("after
empty_cache": the caching allocator's state, which the first large batch changes for the rest of the process).
``--ways sample,pass`` times the first two only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from ab_args import ab_parser, ab_setup  # a sibling script
from zstream.streaming import calibrate
from zstream.streaming.weights import attention_kernels

WAYS = ("calibration's sample", "sustained pass", "after load", "after idle", "after empty_cache")
SHORT = dict(zip(("sample", "pass", "load", "idle", "empty"), WAYS))  # --ways names them so


def sustained_s(call: Any, device: torch.device, blocks: int) -> float:
    """Seconds a call of ``blocks`` calls back to back, one synchronisation at the end (as a pass of that many
    blocks runs them), after one warm-up call."""
    call()
    calibrate._sync(device)
    t0 = time.perf_counter()
    for _ in range(blocks):
        call()
    calibrate._sync(device)
    return (time.perf_counter() - t0) / blocks


def preloaded_s(call: Any, load: Any, device: torch.device, preload_s: float, min_sample_s: float) -> float:
    """The calibration's sample of ``call`` right after ``load`` ran back to back for ``preload_s`` (no pause)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < preload_s:
        load()
        calibrate._sync(device)
    return calibrate._seconds(call, device, min_sample_s)


def idled_s(call: Any, device: torch.device, idle_s: float, min_sample_s: float) -> float:
    """The calibration's sample of ``call`` after the GPU sat idle for ``idle_s``."""
    calibrate._sync(device)
    time.sleep(idle_s)
    return calibrate._seconds(call, device, min_sample_s)


def emptied_s(call: Any, device: torch.device, min_sample_s: float) -> float:
    """The calibration's sample of ``call`` after the caching allocator gave its free segments back."""
    calibrate._sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return calibrate._seconds(call, device, min_sample_s)


def time_way(way: str, call: Any, heaviest: Any, device: torch.device, a: argparse.Namespace, blocks: int,
             min_sample_s: float) -> float:
    """One block call's seconds, timed the ``way`` asked (``WAYS``)."""
    if way == SHORT["sample"]:
        return calibrate._seconds(call, device, min_sample_s)
    if way == SHORT["pass"]:
        return sustained_s(call, device, blocks)
    if way == SHORT["load"]:
        return preloaded_s(call, heaviest, device, a.preload_s, min_sample_s)
    if way == SHORT["idle"]:
        return idled_s(call, device, a.idle_s, min_sample_s)
    return emptied_s(call, device, min_sample_s)


def main(argv: Any = None) -> int:
    p = ab_parser(__doc__, batch="1,8,16,64", rounds=3)
    p.add_argument("--blocks", type=int, default=0, help="calls in a sustained pass (0: the model's blocks)")
    p.add_argument("--ways", default="sample,pass,load,idle,empty",
                   help=f"which ways, in a round's order: {', '.join(SHORT)}")
    p.add_argument("--preload-s", type=float, default=0.5, help="'after load': seconds of the largest batch first")
    p.add_argument("--idle-s", type=float, default=1.0, help="'after idle': seconds of sleep first")
    a = p.parse_args(argv)
    device, dtype, family, batches = ab_setup(a)
    blocks = a.blocks or family.num_blocks
    ways = [SHORT[w] for w in a.ways.split(",")]
    timer = calibrate._BlockTimer(family, device, dtype, a.prompt + a.gen, 0.005, 0, None)
    rounds: Dict[str, Dict[int, List[float]]] = {way: {b: [] for b in batches} for way in ways}
    with torch.inference_mode(), attention_kernels(device):
        calls = {b: timer.block_call(b, a.prompt, a.prompt) for b in batches}
        heaviest = calls[max(batches)]
        for r in range(a.rounds):
            for way in (ways if r % 2 == 0 else list(reversed(ways))):
                for b in batches:
                    rounds[way][b].append(time_way(way, calls[b], heaviest, device, a, blocks, timer.min_sample_s))
    med = {way: {b: statistics.median(ts) for b, ts in by.items()} for way, by in rounds.items()}
    out: Dict[str, Any] = {
        "model": a.model, "device": str(device), "prompt": a.prompt, "blocks": blocks, "preload_s": a.preload_s,
        "idle_s": a.idle_s, "block_s": {way: {str(b): t for b, t in v.items()} for way, v in med.items()},
        "rounds_block_s": {way: {str(b): ts for b, ts in v.items()} for way, v in rounds.items()}}
    if WAYS[0] in med:  # each way against the calibration's sample
        out["over_sample"] = {way: {str(b): med[way][b] / med[WAYS[0]][b] for b in batches}
                              for way in ways if way != WAYS[0]}
        if WAYS[1] in med:
            out["sustained_over_sample"] = out["over_sample"][WAYS[1]]
    for b in batches:
        print(f"batch {b} x {a.prompt} tokens, prefill block: "
              + ", ".join(f"{way} {med[way][b] * 1e3:.3f} ms" for way in ways)
              + (f" (a pass of {blocks}: {med[WAYS[1]][b] / med[WAYS[0]][b]:.3f}x the sample)"
                 if WAYS[0] in med and WAYS[1] in med else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
