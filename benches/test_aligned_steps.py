"""The aligned-steps report on made-up rows: which decode step attends to how many keys, and the skip."""

from __future__ import annotations

import json

from aligned_steps import main, split_steps


def test_a_step_attends_to_the_prompt_and_the_tokens_before_it():
    # prompt 6: steps attend to 7, 8, 9, ... keys; those at 8 and 16 (steps 1 and 9) are the aligned ones
    steps = [0.010] * 12
    steps[1] = steps[9] = 0.008
    split = split_steps({"prompt": 6, "decode_steps_s": steps}, skip=0)
    assert split is not None and split["aligned"] == 0.008 and split["other"] == 0.010
    assert split_steps({"prompt": 6, "decode_steps_s": steps}, skip=2) is None  # one aligned step left


def test_rows_of_other_models_and_host_caches_are_left_out(tmp_path):
    row = {"prompt": 6, "batch": 7, "decode_steps_s": [0.01] * 20, "decode_graph": False, "resident_blocks": 30}
    (tmp_path / "b.json").write_text(json.dumps({"meta": {"model": "bloom-7b1"},
                                                 "rows": [row, {**row, "kv_offload": "host"}]}))
    (tmp_path / "o.json").write_text(json.dumps({"meta": {"model": "opt-30b"}, "rows": [row]}))
    out = main([str(tmp_path / "b.json"), str(tmp_path / "o.json")])
    assert [(r["file"], r["kind"]) for r in out] == [("b.json", "eager")]
