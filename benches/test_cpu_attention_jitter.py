"""The jitter bench on the CPU, one small case in a child process: one JSON line with its quantiles in order, its
calls counted, and the cache's size as given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_attention_jitter as jitter


def test_one_case_reports_its_quantiles_in_order(tmp_path, monkeypatch, capsys):
    out = tmp_path / "jitter.jsonl"
    monkeypatch.setattr(sys, "argv", ["cpu_attention_jitter.py", "--threads", "1", "--gap-ms", "0.5",
                                      "--policies", "default", "--calls", "7", "--warmup", "1", "--layers", "2",
                                      "--batch", "2", "--heads", "2", "--head-dim", "8", "--slots", "32",
                                      "--json", str(out)])
    jitter.main()
    row = json.loads(out.read_text().strip())
    assert json.loads(capsys.readouterr().out.strip()) == row
    assert (row["policy"], row["threads"], row["gap_ms"], row["calls"], row["batch"]) == ("default", 1, 0.5, 7, 2)
    assert row["cache_mb"] == 2 * 2 * 16 * 8 * 2 * 2 / 1e6  # B x nh x keys x hs x 2 bytes, keys and values
    q = [row[k] for k in ("p10_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")]
    assert q == sorted(q) and q[0] > 0 and row["p10_ms"] <= row["mean_ms"] <= row["max_ms"]
    assert row["steal_s"] >= 0 and row["wall_s"] >= 7 * 0.5e-3


def test_quantiles_pick_by_rank():
    q = jitter.quantiles([0.004, 0.001, 0.003, 0.002])
    assert (q["p10_ms"], q["p50_ms"], q["max_ms"], q["mean_ms"]) == (1.0, 3.0, 4.0, 2.5)
