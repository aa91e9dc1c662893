"""Coverage of python/zstream as CI measures it: at least 90% of the statements in all, and 80% in every file
(code that only a GPU can run is marked ``# GPU only`` and left out; docs/testing.md lists it).

    python3 scripts/coverage_check.py coverage.json
"""

from __future__ import annotations

import json
import sys

TOTAL, PER_FILE = 90.0, 80.0


def main(path: str) -> int:
    data = json.load(open(path))
    low = {f: d["summary"]["percent_covered"] for f, d in data["files"].items()
           if d["summary"]["percent_covered"] < PER_FILE and d["summary"]["num_statements"]}
    total = data["totals"]["percent_covered"]
    print(f"coverage: {total:.1f}% of {data['totals']['num_statements']} statements (at least {TOTAL:.0f}%); files "
          f"under {PER_FILE:.0f}%: {', '.join(f'{f} {p:.0f}%' for f, p in low.items()) or 'none'}")
    return 0 if total >= TOTAL and not low else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
