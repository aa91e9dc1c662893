"""The calm rounds' tolerance checked out of sample: for each bench JSON (one run), the tolerance that brings the
most rows of the *other* runs within 10% on replay, then that tolerance's rows of the held-out run; summed over
the runs, against the median of every round (docs/performance.md item 31).

    python3 benches/calm_holdout.py benches/results/raw/h200-2026-12-04-run1[3-8]-bench_kv*.json \\
        benches/results/raw/h200-2026-12-04-run21-bench_kv_all.json

Ties between tolerances go to the smallest (``--ties largest``: the largest), so that the choice is not steered
towards the tolerance the calibration uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_predictions import preset_of, replay_row

TOLERANCES = (1.1, 1.15, 1.2, 1.25, 1.3, 1.4, 1.5, 2.0)


def within(doc: Dict[str, Any], how: str, tolerance: float) -> Tuple[int, int]:
    """(rows replayed within 10% of measured, rows replayed) of one bench JSON."""
    near = n = 0
    for row in doc["rows"]:
        if row.get("predicted_tokens_per_s") is None:
            continue
        r = replay_row(row, doc["meta"], preset_of(doc["meta"]), False, how, tolerance)
        if r["replayed"]:
            n += 1
            near += abs(r["replayed"] / r["measured"] - 1) <= 0.10
    return near, n


def held_out(counts: Dict[Tuple[str, Any], Tuple[int, int]], runs: List[str], tolerances: Tuple[float, ...],
             largest_on_ties: bool = False) -> List[Dict[str, Any]]:
    """Per run: the tolerance chosen on the others (most rows within 10%), and the run's rows at it and at the
    median. ``counts``: (run, tolerance or "median") -> (within, replayed)."""
    out = []
    for run in runs:
        others = [r for r in runs if r != run]
        chosen = max(tolerances, key=lambda t: (sum(counts[(r, t)][0] for r in others),
                                                t if largest_on_ties else -t))
        out.append({"run": run, "tolerance": chosen, "within": counts[(run, chosen)][0],
                    "median_within": counts[(run, "median")][0], "rows": counts[(run, chosen)][1]})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="zstream bench --predict JSON files, one run each")
    p.add_argument("--ties", choices=("smallest", "largest"), default="smallest")
    a = p.parse_args(argv)
    docs = {Path(f).name: json.loads(Path(f).read_text()) for f in a.files}
    counts: Dict[Tuple[str, Any], Tuple[int, int]] = {}
    for run, doc in docs.items():
        counts[(run, "median")] = within(doc, "median", TOLERANCES[0])
        for t in TOLERANCES:
            counts[(run, t)] = within(doc, "calm", t)
    rows = held_out(counts, list(docs), TOLERANCES, a.ties == "largest")
    for r in rows:
        print(f"{r['run'][:44]:44} chosen {r['tolerance']:5.2f}: {r['within']:2d} of {r['rows']:2d} within 10% "
              f"(median of every round: {r['median_within']})")
    print(f"held out: {sum(r['within'] for r in rows)} of {sum(r['rows'] for r in rows)} rows within 10%; "
          f"median of every round: {sum(r['median_within'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
