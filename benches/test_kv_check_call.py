"""Issue 17's device call on stand-ins for nvidia-smi, /proc/cpuinfo and gpu_session.sh: the sweep, then the planner's
row, each with its stage's settings; everything else packed into one archive, so that at most eight files come back
through the device tool; nothing run on the wrong card; a stage past its deadline skipped; the jitter stage only on
the H200's host model."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "kv_check_call.sh"
SESSION = """#!/usr/bin/env bash
echo "$1" >> "$OUT/calls"
for f in host.txt gpu.txt gpu_power.txt gpu_clocks.csv gpu_clocks_utc_offset.txt; do echo "$1" > "$OUT/$f"; done
case $1 in
  bench-kv) python3 -c 'import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k[:3] == "KV_"}))' \
    > "$OUT/bench_kv_$KV_TAG.json" ;;
  cpu-jitter) echo '{"summary": true}' > "$OUT/cpu_jitter_b$JITTER_BATCH.jsonl" ;;
esac
"""


def call(tmp_path: Path, card: str, host_model: int, *args: str, **env: str) -> Path:
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{card}, 580.159.04, 700.00 W'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    (tmp_path / "session.sh").write_text(SESSION)
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel\t\t: {host_model}\nmodel name\t: Xeon\n")
    subprocess.run(["bash", str(SCRIPT), *args], check=True, capture_output=True, text=True,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
                        "GPU_SESSION": str(tmp_path / "session.sh"), "CPUINFO": str(tmp_path / "cpuinfo"), **env})
    return out


def test_the_sweep_then_the_planners_row_and_the_rest_in_one_archive(tmp_path):
    out = call(tmp_path, "NVIDIA H200", 207)
    assert sorted(p.name for p in out.iterdir()) == ["bench_kv_all.json", "bench_kv_planned.json", "calls", "card.txt",
                                                     "logs.tgz"]
    assert (out / "calls").read_text().split() == ["bench-kv", "bench-kv"]  # no jitter unless asked
    sweep, planned = (json.loads((out / f"bench_kv_{t}.json").read_text()) for t in ("all", "planned"))
    assert sweep == {"KV_MICRO": "16", "KV_PREDICT": "1", "KV_OFFLOADS": "none,host,host-compute,split",
                     "KV_BATCHES": "8,16,64", "KV_TAG": "all"}
    assert planned == {"KV_MICRO": "16", "KV_PREDICT": "1", "KV_PLANNED": "128", "KV_PLANNED_ONLY": "1",
                       "KV_TAG": "planned"}
    with tarfile.open(out / "logs.tgz") as tar:
        names = set(tar.getnames())
        assert tar.extractfile("logs/sweep-gpu.txt").read() == b"bench-kv\n"
    assert {"logs/sweep.log", "logs/planned.log", "logs/sweep-host.txt", "logs/planned-host.txt",
            "logs/sweep-gpu_clocks.csv", "logs/planned-gpu_clocks.csv"} <= names
    card = (out / "card.txt").read_text()
    assert card.startswith("NVIDIA H200, 580.159.04") and "model\t\t: 207" in card
    assert "sweep rc=0" in card and "planned rc=0" in card


def test_nothing_runs_on_another_card_than_the_one_asked_for(tmp_path):
    out = call(tmp_path, "NVIDIA H100 80GB HBM3", 143, KV_CHECK_CARD="H200")
    assert sorted(p.name for p in out.iterdir()) == ["card.txt"]
    assert "not an H200: nothing run" in (out / "card.txt").read_text()


def test_a_stage_past_its_deadline_is_skipped(tmp_path):
    out = call(tmp_path, "NVIDIA H200", 207, "0", "0")
    assert not (out / "calls").exists() and not list(out.glob("bench_kv_*.json"))
    card = (out / "card.txt").read_text()
    assert "sweep rc=skipped, past its deadline" in card and "planned rc=skipped" in card


def test_the_jitter_stage_runs_first_on_the_h200s_host_model_only(tmp_path):
    (tmp_path / "a").mkdir()
    out = call(tmp_path / "a", "NVIDIA H100 80GB HBM3", 207, KV_CHECK_JITTER="1")
    assert (out / "calls").read_text().split() == ["cpu-jitter", "bench-kv", "bench-kv"]
    with tarfile.open(out / "logs.tgz") as tar:
        assert {"logs/cpu_jitter_b16.jsonl", "logs/jitter.log", "logs/jitter-host.txt"} <= set(tar.getnames())
    (tmp_path / "b").mkdir()
    other = call(tmp_path / "b", "NVIDIA H100 80GB HBM3", 143, KV_CHECK_JITTER="1")
    assert (other / "calls").read_text().split() == ["bench-kv", "bench-kv"]
