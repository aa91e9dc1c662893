"""The graphed-step A/B script on a tiny model (CPU): every way at every batch, alternating round by round, each timed
over its own sample length, sized as the calibration sizes its sample; the model-like graph reading its own weights
and cache layer per block and computing what the calibration's probe computes."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import graph_probe_ab as ab
from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for


def test_every_way_alternates_through_the_calibrations_timing(tmp_path, monkeypatch):
    timed: list = []
    real_times = ab.step_times
    made: list = []
    real_distinct = ab.distinct_step

    def distinct(timer, B, S):  # type: ignore[no-untyped-def]
        made.append(real_distinct(timer, B, S))
        return made[-1]

    def times(step, dev, s, each=False):  # type: ignore[no-untyped-def]
        timed.append(("own" if step is made[-1] else "probe", s) + (("each",) if each else ()))
        return real_times(step, dev, s, each)

    monkeypatch.setattr(ab, "distinct_step", distinct)
    monkeypatch.setattr(ab, "step_times", times)
    monkeypatch.setattr(ab, "warmed", lambda step, dev, s: timed.append(("warmed", s)))
    real_prefill = ab.prefill_pass

    def prefill(timer, B, prompt):  # type: ignore[no-untyped-def]
        run = real_prefill(timer, B, prompt)
        return lambda: (run(), timed.append(("prefill", B, prompt)))
    monkeypatch.setattr(ab, "prefill_pass", prefill)
    out = tmp_path / "ab.json"
    assert ab.main(["tiny-llama", "--batch", "1,2", "--prompt", "6", "--gen", "2", "--rounds", "2", "--device", "cpu",
                    "--warm-s", "0.125", "--json", str(out)]) == 0
    short, long = ab.calibrate.GRAPH_SAMPLE_S, ab.calibrate.GRAPH_SUSTAINED_S
    one_round = [("probe", short), ("probe", long), ("own", long), ("warmed", 0.125), ("probe", long),
                 ("probe", long, "each"), ("prefill", "B", 6), ("probe", long, "each")]
    back = [("prefill", "B", 6), ("probe", long, "each"), ("probe", long, "each"), ("warmed", 0.125), ("probe", long),
            ("own", long), ("probe", long), ("probe", short)]
    per_batch = [[(*t[:1], b, *t[2:]) if t[0] == "prefill" else t for t in one_round + back] for b in (1, 2)]
    assert timed == [t for batch in per_batch for t in batch]  # per batch: the second round in reverse
    r = json.loads(out.read_text())
    assert r["keys"] == 7 and r["blocks"] == family_for(resolve_config("tiny-llama")).num_blocks
    for way in ab.WAYS:
        for b in ("1", "2"):
            rounds = r["rounds"][way][b]
            assert len(rounds) == 2 and all(x["step_s"] > 0 and len(x["steps_s"]) >= 2 for x in rounds)
            assert r["median"][way][b]["step_s"] == statistics.median(x["step_s"] for x in rounds)


def test_the_models_graph_reads_each_blocks_own_weights_and_cache_and_computes_the_same(monkeypatch):
    graphs: list = []
    real_graph = ab.DecodeGraph

    def graph(family, outer, weights, cache, capture=True):  # type: ignore[no-untyped-def]
        graphs.append(real_graph(family, outer, weights, cache, capture=capture))
        return graphs[-1]

    monkeypatch.setattr(ab, "DecodeGraph", graph)
    family = family_for(resolve_config("tiny-llama"))
    timer = ab.calibrate._BlockTimer(family, torch.device("cpu"), torch.float32, 8, 0.005, 0, None, graphs=True)
    with torch.inference_mode():
        own = ab.distinct_step(timer, 2, 7)
        g = graphs[-1]
        n = family.num_blocks
        assert len(g.weights) == n and g.cache.device_layers == n
        for name in g.weights[0]:
            assert len({w[name].data_ptr() for w in g.weights}) == n  # a copy a block
            assert all(torch.equal(w[name], g.weights[0][name]) for w in g.weights)
        assert len({layer.k.data_ptr() for layer in g.layers}) == n  # a cache layer a block
        probe = timer._graph_step(2, 7, n)
        assert torch.equal(own(), probe())


def test_steps_are_timed_one_by_one_in_the_calibrations_window(monkeypatch):
    """A warm-up step, one step timed to size the sample, then that many steps, each between two clock reads; the
    sample's seconds a step are the window's over its steps. The sample is sized as the calibration sizes its own."""
    ticks = iter([0.0, 1.0, 10.0, 12.0, 15.0, 19.0])  # the sizing step takes 1 s: 3 steps make a 3.5 s sample
    monkeypatch.setattr(ab.time, "perf_counter", lambda: next(ticks))
    calls: list = []
    assert ab.step_times(lambda: calls.append(1), torch.device("cpu"), 3.5) == (3.0, [2.0, 3.0, 4.0])
    assert len(calls) == 5
    ticks = iter([0.0, 1e-6] + [float(t) for t in range(100)])  # a step of 1 us: at most the calibration's count
    calls.clear()
    mean, steps = ab.step_times(lambda: calls.append(1), torch.device("cpu"), 1.0)
    assert len(steps) == ab.calibrate.SAMPLE_MAX_CALLS == len(calls) - 2 and mean == 1.0


def test_a_prefill_pass_runs_the_models_block_count_over_the_prompt_then_waits(monkeypatch):
    """"prefill": the block at batch x prompt tokens attending to the prompt, the model's block count of times, then
    the synchronisation a generation's first tokens wait on, before the decode steps are timed."""
    from types import SimpleNamespace

    made: list = []
    ran: list = []

    def block_call(B, T, S):  # type: ignore[no-untyped-def]
        made.append((B, T, S))
        return lambda: ran.append("block")
    timer = SimpleNamespace(family=SimpleNamespace(num_blocks=3), dev=torch.device("cpu"), block_call=block_call)
    synced: list = []
    monkeypatch.setattr(ab.calibrate, "_sync", lambda dev: synced.append(len(ran)))
    ab.prefill_pass(timer, 7, 512)()
    assert made == [(7, 512, 512)] and ran == ["block"] * 3 and synced == [3]
