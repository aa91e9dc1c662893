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
