"""Per-module mutmut results (scripts/mutants-python.sh): killed, survived, no tests, timeouts, and the kill rate
killed / (killed + survived), from mutmut's own result files (``mutants/**/*.py.meta``), then every survivor.

    python3 scripts/mutants_summary.py target/mutmut [--markdown]
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List

GROUPS = {"streaming/": "engine and generation (streaming/)", "quant/": "quantization (foundations/quant/)",
          "models/": "models (foundations/models/)"}


def markdown(counts: Dict[str, Counter]) -> None:
    """The table of docs/testing.md: per module, then per group; a timeout counts as killed (a mutant that hangs)."""
    print("| module | mutants | run | killed | timeout | survived | kill rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    groups: Dict[str, Counter] = defaultdict(Counter)
    for module, c in counts.items():
        run = c["killed"] + c["timeout"] + c["survived"]
        total = sum(c.values())
        rate = f"{(c['killed'] + c['timeout']) / run:.1%}" if run else "-"
        print(f"| `{module.removeprefix('src/zstream/')}` | {total} | {run} | {c['killed']} | {c['timeout']} | "
              f"{c['survived']} | {rate} |")
        for key in GROUPS:
            if key in module:
                groups[key].update(c)
    for key, name in GROUPS.items():
        c = groups[key]
        run = c["killed"] + c["timeout"] + c["survived"]
        if run:
            print(f"| **{name}** | {sum(c.values())} | {run} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                  f"**{(c['killed'] + c['timeout']) / run:.1%}** |")


def main(stage: Path, as_markdown: bool = False) -> int:
    from mutmut.stats import status_by_exit_code

    counts: Dict[str, Counter] = defaultdict(Counter)
    survivors: List[str] = []
    for meta in sorted((stage / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(stage / "mutants")).removesuffix(".meta")
        for key, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            counts[module][status] += 1
            if status == "survived":
                survivors.append(key)
    if as_markdown:
        markdown(counts)
        return 0
    print(f"{'module':52} {'killed':>6} {'survived':>8} {'no tests':>8} {'timeout':>7} {'other':>5} {'kill rate':>9}")
    total = Counter()
    for module, c in counts.items():
        other = sum(v for k, v in c.items() if k not in ("killed", "survived", "no tests", "timeout"))
        rate = c["killed"] / (c["killed"] + c["survived"]) if c["killed"] + c["survived"] else float("nan")
        print(f"{module:52} {c['killed']:6d} {c['survived']:8d} {c['no tests']:8d} {c['timeout']:7d} {other:5d} "
              f"{rate:9.1%}")
        total.update(c)
    rate = total["killed"] / max(1, total["killed"] + total["survived"])
    print(f"{'all':52} {total['killed']:6d} {total['survived']:8d} {total['no tests']:8d} {total['timeout']:7d} "
          f"{'':5} {rate:9.1%}")
    print(f"\nsurvivors ({len(survivors)}): `mutmut show NAME` in {stage} shows each")
    for key in survivors:
        print("  " + key)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--markdown" in sys.argv[2:]))
