"""The hold-out choice of the calm rounds' tolerance, on hand-made counts: each run's tolerance is the one that does
best on the other runs (ties to the smallest, or the largest), and the run is scored at it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calm_holdout as ch


def test_each_run_is_scored_at_the_tolerance_the_others_choose():
    # (run, tolerance) -> (within, rows). On b + c: 1.2 -> 3 + 1 = 4, 1.5 -> 2 + 3 = 5; on a + c: 1.2 -> 6,
    # 1.5 -> 4; on a + b: 1.2 -> 8, 1.5 -> 3
    counts = {("a", 1.2): (5, 6), ("a", 1.5): (1, 6), ("a", "median"): (4, 6),
              ("b", 1.2): (3, 4), ("b", 1.5): (2, 4), ("b", "median"): (3, 4),
              ("c", 1.2): (1, 3), ("c", 1.5): (3, 3), ("c", "median"): (2, 3)}
    rows = ch.held_out(counts, ["a", "b", "c"], (1.2, 1.5))
    assert [(r["run"], r["tolerance"], r["within"], r["median_within"], r["rows"]) for r in rows] == [
        ("a", 1.5, 1, 4, 6),   # chosen on b + c: 1.5 (5 against 4)
        ("b", 1.2, 3, 3, 4),   # chosen on a + c: 1.2 (6 against 4)
        ("c", 1.2, 1, 2, 3)]   # chosen on a + b: 1.2 (8 against 3)
    tied = {k: (1, v[1]) if k[1] != "median" else v for k, v in counts.items()}  # every tolerance ties
    assert {r["tolerance"] for r in ch.held_out(tied, ["a", "b", "c"], (1.2, 1.5))} == {1.2}
    assert {r["tolerance"] for r in ch.held_out(tied, ["a", "b", "c"], (1.2, 1.5), largest_on_ties=True)} == {1.5}


def test_the_stored_runs_are_replayed_per_run(capsys):
    """Two stored runs (runs 14 and 15 of 2026-12-04: one and two rows): each held out in turn, every row counted."""
    raw = Path(__file__).resolve().parent / "results" / "raw"
    files = [str(raw / f"h200-2026-12-04-{name}.json") for name in ("run14-bench_kv_pair64", "run15-bench_kv_b8")]
    assert ch.main(files) == 0
    out = capsys.readouterr().out
    assert out.count("chosen") == 2 and "of 3 rows within 10%" in out
