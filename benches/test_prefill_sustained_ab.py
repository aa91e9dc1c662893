"""The prefill A/B script on a tiny model (CPU): both ways timed at every batch, alternating round by round, the
calibration's way through the calibration's own timing function, the sustained way as many calls as the model has
blocks back to back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill_sustained_ab as ab


def test_both_ways_alternate_at_every_batch(tmp_path, monkeypatch):
    order: list = []
    real_seconds, real_sustained = ab.calibrate._seconds, ab.sustained_s
    monkeypatch.setattr(ab.calibrate, "_seconds", lambda call, dev, s: order.append(("sample", s)) or
                        real_seconds(call, dev, s))
    monkeypatch.setattr(ab, "sustained_s", lambda call, dev, n: order.append(("pass", n)) or
                        real_sustained(call, dev, n))
    out = tmp_path / "ab.json"
    assert ab.main(["tiny-llama", "--batch", "1,2", "--prompt", "6", "--gen", "2", "--rounds", "3", "--device", "cpu",
                    "--json", str(out)]) == 0
    blocks = ab.family_for(ab.resolve_config("tiny-llama")).num_blocks
    sample, sustained = ("sample", 0.005), ("pass", blocks)
    assert order == [sample] * 2 + [sustained] * 4 + [sample] * 4 + [sustained] * 2  # rounds 1 and 3 sample first
    r = json.loads(out.read_text())
    assert r["blocks"] == blocks and set(r["block_s"]) == set(ab.WAYS)
    assert all(len(r["rounds_block_s"][way][b]) == 3 for way in ab.WAYS for b in ("1", "2"))
    for b in ("1", "2"):
        assert r["sustained_over_sample"][b] == r["block_s"][ab.WAYS[1]][b] / r["block_s"][ab.WAYS[0]][b] > 0


def test_a_sustained_pass_is_its_calls_over_their_count(monkeypatch):
    """Four calls after a warm-up, one synchronisation at the end; the clock read around the four only."""
    calls: list = []
    ticks = iter([10.0, 11.0])
    monkeypatch.setattr(ab.time, "perf_counter", lambda: next(ticks))
    assert ab.sustained_s(lambda: calls.append(1), ab.torch.device("cpu"), 4) == 0.25
    assert len(calls) == 5
