"""The memory replay on the H200's stored rows: a process that recorded no CUDA graph kept every row under its plan
(the plan's sum checked by hand for one row); in processes whose calibrations recorded graphs on a stream each, the
rows peaked over their plans by whole 33 MiB cuBLAS workspaces, up to 32 of them (docs/performance.md, item 36)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_replay as mr

RAW = Path(__file__).parent / "results" / "raw"
MiB = 1 << 20


def by_row(rows: list) -> dict:
    return {(r["kv_offload"], r["batch"]): r for r in rows}


def test_a_process_without_graphs_keeps_every_row_under_its_plan():
    rows = mr.replay_file(RAW / "h200-2026-12-05-run1-bench_kv_all.json")
    assert len(rows) == 11 and all(r["peak"] < r["planned"] <= r["budget"] for r in rows)
    r = by_row(rows)[("none", 8)]  # 26 of 30 blocks resident, 3 ring slots, the cache on the device, 544 positions
    C, V, B, S = 4096, 250880, 8, 544
    block = 2 * (12 * C * C + 13 * C)                   # q, k, v, dense, both MLP matrices, their biases, two norms
    outer = 2 * (V * C + 4 * C)                         # the embedding (tied head), its norm and the final norm
    cache = 30 * 2 * B * S * C * 2                      # keys and values of every layer
    activations = B * S * C * 24 * 2 + B * V * 8 + (256 << 20)
    assert r["planned"] == outer + 26 * block + 3 * block + cache + activations


def test_rows_after_graphs_were_recorded_on_a_stream_each_peaked_over_by_whole_workspaces():
    before = by_row(mr.replay_file(RAW / "h200-2026-12-05-run1-bench_kv_all.json"))
    for run in ("run4", "run6"):
        after = by_row(mr.replay_file(RAW / f"h200-2026-12-05-{run}-bench_kv_all.json"))
        steps = [(after[k]["peak"] - before[k]["peak"]) / (33 * MiB) for k in before]
        assert all(abs(s - round(s)) < 0.02 and 13 <= round(s) <= 32 for s in steps), steps
        assert round(steps[0]) in (13, 14) and round(max(steps)) == 32  # one calibration's streams, then the pool
        assert sum(after[k]["peak"] > after[k]["budget"] for k in before) == 3  # batch 64, planned under 16 GiB


def test_the_summary_counts_rows_over_their_plan_and_budget(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert mr.main([str(RAW / "h200-2026-12-05-run1-bench_kv_all.json"),
                    str(RAW / "h200-2026-12-05-run4-bench_kv_all.json"), "--json", str(out)]) == 0
    assert "peak over its plan: 11 of 23 rows; over the budget: 4" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    graphed = [r for r in rows if r["graphed"]]
    assert [(r["batch"], r["file"][:19]) for r in graphed] == [(7, "h200-2026-12-05-run")]
    eager = by_row(mr.replay_file(RAW / "h200-2026-12-05-run3-bench_graph_eager.json"))[("none", 7)]
    assert graphed[0]["planned"] - eager["planned"] == pytest.approx(74e6, rel=0.01)  # the graph's pool and stream



def test_a_row_given_a_micro_batch_size_ran_eagerly_before_rows_recorded_it():
    """Run 5 of 2026-12-05's batch 7, every block resident, was given micro_batch=16: that build's plan refused the
    graph for it, so its plan has no graph's memory (run 4's, given none, was graphed). A row that says is taken at
    its word."""
    doc = json.loads((RAW / "h200-2026-12-05-run5-bench_kv_trace.json").read_text())
    row = next(r for r in doc["rows"] if r["batch"] == 7 and r["kv_offload"] == "none")
    assert row["micro_batch"] == 16 and not mr.graphed(row)
    assert mr.graphed({**row, "decode_graph": True}) and not mr.graphed({**row, "micro_batch": None,
                                                                          "decode_graph": False})
    assert mr.graphed({**row, "micro_batch": None})


def test_a_row_that_counts_its_graphed_steps_is_graphed_only_where_one_ran():
    """Since 2026-12-06 a row counts its steps replayed from a graph: the plan allowing one (``decode_graph``) with
    none run (a generation of 16 new tokens, too short) is a row without a graph's memory."""
    row = json.loads((RAW / "h100-2026-12-06-run14-bench_graph_graph.json").read_text())["rows"][0]
    assert row["decode_graph"] and row["gen"] == 16  # (its plan allowed one; that build did not count)
    assert not mr.graphed({**row, "graphed_steps": 0}) and mr.graphed({**row, "graphed_steps": 15})
