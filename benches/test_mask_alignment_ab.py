"""The mask-alignment A/B on tiny shapes (CPU): both ways time every key count, and the key ranges parse."""

from __future__ import annotations

import json

from mask_alignment_ab import key_range, main


def test_key_ranges():
    assert key_range("513-516") == [513, 514, 515, 516]
    assert key_range("256,544") == [256, 544]


def test_both_ways_time_every_key_count(tmp_path):
    out = main(["tiny-bloom", "--keys", "14-17", "--rounds", "1", "--layers", "2", "--device", "cpu",
                "--dtype", "float32", "--json", str(tmp_path / "o.json")])
    for way in ("rounded", "contiguous"):
        assert sorted(out[way]["step_ms"]) == [14, 15, 16, 17]
        assert out[way]["aligned_ms"] == out[way]["step_ms"][16]  # the one multiple of 8
        assert out[way]["other_ms"] > 0
    assert json.loads((tmp_path / "o.json").read_text())["layers"] == 2
