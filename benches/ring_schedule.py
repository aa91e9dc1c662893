"""The ring's schedule as the planner plays it out (``planning.batch.ring_schedule``), against the engine's own ring
run on the CPU with every block's compute and every copy paced to a known time.

    python3 benches/ring_schedule.py [--copy-ms 20] [--block-ms 2] [--steps 8] [--json OUT]

A tiny model (``tiny-llama`` widened to ``--blocks`` blocks) loads with ``offload="cpu"`` on the CPU device seam,
``--resident`` blocks resident and the rest streamed through the ring, exactly as on a GPU: the copy stream is a
worker thread, the compute stream the calling thread, ordered by the same events. Paced: a copy takes
``--copy-ms`` on the copy stream before it lands; a block's compute takes ``--block-ms`` (it sleeps out the rest
of its time before its release). The outer work (embedding, head, the loop's own) is measured with every block
resident and paced the same way, and is the schedule's ``head_s``.

Each case runs decode steps two ways:
- waiting for its tokens only, as a generation does (the CPU's compute is the calling thread: nothing to wait for),
  the ring's copies for the next pass left to run on;
- synchronising the device after each step (``device.synchronize()``: every copy issued has landed), as
  ``zstream bench`` timed its steps before it waited for tokens only.

and sets the median step against ``steady_period`` (``device_sync`` as the loop ran), and the first pass after a
synchronisation against ``ring_schedule(...)[0]`` (the prefill's prediction). This checks the schedule's
arithmetic against the code it models without a GPU; what it cannot check is the GPU's own timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import zstream
from zstream.planning.batch import ring_schedule, steady_period
from zstream.streaming.device import CpuDevice

CASES = [  # (resident, prefetch): the residencies whose schedules differ
    (6, 2), (0, 2), (6, 1), (9, 2), (9, 1)]


class PacedDevice(CpuDevice):
    """The CPU seam, every copy taking ``copy_s`` on its stream before its bytes land."""

    def __init__(self, copy_s: float) -> None:
        super().__init__()
        self.copy_s = copy_s

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        def paced() -> None:
            time.sleep(self.copy_s)
            dst.copy_(src)

        self._enqueue(stream, paced)


class PacedBlocks:
    """Wraps a model's streamer chain: a block's compute, from its acquire to its release, takes ``block_s``."""

    def __init__(self, inner: Any, block_s: float) -> None:
        self.inner, self.block_s = inner, block_s
        self.started = 0.0

    def acquire(self, block: int) -> Any:
        w = self.inner.acquire(block)
        self.started = time.perf_counter()
        return w

    def release(self, block: int) -> None:
        left = self.started + self.block_s - time.perf_counter()
        if left > 0:
            time.sleep(left)
        self.inner.release(block)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def load_paced(path: Path, copy_s: float, block_s: float, **kw: Any) -> Any:
    device = PacedDevice(copy_s)
    from zstream.streaming import build

    real = build.device_for
    build.device_for = lambda dev: device  # type: ignore[assignment]
    try:
        model = zstream.load(path, device="cpu", offload="cpu", progress=False, **kw)
    finally:
        build.device_for = real  # type: ignore[assignment]
    model.blocks = PacedBlocks(model.blocks, block_s)
    return model, device


def steps(model: Any, device: CpuDevice, count: int, sync: bool) -> Dict[str, Any]:
    """The first pass after a synchronisation (a prefill, the ring's first copies issued by a pass before it and
    landed), then ``count`` decode steps, each timed; with ``sync`` each ends with ``device.synchronize()``."""
    cache = model.new_cache(1, count + 8)
    ids, one = torch.tensor([[5, 6, 7]]), torch.ones(1, 1, dtype=torch.long)
    model.forward(ids, torch.ones_like(ids), model.new_cache(1, 4), last_only=True)  # the ring's first copies
    device.synchronize()
    t0 = time.perf_counter()
    logits = model.forward(ids, torch.ones_like(ids), cache, last_only=True)
    first = time.perf_counter() - t0
    nxt, out = logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(count):
        t = time.perf_counter()
        nxt = model.forward(nxt, one, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        if sync:
            device.synchronize()
        out.append(time.perf_counter() - t)
    return {"first_s": first, "steps_s": out, "step_s": statistics.median(out[2:] or out)}


def head_s(path: Path, blocks: int, block_s: float, count: int) -> float:
    """The pass's time outside its blocks: every block resident, paced, less ``blocks`` x ``block_s``."""
    model, device = load_paced(path, 0.0, block_s)
    with model:
        return max(0.0, steps(model, device, count, sync=False)["step_s"] - blocks * block_s)


def run(blocks: int, copy_s: float, block_s: float, count: int, cases: List[Any]) -> Dict[str, Any]:
    config = {**zstream.PRESETS["tiny-llama"], "num_hidden_layers": blocks}
    with tempfile.TemporaryDirectory() as tmp:
        path = zstream.synthetic.make_checkpoint(config, Path(tmp) / "m", dtype=torch.float32, progress=False,
                                                 tokenizer=False)
        head = head_s(path, blocks, block_s, count)
        rows = []
        for resident, prefetch in cases:
            model, device = load_paced(path, copy_s, block_s, max_resident_blocks=resident, prefetch=prefetch)
            with model:
                assert model.plan.resident_blocks == list(range(resident)), model.plan.resident_blocks
                copies = [copy_s] * len(model.plan.streamed_blocks)
                for sync in (False, True):
                    got = steps(model, device, count, sync)
                    want = steady_period(copies, prefetch + 1, resident, block_s, head, device_sync=sync)
                    first = ring_schedule(copies, prefetch + 1, resident, block_s, head, 1)[0]  # ends at its tokens
                    rows.append({"resident": resident, "streamed": len(copies), "slots": prefetch + 1,
                                 "device_sync": sync, **got, "predicted_step_s": want, "predicted_first_s": first,
                                 "step_ratio": got["step_s"] / want, "first_ratio": got["first_s"] / first})
    return {"blocks": blocks, "copy_s": copy_s, "block_s": block_s, "head_s": head, "rows": rows}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--copy-ms", type=float, default=20.0)
    ap.add_argument("--block-ms", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    cases = [(r, p) for r, p in CASES if r < a.blocks]
    result = run(a.blocks, a.copy_ms / 1e3, a.block_ms / 1e3, a.steps, cases)
    print(f"{a.blocks} blocks, copies {a.copy_ms} ms, blocks {a.block_ms} ms, "
          f"outer work {result['head_s'] * 1e3:.2f} ms")
    print("resident streamed slots  wait      step ms  predicted  ratio   first ms  predicted  ratio")
    for r in result["rows"]:
        wait = "device" if r["device_sync"] else "tokens"
        print(f"{r['resident']:8} {r['streamed']:8} {r['slots']:5}  {wait:6} {r['step_s'] * 1e3:10.2f} "
              f"{r['predicted_step_s'] * 1e3:10.2f} {r['step_ratio']:6.3f} {r['first_s'] * 1e3:10.2f} "
              f"{r['predicted_first_s'] * 1e3:10.2f} {r['first_ratio']:6.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
