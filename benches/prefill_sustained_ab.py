"""A prefill block timed as the calibration times it against the same block run as a pass runs it, in one process
(issue 17; docs/performance.md item 32): the calibration's sample (``calibrate._seconds`` over ``min_sample_s``:
one call or a few after a warm-up) against ``--blocks`` calls back to back, a whole pass of them (the GPU loaded for
0.1-1.4 s, long enough for its power cap to lower the clock).

    python3 benches/prefill_sustained_ab.py bloom-7b1 --batch 1,8,16,64 --prompt 512 --rounds 3 --json out.json

The model is a preset's shapes (or a config.json) on random weights, one block of them; nothing is read from disk.
The two ways alternate, round by round, so that the host's drift falls on both. Prints each batch's block (ms)
both ways and their ratio: about 1.07 where the prefill ran slower than calibrated for its clock (item 32's
prediction), about 1 where it did not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for
from zstream.streaming import calibrate
from zstream.streaming.weights import attention_kernels

WAYS = ("calibration's sample", "sustained pass")


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


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a preset name or a config.json")
    p.add_argument("--batch", default="1,8,16,64", help="comma-separated batches")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=32, help="the cache is as long as prompt + gen, as a run's")
    p.add_argument("--blocks", type=int, default=0, help="calls in a sustained pass (0: the model's blocks)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), torch.float16 if a.device.startswith("cuda") else torch.float32
    family = family_for(resolve_config(a.model))
    blocks = a.blocks or family.num_blocks
    batches = [int(b) for b in a.batch.split(",")]
    timer = calibrate._BlockTimer(family, device, dtype, a.prompt + a.gen, 0.005, 0, None)
    rounds: Dict[str, Dict[int, List[float]]] = {way: {b: [] for b in batches} for way in WAYS}
    with torch.inference_mode(), attention_kernels(device):
        calls = {b: timer.block_call(b, a.prompt, a.prompt) for b in batches}
        for r in range(a.rounds):
            for way in (WAYS if r % 2 == 0 else tuple(reversed(WAYS))):
                for b in batches:
                    t = (calibrate._seconds(calls[b], device, timer.min_sample_s) if way == WAYS[0]
                         else sustained_s(calls[b], device, blocks))
                    rounds[way][b].append(t)
    med = {way: {b: statistics.median(ts) for b, ts in by.items()} for way, by in rounds.items()}
    out = {"model": a.model, "device": str(device), "prompt": a.prompt, "blocks": blocks,
           "block_s": {way: {str(b): t for b, t in v.items()} for way, v in med.items()},
           "rounds_block_s": {way: {str(b): ts for b, ts in v.items()} for way, v in rounds.items()},
           "sustained_over_sample": {str(b): med[WAYS[1]][b] / med[WAYS[0]][b] for b in batches}}
    for b in batches:
        short, long = med[WAYS[0]][b], med[WAYS[1]][b]
        print(f"batch {b} x {a.prompt} tokens: prefill block {short * 1e3:.3f} ms as calibrated, {long * 1e3:.3f} ms "
              f"in a pass of {blocks} ({long / short:.3f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
