"""What a streamed block costs the host thread that launches a decode step: the slope of the step's time over the
number of blocks streamed, with each ring slot's views made once (``ring.SlotView``) and, interleaved in the same
process, made again at every copy as before (docs/performance.md item 48).

A decode step whose kernels launch faster than the device runs them hides this; one that is launch-bound (a small
batch, most blocks resident, eager) pays it on every streamed block. On the CPU (this script's default) the whole
step is host work, so the slope is the cost itself.

    python benches/ring_host_cost.py [--device cpu] [--streamed 0,1,2,5] [--rounds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch

import zstream
from zstream.api.synthetic import PRESETS, make_checkpoint
from zstream.interfaces.bench import run_one
from zstream.streaming.ring import DeviceRing

LAYERS = 30  # bloom-7b1's blocks, at tiny widths: the step is launches, not arithmetic


@contextlib.contextmanager
def views_every_copy() -> Iterator[None]:
    """The ring as it was before its slots' views were kept: every copy makes them, every acquire the weights."""
    keep = DeviceRing.slot_view

    def fresh(self: DeviceRing, slot: int, block: int, host: Any) -> Any:
        self.views.pop((slot, block), None)
        return keep(self, slot, block, host)

    DeviceRing.slot_view = fresh  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceRing.slot_view = keep  # type: ignore[method-assign]


def slope(xs: List[int], ys: List[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _timed(a: argparse.Namespace) -> Dict[str, Dict[int, List[float]]]:
    """{way: {blocks streamed: decode step seconds, one a round}}, the two ways interleaved on the same models."""
    streamed = [int(s) for s in a.streamed.split(",")]
    prompt, gen = 48, 33
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        make_checkpoint({**PRESETS["tiny-bloom"], "n_layer": LAYERS}, path)
        models = {n: zstream.load(str(path), offload="cpu", device=a.device, dtype=torch.float16,
                                  max_batch=a.batch, max_seq_len=prompt + gen, progress=False,
                                  max_resident_blocks=LAYERS - n, cuda_graphs=False) for n in streamed}
        steps: Dict[str, Dict[int, List[float]]] = {"kept": {n: [] for n in streamed},
                                                    "every copy": {n: [] for n in streamed}}
        for _ in range(a.rounds):
            for n, model in models.items():
                steps["kept"][n].append(run_one(model, a.batch, prompt, gen)["decode_step_s"])
                with views_every_copy():
                    steps["every copy"][n].append(run_one(model, a.batch, prompt, gen)["decode_step_s"])
        for model in models.values():
            model.close()
    return steps


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--streamed", default="0,1,2,5", help="blocks streamed, one model each")
    p.add_argument("--batch", type=int, default=7)
    p.add_argument("--rounds", type=int, default=6, help="generations per model and way, interleaved")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one launching thread, as on a GPU
    try:
        steps = _timed(a)
    finally:
        torch.set_num_threads(threads)
    streamed = sorted(steps["kept"])
    out: Dict[str, Any] = {"device": a.device, "batch": a.batch, "streamed": streamed}
    for way, by_n in steps.items():
        medians = [statistics.median(by_n[n]) for n in streamed]
        out[way] = {"step_ms": [m * 1e3 for m in medians], "per_streamed_block_ms": slope(streamed, medians) * 1e3}
        print(f"{way:>10}: step ms " + ", ".join(f"{n} streamed {m * 1e3:.3f}" for n, m in zip(streamed, medians))
              + f"; per streamed block {out[way]['per_streamed_block_ms']:.3f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
