"""Decode steps over S keys a multiple of 8 against the others, from ``zstream bench`` JSON rows (docs/performance.md
item 49: SDPA's memory-efficient kernel padded a copy of a mask whose rows were not 16 bytes apart, at every call).

    python3 benches/aligned_steps.py benches/results/raw/*-2026-12-0[456]-*bench*.json [--batch-max 16]

After a prompt of P tokens a row's decode step i (from 0) attends to P + 1 + i keys. The first ``--skip`` steps
(the card settling after the prefill) are left out. Prints, for every bloom row with the cache on the device, whether
its steps replayed a CUDA graph, the median step at S a multiple of 8, the median of the others, and their
difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

ALIGN = 8


def split_steps(row: Dict[str, Any], skip: int) -> Optional[Dict[str, float]]:
    """{"aligned", "other", "diff"} in seconds for one row (None: fewer than two steps on either side)."""
    steps = row.get("decode_steps_s") or []
    first = row["prompt"] + 1  # the first decode step's key count
    aligned = [s for i, s in enumerate(steps) if i >= skip and (first + i) % ALIGN == 0]
    other = [s for i, s in enumerate(steps) if i >= skip and (first + i) % ALIGN]
    if len(aligned) < 2 or len(other) < 2:
        return None
    a, o = statistics.median(aligned), statistics.median(other)
    return {"aligned": a, "other": o, "diff": o - a}


def rows_of(paths: List[str], batch_max: int) -> Iterator[Dict[str, Any]]:
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "bloom" not in str(data.get("meta", {}).get("model", "")):
            continue
        for row in data.get("rows", []):
            if row.get("kv_offload", "none") == "none" and row.get("batch", 0) <= batch_max:
                yield {"file": Path(path).name, **row}


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--batch-max", type=int, default=16)
    p.add_argument("--skip", type=int, default=4, help="first decode steps left out")
    a = p.parse_args(argv)
    out = []
    for row in rows_of(a.files, a.batch_max):
        split = split_steps(row, a.skip)
        if split is None:
            continue
        # the steps replayed from a graph (before 2026-12-06: the plan allowed one; before 2026-12-05: not recorded)
        graph = row["graphed_steps"] > 0 if "graphed_steps" in row else row.get("decode_graph")
        kind = "graphed" if graph else "-" if graph is None else "eager"
        out.append({"file": row["file"], "batch": row["batch"], "resident": row.get("resident_blocks"),
                    "kind": kind, **split})
        print(f"{row['file'][:46]:46} batch {row['batch']:3d} resident {row.get('resident_blocks')!s:>3} {kind:>8}: "
              f"aligned {split['aligned'] * 1e3:8.2f} ms, others {split['other'] * 1e3:8.2f}, "
              f"difference {split['diff'] * 1e3:+.2f}")
    return out


if __name__ == "__main__":
    main()
