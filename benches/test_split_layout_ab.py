"""The split-layout A/B script on a tiny checkpoint (CPU): both layouts run on one model, alternating, each cache in
its own layout, and the engine's layout is back in place afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import zstream

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_layout_ab as ab


def test_both_layouts_run_alternating_on_one_model(tmp_path, monkeypatch):
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    seen = []
    real = ab.run_one

    def spy(model, batch, prompt, gen, **kw):
        seen.append(model.new_cache(batch, prompt + gen).cpu_layers)
        return real(model, batch, prompt, gen, **kw)

    monkeypatch.setattr(ab, "run_one", spy)
    out = tmp_path / "ab.json"
    assert ab.main([str(path), "--batch", "2", "--prompt", "6", "--gen", "3", "--rounds", "2", "--kv-cpu-layers", "1",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    n = row["num_blocks"]
    odd, first = row["odd"]["cpu_layer_indices"], row["first"]["cpu_layer_indices"]
    assert first == [0] and odd == [n // 2] and odd != first
    # the warm-up in the engine's layout, then odd, first, first, odd: each cache as its round's layout says
    assert seen == [odd, odd, first, first, odd]
    assert len(row["odd"]["rounds_decode_step_s"]) == len(row["first"]["rounds_decode_step_s"]) == 2
    assert ab.engine.cpu_layers_of is ab.cpu_layers_of  # the engine's own layout is back
