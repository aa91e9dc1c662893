"""graph_break_even's arithmetic, and the engine's threshold against the stored pairs it was set from."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from zstream.planning.residency import GRAPH_MIN_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_break_even import break_even, pair, ran_a_graph

RAW = Path(__file__).resolve().parent / "results" / "raw"


def test_a_graph_pays_where_the_two_generations_meet() -> None:
    # eager 10 ms a step; graphed 8 ms after a first step of 28: 10 n = 28 + 8 (n - 1) at n = 10
    assert break_even(0.028, 0.008, 0.010) == pytest.approx(10.0)
    eager, graphed = 10 * 0.010, 0.028 + 9 * 0.008
    assert eager == pytest.approx(graphed)
    assert break_even(0.028, 0.010, 0.010) is None and break_even(0.028, 0.011, 0.010) is None  # never


def _row(steps_ms: list, batch: int = 7) -> dict:
    return {"rows": [{"batch": batch, "gen": len(steps_ms) + 1, "decode_steps_s": [s / 1e3 for s in steps_ms],
                      "decode_step_s": statistics.median(steps_ms) / 1e3, "graphed_steps": len(steps_ms)}]}


def test_a_pair_is_read_from_the_graphed_file_and_the_eager_one_beside_it(tmp_path) -> None:
    (tmp_path / "x-bench_graph_graph.json").write_text(json.dumps(_row([30.0, 8.0, 8.0, 8.0])))
    (tmp_path / "x-bench_graph_eager.json").write_text(json.dumps(_row([11.0, 10.0, 10.0, 10.0])))
    got = pair(tmp_path / "x-bench_graph_graph.json")
    assert got["eager_ms"] == pytest.approx(10.0) and got["graphed_ms"] == pytest.approx(8.0)
    assert got["first_ms"] == pytest.approx(30.0) and got["record_in_eager_steps"] == pytest.approx(2.2)
    assert got["break_even_steps"] == pytest.approx(11.0)


def test_the_engines_threshold_is_where_the_stored_leases_graphs_paid() -> None:
    """GRAPH_MIN_STEPS was set from the stored bench-graph pairs (performance.md item 52): at least the steps after
    which a graph paid on the median lease, so that a generation graphed is not slower there."""
    pairs = [pair(f) for f in sorted(RAW.glob("*-bench_graph_graph.json"))]
    paid = [p["break_even_steps"] for p in pairs if p["graph_ran"]]  # (16 new tokens: no graph, item 52)
    assert len(paid) >= 4 and all(n is not None for n in paid)
    threshold = GRAPH_MIN_STEPS
    assert threshold >= math.floor(statistics.median(paid))


def test_a_graphed_row_that_ran_no_graph_is_no_pair() -> None:
    """Run 14 of 2026-12-06 ran the graphed row at 16 new tokens, too few to record a graph: its first step is an
    eager one, and no break-even can be read from it. Rows since then count their graphed steps."""
    assert not pair(RAW / "h100-2026-12-06-run14-bench_graph_graph.json")["graph_ran"]
    assert pair(RAW / "h100-2026-12-06-run1-bench_graph_graph.json")["graph_ran"]
    assert not ran_a_graph({"gen": 32, "graphed_steps": 0}) and ran_a_graph({"gen": 16, "graphed_steps": 15})
