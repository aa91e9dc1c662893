"""Decode steps as one CUDA graph (``streaming.graph``): the graphed step runs at fixed shapes (attention over every
slot of the cache, the unwritten ones masked; this step's keys and values written at a slot held in a device
tensor). On the CPU the same fixed-shape step runs eagerly (``capture=False``), and is checked here against the
eager step every family runs, which is checked against transformers elsewhere: the same cache slots, the same logits
to rounding and the same tokens, greedy and sampled, with left padding. The capture itself runs on the GPU
(test_gpu.py). And when the plan allows a graph."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

import zstream
from zstream.api.options import load_options
from zstream.foundations.models.common import MASK_ALIGN
from zstream.planning.residency import GRAPH_MIN_STEPS, PlanOptions, decode_graph_allowed, graphs_for_ranks
from zstream.streaming import graph as graph_mod
from zstream.streaming.graph import DecodeGraph

from tiny_models import padded_batch

FAMILIES = ["tiny-bloom", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-qwen2"]


def _graphed(model: object) -> None:
    """Let a CPU model take the graphed path (its plan never does: no CUDA there)."""
    model.plan = dataclasses.replace(model.plan, decode_graph=True)  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("name", FAMILIES)
def test_the_fixed_shape_step_gives_the_eager_steps_logits_and_tokens(family_checkpoints: dict, name: str) -> None:
    ids, mask = padded_batch(vocab=250, lengths=(9, 6, 3))
    kw = {"device": "cpu", "progress": False, "offload": "none"}
    with zstream.load(family_checkpoints[name], **kw) as eager, zstream.load(family_checkpoints[name], **kw) as fixed:
        _graphed(fixed)
        caches = [m.new_cache(3, 9 + GRAPH_MIN_STEPS + 4) for m in (eager, fixed)]
        nxt = None
        for step in range(GRAPH_MIN_STEPS + 4):
            step_ids, step_mask = (ids, mask) if step == 0 else (nxt, torch.ones(3, 1, dtype=torch.long))
            want = eager.forward(step_ids, step_mask, caches[0], last_only=True)
            got = fixed.forward(step_ids, step_mask, caches[1], last_only=True)
            assert got.shape == want.shape == (3, 1, eager.family.vocab_size)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            nxt = want[:, -1].argmax(-1, keepdim=True)
        assert fixed._graph is not None and fixed._graph.cache is caches[1]  # the fixed-shape path ran
        assert eager._graph is None
        n = caches[0].length
        torch.testing.assert_close(caches[1].k[:, :, :, :n], caches[0].k[:, :, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].v[:, :, :, :n], caches[0].v[:, :, :, :n], rtol=1e-5, atol=1e-5)
        greedy = {"max_new_tokens": 12, "do_sample": False}
        assert torch.equal(fixed.generate(ids, attention_mask=mask, **greedy),
                           eager.generate(ids, attention_mask=mask, **greedy))
        sampled = {"max_new_tokens": 12, "do_sample": True, "top_k": 20, "temperature": 0.8, "seed": 3}
        assert torch.equal(fixed.generate(ids, attention_mask=mask, **sampled),
                           eager.generate(ids, attention_mask=mask, **sampled))


class NoReadback(TorchFunctionMode):
    """Fails any op that a CUDA graph cannot record: a tensor's value read back to Python (a device sync, which
    capture refuses) or a shape that depends on values (boolean indexing, nonzero, unique)."""

    READS = frozenset({torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
             torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
             torch.Tensor.unique, torch.argwhere})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        indexed = func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if func in self.READS or indexed:
            raise AssertionError(f"{getattr(func, '__name__', func)} in a step a CUDA graph records")
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("name", FAMILIES)
def test_the_fixed_shape_step_reads_nothing_back_and_has_fixed_shapes(family_checkpoints: dict, name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What the capture on a GPU would refuse, caught on the CPU: every family's graphed step, under a mode that
    fails reads of tensor values and value-dependent shapes (itself checked to fail them)."""
    t = torch.ones(3)
    for refused in (lambda: bool(t[0]), lambda: t.sum().item(), lambda: t[t > 0], lambda: [0, 1][t[0].long()]):
        with NoReadback(), pytest.raises(AssertionError, match="CUDA graph records"):
            refused()
    real_step = DecodeGraph._step
    stepped = []

    def guarded(self: DecodeGraph) -> torch.Tensor:
        with NoReadback():
            out = real_step(self)
        stepped.append(out.shape)
        assert self.mask is not None and all(st % MASK_ALIGN == 0 for st in self.mask.stride()[:-1])  # no pad a call
        return out

    monkeypatch.setattr(graph_mod.DecodeGraph, "_step", guarded)
    ids, mask = padded_batch(vocab=250, lengths=(7, 4))
    with zstream.load(family_checkpoints[name], device="cpu", progress=False, offload="none") as model:
        _graphed(model)
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 3)
    assert len(stepped) == GRAPH_MIN_STEPS + 2  # every decode step after the prompt, through the fixed-shape step


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_graph_is_made_once_a_cache_and_only_with_room_for_enough_steps(family_checkpoints: dict,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real_init = DecodeGraph.__init__

    def spy(self: DecodeGraph, *args: object, **kwargs: object) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(graph_mod.DecodeGraph, "__init__", spy)
    ids, mask = padded_batch(vocab=250, lengths=(5, 4))
    with zstream.load(family_checkpoints["tiny-llama"], device="cpu", progress=False) as model:
        _graphed(model)
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS)  # a prompt, then 7 steps: too few
        assert made == [] and model._graph is None
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 2)
        assert len(made) == 1 and model._graph is made[0]  # one graph for every step of the cache
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 2)
        assert len(made) == 2 and model._graph is made[1]  # a new cache: a new graph, the old one let go
        model.new_cache(2, 16)
        assert model._graph is None  # let go as the next cache is made (it holds its cache's memory)
        model.plan = dataclasses.replace(model.plan, micro_batch=1)  # micro-batches of one row: not graphed
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 2)
        assert len(made) == 2
        model.plan = dataclasses.replace(model.plan, micro_batch=len(ids))  # the batch in one micro-batch: graphed
        model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 2)
        assert len(made) == 3
    assert model._graph is None


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_every_graph_is_recorded_on_the_devices_one_stream(family_checkpoints: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs are warmed up and captured on one stream a device, made once: torch keeps a cuBLAS workspace for every
    stream a matmul ran on (33 MiB on the H200), so a stream a recording held 33 MiB more each time (runs 3-6 of
    2026-12-05). The CUDA calls are stand-ins here, the capture run eagerly; test_gpu.py measures the memory."""
    made: list = []
    captured: list = []

    class Stream:
        def __init__(self, *args: object) -> None:
            made.append(self)

        def wait_stream(self, other: object) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            pass

    monkeypatch.setattr(graph_mod, "_RECORDING_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream.__new__(Stream))  # (not made: the current one)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: captured.append(stream) or contextlib.nullcontext())
    real_init = DecodeGraph.__init__
    monkeypatch.setattr(graph_mod.DecodeGraph, "__init__",
                        lambda self, *a, capture=True: real_init(self, *a, capture=True))  # type: ignore[misc]
    ids, mask = padded_batch(vocab=250, lengths=(5, 4))
    with zstream.load(family_checkpoints["tiny-llama"], device="cpu", progress=False) as model:
        _graphed(model)
        for _ in range(3):  # a cache each: a graph recorded each
            model.generate(ids, attention_mask=mask, max_new_tokens=GRAPH_MIN_STEPS + 2)
    assert len(made) == 1 and captured == made * 3


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_graphs_pool_is_the_segments_of_its_pool(family_checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """``graph_pool_bytes``: the segments torch's allocator lists under the pool of the last cache's graph, none
    of another pool's or of the ordinary one; None before a graph is recorded (the CUDA calls are stand-ins)."""
    class Graph:
        def pool(self) -> tuple:
            return (0, 7)

    segments = [{"total_size": 2 << 20, "segment_pool_id": (0, 7)}, {"total_size": 20 << 20, "segment_pool_id": (0, 7)},
                {"total_size": 64 << 20, "segment_pool_id": (0, 0)}, {"total_size": 4 << 20, "segment_pool_id": (0, 8)},
                {"total_size": 8 << 20}]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    with zstream.load(family_checkpoints["tiny-llama"], device="cpu", progress=False) as model:
        assert model.graph_pool_bytes() is None
        model._graph = type("Recorded", (), {"graph": Graph()})()  # type: ignore[assignment]
        assert model.graph_pool_bytes() == 22 << 20
        model._graph.graph = None  # type: ignore[union-attr]
        assert model.graph_pool_bytes() is None


def test_the_plan_allows_a_graph_only_where_the_step_is_fixed() -> None:
    on = PlanOptions(offload="none", cuda_graphs=True)
    assert decode_graph_allowed(on, "cuda", streams=False, coded=False)
    assert not decode_graph_allowed(on, "cpu", streams=False, coded=False)            # no CUDA graphs on the CPU
    assert not decode_graph_allowed(on, "cuda", streams=True, coded=False)            # weights move between slots
    assert not decode_graph_allowed(on, "cuda", streams=False, coded=True)            # dequantized every call
    for off in (dataclasses.replace(on, cuda_graphs=False), dataclasses.replace(on, kv_offload="host")):
        assert not decode_graph_allowed(off, "cuda", streams=False, coded=False), off
    # a micro-batch size leaves the plan's graph allowed: a batch no larger runs whole, and the step graphs it (run 5
    # of 2026-12-05: load's micro_batch=16 kept batch 7 eager, where the planner had predicted it graphed)
    assert decode_graph_allowed(dataclasses.replace(on, micro_batch=16), "cuda", streams=False, coded=False)


def test_cuda_graphs_must_be_a_bool_or_none() -> None:
    with pytest.raises(zstream.UsageError, match="cuda_graphs must be True, False or None"):
        zstream.load("unused", cuda_graphs="yes")


def test_decode_steps_are_graphed_by_default_where_they_can_be() -> None:
    """load's default (None) plans an all-resident GPU model's decode steps as a CUDA graph; False keeps them eager;
    the device and the residency still decide (the plan's own rule, above)."""
    default = load_options(device="cpu", offload="none")
    assert default.cuda_graphs is None and default.plan_options().cuda_graphs
    assert decode_graph_allowed(default.plan_options(), "cuda", streams=False, coded=False)
    assert not decode_graph_allowed(default.plan_options(), "cpu", streams=False, coded=False)
    off = load_options(device="cpu", offload="none", cuda_graphs=False)
    assert not off.plan_options().cuda_graphs
    assert load_options(device="cpu", offload="none", cuda_graphs=True).plan_options().cuda_graphs
    for entry in (zstream.load, zstream.plan_batch, load_options):  # each entry point leaves it to the default
        assert inspect.signature(entry).parameters["cuda_graphs"].default is None, entry


def test_ranks_turn_the_default_graphs_off_without_a_warning() -> None:
    """Several tensor-parallel ranks never graph: silently where graphs were left to the default, with a warning
    where they were asked for (test_tensor_parallel.py); one rank keeps the default on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert graphs_for_ranks(None, 2) is False
        assert graphs_for_ranks(False, 2) is False
        assert graphs_for_ranks(None, 1) is True
        assert graphs_for_ranks(False, 1) is False
    with pytest.warns(RuntimeWarning, match="no effect under tensor parallelism"):
        assert graphs_for_ranks(True, 4) is False


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_bench_row_counts_the_steps_a_graph_ran_not_what_the_plan_allowed(family_checkpoints: dict) -> None:
    """``zstream bench``'s row says how many decode steps replayed a graph (``graphed_steps``): its plan's
    ``decode_graph`` only allows one, and a generation too short for a graph ran every step eagerly (a bench row at
    16 new tokens was listed as graphed)."""
    from zstream.interfaces.bench import run_one

    with zstream.load(family_checkpoints["tiny-bloom"], device="cpu", progress=False) as model:
        _graphed(model)
        short = run_one(model, 2, 4, GRAPH_MIN_STEPS)          # GRAPH_MIN_STEPS - 1 decode steps: too few
        long = run_one(model, 2, 4, GRAPH_MIN_STEPS + 3)       # GRAPH_MIN_STEPS + 2 decode steps, every one graphed
        again = run_one(model, 2, 4, GRAPH_MIN_STEPS + 3)      # counted a row at a time
    assert short["graphed_steps"] == 0 and len(short["decode_steps_s"]) == GRAPH_MIN_STEPS - 1
    assert long["graphed_steps"] == again["graphed_steps"] == GRAPH_MIN_STEPS + 2
