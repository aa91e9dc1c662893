"""After how many decode steps a CUDA graph pays for its recording, from stored ``bench-graph`` pairs (the same
batch run graphed and eager in one call): the first graphed step records the graph (an eager warm-up, the capture,
a replay), every later one saves the eager step's launches. A generation of n steps costs ``n * eager`` eagerly and
``first + (n - 1) * graphed`` graphed; they meet at n = (first - graphed) / (eager - graphed). The engine records a
graph only for a generation of more than ``residency.GRAPH_MIN_STEPS`` steps (docs/performance.md item 52).

    python3 benches/graph_break_even.py benches/results/raw/*-bench_graph_graph.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from zstream.planning.residency import GRAPH_MIN_STEPS


def ran_a_graph(row: Dict[str, Any]) -> bool:
    """Whether the row's decode steps ran from a graph: its count of them (since 2026-12-06), or for rows before it,
    a generation long enough to record one (all of those ran 32 new tokens but run 14 of 2026-12-06, which ran 16
    where the threshold was already 24)."""
    if row.get("graphed_steps") is not None:
        return bool(row["graphed_steps"] > 0)
    return bool(row["gen"] - 1 > GRAPH_MIN_STEPS)


def break_even(first_s: float, graphed_s: float, eager_s: float) -> Optional[float]:
    """Decode steps after which the graphed generation is the shorter (None: the graph never pays)."""
    saved = eager_s - graphed_s
    return (first_s - graphed_s) / saved if saved > 0 else None


def pair(graph_file: Path) -> Dict[str, Any]:
    """One lease's pair: the graphed row's file and the eager row's beside it (``..._eager.json``)."""
    eager_file = graph_file.with_name(graph_file.name.replace("_graph.json", "_eager.json"))
    graphed = json.loads(graph_file.read_text())["rows"][0]
    eager = json.loads(eager_file.read_text())["rows"][0]
    first, step, plain = graphed["decode_steps_s"][0], graphed["decode_step_s"], eager["decode_step_s"]
    return {"file": graph_file.name, "batch": graphed["batch"], "graph_ran": ran_a_graph(graphed),
            "eager_ms": plain * 1e3, "graphed_ms": step * 1e3,
            "first_ms": first * 1e3, "record_in_eager_steps": (first - step) / plain,
            "break_even_steps": break_even(first, step, plain)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("graph_files", nargs="+", type=Path)
    a = p.parse_args()
    rows: List[Dict[str, Any]] = [pair(f) for f in a.graph_files]
    print(f"{'file':48} {'batch':>5} {'eager':>7} {'graphed':>7} {'first':>7} {'record':>7} {'pays after':>10}")
    for r in rows:
        n = r["break_even_steps"]
        pays = "no graph" if not r["graph_ran"] else "never" if n is None else f"{n:.1f}"
        print(f"{r['file']:48} {r['batch']:5d} {r['eager_ms']:7.2f} {r['graphed_ms']:7.2f} {r['first_ms']:7.1f} "
              f"{r['record_in_eager_steps']:7.2f} {pays:>10}")
    ran = [r for r in rows if r["graph_ran"]]
    paid = [r["break_even_steps"] for r in ran if r["break_even_steps"] is not None]
    if paid:
        print(f"median: a graph pays after {statistics.median(paid):.1f} steps ({len(paid)} of the {len(ran)} leases "
              f"whose graphed row ran a graph)")


if __name__ == "__main__":
    main()
