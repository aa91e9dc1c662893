"""The trace summary's arithmetic on a hand-made trace: two steps of three streamed blocks, block 2 on the CPUs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_summary as ts


def test_steps_are_summed_by_where_their_blocks_ran():
    def block(b: int, ts_us: float, dur_us: float) -> dict:
        return {"ph": "X", "tid": 3, "name": f"block {b}", "ts": ts_us, "dur": dur_us}
    events = [block(1, 0, 1000), block(2, 1500, 20000), block(3, 22000, 1000),       # step 1: gaps 0.5 + 0.5 ms
              block(1, 30000, 1000), block(2, 31000, 30000), block(3, 61000, 2000),  # step 2: no gap
              {"ph": "X", "tid": 2, "name": "block 1", "ts": 0, "dur": 5}, {"ph": "M", "tid": 3}]
    one, two = ts.step_summaries(events, {2}, 3)
    assert (one["cpu_layers"], one["cpu_ms"], one["device_ms"], one["span_ms"]) == (1, 20.0, 2.0, 23.0)
    assert one["gaps_ms"] == 1.0 and two["gaps_ms"] == 0.0 and two["cpu_layer_median_ms"] == 30.0


def test_the_run_20_trace_is_summed_as_the_docs_quote_it(capsys):
    """Run 20 (OPT-30B fp16 at the planner's choice, traced): the calibrated CPU layer alone and with the busy factor
    (the link copying beside all of it), as docs/performance.md quotes them: 26.1 ms x 1.09 = 28.6 ms."""
    raw = Path(__file__).resolve().parent / "results" / "raw"
    assert ts.main([str(raw / "h200-2026-12-04-run20-trace_opt30b_fp16trace.json"),
                    str(raw / "h200-2026-12-04-run20-bench_opt30b_fp16trace.json")]) == 0
    out = capsys.readouterr().out
    assert "calibrated CPU layer: 26.1 ms alone, 28.6 with the busy factor 1.09" in out
