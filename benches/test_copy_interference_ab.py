"""The copy-interference A/B on tiny shapes (CPU): every way timed every round, the copy's bytes one block's."""

from __future__ import annotations

import json
import math

from copy_interference_ab import main
from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for


def test_every_way_is_timed_every_round_and_the_copy_is_one_blocks_bytes(tmp_path):
    got = main(["tiny-bloom", "--batch", "2,3", "--prompt", "12", "--gen", "4", "--rounds", "3", "--blocks", "4",
                "--device", "cpu", "--json", str(tmp_path / "o.json")])
    assert sorted(got["by_batch"]) == [2, 3]
    out = got["by_batch"][3]
    assert (out["batch"], out["keys"], out["blocks"]) == (3, 16, 4)
    assert all(len(v) == 3 and min(v) > 0 for v in out["ms"].values())
    assert set(out["ms"]) == {"blocks alone", "blocks beside a copy", "copy beside the blocks", "copy alone"}
    fam = family_for(resolve_config("tiny-bloom"))
    shapes = fam.expected_shapes()
    assert out["block_bytes"] == 4 * sum(math.prod(shapes[c]) for c in fam.block_tensors(0).values())  # float32
    assert out["blocks_slowdown"] == out["median_ms"]["blocks beside a copy"] / out["median_ms"]["blocks alone"]
    assert json.loads((tmp_path / "o.json").read_text())["by_batch"]["2"]["blocks"] == 4
