"""The calibration's graphed decode step against the model's, in one process (issue 17; docs/performance.md item 41):
why bloom-7b1's resident batch 7, replayed as a CUDA graph, stepped in 7.07 ms where its calibration timed 6.58 (run
12 of 2026-12-05, the miss of the run's 12 rows).

    python3 benches/graph_probe_ab.py bloom-7b1 --batch 7 --prompt 512 --gen 32 --rounds 3 --json out.json

The calibration's probe (``calibrate._BlockTimer``) replays a graph of the model's block count that reuses one
block's weights and takes a few cache layers in turn; the model's graph reads every block's own weights and cache
layer. Ways, alternating round by round so that the host's and the card's drift fall on all of them:

- "sample": the probe timed over ``calibrate.GRAPH_SAMPLE_S`` (calibration format 11);
- "sustained": the probe timed over ``calibrate.GRAPH_SUSTAINED_S`` (format 12);
- "distinct": a graph whose blocks each read their own weights (copies) and their own cache layer, as the model's,
  timed as "sustained";
- "warm": the probe timed as "sustained" right after ``--warm-s`` of untimed replays, as a generation's decode steps
  follow its prefill with the card already at its power draw;
- "synced": the probe timed as "sustained" with a synchronisation after every step, as a generation's steps each
  wait for their tokens (calibration format 15), the host's work before a replay no longer under the last one;
- "prefill": the probe timed as "synced" right after a prefill's blocks (the model's block count, one block's
  weights, batch x prompt tokens) and the synchronisation that reads its tokens, as a generation's first steps
  follow its prefill (item 45: on the H200 the card's clock fell under its power cap there, not in "warm"; run 5 of
  2026-12-06 timed it as "sustained", before "synced" was a way).

Each way is timed as the calibration's sample is (``calibrate._seconds``: the wall clock over the steps, one
synchronisation at the end; "synced" and "prefill" one after every step too), and in the same window step by step
(CUDA events; on the CPU the clock): the first and last quarter's medians say whether the clock fell inside the
window. The model is a preset's shapes (or a config.json) on random weights; nothing is read from disk.
``benches/gpu_session.sh graph-ab`` runs it with the clock log beside it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from ab_args import ab_parser, ab_setup  # a sibling script
from zstream.streaming import calibrate
from zstream.streaming.cache import KVCache
from zstream.streaming.graph import DecodeGraph
from zstream.streaming.weights import attention_kernels

WAYS = ("sample", "sustained", "distinct", "warm", "synced", "prefill")
Step = Callable[[], Any]


def distinct_step(timer: Any, B: int, S: int) -> Step:
    """A graphed decode step at batch ``B`` over ``S`` keys whose blocks each read their own weights (copies of the
    timer's block) and their own cache layer, as the model's graph does."""
    fam, dev = timer.family, timer.dev
    base = timer.weights()
    weights = [base] + [{k: v.clone() for k, v in base.items()} for _ in range(fam.num_blocks - 1)]
    cache = KVCache(fam.num_blocks, B, timer.longest, fam.num_kv_heads, fam.head_dim, timer.dtype, dev)
    graph = DecodeGraph(fam, timer.outer_w, weights, cache, capture=dev.type == "cuda")
    ids = torch.ones(B, 1, dtype=torch.long, device=dev)                                   # (B, 1)
    mask = torch.ones(B, S, dtype=torch.long, device=dev)                                  # (B, S)
    return lambda: graph(ids, fam.context(mask, 1, timer.dtype))


def step_times(step: Step, device: torch.device, sample_s: float, each: bool = False) -> Tuple[float, List[float]]:
    """(seconds a step as the calibration's sample takes it, each step's seconds) over about ``sample_s`` of steps
    back to back, sized as the calibration sizes its sample (``calibrate.sample_calls``): the first is the wall clock
    over the steps with one synchronisation at the end (with ``each``, after every step too), as
    ``calibrate._seconds`` reads it; the steps are timed between CUDA events recorded around every one (on the CPU,
    by the clock) in the same window."""
    count = max(2, calibrate.sample_calls(step, device, sample_s))
    if device.type != "cuda":
        ticks = [time.perf_counter()]
        for _ in range(count):
            step()
            ticks.append(time.perf_counter())
        return (ticks[-1] - ticks[0]) / count, [b - a for a, b in zip(ticks, ticks[1:])]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    t0 = time.perf_counter()
    events[0].record()
    for e in events[1:]:
        step()
        e.record()
        if each:
            e.synchronize()
    events[-1].synchronize()
    wall = (time.perf_counter() - t0) / count
    return wall, [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def warmed(step: Step, device: torch.device, warm_s: float) -> None:
    """Untimed steps back to back for ``warm_s`` (no pause after them)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        step()
        calibrate._sync(device)


def prefill_pass(timer: Any, B: int, prompt: int) -> Step:
    """A prefill's blocks back to back: the model's block count of the timer's block over ``B`` x ``prompt`` tokens,
    then the synchronisation a generation waits on for its first tokens."""
    block = timer.block_call(B, prompt, prompt)

    def run() -> None:
        for _ in range(timer.family.num_blocks):
            block()
        calibrate._sync(timer.dev)
    return run


def time_way(way: str, probe: Step, own: Step, device: torch.device, warm_s: float,
             prefill: Step = lambda: None) -> Dict[str, Any]:
    """One round of ``way``: seconds a step as the calibration times it, and the same window's steps one by one (one
    window: a second would start where the first left the card)."""
    step = own if way == "distinct" else probe
    sample_s = calibrate.GRAPH_SAMPLE_S if way == "sample" else calibrate.GRAPH_SUSTAINED_S
    if way == "warm":
        warmed(step, device, warm_s)
    if way == "prefill":
        prefill()
    mean, steps = step_times(step, device, sample_s, each=way in ("synced", "prefill"))
    quarter = max(1, len(steps) // 4)
    return {"step_s": mean, "steps_s": steps, "first_quarter_s": statistics.median(steps[:quarter]),
            "last_quarter_s": statistics.median(steps[-quarter:])}


def main(argv: Any = None) -> int:
    p = ab_parser(__doc__, batch="7", rounds=3, gen_help="the cache is as long as prompt + gen; keys at prompt + gen/2")
    p.add_argument("--ways", default=",".join(WAYS), help=f"which ways, in a round's order: {', '.join(WAYS)}")
    p.add_argument("--warm-s", type=float, default=0.3, help="'warm': seconds of untimed replays first")
    a = p.parse_args(argv)
    device, dtype, family, batches = ab_setup(a)
    ways = a.ways.split(",")
    unknown = set(ways) - set(WAYS)
    if unknown:
        p.error(f"unknown ways {sorted(unknown)}; the ways are {', '.join(WAYS)}")
    keys = a.prompt + a.gen // 2  # a decode step's keys, the mean of a generation's
    timer = calibrate._BlockTimer(family, device, dtype, a.prompt + a.gen, 0.005, 0, None, graphs=True)
    rounds: Dict[str, Dict[int, List[Dict[str, Any]]]] = {w: {b: [] for b in batches} for w in ways}
    with torch.inference_mode(), attention_kernels(device):
        for b in batches:
            probe = timer._graph_step(b, keys, family.num_blocks)
            own = distinct_step(timer, b, keys) if "distinct" in ways else probe
            prefill = prefill_pass(timer, b, a.prompt)
            for r in range(a.rounds):
                for way in (ways if r % 2 == 0 else list(reversed(ways))):
                    rounds[way][b].append(time_way(way, probe, own, device, a.warm_s, prefill))
            del probe, own, prefill
            if device.type == "cuda":
                torch.cuda.empty_cache()
    med = {w: {b: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "first_quarter_s", "last_quarter_s")}
               for b, rs in by.items()} for w, by in rounds.items()}
    out: Dict[str, Any] = {"model": a.model, "device": str(device), "prompt": a.prompt, "gen": a.gen, "keys": keys,
                           "blocks": family.num_blocks, "warm_s": a.warm_s, "ways": ways,
                           "median": {w: {str(b): v for b, v in by.items()} for w, by in med.items()},
                           "rounds": {w: {str(b): rs for b, rs in by.items()} for w, by in rounds.items()}}
    for b in batches:
        base = med[ways[0]][b]["step_s"]
        print(f"batch {b}, {family.num_blocks} blocks, {keys} keys: " + ", ".join(
            f"{w} {med[w][b]['step_s'] * 1e3:.3f} ms ({med[w][b]['step_s'] / base:.3f}x; quarters "
            f"{med[w][b]['first_quarter_s'] * 1e3:.3f}/{med[w][b]['last_quarter_s'] * 1e3:.3f})" for w in ways))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
