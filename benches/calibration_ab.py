"""The calibration's two host-memory probes against what they replaced, in one process (issue 17; docs/performance.md
item 19): a host-compute decode block timed on one layer's cache called again and again (the CPUs may serve it from
their last-level cache) against layers taken in turn, 1 GiB of them (read from DRAM, as the engine's 30 layers are);
and the engine's uplink bringing host layers up against the link's large-copy rate.

    python3 benches/calibration_ab.py bloom-7b1 --batch 8,16,64 --rounds 2 --json out.json

The model is a preset's shapes (or a config.json) on random weights; nothing is read from disk. The two timings
alternate, round by round, so that the host's drift falls on both. Prints each batch's host-compute block (ms) both
ways and their ratio, and the uplink's GB/s beside the link's.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Dict, List

import torch

from ab_args import ab_parser, ab_setup  # a sibling script
from zstream.foundations.measure import measure_copy, measure_h2d
from zstream.streaming import calibrate

WAYS = {"one layer": 0, "layers in turn": calibrate.HOST_WORKING_SET_BYTES}  # the working set each way


def host_compute_blocks(family: Any, device: torch.device, dtype: torch.dtype, batches: List[int], prompt: int,
                        gen: int, working_set: int) -> Dict[int, float]:
    """{batch: seconds of a host-compute decode block at the mean context}, from a fresh calibration whose decode
    blocks cycle through ``working_set`` bytes of host cache (0: one layer)."""
    calibrate._COMPUTE_CACHE.clear()
    saved = calibrate.HOST_WORKING_SET_BYTES
    calibrate.HOST_WORKING_SET_BYTES = working_set
    try:
        cm = calibrate.calibrate_compute(family, device, dtype, max_batch=max(batches), prompt=prompt, gen=gen,
                                         rounds=3, kv_offloads=("host-compute",))
    finally:
        calibrate.HOST_WORKING_SET_BYTES = saved
        calibrate._COMPUTE_CACHE.clear()
    return {b: cm.decode_block_s(b, prompt + gen / 2, "host-compute") for b in batches}


def main(argv: Any = None) -> int:
    a = ab_parser(__doc__, batch="8,16,64", rounds=2).parse_args(argv)
    device, dtype, family, batches = ab_setup(a)
    runs: Dict[str, List[Dict[int, float]]] = {way: [] for way in WAYS}
    for r in range(a.rounds):
        for way in (list(WAYS) if r % 2 == 0 else list(reversed(WAYS))):
            runs[way].append(host_compute_blocks(family, device, dtype, batches, a.prompt, a.gen, WAYS[way]))
    blocks = {way: {b: statistics.median(x[b] for x in reps) for b in batches} for way, reps in runs.items()}
    weights = calibrate._random_weights(family, family.block_tensors(0), dtype, device,
                                        torch.Generator().manual_seed(0))
    uplink = calibrate._uplink_sample(family, lambda: weights, device, dtype, max(batches), a.prompt + a.gen, 3)
    link = (measure_h2d(device, 1 << 30) if device.type == "cuda" else measure_copy(device)).gbps
    out = {"model": a.model, "device": str(device), "prompt": a.prompt, "gen": a.gen,
           "host_compute_block_s": {way: {str(b): t for b, t in v.items()} for way, v in blocks.items()},
           "rounds_host_compute_block_s": {way: [{str(b): t for b, t in x.items()} for x in reps]
                                           for way, reps in runs.items()},
           "uplink": uplink, "link_gbps": link}
    for b in batches:
        one, turn = blocks["one layer"][b], blocks["layers in turn"][b]
        print(f"batch {b}: host-compute block {one * 1e3:.2f} ms on one layer, {turn * 1e3:.2f} ms on layers in "
              f"turn ({turn / one:.3f}x)")
    print(f"uplink {uplink['gbps']:.1f} GB/s ({uplink['layers']} layers of batch {uplink['batch']}), link "
          f"{link:.1f} GB/s ({uplink['gbps'] / link:.3f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
