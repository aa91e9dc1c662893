"""Which layers a "split" KV cache attends to on the CPUs, A against B in one process (issue 17; docs/performance.md
item 17). "odd", the engine's: layers 1, 3, ... on the CPUs, so layer 0's cache is brought up as each pass begins and
the pass waits for it. "first": layers 0, 2, ..., so that copy runs while the CPUs attend layer 0. Run 9 tried
"first" alone, on a host whose CPUs were slower than run 8's, and could not tell the two apart; here both run in one
process, alternating round by round, so that the host's drift falls on both.

    python3 benches/split_layout_ab.py CHECKPOINT --gpu-memory 16GiB --batch 16,64 --micro-batch 16 --rounds 3 \
        --json out.json

Each round loads nothing anew: the same model, a new cache in the other layout, one prefill and ``gen - 1`` decode
steps (``zstream bench``'s ``run_one``). Prints and writes each layout's median step and tokens/s by batch, and
layer 0's copy time at the link measured at load (what "odd" waits, less the pass's outer work: the planner's
``ThroughputModel.first_cache_wait``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import zstream
from zstream.interfaces.bench import run_one
from zstream.planning.residency import cpu_layers_of, kv_layer_bytes
from zstream.streaming import model as engine

LAYOUTS = {
    "odd": cpu_layers_of,  # the engine's
    "first": lambda n, count: [k * n // count for k in range(max(0, min(count, n)))],
}


def arguments(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The command line of the split benches (this one and ``split_anatomy.py``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--batch", default="16,64", help="comma-separated batches")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--kv-cpu-layers", type=int, default=None, help="layers on the CPUs (default: the planner's)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--json", default=None)
    return p


def load_split(path: str, batch: int, a: argparse.Namespace) -> Any:
    """The checkpoint loaded for ``batch`` with a "split" cache, as the command line asks, warmed up."""
    model = zstream.load(path, offload="cpu", gpu_memory=a.gpu_memory, max_batch=batch,
                         max_seq_len=a.prompt + a.gen, kv_offload="split", micro_batch=a.micro_batch,
                         kv_cpu_layers=a.kv_cpu_layers, progress=False)
    run_one(model, batch, min(a.prompt, 16), 3)
    return model


def in_turn(names: Sequence[str], rounds: int) -> Iterator[Tuple[int, str]]:
    """(round, name): every name each round, the order reversed every other round (the host's drift falls on all)."""
    for r in range(rounds):
        yield from ((r, name) for name in (list(names) if r % 2 == 0 else list(reversed(names))))


@contextlib.contextmanager
def engine_layout(layout: Callable[[int, int], List[int]]) -> Iterator[None]:
    """The engine's caches made in ``layout`` (which layers the CPUs attend) inside, its own afterwards."""
    engine.cpu_layers_of = layout  # type: ignore[assignment]  # the layout new_cache takes
    try:
        yield
    finally:
        engine.cpu_layers_of = cpu_layers_of  # type: ignore[assignment]


def run_batch(path: str, batch: int, a: argparse.Namespace) -> Dict[str, Any]:
    model = load_split(path, batch, a)
    n, cpu = model.family.num_blocks, model.plan.kv_cpu_layers
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in LAYOUTS}
    try:
        for _, name in in_turn(list(LAYOUTS), a.rounds):
            with engine_layout(LAYOUTS[name]):
                runs[name].append(run_one(model, batch, a.prompt, a.gen))
        layer = kv_layer_bytes(model.family, batch, a.prompt + a.gen // 2, model.dtype)
        link = model.plan.link_gbps
    finally:
        model.close()
    out: Dict[str, Any] = {"batch": batch, "cpu_layers": cpu, "num_blocks": n, "layer_kv_bytes": layer,
                           "link_gbps": link,
                           "layer0_copy_s": layer / (link * 1e9) if link else None}
    for name, reps in runs.items():
        out[name] = {"cpu_layer_indices": LAYOUTS[name](n, cpu),
                     "decode_step_s": statistics.median(x["decode_step_s"] for x in reps),
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in reps),
                     "rounds_decode_step_s": [x["decode_step_s"] for x in reps]}
    out["first_over_odd_step"] = out["first"]["decode_step_s"] / out["odd"]["decode_step_s"]
    return out


def run_all(argv: Any, doc: str, rounds: int, run: Callable[[str, int, argparse.Namespace], Dict[str, Any]],
            lines: Callable[[Dict[str, Any]], List[str]]) -> int:
    """A script's command line: ``run`` for each batch asked, its ``lines`` printed, the rows written as JSON."""
    a = arguments(doc, rounds=rounds).parse_args(argv)
    rows = [run(a.checkpoint, int(b), a) for b in a.batch.split(",")]
    for r in rows:
        print("\n".join(lines(r)))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


def main(argv: Any = None) -> int:
    return run_all(argv, __doc__ or "", 3, run_batch, lambda r: [
        f"batch {r['batch']}: {r['cpu_layers']}/{r['num_blocks']} layers on the CPUs; step odd "
        f"{r['odd']['decode_step_s'] * 1e3:.1f} ms, first {r['first']['decode_step_s'] * 1e3:.1f} ms "
        f"({r['first_over_odd_step']:.3f}x); layer 0's copy {(r['layer0_copy_s'] or 0) * 1e3:.1f} ms"])


if __name__ == "__main__":
    raise SystemExit(main())
