"""profile_summary's arithmetic on a hand-made trace, and on a real CPU profile written by ``zstream bench``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from zstream.interfaces.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_summary import covered, kernels_by_name, profiled_row, summarize


def test_covered_counts_overlaps_once_and_clips_to_the_window() -> None:
    assert covered([(0, 10), (5, 15), (20, 30)], 0, 100) == 25
    assert covered([(0, 10), (5, 15), (20, 30)], 8, 25) == 7 + 5
    assert covered([(2, 3), (1, 9)], 0, 10) == 8  # a span inside another
    assert covered([], 0, 10) == 0 and covered([(11, 12)], 0, 10) == 0


def _x(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_a_steps_times_from_its_kernels_copies_and_launches() -> None:
    """A step marked over [1000, 2000] us: kernels at 1100-1300, 1250-1400 and 1600-1700 (one overlap), a copy
    from 900 to 1500 (half of it before the step), launches of 50 us each; the next step's kernels outside it, one
    begun before that step's mark."""
    events = [
        _x("user_annotation", "zstream.prefill", 0, 800), _x("kernel", "gemm", 100, 500),
        _x("user_annotation", "zstream.step.0", 1000, 1000),
        _x("gpu_user_annotation", "zstream.step.0", 1000, 1000),  # the GPU timeline's copy of the mark: not a step
        _x("kernel", "a", 1100, 200), _x("kernel", "b", 1250, 150), _x("gpu_memset", "c", 1600, 100),
        _x("gpu_memcpy", "copy", 900, 600),
        _x("cuda_runtime", "cudaLaunchKernel", 1050, 50), _x("cuda_runtime", "cudaGraphLaunch", 1500, 50),
        _x("cpu_op", "aten::mm", 1040, 300),
        _x("user_annotation", "zstream.step.1", 2100, 500), _x("kernel", "d", 2200, 100),
        _x("kernel", "e", 2050, 100),  # begun before step 1's mark: it leads with no wait
        _x("user_annotation", "## forward ##", 1200, 10),  # another mark: not a step
    ]
    out = summarize({"traceEvents": events}, skip=0)
    s0 = out["steps"][0]
    assert s0["wall_ms"] == pytest.approx(1.0)
    assert s0["gpu_busy_ms"] == pytest.approx(0.4)        # 1100-1400 and 1600-1700
    assert s0["gaps_ms"] == pytest.approx(0.6 - 0.4)       # first kernel 1100, last ends 1700
    assert s0["lead_ms"] == pytest.approx(0.1) and s0["tail_ms"] == pytest.approx(0.3)
    assert s0["copy_busy_ms"] == pytest.approx(0.5)        # 1000-1500 of the copy
    assert s0["runtime_ms"] == pytest.approx(0.1) and s0["kernels"] == 3
    assert len(out["steps"]) == 2 and out["prefill"]["gpu_busy_ms"] == pytest.approx(0.5)
    s1 = out["steps"][1]
    assert s1["lead_ms"] == 0 and s1["gpu_busy_ms"] == pytest.approx(0.15) and s1["gaps_ms"] == pytest.approx(0.05)
    assert out["median_step"]["wall_ms"] == pytest.approx(0.75)  # the median of 1.0 and 0.5
    assert summarize({"traceEvents": events}, skip=1)["median_step"]["wall_ms"] == pytest.approx(0.5)


def test_a_windows_kernels_by_name_the_longest_total_first() -> None:
    """Kernels (and memsets) inside the window only, grouped by name with their calls; copies and other windows'
    kernels left out; a window not in the trace refused."""
    events = [
        _x("user_annotation", "zstream.prefill", 0, 1000), _x("gpu_user_annotation", "zstream.prefill", 0, 1000),
        _x("kernel", "nvjet", 100, 200), _x("kernel", "nvjet", 400, 200), _x("kernel", "cutlass_80_align2", 650, 300),
        _x("gpu_memset", "Memset", 960, 10), _x("gpu_memcpy", "copy", 100, 800),
        _x("user_annotation", "zstream.step.0", 1100, 100), _x("kernel", "nvjet", 1120, 50),
    ]
    assert kernels_by_name(events, "zstream.prefill") == [("nvjet", 2, 0.4), ("cutlass_80_align2", 1, 0.3),
                                                          ("Memset", 1, 0.01)]
    assert kernels_by_name(events, "zstream.step.0") == [("nvjet", 1, 0.05)]
    with pytest.raises(SystemExit, match="no window"):
        kernels_by_name(events, "zstream.step.7")


def test_zstream_bench_writes_a_profile_with_the_prefill_and_every_step_marked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ZSTREAM_CACHE", str(tmp_path / "cache"))
    trace, rows = tmp_path / "prof.json", tmp_path / "rows.json"
    assert cli_main(["bench", "tiny-llama", "--offload", "none", "--batch", "2,3", "--prompt", "6", "--gen", "5",
                     "--profile", str(trace), "--json", str(rows)]) == 0
    assert json.loads(rows.read_text())["meta"]["profiled_row"]["batch"] == 2
    out = summarize(json.loads(trace.read_text()), skip=0)
    bench = json.loads(rows.read_text())
    row = profiled_row(bench)
    assert row["decode_step_ms"] == pytest.approx(bench["rows"][0]["decode_step_s"] * 1e3)  # batch 2's, not 3's
    assert bench["rows"][1]["batch"] == 3 and math.isnan(row["predicted_decode_step_ms"])  # (no --predict)
    assert out["prefill"] is not None and len(out["steps"]) == 4  # gen 5: 4 decode steps, of the first row only
    assert all(s["wall_ms"] > 0 and s["kernels"] == 0 and math.isnan(s["lead_ms"]) for s in out["steps"])


def test_the_summary_reads_a_gzipped_trace_and_writes_its_numbers(tmp_path, monkeypatch, capsys) -> None:
    """The GPU session gzips its traces: the command line reads them as they come back."""
    import gzip

    import profile_summary

    events = [_x("user_annotation", "zstream.prefill", 0, 800), _x("kernel", "gemm", 100, 500),
              _x("user_annotation", "zstream.step.0", 1000, 1000), _x("kernel", "a", 1100, 200)]
    trace, out = tmp_path / "t.json.gz", tmp_path / "s.json"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    monkeypatch.setattr(sys, "argv", ["profile_summary", str(trace), "--skip", "0", "--json", str(out)])
    profile_summary.main()
    got = json.loads(out.read_text())
    assert got["median_step"]["gpu_busy_ms"] == pytest.approx(0.2) and got["prefill"]["wall_ms"] == pytest.approx(0.8)
    assert "median 0+" in capsys.readouterr().out
