"""Measuring the compute model the batch planner predicts with: one block of the real shapes, and the per-pass
work, timed on the device with the engine's own pieces (its attention kernels, its dequantization)."""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import warn
from ..foundations.store import FlatRead, host_buffer
from ..planning.batch import ComputeModel, Linear3
from .blocks import Resident, run_blocks
from .cache import KVCache
from .generate import decode, setup
from .graph import DecodeGraph
from .weights import attention_kernels, local_weights

_COMPUTE_CACHE: Dict[str, ComputeModel] = {}  # calibrations of this process, by ComputeModel.key
# in every key: a calibration stored by an older build lacks what this one times (2: the host prefill, the loop;
# 3: host memory read by the link and the CPUs at once; 4: the uplink's rate, the CPUs' reads from DRAM; 5: the
# CPUs' blocks beside the link's copies; 6: decode steps replayed as a CUDA graph; 7: the CPUs' points from their
# calm rounds, their slow-down beside the link against the block alone in the window before; 8: graph recordings
# after a throwaway capture, fitted without their noise floor; 9: a recording less the replayed step it includes;
# 10: recordings on the device's one recording stream, as the engine's, no longer each setting up a stream of its own;
# 11: graphed steps timed at the model's own block count; 12: sustained, as long as a generation's decode; 13: a
# split pair's prefill; 14: the prefill's fits in seconds; 15: graphed steps synchronised one by one; 16: an eager
# step of every block timed whole; 17: its extra over the parts from the whole step's median, a graphed point timed
# once a round where a prefill point has its batch and length; 18: a pass's decode blocks beside the link's copies;
# 19: the CPUs' rounds scored calm on their slower half of points)
CALIBRATION_FORMAT = 19
# a timed host-compute decode block cycles through this much host cache, so that the CPUs read it from DRAM as the
# engine's layers do, not from their last-level cache (hundreds of MB on a server: one bloom-7b1 layer at batch 8 is
# 71 MB)
HOST_WORKING_SET_BYTES = 1 << 30
UPLINK_PROBE_LAYER_BYTES = 128 << 20  # a layer's cache in the uplink's probe: large copies, at the link's best rate
UPLINK_PROBE_LAYERS = 8               # the layers a probe pass brings up: the pass's first wait is 1/8 of it
CPU_SAMPLE_S = 0.05                   # a host-compute decode block's timing sample: many calls, many layers
# a round of the CPUs' decode points is calm where its points ran within this factor of the calmest round's (their
# time over each point's fastest round, median over the points); the others are spells of a disturbed host, and are
# timed again (up to as many rounds once more). Chosen on the stored calibrations of runs 13-21 (item 31,
# docs/performance.md): 1.15, 1.3, 1.5 and 2 bring 32, 34, 32 and 31 of 41 rows within 10% (all rounds: 31); chosen
# on six runs and scored on the seventh, 33-34 (benches/calm_holdout.py)
CALM_ROUND_TOLERANCE = 1.3
# the share of the CPUs' decode points, the slowest, that score a round's calm (item 59: on run 25's calibration at
# batch 16 the four small points of six, barely slowed, made two rounds 1.45x slow on the largest count as calm)
CALM_SCORED_SHARE = 0.5
COPY_PROBE_CHUNK_BYTES = 256 << 20    # the copies a pass's blocks are timed beside: queued, each this large
SPLIT_PAIR_LAYER_BYTES = 256 << 20    # a split pair's layers up to this size are timed two pairs a pass, larger one
GRAPH_PROBE_FEW = 2                   # a graphed decode step timed over this many blocks and the model's own count
GRAPH_SAMPLE_S = 0.05                 # a few-block graph's timing sample: several steps back to back
# the model's whole graphed step is timed over as long as a generation's decode steps run: sustained, a graphed
# step draws the device to its power cap and its clock down (run 12 of 2026-12-05: bloom-7b1's batch 7 decoded at a
# median 1748 MHz and 480 W, its calibration's 50 ms samples at 1980 MHz; 7.07 ms measured, 6.58 predicted)
GRAPH_SUSTAINED_S = 0.25
GRAPH_PROBE_CACHE_BYTES = 256 << 20   # its blocks take turns over this much cache at most (one layer at the least)
GRAPH_FLOOR_S = 1e-6                  # a graphed sample's part (a difference of timings) at least this
EAGER_SAMPLE_S = 0.1                  # an eager step of every block's timing sample: steps one after another
SAMPLE_MAX_CALLS = 50                 # a timing sample's calls at most, however short a call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_calls(fn: Callable[[], Any], device: torch.device, min_sample_s: float) -> int:
    """How many calls of ``fn`` back to back make a sample of ``min_sample_s`` (so that timer resolution washes out),
    at most ``SAMPLE_MAX_CALLS``: timed on one call, after a warm-up call (allocator, kernel selection)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = time.perf_counter() - t0
    return max(1, min(SAMPLE_MAX_CALLS, int(min_sample_s / max(one, 1e-7))))


def _seconds(fn: Callable[[], Any], device: torch.device, min_sample_s: float, each: bool = False) -> float:
    """Seconds per call of ``fn``: ``sample_calls`` calls back to back with one synchronisation at the end, or with
    ``each`` after every call (a call that the engine starts only once the last one's results are in)."""
    inner = sample_calls(fn, device, min_sample_s)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
        if each:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / inner


def host_attention_s(rows: int, heads: int, keys: int, head_dim: int, dtype: torch.dtype, repeats: int = 5,
                     min_sample_s: float = 0.02) -> float:
    """Seconds of one decode step's attention on the host's CPUs, as a "host-compute" layer runs it: ``rows``
    queries of one token over ``keys`` keys and values of ``heads`` heads ``head_dim`` wide, in ``dtype``; the
    median of ``repeats`` samples (``_seconds``, each at least ``min_sample_s``). A gauge of the CPUs' speed now: on
    a shared host it moves from one minute to the next and within one (performance.md items 56-58), invisibly to
    /proc/stat."""
    gen, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    k, v = (torch.randn(rows, heads, keys, head_dim, generator=gen, dtype=dtype) for _ in range(2))  # (B, nh, S, hs)
    q = torch.randn(rows, heads, 1, head_dim, generator=gen, dtype=dtype)                         # (B, nh, 1, hs)

    def step() -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return statistics.median(_seconds(step, cpu, min_sample_s) for _ in range(repeats))


def _random_weights(family: Any, names: Dict[str, str], dtype: torch.dtype, device: torch.device,
                    gen: torch.Generator) -> Dict[str, Tensor]:
    """{local name: random tensor of the checkpoint's shape}, N(0, 0.02): values only need to be finite (the
    kernels' speed does not depend on them); tensors a tied head shares with the embedding are shared here too."""
    shapes = family.expected_shapes()
    made: Dict[str, Tensor] = {}
    for ckpt in set(names.values()):
        t = torch.randn(shapes[ckpt], generator=gen, dtype=torch.float32).mul_(0.02)
        made[ckpt] = t.to(device=device, dtype=dtype)
    return {local: made[ckpt] for local, ckpt in names.items()}


def compute_key(family: Any, dtype: torch.dtype, device: Union[str, torch.device]) -> str:
    """What a calibration depends on: the block's shapes, the vocabulary, the dtype and the device (its name)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    shapes = family.expected_shapes()
    block = ",".join(f"{local}={list(shapes[c])}" for local, c in sorted(family.block_tensors(0).items()))
    return (f"{type(family).__name__} blocks={family.num_blocks} vocab={family.vocab_size} [{block}] "
            f"{str(dtype).replace('torch.', '')} {name}")


def calibrate_compute(family: Any, device: Union[str, torch.device], dtype: torch.dtype, *, max_batch: int,
                      prompt: int, gen: int, rounds: int = 5, min_sample_s: float = 0.005,
                      max_prefill_tokens: int = 32768, cache: Union[str, os.PathLike, None] = None,
                      seed: int = 0, quant: Any = None, kv_offloads: Sequence[str] = ("none",),
                      batches: Sequence[int] = (), graphs: bool = False) -> ComputeModel:
    """Measure the compute model of ``family`` on ``device``: one block of the real shapes on random weights,
    and the per-pass work (mask, embedding, head), timed at the corners of the range the planner will ask about.

    Decode is timed at batches 1, ~sqrt(max_batch) and max_batch, each at a short and the longest context
    (prompt + gen); prefill at batches 1 and max_batch (capped at ``max_prefill_tokens`` tokens: beyond, the fit is
    linear in tokens) over half the prompt and the whole prompt. A cost grows nonlinearly between few tokens (reading
    the weights dominates) and many (the matmuls dominate), so the fit is only trusted inside that range, which is
    why the range comes from the question being asked. Every point is timed once per round, ``rounds`` rounds, and
    its median kept (``_BlockTimer.sample``).
    ``cache``: a JSON file of calibrations by key and range, read first and written after; calibrations are also
    kept for the life of the process. ``quant`` (a ``quant.BlockQuant``): the block is timed as the engine runs a
    quantized one, its packed weights dequantized before the block's matmuls. ``kv_offloads``: with "host-compute"
    or "split" among them, the block is also timed with its KV cache in host memory and attention on the host's
    CPUs; with "host" or "split", its prefill with the cache in host memory (the prompt's copies down); with "split",
    a pair of the two interleaved as the engine runs them, at every point; all through the engine's own layer
    caches. ``batches``: more decode batches to time (the micro-batches the planner will ask
    about: a block of a micro-batched step is timed at its micro-batch's rows, not read off the fit between the
    corners). ``graphs``: the decode points are also timed as the CUDA graph an all-resident step replays (load's
    ``cuda_graphs``; on a GPU, plain weights only)."""
    dev = torch.device(device)
    max_batch = max(1, int(max_batch))
    longest = min(prompt + gen, family.max_positions)
    prompt = max(1, min(prompt, longest))
    placements = _host_placements(kv_offloads)
    split = "split" in kv_offloads
    # a graph replays steps with the cache on the device only (``residency.decode_graph_allowed``)
    graphs = graphs and "none" in kv_offloads
    extra = sorted({int(b) for b in batches if 1 <= int(b) <= max_batch})
    key = (f"{compute_key(family, dtype, dev)} v{CALIBRATION_FORMAT} batch<={max_batch} prompt={prompt} gen={gen} "
           f"prefill<={max_prefill_tokens}" + (f" at={','.join(map(str, extra))}" if extra else "")
           + (f" quant={quant.cfg.describe()}" if quant is not None else "")
           + (f" kv={','.join(placements + (['split'] if split else []))}" if placements else "")
           + (" graphs" if graphs else ""))
    if key in _COMPUTE_CACHE:
        return _COMPUTE_CACHE[key]
    stored: Dict[str, Any] = json.loads(Path(cache).read_text()) if cache is not None and Path(cache).exists() else {}
    if key in stored:
        _COMPUTE_CACHE[key] = ComputeModel.from_dict(stored[key])
        return _COMPUTE_CACHE[key]

    timer = _BlockTimer(family, dev, dtype, longest, min_sample_s, seed, quant, graphs)
    try:
        points = _points(max_batch, prompt, longest, max_prefill_tokens, extra)
        samples, kv_samples = timer.sample(points, placements, split, rounds)
        shared, uplink, loop = timer.probes(placements, max_batch, rounds)
        copies = timer.copy_probe(max_batch, rounds) if dev.type == "cuda" else []
    finally:
        timer.close()
    model = _fitted(family, dtype, key, samples, kv_samples, shared, uplink, loop, placements, split,
                    max_batch * longest, copies)
    _COMPUTE_CACHE[key] = model
    if cache is not None:
        stored[key] = model.to_dict()
        Path(cache).write_text(json.dumps(stored, indent=1))
    return model


def _host_placements(kv_offloads: Sequence[str]) -> List[str]:
    """The host-cache timings a calibration for ``kv_offloads`` takes. "host" decodes as a device-cache block does:
    its cache comes up ahead of the block, on its own stream (cache.Uplink), and the cache's bytes are a cost of the
    link. Its prefill is timed, through the engine's own host layer: the prompt's keys and values go down to host
    memory on the compute stream (runs 1-4 of 2026-12-04: without it the prefill of "host" and "split" rows came out
    0.61-0.78x of measured). "split" is planned from the host block's and the host-compute block's timings and its
    own pairs' (``_split_pair_s``)."""
    asked = set(kv_offloads)
    up = ["host"] if {"host", "split"} & asked else []
    on_cpus = ["host-compute"] if {"host-compute", "split"} & asked else []
    return up + on_cpus


def _points(max_batch: int, prompt: int, longest: int, max_prefill_tokens: int,
            extra: Sequence[int]) -> List[Tuple[str, int, int, int]]:
    """(phase, batch, new tokens a row, keys attended to): decode at batches 1, ~sqrt(max_batch), max_batch and
    ``extra``, each at half the prompt and the longest context; prefill at batches 1 and the most that
    ``max_prefill_tokens`` allows, over half the prompt and the whole prompt."""
    points = [("decode", B, 1, S) for B in sorted({1, max(1, round(max_batch ** 0.5)), max_batch, *extra})
              for S in sorted({max(1, prompt // 2), longest})]
    points += [("prefill", B, P, P) for B in sorted({1, max(1, min(max_batch, max_prefill_tokens // prompt))})
               for P in sorted({max(1, prompt // 2), prompt})]
    return points


def graph_probe_blocks(num_blocks: int) -> Tuple[int, int]:
    """(few, many): the block counts a graphed decode point is timed over; the difference is blocks', the rest the
    step's. Many is the model's own count, so the step an all-resident generation replays is timed whole, not
    extrapolated from a shorter graph: from graphs of 2 and 8 blocks, runs 7 and 11 of 2026-12-05 predicted
    bloom-7b1's 30-block step at 8.25 and 6.84 ms where both runs measured 7.35-7.57 (x4.7 on their difference's
    noise, and whatever a 30-block graph's replay costs that an 8-block one's does not)."""
    many = max(2, num_blocks)
    return min(GRAPH_PROBE_FEW, many - 1), many


def times_eager_steps(device: torch.device, quant: Any) -> bool:
    """Whether a calibration times whole eager decode steps: on a GPU, where a step's kernels are launched from
    Python while the device waits on them, with plain weights (a packed block's dequantization is its own cost)."""
    return device.type == "cuda" and quant is None


def times_graphs(asked: bool, device: torch.device, quant: Any) -> bool:
    """Whether a calibration times decode steps as CUDA graphs: where asked (load's ``cuda_graphs``), on a GPU, with
    plain weights (a packed block is dequantized every call: the engine does not graph it)."""
    return asked and device.type == "cuda" and quant is None


class _BlockTimer:
    """One block of the family's real shapes on random weights, and the per-pass work, timed on ``device`` as the
    engine runs them: through its layer caches of each placement, and with ``quant`` (a ``quant.BlockQuant``) its
    packed weights dequantized on every call."""

    def __init__(self, family: Any, device: torch.device, dtype: torch.dtype, longest: int, min_sample_s: float,
                 seed: int, quant: Any, graphs: bool = False) -> None:
        self.family, self.dev, self.dtype = family, device, dtype
        self.longest, self.min_sample_s = longest, min_sample_s
        g = torch.Generator().manual_seed(seed)
        block_w = _random_weights(family, family.block_tensors(0), dtype, device, g)
        self.weights: Callable[[], Dict[str, Tensor]] = lambda: block_w
        if quant is not None:  # the block's packed form, dequantized on every call as the engine does
            names = family.block_tensors(0)
            buf, layout = quant.pack({names[k]: v for k, v in block_w.items()}, names, work=device, dest=device)
            packed_w = local_weights(FlatRead(buf, layout), quant.names(names), dtype)
            self.weights = lambda: quant.dequantize(packed_w)
        self.outer_w = _random_weights(family, family.outer_tensors(), dtype, device, g)
        self.host_caches: Dict[Tuple[int, int], KVCache] = {}  # (B, length) -> host-compute decode caches, made once
        # decode steps replayed as a CUDA graph (``graph.DecodeGraph``) where the engine would: on a GPU, plain weights
        self.graphs = times_graphs(graphs, device, quant)
        self.graph_steps: Dict[Tuple[int, int, int], Callable[[], Any]] = {}  # (B, S, blocks) -> one graphed step
        self.graph_records: Dict[Tuple[int, int, int], float] = {}  # (B, S, blocks) -> its first step, recording
        self.graph_probe = graph_probe_blocks(family.num_blocks)  # (few, many) blocks a graphed point is timed over
        self.pair_caches: Dict[int, Tuple[KVCache, int]] = {}  # B -> a split cache (up, CPUs, ...) and its pairs
        self.eager = times_eager_steps(device, quant)  # decode points also timed as a whole eager step

    def close(self) -> None:
        """Let the timer's weights and caches go now, not when it is collected: frames held in a reference cycle keep
        it until a garbage collection. A process whose first import of transformers runs inside the calibration
        (``_decode_loop_s``) keeps the calibration's frames so, under that import's: its block and outer weights,
        2.5 GB of bloom-7b1, and its caches."""
        self.weights = dict
        self.outer_w = {}
        self.host_caches.clear()
        self.pair_caches.clear()
        self.graph_steps.clear()

    def block_call(self, B: int, T: int, S: int, kv: str = "none") -> Callable[[], Any]:
        """One block over T new tokens a row (B rows), attending to S keys (the cache holds S - T before). The cache
        is as long as a real run's (prompt + gen), so attention reads the same strided views of it; with ``kv`` in
        host memory, laid out and attended to as the engine's host layers are. A host-compute decode block takes the
        next of enough layers to read ``HOST_WORKING_SET_BYTES`` from DRAM."""
        fam, dev, dtype = self.family, self.dev, self.dtype
        nkv, hs = fam.num_kv_heads, fam.head_dim
        hidden = torch.randn(B, T, fam.hidden_size, device=dev, dtype=dtype)               # (B, T, C)
        L = max(S, self.longest)
        ctx = fam.context(torch.ones(B, S, dtype=torch.long, device=dev), T, dtype)
        if kv == "host-compute" and T == 1:
            layer_bytes = 2 * B * L * nkv * hs * dtype.itemsize
            layers = max(1, min(fam.num_blocks, -(-HOST_WORKING_SET_BYTES // layer_bytes)))
            if (B, L) not in self.host_caches:
                self.host_caches[(B, L)] = KVCache(layers, B, L, nkv, hs, dtype, dev, device_layers=0,
                                                   host_compute=True)
            turn, many = itertools.cycle(range(layers)), self.host_caches[(B, L)]
            return lambda: fam.block(self.weights(), hidden, many.layer(next(turn)), ctx)
        cache = KVCache(1, B, L, nkv, hs, dtype, dev, device_layers=None if kv == "none" else 0,
                        host_compute=kv == "host-compute")
        # the layer's cache taken as the engine takes it, once a block (its views cost launch time too)
        return lambda: fam.block(self.weights(), hidden, cache.layer(0), ctx)

    def time_block(self, B: int, T: int, S: int, kv: str = "none") -> float:
        # the CPUs' blocks over a longer sample: on a shared host their speed drifts within milliseconds (runs 13-14
        # of 2026-12-04: two calibrations minutes apart put one block 16% apart), and a step is seconds of them
        cpus = kv == "host-compute" and T == 1
        sample_s = max(self.min_sample_s, CPU_SAMPLE_S) if cpus else self.min_sample_s
        # (a prefill block timed a pass's worth of calls back to back moved its fit 0-5% and left the prefill 3-13%
        # slower than predicted: run 6 of 2026-12-05, docs/performance.md item 35)
        return _seconds(self.block_call(B, T, S, kv), self.dev, sample_s)

    def time_kv(self, kv: str, B: int, T: int, S: int) -> float:
        """A block with its cache placed by ``kv`` ("host", "host-compute"), or a "split" pair of them."""
        if kv == "split":
            return _split_pair_s(self.family, self.weights, self.dev, self.dtype, B, T, S, self.longest,
                                 self.pair_caches)
        return self.time_block(B, T, S, kv)

    def time_graph(self, B: int, S: int, blocks: int) -> float:
        """A decode step replayed from a CUDA graph of ``blocks`` blocks, as the engine runs one: its context made
        eagerly and copied in, the replay, the logits taken out (recorded once a point, replayed every round; on the
        CPU the same fixed-shape step, run eagerly)."""
        point = (B, S, blocks)
        if not self.graph_steps:  # a sampling's first capture pays once for what later ones reuse
            self._graph_step(B, S, 1)()
        if point not in self.graph_steps:
            self.graph_steps[point] = self._graph_step(B, S, blocks)
            _sync(self.dev)
            t0 = time.perf_counter()
            self.graph_steps[point]()  # the first step records the graph (and replays it)
            _sync(self.dev)
            self.graph_records[point] = time.perf_counter() - t0
        sample_s = GRAPH_SUSTAINED_S if blocks == self.graph_probe[1] else GRAPH_SAMPLE_S
        # each step waits for the last one's results, as a generation waits for its tokens: the host's work before a
        # replay (the context, the graph's inputs, the launch) runs while the device idles, not under the last replay
        return _seconds(self.graph_steps[point], self.dev, max(self.min_sample_s, sample_s), each=True)

    def _probe_inputs(self, B: int, S: int, blocks: int) -> Tuple[KVCache, Tensor, Tensor]:
        """A whole-step probe's device cache, which its ``blocks`` blocks take in turn (``cache.device_layers`` of
        them, up to ``GRAPH_PROBE_CACHE_BYTES``), and a decode step's token ids (B, 1) and mask (B, S)."""
        fam, dev = self.family, self.dev
        layer_bytes = 2 * B * self.longest * fam.num_kv_heads * fam.head_dim * self.dtype.itemsize
        layers = max(1, min(blocks, GRAPH_PROBE_CACHE_BYTES // layer_bytes))
        cache = KVCache(layers, B, self.longest, fam.num_kv_heads, fam.head_dim, self.dtype, dev)
        ids = torch.ones(B, 1, dtype=torch.long, device=dev)                              # (B, 1)
        mask = torch.ones(B, S, dtype=torch.long, device=dev)                             # (B, S)
        return cache, ids, mask

    def _graph_step(self, B: int, S: int, blocks: int) -> Callable[[], Any]:
        """A graphed decode step of ``blocks`` blocks at batch ``B`` over ``S`` keys (recorded at its first call)."""
        fam = self.family
        cache, ids, mask = self._probe_inputs(B, S, blocks)
        graph = DecodeGraph(fam, self.outer_w, [self.weights()] * blocks, cache, capture=self.dev.type == "cuda")
        return lambda: graph(ids, fam.context(mask, 1, self.dtype))

    def time_eager(self, B: int, S: int) -> float:
        """An eager decode step of the model's every block at batch ``B`` over ``S`` keys, resident with the cache
        on the device, as the engine runs one: its context, embedding, the engine's block loop
        (``blocks.run_blocks``) and the head, each step starting once the last one's results are in. Made again at
        every call (its cache up to ``GRAPH_PROBE_CACHE_BYTES``), so that the device holds one point's at a time."""
        return _seconds(self._eager_step(B, S), self.dev, max(self.min_sample_s, EAGER_SAMPLE_S), each=True)

    def _eager_step(self, B: int, S: int) -> Callable[[], Any]:
        fam = self.family
        cache, ids, mask = self._probe_inputs(B, S, fam.num_blocks)
        layers = cache.device_layers
        blocks = Resident(dict.fromkeys(range(fam.num_blocks), self.weights()), None)

        def step() -> Tensor:
            ctx = fam.context(mask, 1, self.dtype)
            hidden = run_blocks(fam, blocks, [fam.embed(self.outer_w, ids, ctx)],
                                lambda i, rows: cache.layer(i % layers, rows), [slice(None)], [ctx])
            return fam.head(self.outer_w, hidden[0][:, -1:])                           # (B, 1, vocab)
        return step

    def time_outer(self, B: int, T: int, S: int) -> float:
        """What a pass does besides its blocks: the context (mask, ALiBi, RoPE), the embedding, the last position's
        head."""
        fam, dev = self.family, self.dev
        ids = torch.randint(0, fam.vocab_size, (B, T), device=dev)                       # (B, T)
        mask = torch.ones(B, S, dtype=torch.long, device=dev)                           # (B, S)

        def outer() -> Tensor:
            ctx = fam.context(mask, T, self.dtype)
            h = fam.embed(self.outer_w, ids, ctx)                                      # (B, T, C)
            return fam.head(self.outer_w, h[:, -1:])                                   # (B, 1, vocab)
        return _seconds(outer, dev, self.min_sample_s)

    def sample(self, points: List[Tuple[str, int, int, int]], placements: List[str], split: bool,
               rounds: int) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """Every point timed once a round, ``rounds`` rounds, and its median kept: on a shared host the speed of
        launching kernels from Python drifts by up to 2x for seconds at a time (seen on the H100 VM), and
        interleaving spreads such a spell over all points instead of one. The CPUs' decode points (host-compute
        blocks, split pairs) keep the median of their calm rounds (``calm_rounds``), timed again where fewer than
        ``rounds`` were calm. (device samples, host-cache samples)"""
        times: Dict[Tuple[str, int, int, int], Tuple[List[float], List[float]]] = {p: ([], []) for p in points}
        kv_times: Dict[Tuple[str, str, int, int, int], List[float]] = {
            (kv, *p): [] for kv in placements for p in points if kv != "host" or p[0] == "prefill"}
        if split:  # the split's interleaving, at every point: the prefill's too (runs 3-4 of 2026-12-06, an H100
            # host: a split prefill at batch 8 ran slower than a "host" and a "host-compute" one alone)
            kv_times.update({("split", *p): [] for p in points})
        graph_times: Dict[Tuple[int, int], List[Tuple[float, float]]] = {
            (B, S): [] for phase, B, _, S in points if phase == "decode" and self.graphs}
        eager_times: Dict[Tuple[int, int], List[float]] = {
            (B, S): [] for phase, B, _, S in points if phase == "decode" and self.eager}
        on_cpus = [k for k in kv_times if k[1] == "decode" and k[0] in ("host-compute", "split")]
        with torch.inference_mode(), attention_kernels(self.dev):
            for _ in range(max(1, rounds)):
                for p in points:
                    phase, B, T, S = p
                    times[p][0].append(self.time_block(B, T, S))
                    times[p][1].append(self.time_outer(B, T, S))
                    for kv in (*placements, "split"):
                        if (kv, *p) in kv_times:
                            kv_times[(kv, *p)].append(self.time_kv(kv, B, T, S))
                    if phase != "decode":  # (a prefill's (B, prompt) may be a decode point's (B, context) too)
                        continue
                    if (B, S) in graph_times:
                        few, many = self.graph_probe
                        graph_times[(B, S)].append((self.time_graph(B, S, few), self.time_graph(B, S, many)))
                    if (B, S) in eager_times:
                        eager_times[(B, S)].append(self.time_eager(B, S))
            for _ in range(max(1, rounds)):  # the CPUs' points again, until as many rounds as asked were calm
                if not on_cpus or len(calm_rounds([kv_times[k] for k in on_cpus])) >= rounds:
                    break
                for kv, _, B, T, S in on_cpus:
                    kv_times[(kv, "decode", B, T, S)].append(self.time_kv(kv, B, T, S))
        calm = calm_rounds([kv_times[k] for k in on_cpus]) if on_cpus else []
        if on_cpus and len(calm) < rounds:
            taken = len(kv_times[on_cpus[0]])
            warn(f"zstream: calibrating the CPUs' attention, {taken - len(calm)} of {taken} rounds ran slower than the "
                 f"calmest by more than {CALM_ROUND_TOLERANCE}x (the host's CPUs were busy with other work); the "
                 f"prediction of placements that attend on the CPUs rests on {len(calm)} rounds", RuntimeWarning)
        self.pair_caches.clear()
        self.graph_steps.clear()  # (the graphs and their caches' memory)
        samples: List[Dict[str, Any]] = []
        for (phase, B, T, S), (blk, out) in times.items():
            where = {"context": S} if phase == "decode" else {"prompt": T}
            samples.append({"phase": phase, "batch": B, **where, "block_s": statistics.median(blk),
                            "outer_s": statistics.median(out), "block_rounds_s": blk, "outer_rounds_s": out})
        kv_samples: List[Dict[str, Any]] = [{"kv_offload": kv, "phase": phase, "batch": B, "tokens": T, "keys": S,
                       "block_s": statistics.median(t), "block_rounds_s": t}
                      for (kv, phase, B, T, S), t in kv_times.items()]
        for s in kv_samples:
            if (s["kv_offload"], s["phase"], s["batch"], s["tokens"], s["keys"]) in on_cpus:
                s.update(block_s=statistics.median(s["block_rounds_s"][i] for i in calm), calm_rounds=calm)
        few, many = self.graph_probe
        graphed = [_graph_sample(B, S, t, (self.graph_records[(B, S, few)], self.graph_records[(B, S, many)]),
                                 self.graph_probe)
                   for (B, S), t in graph_times.items()]
        self.graph_records.clear()
        eager = [{"phase": "eager", "batch": B, "context": S, "step_s": statistics.median(t), "step_rounds_s": t}
                 for (B, S), t in eager_times.items()]
        return samples + graphed + eager, kv_samples

    def probes(self, placements: List[str], max_batch: int, rounds: int,
               shared_probe: Optional[bool] = None) -> Tuple[List[Dict[str, Any]], ...]:
        """(shared, uplink, loop): host memory read by the link and the CPUs at once (a "split" step, and
        "host-compute" with weights streaming; ``shared_probe``, by default on a GPU only), the engine's uplink
        ("host"), the decode loop's own work."""
        fam, dev, dtype = self.family, self.dev, self.dtype
        shared: List[Dict[str, Any]] = []
        if "host-compute" in placements and (dev.type == "cuda" if shared_probe is None else shared_probe):
            with torch.inference_mode(), attention_kernels(dev):
                cpu_block = self.block_call(max_batch, 1, self.longest, "host-compute")
                cpu_bytes = max_batch * self.longest * fam.num_kv_heads * fam.head_dim * 2 * dtype.itemsize
                shared = [_shared_read(cpu_block, cpu_bytes, dev) for _ in range(max(1, rounds))]
        self.host_caches.clear()
        uplink = [_uplink_sample(fam, self.weights, dev, dtype, max_batch, self.longest, rounds)] \
            if "host" in placements else []
        loop = [{"phase": "loop", "batch": B, "step_s": _decode_loop_s(fam, dev, dtype, B, rounds)}
                for B in sorted({1, max_batch})]
        return shared, uplink, loop

    def copy_probe(self, max_batch: int, rounds: int) -> List[Dict[str, Any]]:  # GPU only
        """A pass's decode blocks (the model's count, at ``max_batch`` and the longest context) alone and beside
        host-to-device copies queued on a stream of their own for longer than the blocks run, as a streamed block's
        land while the resident ones compute (run 16 of 2026-12-06: bloom-7b1's 30 blocks at batch 7 took 1.052x as
        long beside one block's copy); a round each, alternating, every block's time on the device's clock."""
        fam, dev = self.family, self.dev
        src = host_buffer(COPY_PROBE_CHUNK_BYTES, pin=True)  # (let go with the probe, unlike torch's pinned cache)
        dst = torch.empty(COPY_PROBE_CHUNK_BYTES, dtype=torch.uint8, device=dev)
        copies = torch.cuda.Stream(dev)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode(), attention_kernels(dev):
            block = self.block_call(max_batch, 1, self.longest)

            def blocks_s(beside: int) -> float:
                _sync(dev)
                with torch.cuda.stream(copies):
                    for _ in range(beside):
                        dst.copy_(src, non_blocking=True)
                begin.record()
                for _ in range(fam.num_blocks):
                    block()
                end.record()
                _sync(dev)
                return begin.elapsed_time(end) / 1e3

            alone = blocks_s(0)  # (warm-up: the kernels, the allocator)
            with torch.cuda.stream(copies):  # the link's rate sizes the queue; the first copy pays for set-up
                dst.copy_(src, non_blocking=True)
                copies.synchronize()
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                copies.synchronize()
                chunk_s = time.perf_counter() - t0
            beside = 2 + int(2 * alone / chunk_s)  # the link busy from before the blocks start until past their end
            out = []
            for _ in range(max(3, rounds)):
                out.append({"phase": "copy_busy", "batch": max_batch, "context": self.longest,
                            "alone_s": blocks_s(0), "beside_s": blocks_s(beside), "chunks": beside,
                            "chunk_gbps": COPY_PROBE_CHUNK_BYTES / chunk_s / 1e9})
        return out


def copy_busy_factor(samples: Sequence[Dict[str, Any]]) -> Optional[float]:
    """How much longer a pass's blocks took beside the link's copies than alone: their medians' ratio, never below
    1 (a faster pass beside them is noise, not a gain); None where not timed."""
    timed = [s for s in samples if s.get("phase") == "copy_busy"]
    if not timed:
        return None
    return max(1.0, statistics.median(s["beside_s"] for s in timed) / statistics.median(s["alone_s"] for s in timed))


def calm_rounds(rounds_by_point: Sequence[Sequence[float]], tolerance: float = CALM_ROUND_TOLERANCE,
                scored_share: float = CALM_SCORED_SHARE) -> List[int]:
    """The rounds (indices) in which the CPUs' points ran undisturbed: a round's disturbance is its points' times
    over each point's fastest round, their median; a round is calm within ``tolerance`` of the calmest. On a shared
    host the CPUs' attention slows by 2-4x for seconds at a time (run 21 of 2026-12-04: rounds of one split pair at
    21.1, 5.2, 7.8, 6.2 and 19.2 ms, the run's steps steady at the fast ones); interleaving the points spreads a spell
    over a round, so a round, not a point, is what it disturbs. Only the slowest ``scored_share`` of the points (by
    their fastest round) score a round: a busy host slows the large points, which read the most host memory and are
    where the rows run, and barely the small ones, which would otherwise outvote them (item 59). ``rounds_by_point``:
    per point, its time each round (the rounds in the same order for every point)."""
    if not rounds_by_point:
        return []
    n = min(len(r) for r in rounds_by_point)
    by_size = sorted(rounds_by_point, key=lambda r: min(r[:n]), reverse=True)
    scored = by_size[:max(1, math.ceil(scored_share * len(by_size)))]
    fastest = [max(min(r[:n]), 1e-12) for r in scored]
    scores = [statistics.median(r[i] / f for r, f in zip(scored, fastest)) for i in range(n)]
    calmest = min(scores, default=0.0)
    return [i for i, score in enumerate(scores) if score <= calmest * tolerance]


def eager_extra_fit(samples: Sequence[Dict[str, Any]], num_blocks: int) -> Optional[Linear3]:
    """What a whole eager step takes over its blocks and outer work, fitted over (batch, context) in seconds: at each
    decode point its steps' median less ``num_blocks`` times the block's median and the outer work's, the medians the
    device fits take, so that the prediction gives back the step as timed (as a graphed point's parts do), at the
    floor where that came out at or below zero. Not each round's own difference: those moved by milliseconds from
    round to round (docs/performance.md item 47). None where no point was timed whole."""
    decode = {(s["batch"], s["context"]): s for s in samples if s.get("phase") == "decode" and "kv_offload" not in s}
    points = [(s["batch"], s["context"], max(GRAPH_FLOOR_S, s["step_s"] - num_blocks * d["block_s"] - d["outer_s"]))
              for s in samples if s.get("phase") == "eager" and (d := decode.get((s["batch"], s["context"])))]
    return Linear3.fit(points, relative=False) if points else None


def _graph_sample(B: int, S: int, rounds: List[Tuple[float, float]], records: Tuple[float, float],
                  probe: Tuple[int, int]) -> Dict[str, Any]:
    """A graphed decode step's sample from its rounds of (few blocks, many blocks): a block is the difference over
    the blocks between, the rest of the step (context, copies in and out, the replay's launch) what remains; and the
    same of ``records``, the first step of each (the graph recorded: a warm-up step, the capture and a replay), less
    the replayed step's: what recording adds to a generation's first step."""
    few, many = probe

    def split(pairs: Sequence[Tuple[float, float]]) -> Tuple[List[float], List[float]]:
        blocks = [(t_many - t_few) / (many - few) for t_few, t_many in pairs]
        return blocks, [t_few - few * b for (t_few, _), b in zip(pairs, blocks)]
    blocks, outer = split(rounds)
    block = statistics.median(blocks)
    # the rest is what the step of ``many`` blocks leaves of its median: that step, the one an all-resident
    # generation replays, comes out as timed
    rest = statistics.median(t_many for _, t_many in rounds) - many * block
    (record_block,), (record_outer,) = split([records])
    # a recording's first step replays the graph too: what it adds is what it took over a replayed step
    record_block -= block
    record_outer -= rest
    # (at least the floor: a difference of two noisy timings can come out at or below zero, and fits need > 0)
    f = GRAPH_FLOOR_S
    return {"phase": "graph", "batch": B, "context": S, "block_s": max(f, block), "outer_s": max(f, rest),
            "block_rounds_s": blocks, "outer_rounds_s": outer,
            "record_block_s": max(f, record_block), "record_outer_s": max(f, record_outer)}


def _fitted(family: Any, dtype: torch.dtype, key: str, samples: List[Dict[str, Any]],
            kv_samples: List[Dict[str, Any]], shared: List[Dict[str, Any]], uplink: List[Dict[str, Any]],
            loop: List[Dict[str, Any]], placements: List[str], split: bool, rows_keys: int,
            copies: Sequence[Dict[str, Any]] = ()) -> ComputeModel:
    """The compute model fitted to a calibration's timings; ``rows_keys``: the shared probe's batch x keys;
    ``copies``: the copy probe's rounds (``_BlockTimer.copy_probe``)."""
    dec = [s for s in samples if s["phase"] == "decode"]
    graphed = [s for s in samples if s["phase"] == "graph"]
    busy = [s for s in shared if s["link_busy"]]
    decode_block = Linear3.fit([(s["batch"], s["context"], s["block_s"]) for s in dec])

    def kv_fit(kv: str) -> Linear3:  # a decode block with its cache placed by ``kv`` (or the split pair)
        return Linear3.fit([(s["batch"], s["keys"], s["block_s"]) for s in kv_samples
                            if s["kv_offload"] == kv and s["phase"] == "decode"])
    return ComputeModel(
        num_blocks=family.num_blocks,
        decode_block=decode_block,
        decode_outer=Linear3.fit([(s["batch"], s["context"], s["outer_s"]) for s in dec]),
        prefill_block=prefill_fit(prefill_points(samples)),
        prefill_outer=prefill_fit(prefill_points(samples, what="outer_s")),
        decode_loop=Linear3.fit([(s["batch"], 0.0, s["step_s"]) for s in loop]),
        key=key, samples=samples + kv_samples + loop + shared + uplink + list(copies),
        kv_blocks={kv: (decode_block if kv == "host" else kv_fit(kv), prefill_fit(prefill_points(kv_samples, kv)))
                   for kv in placements},
        split_pair=kv_fit("split") if split else None,
        split_pair_prefill=prefill_fit(prefill_points(kv_samples, "split")) if split else None,
        host_read_gbps=_host_read_gbps(dec, kv_samples, family.num_kv_heads * family.head_dim * 2 * dtype.itemsize),
        shared_read_gbps=statistics.median(s["gbps"] for s in busy) if busy else None,
        uplink_gbps=uplink[0]["gbps"] if uplink else None,
        cpu_busy_factor=_cpu_busy_factor(kv_samples, busy, rows_keys), copy_busy_factor=copy_busy_factor(copies),
        decode_graph_block=_graph_fit(graphed, "block_s"), decode_graph_outer=_graph_fit(graphed, "outer_s"),
        decode_graph_record_block=_graph_fit(graphed, "record_block_s"),
        decode_graph_record_outer=_graph_fit(graphed, "record_outer_s"),
        decode_eager_extra=eager_extra_fit(samples, family.num_blocks))


def prefill_points(samples: Sequence[Dict[str, Any]], kv: Optional[str] = None,
                   what: str = "block_s") -> List[Tuple[float, float, float]]:
    """A prefill fit's points, (batch x prompt, prompt, seconds), out of a calibration's samples: the device block's
    (``kv`` None; ``what``: its "block_s", or the pass's "outer_s"), or a block's with its cache placed by ``kv``
    ("host", "host-compute"; "split": the pair). The one selection the calibration's fits and a replay's take."""
    if kv is None:
        return [(s["batch"] * s["prompt"], s["prompt"], s[what]) for s in samples
                if s.get("phase") == "prefill" and "kv_offload" not in s]
    return [(s["batch"] * s["tokens"], s["tokens"], s[what]) for s in samples
            if s.get("kv_offload") == kv and s.get("phase") == "prefill"]


def prefill_fit(points: List[Tuple[float, float, float]]) -> Linear3:
    """A prefill's fit over (batch x prompt, prompt, seconds), in seconds rather than relative error. Its smallest
    points sit at the launch floor (a batch-1 block takes about as long over 256 tokens as over 512), which no
    c0 + c1 x + c2 x y follows; a relative fit splits that miss across every point and put the largest, the one a
    row's micro-batch runs at, 3-8% under its own timing (every calibration of run 12 of 2026-12-05 and runs 2-4 of
    2026-12-06, 24). In seconds the miss goes to the small points, whose prefill is milliseconds beside a generation's
    steps (docs/performance.md item 44)."""
    return Linear3.fit(points, relative=False)


def _graph_fit(graphed: List[Dict[str, Any]], what: str) -> Optional[Linear3]:
    """The fit of the graphed decode samples' ``what`` over (batch, context); None where none was timed. A sample at
    the floor (a difference of two timings that came out at or below zero: noise, not a cost) is left out where
    others are not: a fit in relative error would bend every coefficient to it (run 4 of 2026-12-05: the first
    point's recording, at the floor, put a block's recording at 0.5 us where the engine's took 0.4 ms)."""
    usable = [s for s in graphed if s[what] > GRAPH_FLOOR_S] or graphed
    return Linear3.fit([(s["batch"], s["context"], s[what]) for s in usable]) if usable else None


def _decode_loop_s(family: Any, device: torch.device, dtype: torch.dtype, batch: int, rounds: int,
                   steps: int = 16) -> float:
    """Seconds a decode step spends outside its pass: ``generate.decode``'s own work (the last position's logits in
    fp32, the greedy token, finished rows, the stop criteria and the synchronisation that reads them) and the cache's
    mask extended, timed with a forward that returns fixed logits (token 1, never the end of sequence); the median of
    ``rounds`` runs of ``steps`` steps."""
    from transformers import GenerationConfig

    V = family.vocab_size
    logits = torch.zeros(batch, 1, V, dtype=dtype, device=device)                        # (B, 1, V)
    logits[..., 1] = 1.0
    ids = torch.ones(batch, 1, dtype=torch.long, device=device)                           # (B, 1)
    config = GenerationConfig(max_new_tokens=steps, eos_token_id=V - 1, pad_token_id=0)
    s = setup(config, {"max_new_tokens"}, ids, torch.ones_like(ids), tokenizer=None)

    def forward(step_ids: Tensor, step_mask: Tensor, cache: KVCache) -> Tensor:
        cache.extend(step_mask)
        return logits

    def run() -> float:
        cache = KVCache(1, batch, steps + 1, 1, 1, dtype, device)
        _sync(device)
        t0 = time.perf_counter()
        for _ in decode(forward, ids, torch.ones_like(ids), cache, s):
            pass
        _sync(device)
        return (time.perf_counter() - t0) / steps

    run()  # warm-up
    return statistics.median(run() for _ in range(max(1, rounds)))


def _split_pair_s(family: Any, weights: Callable[[], Dict[str, Tensor]], device: torch.device, dtype: torch.dtype,
                  B: int, T: int, S: int, longest: int, caches: Dict[int, Tuple[KVCache, int]]) -> float:
    """A "split" pair, as the engine interleaves it: a layer brought up, then a layer on the CPUs, over T new tokens
    a row (B rows) attending to S keys (a prefill: T = S, the prompt's keys and values going down to host memory as
    the engine's layers send them); the up-layers' caches landed before the clock starts (the link is the
    planner's to count), so the time is the two blocks' and what their interleaving adds (run 12 of 2026-12-04: an
    up-layer between two CPU layers cost 0.57 ms at bloom-7b1's batch 16, its device block 0.24). Two pairs a pass
    where a layer is at most ``SPLIT_PAIR_LAYER_BYTES``, else one; the median of three passes. ``caches``: the
    split caches by batch, made here once."""
    nkv, hs = family.num_kv_heads, family.head_dim
    if B not in caches:
        pairs = 2 if 2 * B * longest * nkv * hs * dtype.itemsize <= SPLIT_PAIR_LAYER_BYTES else 1
        caches[B] = (KVCache(2 * pairs, B, longest + 1, nkv, hs, dtype, device, device_layers=0,
                             host_compute=list(range(1, 2 * pairs, 2)), uplink_slots=pairs), pairs)
    cache, pairs = caches[B]
    hidden = torch.randn(B, T, family.hidden_size, device=device, dtype=dtype)         # (B, T, C)
    new = torch.ones(B, T, dtype=torch.long, device=device)                            # (B, T)

    def one_pass() -> float:
        cache.reset()
        if S > T:
            cache.extend(torch.ones(B, S - T, dtype=torch.long, device=device))  # the earlier keys (any values)
        mask, _ = cache.extend(new)  # the pass begins: every up-layer's earlier cache starts up (a slot each)
        ctx = family.context(mask, T, dtype)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(2 * pairs):
            family.block(weights(), hidden, cache.layer(i), ctx)
        _sync(device)
        return (time.perf_counter() - t0) / pairs

    one_pass()  # warm-up
    return statistics.median(one_pass() for _ in range(3))


def _uplink_sample(family: Any, weights: Callable[[], Dict[str, Tensor]], device: torch.device, dtype: torch.dtype,
                   max_batch: int, longest: int, rounds: int) -> Dict[str, Any]:
    """The rate at which the engine's ``Uplink`` brings host layers' caches up in a decode pass, each layer's block
    running as its cache lands: ``UPLINK_PROBE_LAYERS`` layers of about ``UPLINK_PROBE_LAYER_BYTES`` (the batch that
    makes them, at most ``max_batch``), every earlier key and value of the longest context, the median of ``rounds``
    passes. Runs 5 and 10 of 2026-12-04 measured "host" steps at 87-91% of their bytes at the link's large-copy rate:
    the layers' copies up, each followed by its reordering on the device on the same stream, with the pass waiting
    for the first, come up slower than the link's probe."""
    nkv, hs = family.num_kv_heads, family.head_dim
    start = longest - 1                                   # keys before the pass's new token
    per_row = 2 * start * nkv * hs * dtype.itemsize       # one layer's keys and values, a row
    B = max(1, min(max_batch, UPLINK_PROBE_LAYER_BYTES // per_row))
    layers = min(family.num_blocks, UPLINK_PROBE_LAYERS)
    passes = max(1, rounds) + 1
    cache = KVCache(layers, B, longest + passes, nkv, hs, dtype, device, device_layers=0)
    cache.extend(torch.ones(B, start, dtype=torch.long, device=device))          # the prompt's slots (any values)
    hidden = torch.randn(B, 1, family.hidden_size, device=device, dtype=dtype)     # (B, 1, C)
    new = torch.ones(B, 1, dtype=torch.long, device=device)                        # (B, 1)

    def one_pass() -> float:
        _sync(device)
        t0 = time.perf_counter()
        mask, _ = cache.extend(new)  # the pass begins: the first layers' caches start up
        ctx = family.context(mask, 1, dtype)
        for i in range(layers):
            family.block(weights(), hidden, cache.layer(i), ctx)
        _sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode(), attention_kernels(device):
        one_pass()  # warm-up: the device buffers, the kernels
        pass_s = statistics.median(one_pass() for _ in range(passes - 1))
    nbytes = layers * B * per_row  # each pass a token longer: within 1/longest of it
    return {"phase": "uplink", "batch": B, "layers": layers, "bytes": nbytes, "pass_s": pass_s,
            "gbps": nbytes / pass_s / 1e9}


def _host_read_gbps(device: List[Dict[str, Any]], host: List[Dict[str, Any]], key_bytes: int) -> Optional[float]:
    """GB/s at which the CPUs read a host cache as they attend: a layer's keys and values (``key_bytes`` per row and
    key) over the time a host-compute block takes beyond the device block, at the largest batch and context timed
    (where the cache's reading dominates); None without host-compute timings."""
    timed = [s for s in host if s["kv_offload"] == "host-compute" and s["phase"] == "decode"]
    if not timed:
        return None
    top = max(timed, key=lambda s: (s["batch"] * s["keys"], s["keys"]))
    same = [s for s in device if s["batch"] == top["batch"] and s["context"] == top["keys"]]
    extra = top["block_s"] - (same[0]["block_s"] if same else 0.0)
    return top["batch"] * top["keys"] * key_bytes / extra / 1e9 if extra > 0 else None


def _cpu_busy_factor(host: List[Dict[str, Any]], busy: List[Dict[str, Any]], rows_keys: int) -> Optional[float]:
    """How much longer the shared probe's host-compute block (``rows_keys`` = batch x keys, the largest point) took
    with the link copying beside it than alone: each busy window's call (bytes a call over the CPUs' rate) over the
    block's call alone just before it (``alone_call_s``; a probe from before format 7: the point's calibrated
    time, minutes apart), their median; never below 1 (a faster window is noise, not a gain). None where either
    was not timed."""
    alone = [s for s in host if s["kv_offload"] == "host-compute" and s["phase"] == "decode"
             and s["batch"] * s["keys"] == rows_keys]
    windows = [s for s in busy if s.get("calls") and s["cpu_gbps"]]
    if not alone or not windows:
        return None
    ratios = [s["cpu_bytes"] / s["calls"] / (s["cpu_gbps"] * 1e9) / (s.get("alone_call_s") or alone[0]["block_s"])
              for s in windows]
    return max(1.0, statistics.median(ratios))


def _shared_read(cpu_block: Callable[[], Any], cpu_bytes: int, device: torch.device,  # GPU only
                 window_s: float = 0.25, chunk: int = 256 << 20) -> Dict[str, Any]:
    """Host memory read by the link and the CPUs at once: ``cpu_block`` (a host-compute block, reading ``cpu_bytes``
    of host cache a call) called back to back while pinned host-to-device copies of ``chunk`` bytes run queued on a
    stream of their own, as the ring's and the uplink's do in a step. The copies are queued before the window opens,
    enough to outlast it at twice their rate alone; the window lasts ``window_s`` and at least ten calls, and closes
    early if the copies end first. Just before it, the block runs alone for as long (``alone_call_s``, its call).
    Where the window falls on the copy stream is read from events recorded on the compute stream, which runs the
    block's kernels (run 8 of 2026-12-04: events on a third stream, idle, were stamped after every copy in 4 windows
    of 10, as if queued behind them: CUDA maps streams onto a few hardware queues)."""
    src = torch.empty(chunk, dtype=torch.uint8).pin_memory()
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    copies = torch.cuda.Stream(device)
    with torch.cuda.stream(copies):  # the link's rate alone sizes the queue; the first copy pays for set-up
        dst.copy_(src, non_blocking=True)
        copies.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
        copies.synchronize()
        alone = 4 * chunk / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    cpu_block()
    _sync_stream(device)
    call_s = time.perf_counter() - t0
    window_s = max(window_s, 10 * call_s)
    alone_calls, t0 = 0, time.perf_counter()  # the block alone, just before its busy window: their ratio is the
    while time.perf_counter() - t0 < window_s:  # CPUs' slow-down, not the host's drift between the two
        cpu_block()
        alone_calls += 1
    _sync_stream(device)
    alone_call_s = (time.perf_counter() - t0) / alone_calls
    queued_s = window_s + 2 * call_s  # the window overshoots by at most a call
    start = torch.cuda.Event(enable_timing=True)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(max(16, int(2 * alone * queued_s / chunk) + 4))]
    opened, closed = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(copies):
        start.record()
        for end in ends:
            dst.copy_(src, non_blocking=True)
            end.record()
    calls, t0 = 0, time.perf_counter()
    opened.record()
    while time.perf_counter() - t0 < window_s and not ends[-1].query():
        cpu_block()
        calls += 1
    closed.record()
    closed.synchronize()
    window = time.perf_counter() - t0
    copies.synchronize()
    return {**shared_sample([start.elapsed_time(e) / 1e3 for e in ends], chunk, start.elapsed_time(opened) / 1e3,
                            start.elapsed_time(closed) / 1e3, window, calls * cpu_bytes, alone), "calls": calls,
            "alone_call_s": alone_call_s}


def _sync_stream(device: torch.device) -> None:  # GPU only
    """The compute stream's work done (the blocks' kernels), not the copy stream's."""
    torch.cuda.current_stream(device).synchronize()


def shared_sample(ends_s: Sequence[float], chunk: int, opened_s: float, closed_s: float, window_s: float,
                  cpu_bytes: int, link_alone: float, busy_at_least: float = 0.9) -> Dict[str, Any]:
    """One window of the shared probe: the copies' ends (seconds after the first was queued to run), the window's
    opening and closing on the same clock and its length on the host's, the bytes the CPUs read in it. The link's
    bytes are those landed in the window (``landed_bytes``); the sample is kept (``link_busy``) only if the copies ran
    through at least ``busy_at_least`` of it: where the link idles, the window measures the CPUs alone."""
    link = landed_bytes(ends_s, chunk, opened_s, closed_s)
    span = closed_s - opened_s
    busy = (min(ends_s[-1], closed_s) - max(opened_s, 0.0)) / span if span > 0 and ends_s else 0.0
    return {"phase": "shared", "link_busy": cpu_bytes > 0 and busy >= busy_at_least, "link_busy_share": busy,
            "cpu_bytes": cpu_bytes, "window_s": window_s, "link_gbps": link / window_s / 1e9,
            "cpu_gbps": cpu_bytes / window_s / 1e9, "gbps": (link + cpu_bytes) / window_s / 1e9,
            "link_alone_gbps": link_alone / 1e9}


def landed_bytes(ends_s: Sequence[float], chunk: int, opened_s: float, closed_s: float) -> float:
    """Bytes that copies of ``chunk`` bytes each, back to back and ending at ``ends_s`` (seconds on one clock), moved
    between ``opened_s`` and ``closed_s``: each copy's bytes spread evenly from the previous one's end to its own."""
    def by(t: float) -> float:
        moved, prev = 0.0, 0.0
        for end in ends_s:
            if t >= end:
                moved += chunk
            elif t > prev:
                moved += chunk * (t - prev) / (end - prev)
            prev = end
        return moved
    return by(closed_s) - by(opened_s)
