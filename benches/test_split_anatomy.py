"""The split anatomy script on a tiny checkpoint (CPU): both layouts run on one model, the CPU layers' decode calls
counted and clocked, the engine's layout and the cache's methods back in place afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import zstream
from zstream.streaming import model as engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import split_anatomy as sa


def test_the_cpu_layers_are_clocked_in_both_layouts(tmp_path):
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    update, attend = sa.cache_mod.HostComputeLayerCache.update, sa.cache_mod.HostComputeLayerCache.attend
    out = tmp_path / "anatomy.json"
    assert sa.main([str(path), "--batch", "2", "--prompt", "6", "--gen", "3", "--rounds", "2", "--kv-cpu-layers", "1",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    n = row["num_blocks"]
    # a decode step calls each CPU layer once (no micro-batches): one layer with "odd", every layer with "all"
    assert (row["odd"]["cpu_layer_calls"], row["all"]["cpu_layer_calls"]) == (1, n)
    assert (row["odd"]["layers_on_cpus"], row["all"]["layers_on_cpus"]) == (1, n)
    for name in ("odd", "all"):
        x = row[name]
        assert len(x["rounds"]) == 2 and x["wait_s"] > 0 and 0 < x["attend_s"] < x["decode_step_s"]
        assert x["attend_per_layer_s"] == x["attend_s"] / x["layers_on_cpus"]
    assert engine.cpu_layers_of is sa.cpu_layers_of
    assert (sa.cache_mod.HostComputeLayerCache.update, sa.cache_mod.HostComputeLayerCache.attend) == (update, attend)


def test_the_calibrations_own_timings_run_beside_the_layouts_and_add_up_to_an_all_step(tmp_path, monkeypatch):
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    timed = []  # (rows, new tokens, keys, placement) of every block or pair the calibration's timer timed
    block = sa._BlockTimer.time_block

    def spy(self, B, T, S, kv="none"):
        timed.append((B, T, S, kv))
        return block(self, B, T, S, kv)
    monkeypatch.setattr(sa._BlockTimer, "time_block", spy)
    pair = sa._BlockTimer.time_kv

    def pair_spy(self, kv, B, T, S):
        timed.append((B, T, S, kv))
        return pair(self, kv, B, T, S)
    monkeypatch.setattr(sa._BlockTimer, "time_kv", pair_spy)
    out = tmp_path / "anatomy.json"
    assert sa.main([str(path), "--batch", "4", "--micro-batch", "2", "--prompt", "6", "--gen", "4", "--rounds", "3",
                    "--kv-cpu-layers", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    c, n = row["calibrated"], row["num_blocks"]
    # each round: a host-compute block, a split pair and a device block at a micro-batch's rows and the steps' mean
    # context (6 + 4 // 2)
    assert timed == [(2, 1, 8, "host-compute"), (2, 1, 8, "split"), (2, 1, 8, "none")] * 3 and row["context"] == 8
    assert len(c["rounds"]) == 3 and n == 2
    for r in c["rounds"]:  # two micro-batches of every block on the CPUs (or of the one pair), and their outer work
        assert r["decode_step_s"] == 2 * (n * r["block_s"] + r["outer_s"])
        assert r["pair_s"] > 0 and r["odd_step_s"] == 2 * (r["pair_s"] + r["outer_s"])
    assert c["block_s"] == sorted(r["block_s"] for r in c["rounds"])[1]  # the median of three
    assert row["all_over_calibrated_step"] == row["all"]["decode_step_s"] / c["decode_step_s"]
    assert row["odd_over_calibrated_step"] == row["odd"]["decode_step_s"] / c["odd_step_s"]


def test_no_odd_step_is_added_up_where_some_layers_are_brought_up_unpaired(tmp_path):
    config = {**zstream.synthetic.PRESETS["tiny-llama"], "num_hidden_layers": 3}  # one pair and a layer brought up
    path = zstream.make_checkpoint(config, tmp_path / "m", torch.float32, progress=False)
    out = tmp_path / "anatomy.json"
    assert sa.main([str(path), "--batch", "2", "--prompt", "6", "--gen", "3", "--rounds", "1", "--kv-cpu-layers", "1",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["num_blocks"], row["cpu_layers"]) == (3, 1)
    assert row["calibrated"]["odd_step_s"] is None and row["odd_over_calibrated_step"] is None
