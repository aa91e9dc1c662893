"""The trace summary's arithmetic on a hand-made trace: two steps of three streamed blocks, block 2 on the CPUs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_a_prefill_trace_is_set_against_each_blocks_calibrated_prefill():
    """``prefill_summary``: each traced block against its calibrated prefill block over the row's micro-batches; a
    split's layers on the CPUs as "host-compute", the others as "host"."""
    from zstream.planning.batch import ComputeModel, Linear3

    zero = Linear3(0.0, 0.0, 0.0)
    cm = ComputeModel(num_blocks=4, decode_block=zero, decode_outer=zero, prefill_block=Linear3(1e-3, 0.0, 0.0),
                      prefill_outer=zero, decode_loop=zero,
                      kv_blocks={"host": (zero, Linear3(2e-3, 0.0, 0.0)),
                                 "host-compute": (zero, Linear3(0.0, 1e-6, 0.0))})
    events = [{"ph": "X", "tid": 3, "name": f"block {i}", "ts": 10 * i, "dur": d}
              for i, d in ((0, 5000), (1, 4000), (2, 6000), (3, 9000))]
    row = {"kv_offload": "split", "kv_cpu_layers": 2, "batch": 8, "micro_batch": 4, "prompt": 100}
    s = ts.prefill_summary(events, cm, row, 4)
    # two micro-batches of 4: "host" 2 x 2 ms; "host-compute" 2 x 1e-6 x 400 tokens = 0.8 ms (layers 1 and 3)
    assert s["calibrated_ms"] == pytest.approx([4.0, 0.8, 4.0, 0.8])
    assert s["measured_ms"] == [5.0, 4.0, 6.0, 9.0] and s["blocks"] == 4
    assert s["ratio"] == pytest.approx(((5.0 + 6.0) / 2) / ((4.0 + 0.8) / 2))
    plain = ts.prefill_summary(events, cm, {"kv_offload": "none", "batch": 2, "prompt": 100}, 4)
    assert plain["calibrated_ms"] == pytest.approx([1.0] * 4) and plain["ratio"] == pytest.approx(5.5)
