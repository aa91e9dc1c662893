"""The clock log read and cut into a bench row's windows: a synthetic nvidia-smi log (a sample every 100 ms, the SM
clock at 1980 MHz but for 1 s at 1700 MHz under the power cap) against a row whose prefill falls in that second."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clock_windows as cw

T0 = datetime(2026, 12, 4, 23, 0, 0, tzinfo=timezone.utc).timestamp()


def write_log(path: Path) -> None:
    lines = ["timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], temperature.gpu, "
             "clocks_throttle_reasons.active"]
    for k in range(50):  # 5 s: 23:00:00.0 to 23:00:04.9
        capped = 20 <= k < 30  # 23:00:02.0 to 23:00:02.9
        stamp = datetime.fromtimestamp(T0 + k / 10, timezone.utc).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        lines.append(f"{stamp}, {1700 if capped else 1980}, 3201, {700.0 if capped else 310.5}, 45, "
                     f"{'0x0000000000000004' if capped else '0x0000000000000000'}")
    lines.append("2026/12/04 23:00:05")  # cut off as the logger stopped
    path.write_text("\n".join(lines) + "\n")


def test_a_rows_windows_read_the_clocks_logged_while_they_ran(tmp_path, capsys):
    log = tmp_path / "gpu_clocks.csv"
    write_log(log)
    samples = cw.read_clocks(str(log))
    assert len(samples) == 50 and samples[0][0] == pytest.approx(T0) and samples[20][1:] == (1700.0, 700.0,
                                                                                            "0x0000000000000004")
    # calibration 23:00:00.0-01.45; prefill 02.0-02.95 (0.95 s before the decode steps); decode 02.95-04.5
    row = {"kv_offload": "split", "batch": 64, "micro_batch": 16, "prefill_s": 0.95,
           "prediction_counters": {"from_unix_s": T0, "to_unix_s": T0 + 1.45},
           "decode_counters": {"from_unix_s": T0 + 2.95, "to_unix_s": T0 + 4.5}}
    w = cw.row_windows(row, samples)
    assert w["calibration"] == {"samples": 15, "sm_mhz": 1980, "sm_mhz_min": 1980, "watts": 310.5,
                                "throttle": ["0x0000000000000000"]}
    assert w["prefill"]["samples"] == 10 and w["prefill"]["sm_mhz"] == 1700 and w["prefill"]["watts"] == 700
    assert w["decode"]["sm_mhz"] == 1980 and w["decode"]["sm_mhz_min"] == 1980 and w["decode"]["samples"] == 16
    assert cw.window(samples, T0 + 10, T0 + 11) is None
    # half before the cap, half under it: 23:00:01.5-02.4
    assert cw.window(samples, T0 + 1.5, T0 + 2.4) == {"samples": 10, "sm_mhz": 1840, "sm_mhz_min": 1700,
                                                      "watts": pytest.approx(505.25),
                                                      "throttle": ["0x0000000000000000", "0x0000000000000004"]}
    assert cw.row_windows({"batch": 1, "prefill_s": 0.1}, samples) == {}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"meta": {}, "rows": [row]}))
    assert cw.main([str(log), str(bench)]) == 0
    out = capsys.readouterr().out
    assert "split b64 m16" in out and "1700 (1700)   700 W  10" in out
    # a machine 2 hours ahead of UTC stamps the same instants 2 hours later
    shifted = tmp_path / "shifted.csv"
    shifted.write_text(log.read_text().replace("2026/12/04 23:", "2026/12/05 01:"))
    assert cw.read_clocks(str(shifted), utc_offset_h=2)[0][0] == pytest.approx(T0)
