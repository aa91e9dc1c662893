"""The ring-schedule bench on a tiny model: its pacing does what it says, every case runs both ways and is set
against the schedule of its own residency and slots (no assertion on a time: the numbers are the machine's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ring_schedule as rs


def test_a_paced_copy_lands_only_after_its_time_on_the_copy_stream():
    device = rs.PacedDevice(0.05)
    stream, done = device.new_stream(), device.new_event()
    dst, src = torch.zeros(4), torch.ones(4)
    device.copy(dst, src, stream)
    device.record(done, stream)
    assert not device.query(done) and torch.equal(dst, torch.zeros(4))  # still sleeping on the copy stream
    device.wait_host(done)
    assert torch.equal(dst, src)
    device.close()


def test_a_paced_block_sleeps_out_the_rest_of_its_time_before_its_release(monkeypatch):
    calls: list = []

    class Inner:
        def acquire(self, block: int) -> str:
            calls.append(("acquire", block))
            return "w"

        def release(self, block: int) -> None:
            calls.append(("release", block))

    ticks = iter([10.0, 10.25])
    monkeypatch.setattr(rs.time, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(rs.time, "sleep", lambda s: calls.append(("sleep", s)))
    paced = rs.PacedBlocks(Inner(), 1.0)
    assert paced.acquire(3) == "w"
    paced.release(3)
    assert calls == [("acquire", 3), ("sleep", 0.75), ("release", 3)]


def test_every_case_runs_both_ways_against_its_own_schedule(tmp_path):
    out = tmp_path / "ring.json"
    assert rs.main(["--blocks", "7", "--copy-ms", "2", "--block-ms", "0.5", "--steps", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    cases = [(res, p + 1) for res, p in rs.CASES if res < 7]
    assert [(row["resident"], row["slots"], row["device_sync"]) for row in r["rows"]] == [
        (res, slots, sync) for res, slots in cases for sync in (False, True)]
    for row in r["rows"]:
        assert row["streamed"] == 7 - row["resident"] and len(row["steps_s"]) == 3
        copies = [r["copy_s"]] * row["streamed"]
        assert row["predicted_step_s"] == rs.steady_period(copies, row["slots"], row["resident"], r["block_s"],
                                                           r["head_s"], device_sync=row["device_sync"])
        assert row["step_ratio"] == row["step_s"] / row["predicted_step_s"] > 0
