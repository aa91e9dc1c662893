"""The calibration A/B script on a tiny model (CPU): both ways timed, alternating, the engine's working set restored,
and the uplink's probe beside the link's rate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_ab as ab


def test_both_ways_alternate_and_the_working_set_is_restored(tmp_path, monkeypatch):
    sets = []
    real = ab.calibrate.calibrate_compute

    def spy(*args, **kw):
        sets.append(ab.calibrate.HOST_WORKING_SET_BYTES)
        return real(*args, **kw)

    monkeypatch.setattr(ab.calibrate, "calibrate_compute", spy)
    out = tmp_path / "ab.json"
    assert ab.main(["tiny-llama", "--batch", "1,2", "--prompt", "6", "--gen", "2", "--rounds", "2", "--device", "cpu",
                    "--json", str(out)]) == 0
    one, turn = ab.WAYS["one layer"], ab.WAYS["layers in turn"]
    assert sets == [one, turn, turn, one] and one == 0 < turn
    assert turn == ab.calibrate.HOST_WORKING_SET_BYTES  # the engine's own working set is back
    r = json.loads(out.read_text())
    assert set(r["host_compute_block_s"]) == set(ab.WAYS) and set(r["host_compute_block_s"]["one layer"]) == {"1", "2"}
    assert len(r["rounds_host_compute_block_s"]["layers in turn"]) == 2
    assert r["uplink"]["phase"] == "uplink" and r["uplink"]["gbps"] > 0 and r["link_gbps"] > 0
