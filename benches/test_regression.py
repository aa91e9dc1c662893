"""The CPU regression guard (``benches/regression.py --check``) as a test: fails when the store read against memcpy
or the nvme decode step against the resident model is more than 2x worse than ``benches/results/cpu_ratios.json``.

    pytest benches/test_regression.py -s          # -s shows the measured ratios
    python3 benches/regression.py --update        # after an intended change of speed: a new baseline
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _regression():
    spec = importlib.util.spec_from_file_location("zstream_bench_regression", HERE / "regression.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_ratios_within_2x_of_baseline() -> None:
    reg = _regression()
    lines: list[str] = []
    ok, got = reg.check(reg.load_baseline(), out=lambda s: (lines.append(s), print(s)))
    assert set(got) == set(reg.RATIOS)
    assert ok, "\n".join(lines)
