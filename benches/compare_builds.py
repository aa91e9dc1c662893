"""Step/bound ratios of two builds side by side, from ``zstream bench --json`` files named
``compare_<build>_<weights>_<round>.json`` (benches/gpu_session.sh, stage ``compare``): the median over rounds of
each (weights, batch) for each build, and new over baseline.

    python3 benches/compare_builds.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple


def main(out: Path) -> None:
    ratios: Dict[Tuple[str, str, int], List[float]] = defaultdict(list)  # (build, weights, batch) -> step / bound
    steps: Dict[Tuple[str, str, int], List[float]] = defaultdict(list)
    for f in sorted(out.glob("compare_*_*_*.json")):
        _, build, weights, _round = f.stem.split("_")
        for row in json.loads(f.read_text())["rows"]:
            key = (build, weights, row["batch"])
            ratios[key].append(row["decode_step_s"] / row["bound_step_s"])
            steps[key].append(row["decode_step_s"])
    print(f"{'weights':8} {'batch':>5} {'baseline step/bound':>20} {'new step/bound':>15} {'new/baseline':>13} "
          f"{'baseline ms':>11} {'new ms':>8} rounds")
    for weights in ("fp16", "int4"):
        for batch in sorted({b for (_, w, b) in ratios if w == weights}):
            old, new = ratios.get(("baseline", weights, batch)), ratios.get(("new", weights, batch))
            if not old or not new:
                continue
            o, n = statistics.median(old), statistics.median(new)
            print(f"{weights:8} {batch:5d} {o:20.3f} {n:15.3f} {n / o:13.3f} "
                  f"{statistics.median(steps[('baseline', weights, batch)]) * 1e3:11.1f} "
                  f"{statistics.median(steps[('new', weights, batch)]) * 1e3:8.1f} {len(old)}/{len(new)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
