"""The GPU's clocks and power in each window of a bench run: per row of a ``zstream bench`` JSON, the SM clock, the
power drawn and the throttle reasons that ``nvidia-smi`` logged (``benches/gpu_session.sh`` writes
``gpu_clocks.csv``, a sample every 100 ms) while the row's calibration, its prefill and its decode steps ran.

    python3 benches/clock_windows.py gpu_clocks.csv BENCH.json [--utc-offset-h 0]

Item 32 of docs/performance.md: the prefill runs 7-10% slower than calibrated in every placement. Its block was
timed over a few milliseconds, the pass runs it for 0.1-1.4 s: if the SM clock falls under a sustained load (the
power cap), the prefill's samples show a lower clock than the calibration's. The windows come from the row's host
counters (``prediction_counters``: the calibration; ``decode_counters``: the decode steps, the prefill just
before them, ``prefill_s`` long). ``nvidia-smi`` stamps local time; ``--utc-offset-h`` is the GPU machine's offset
from UTC (``gpu_clocks_utc_offset.txt`` beside the log: ``+0000`` is 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

Sample = Tuple[float, float, float, str]  # (Unix seconds, SM MHz, watts, throttle reasons)


def read_clocks(path: str, utc_offset_h: float = 0.0) -> List[Sample]:
    """``nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,
    clocks_throttle_reasons.active --format=csv,nounits`` rows as samples; unreadable rows are skipped."""
    zone = timezone(timedelta(hours=utc_offset_h))
    out: List[Sample] = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            try:
                when = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=zone)
                out.append((when.timestamp(), float(row[1]), float(row[3]), row[5].strip()))
            except (ValueError, IndexError):
                continue  # the header, or a row cut off when the logger was stopped
    return out


def window(samples: List[Sample], start: float, end: float) -> Optional[Dict[str, Any]]:
    """The samples from ``start`` to ``end``: their count, median and lowest SM clock, median power, and the
    throttle reasons seen (None where no sample fell inside)."""
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return None
    return {"samples": len(inside), "sm_mhz": statistics.median(s[1] for s in inside),
            "sm_mhz_min": min(s[1] for s in inside), "watts": statistics.median(s[2] for s in inside),
            "throttle": sorted({s[3] for s in inside})}


def row_windows(row: Dict[str, Any], samples: List[Sample]) -> Dict[str, Optional[Dict[str, Any]]]:
    """The row's calibration, prefill and decode windows, each summed up by ``window``."""
    out: Dict[str, Optional[Dict[str, Any]]] = {}
    cal = row.get("prediction_counters") or {}
    if "from_unix_s" in cal:
        out["calibration"] = window(samples, cal["from_unix_s"], cal["to_unix_s"])
    dec = row.get("decode_counters") or {}
    if "from_unix_s" in dec:
        out["prefill"] = window(samples, dec["from_unix_s"] - row["prefill_s"], dec["from_unix_s"])
        out["decode"] = window(samples, dec["from_unix_s"], dec["to_unix_s"])
    return out


def _cell(w: Optional[Dict[str, Any]]) -> str:
    if w is None:
        return f"{'-':>22}"
    return f"{w['sm_mhz']:6.0f} ({w['sm_mhz_min']:4.0f}) {w['watts']:5.0f} W {w['samples']:3d}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("clocks", help="gpu_clocks.csv from benches/gpu_session.sh")
    p.add_argument("bench", nargs="+", help="zstream bench JSON files of the same session")
    p.add_argument("--utc-offset-h", type=float, default=0.0, help="the GPU machine's offset from UTC, in hours")
    a = p.parse_args(argv)
    samples = read_clocks(a.clocks, a.utc_offset_h)
    print(f"{len(samples)} clock samples; per window: median SM MHz (lowest), median power, samples")
    print(f"{'row':28} {'calibration':>22} {'prefill':>22} {'decode':>22}")
    for f in a.bench:
        for row in json.loads(Path(f).read_text())["rows"]:
            w = row_windows(row, samples)
            name = f"{row.get('kv_offload', 'none')} b{row['batch']}" + (f" m{row['micro_batch']}"
                                                                          if row.get("micro_batch") else "")
            print(f"{name:28} {_cell(w.get('calibration'))} {_cell(w.get('prefill'))} {_cell(w.get('decode'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
