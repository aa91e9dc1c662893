"""The prefill A/B script on a tiny model (CPU): both ways timed at every batch, alternating round by round, the
calibration's way through the calibration's own timing function, the sustained way as many calls as the model has
blocks back to back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill_sustained_ab as ab
from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for


def test_both_ways_alternate_at_every_batch(tmp_path, monkeypatch):
    order: list = []
    real_seconds, real_sustained = ab.calibrate._seconds, ab.sustained_s
    monkeypatch.setattr(ab.calibrate, "_seconds", lambda call, dev, s: order.append(("sample", s)) or
                        real_seconds(call, dev, s))
    monkeypatch.setattr(ab, "sustained_s", lambda call, dev, n: order.append(("pass", n)) or
                        real_sustained(call, dev, n))
    out = tmp_path / "ab.json"
    assert ab.main(["tiny-llama", "--batch", "1,2", "--prompt", "6", "--gen", "2", "--rounds", "3", "--device", "cpu",
                    "--ways", "sample,pass", "--json", str(out)]) == 0
    blocks = family_for(resolve_config("tiny-llama")).num_blocks
    sample, sustained = ("sample", 0.005), ("pass", blocks)
    assert order == [sample] * 2 + [sustained] * 4 + [sample] * 4 + [sustained] * 2  # rounds 1 and 3 sample first
    r = json.loads(out.read_text())
    assert r["blocks"] == blocks and set(r["block_s"]) == set(ab.WAYS[:2])
    assert all(len(r["rounds_block_s"][way][b]) == 3 for way in ab.WAYS[:2] for b in ("1", "2"))
    for b in ("1", "2"):
        assert r["sustained_over_sample"][b] == r["block_s"][ab.WAYS[1]][b] / r["block_s"][ab.WAYS[0]][b] > 0


def test_a_sustained_pass_is_its_calls_over_their_count(monkeypatch):
    """Four calls after a warm-up, one synchronisation at the end; the clock read around the four only."""
    calls: list = []
    ticks = iter([10.0, 11.0])
    monkeypatch.setattr(ab.time, "perf_counter", lambda: next(ticks))
    assert ab.sustained_s(lambda: calls.append(1), ab.torch.device("cpu"), 4) == 0.25
    assert len(calls) == 5


def test_the_sample_after_load_idle_and_empty_cache(tmp_path, monkeypatch):
    """"after load": the largest batch's block back to back for --preload-s, then the sample, no pause; "after
    idle": a sleep of --idle-s, then the sample; "after empty_cache": the sample. Each against the sample alone."""
    events: list = []
    clock = [0.0]
    real_seconds = ab.calibrate._seconds

    def seconds(call, dev, s):  # type: ignore[no-untyped-def]
        events.append("sample")
        return real_seconds(call, dev, s)

    def tick() -> float:
        clock[0] += 0.1
        return clock[0]

    monkeypatch.setattr(ab.calibrate, "_seconds", seconds)
    monkeypatch.setattr(ab.time, "perf_counter", tick)
    monkeypatch.setattr(ab.time, "sleep", lambda s: events.append(("sleep", s)))
    heaviest = lambda: events.append("heaviest")  # noqa: E731
    assert ab.preloaded_s(lambda: None, heaviest, ab.torch.device("cpu"), 0.35, 0.005) > 0
    assert events == ["heaviest"] * 3 + ["sample"]  # the clock read at 0.1 (start), 0.2, 0.3, 0.4: three calls
    events.clear()
    assert ab.idled_s(lambda: None, ab.torch.device("cpu"), 1.5, 0.005) > 0
    assert events == [("sleep", 1.5), "sample"]
    events.clear()
    monkeypatch.undo()
    out = tmp_path / "ab.json"
    assert ab.main(["tiny-llama", "--batch", "1,2", "--prompt", "6", "--gen", "2", "--rounds", "1", "--device", "cpu",
                    "--preload-s", "0.01", "--idle-s", "0.01", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["block_s"]) == set(ab.WAYS) and set(r["over_sample"]) == set(ab.WAYS[1:])
    for way in ab.WAYS[1:]:
        assert r["over_sample"][way]["2"] == r["block_s"][way]["2"] / r["block_s"][ab.WAYS[0]]["2"]
    assert r["sustained_over_sample"] == r["over_sample"][ab.WAYS[1]]


def test_each_way_is_timed_its_own_way(monkeypatch):
    import argparse

    monkeypatch.setattr(ab.calibrate, "_seconds", lambda call, dev, s: 1.0)
    monkeypatch.setattr(ab, "sustained_s", lambda call, dev, n: 2.0 + n)
    monkeypatch.setattr(ab, "preloaded_s", lambda call, load, dev, p, s: 3.0 + p + (load is heaviest))
    monkeypatch.setattr(ab, "idled_s", lambda call, dev, i, s: 4.0 + i)
    monkeypatch.setattr(ab, "emptied_s", lambda call, dev, s: 5.0)
    heaviest = object()
    a = argparse.Namespace(preload_s=0.5, idle_s=0.25)
    got = [ab.time_way(w, None, heaviest, ab.torch.device("cpu"), a, 30, 0.005) for w in ab.WAYS]
    assert got == [1.0, 32.0, 4.5, 4.25, 5.0]


def test_the_load_before_a_sample_is_the_largest_batchs_block(monkeypatch):
    made: dict = {}
    real_call = ab.calibrate._BlockTimer.block_call

    def block_call(self, B, T, S, kv="none"):  # type: ignore[no-untyped-def]
        made[B] = real_call(self, B, T, S, kv)
        return made[B]

    loads: list = []
    monkeypatch.setattr(ab.calibrate._BlockTimer, "block_call", block_call)
    monkeypatch.setattr(ab, "preloaded_s", lambda call, load, dev, p, s: loads.append(load) or 1.0)
    assert ab.main(["tiny-llama", "--batch", "2,4,1", "--prompt", "6", "--gen", "2", "--rounds", "1",
                    "--device", "cpu", "--ways", "load"]) == 0
    assert loads == [made[4]] * 3
