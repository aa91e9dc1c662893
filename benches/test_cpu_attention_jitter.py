"""The jitter bench on the CPU, small cases in a child process: JSON lines with their quantiles in order, their calls
counted, the cache's size as given, the thread counts taking turns round by round (each round starting one count further
along), and a summary per case."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_attention_jitter as jitter

SMALL = ["--calls", "7", "--warmup", "1", "--layers", "2", "--batch", "2", "--heads", "2", "--head-dim", "8",
         "--slots", "32"]


def test_one_case_reports_its_quantiles_in_order(tmp_path, monkeypatch, capsys):
    out = tmp_path / "jitter.jsonl"
    monkeypatch.setattr(sys, "argv", ["cpu_attention_jitter.py", "--threads", "1", "--gap-ms", "0.5",
                                      "--policies", "default", *SMALL, "--json", str(out)])
    jitter.main()
    row, summary = (json.loads(line) for line in out.read_text().strip().splitlines())
    assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == [row, summary]
    assert (row["policy"], row["threads"], row["gap_ms"], row["calls"], row["batch"]) == ("default", 1, 0.5, 7, 2)
    assert row["cache_mb"] == 2 * 2 * 16 * 8 * 2 * 2 / 1e6  # B x nh x keys x hs x 2 bytes, keys and values
    q = [row[k] for k in ("p10_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert q == sorted(q) and q[0] > 0 and row["p10_ms"] <= row["mean_ms"] <= row["max_ms"]
    assert row["steal_s"] >= 0 and row["wall_s"] >= 7 * 0.5e-3
    assert summary["summary"] and summary["rounds"] == 1 and summary["round_p50s_ms"] == [row["p50_ms"]]


def test_the_thread_counts_take_turns_and_rotate_round_by_round(tmp_path, monkeypatch):
    out = tmp_path / "jitter.jsonl"
    monkeypatch.setattr(sys, "argv", ["cpu_attention_jitter.py", "--threads", "1,2,3", "--gap-ms", "0",
                                      "--rounds", "4", "--policies", "default", *SMALL, "--json", str(out)])
    jitter.main()
    lines = [json.loads(line) for line in out.read_text().strip().splitlines()]
    rows, summaries = lines[:12], lines[12:]
    assert [(r["threads"], r["round"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (1, 1),
                                                          (3, 2), (1, 2), (2, 2), (1, 3), (2, 3), (3, 3)]
    assert sorted((s["threads"], s["rounds"]) for s in summaries) == [(1, 4), (2, 4), (3, 4)]
    one = [r["p50_ms"] for r in rows if r["threads"] == 1]
    first = next(s for s in summaries if s["threads"] == 1)
    assert first["round_p50s_ms"] == one and first["fastest_ms"] == min(one)


def test_a_summary_is_the_rounds_medians_and_their_spread():
    rows = [{"policy": "default", "threads": 16, "gap_ms": 0.0, "batch": 16, "p50_ms": p} for p in (2.1, 2.8, 2.2)]
    rows += [{"policy": "ACTIVE", "threads": 16, "gap_ms": 0.0, "batch": 16, "p50_ms": 3.0}]
    first, second = jitter.summarise(rows)
    assert (first["policy"], first["median_ms"], first["fastest_ms"], first["slowest_ms"]) == ("default", 2.2, 2.1, 2.8)
    assert abs(first["spread"] - 2.8 / 2.1) < 1e-12 and first["rounds"] == 3
    assert (second["policy"], second["rounds"], second["spread"]) == ("ACTIVE", 1, 1.0)


def test_quantiles_pick_by_rank():
    q = jitter.quantiles([0.004, 0.001, 0.003, 0.002])
    assert (q["p10_ms"], q["p50_ms"], q["max_ms"], q["mean_ms"]) == (1.0, 3.0, 4.0, 2.5)
