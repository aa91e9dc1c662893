"""The predictive batch planner: the (batch, residency) that gives the most tokens/s under a device budget.

Pure arithmetic over a checkpoint's sizes, the measured link and a compute model measured on the device
(``streaming.calibrate`` measures it; ``api.plan_batch`` puts the pieces together).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import OutOfMemoryError
from ..foundations.units import fmt_bytes
from .facts import CheckpointFacts
from .residency import (
    GRAPH_MIN_STEPS,
    PlanOptions,
    choose_residency,
    cpu_layers_of,
    decode_graph_allowed,
    decode_graph_bytes,
    decode_graph_fits,
    kv_layer_bytes,
    micro_batch_rows,
    reserve_bytes,
)

# ---- the predictive batch planner ------------------------------------------------------------------------------
#
# Under a device budget the KV cache competes with resident blocks: a larger batch spreads every streamed byte over
# more tokens, but leaves room for fewer resident blocks, so more bytes stream every step. Which (batch, residency)
# gives the most tokens/s depends on the link and on how the device's compute grows with the batch. Both are
# measured (the link by the loader's own probes, the compute by timing one block of the real shapes on the device);
# the memory of a candidate is the loader's own arithmetic (``choose_residency`` over ``reserve_bytes``); the
# step is the ring's schedule played out (``ThroughputModel.pass_s``).


@dataclass(frozen=True)
class Linear3:
    """``seconds = c0 + c1 * x + c2 * x * y`` with every coefficient >= 0 (a cost never falls as x or y grows).

    Decode: x = batch (one new token a row), y = context (keys attended to): c0 is reading the weights and launching
    the kernels, c1 the per-token matmul work, c2 attention over the KV cache. Prefill: x = batch * prompt new
    tokens, y = prompt: c2 is then attention's quadratic term."""

    c0: float
    c1: float
    c2: float

    def __call__(self, x: float, y: float) -> float:
        return self.c0 + self.c1 * x + self.c2 * x * y

    @classmethod
    def fit(cls, samples: Sequence[Tuple[float, float, float]], relative: bool = True) -> Linear3:
        """Least squares over (x, y, seconds), by default in *relative* error, so that the fast small-batch timings
        weigh as much as the slow large ones; ``relative=False``: in seconds (the prefill's fits:
        ``calibrate.prefill_fit``). Non-negative by exhaustion: every subset of the three terms is fitted and the
        best fit whose coefficients are all >= 0 wins (three unknowns: eight tiny solves)."""
        if not samples or any(t <= 0 for _, _, t in samples):
            raise ValueError(f"need positive timings to fit, got {list(samples)}")
        rows = torch.tensor([[1.0, x, x * y] for x, y, _ in samples], dtype=torch.float64)
        t = torch.tensor([s[2] for s in samples], dtype=torch.float64)
        scale = t if relative else t.max().expand_as(t)  # (seconds: every row over one constant, for conditioning)
        a, target = rows / scale[:, None], (t / scale)[:, None]  # (n, 3), (n, 1)
        best: Optional[Tuple[float, List[float]]] = None
        for mask in range(1, 8):
            cols = [j for j in range(3) if mask >> j & 1]
            sol = torch.linalg.lstsq(a[:, cols], target).solution[:, 0]  # (len(cols),)
            if bool((sol < 0).any()):
                continue
            coef = [0.0, 0.0, 0.0]
            for j, v in zip(cols, sol.tolist()):
                coef[j] = v
            err = float(((a @ torch.tensor(coef, dtype=torch.float64))[:, None] - target).pow(2).sum())
            if best is None or err < best[0] - 1e-12:
                best = (err, coef)
        if best is None:  # unreachable for positive timings: c0 alone is always a non-negative fit
            raise ValueError(f"no non-negative fit for {list(samples)}")
        return cls(*best[1])


FITS = ("decode_block", "decode_outer", "prefill_block", "prefill_outer", "decode_loop")  # ComputeModel's fits
# the fits a calibration may lack (None): the split pair's, and those timed on a GPU as CUDA graphs
OPTIONAL_FITS = ("split_pair", "split_pair_prefill", "decode_graph_block", "decode_graph_outer",
                 "decode_graph_record_block", "decode_graph_record_outer", "decode_eager_extra")


@dataclass
class ComputeModel:
    """Compute time of a forward pass on one device, fitted to timings of one block (and of the per-pass work:
    mask / ALiBi, embedding, head) of the real shapes on that device. A pass is ``num_blocks`` blocks plus the
    outer work; each block costs the same (every block has the same shapes).

    Timings are of back-to-back calls with one synchronisation at the end, as the engine issues them: a block costs
    whichever is longer, its kernels or launching them from Python."""

    num_blocks: int
    decode_block: Linear3   # x = batch, y = context
    decode_outer: Linear3   # x = batch, y = context
    prefill_block: Linear3  # x = batch * prompt, y = prompt
    prefill_outer: Linear3  # x = batch * prompt, y = prompt
    key: str = ""           # what was calibrated: family shapes, dtype, device
    samples: List[Dict[str, Any]] = field(default_factory=list)  # the timings behind the fits
    # a block timed with its KV cache in host memory, (decode, prefill): "host-compute" (attention on the CPUs) and
    # "host" (its prefill sends the prompt's cache down; it decodes as a device block)
    kv_blocks: Dict[str, Tuple[Linear3, Linear3]] = field(default_factory=dict)
    # GB/s at which the CPUs read a host cache as they attend (from the host-compute timings; None: not timed)
    host_read_gbps: Optional[float] = None
    # GB/s that host memory served the link and the CPUs together, both reading at once (None: not timed)
    shared_read_gbps: Optional[float] = None
    # GB/s at which the engine's uplink brought host layers' caches up in a pass, their blocks running (None: not
    # timed; the link's rate)
    uplink_gbps: Optional[float] = None
    # seconds of a "split" pair as the engine interleaves them, a layer brought up (its cache landed) then a layer
    # on the CPUs (x = batch, y = context; None: not timed, the two blocks' sum)
    split_pair: Optional[Linear3] = None
    split_pair_prefill: Optional[Linear3] = None  # (batch x prompt, prompt): a split pair's prefill
    # how much longer a host-compute decode block takes while the link copies from the same host memory: the shared
    # probe's calls against the block alone, at the largest batch and context (None: not timed, no slower)
    cpu_busy_factor: Optional[float] = None
    # how much longer a pass's decode blocks take on the device while the link copies into its memory beside them
    # (a streamed block's bytes landing in HBM as the resident blocks read theirs): a pass's blocks beside
    # back-to-back copies against alone, at the largest batch and context (None: not timed, no slower)
    copy_busy_factor: Optional[float] = None
    # a decode step's own work outside its pass (x = batch): the logits read, the token taken, the stop check and
    # the synchronisation that reads it; the device idles through it (a step starts once the last one's tokens are in)
    decode_loop: Linear3 = field(default_factory=lambda: Linear3(0.0, 0.0, 0.0))
    # a decode step replayed as one CUDA graph (every block resident, the cache on the device; ``streaming.graph``):
    # a block's kernels without their launches, and the step's eager rest (x = batch, y = context; None: not timed)
    decode_graph_block: Optional[Linear3] = None
    decode_graph_outer: Optional[Linear3] = None
    # and recording the graph, once a generation: what its first step (an eager warm-up step, the capture and the
    # replay) takes over a replayed step
    decode_graph_record_block: Optional[Linear3] = None
    decode_graph_record_outer: Optional[Linear3] = None
    # what an eager decode step of every block (resident, the cache on the device) took over its blocks and its
    # outer work timed back to back: the engine's own loop, and the device idling while the host starts a step that
    # waits for the last one's tokens (x = batch, y = context; None: not timed)
    decode_eager_extra: Optional[Linear3] = None

    def _block(self, kv: str, phase: int) -> Linear3:
        # "host": the cache comes up ahead of the block (its bytes are the link's cost); a model calibrated without
        # "host" has no timing of its prefill's copies down and takes the device block's
        if kv == "none" or (kv == "host" and kv not in self.kv_blocks):
            return (self.decode_block, self.prefill_block)[phase]
        if kv not in self.kv_blocks:
            raise ValueError(f"the compute model has no timings with kv_offload={kv!r}: calibrate with it")
        return self.kv_blocks[kv][phase]

    def decode_block_s(self, batch: int, context: float, kv: str = "none", link_busy: float = 0.0) -> float:
        """One decode block; ``link_busy``: the share of its time the link copies beside it, which slows the CPUs'
        reads of a host cache ("host-compute": ``cpu_busy_factor``; runs 16-17 of 2026-12-04)."""
        t = self._block(kv, 0)(batch, context)
        if kv == "host-compute" and self.cpu_busy_factor:
            t *= 1.0 + (self.cpu_busy_factor - 1.0) * min(1.0, max(0.0, link_busy))
        return t

    def split_extra_s(self, batch: int, context: float) -> float:
        """What a "split" pair adds to its two blocks' times as the engine interleaves them (0 where not timed)."""
        if self.split_pair is None:
            return 0.0
        alone = self.decode_block_s(batch, context, "host") + self.decode_block_s(batch, context, "host-compute")
        return max(0.0, self.split_pair(batch, context) - alone)

    def split_prefill_extra_s(self, batch: int, prompt: int) -> float:
        """What a "split" pair adds to its two blocks' prefill times as the engine interleaves them (0 where not
        timed)."""
        if self.split_pair_prefill is None:
            return 0.0
        alone = self.prefill_block_s(batch, prompt, "host") + self.prefill_block_s(batch, prompt, "host-compute")
        return max(0.0, self.split_pair_prefill(batch * prompt, prompt) - alone)

    def eager_extra_s(self, batch: int, context: float) -> float:
        """What an eager decode step with the cache on the device costs beyond its blocks and outer work (0 where not
        timed)."""
        return self.decode_eager_extra(batch, context) if self.decode_eager_extra is not None else 0.0

    def decode_outer_s(self, batch: int, context: float) -> float:
        """The per-pass work of a decode step (mask / ALiBi, embedding, head) and the decode loop's own."""
        return self.decode_outer(batch, context) + self.decode_loop(batch, 0.0)

    def prefill_block_s(self, batch: int, prompt: int, kv: str = "none") -> float:
        return self._block(kv, 1)(batch * prompt, prompt)

    def prefill_outer_s(self, batch: int, prompt: int) -> float:
        return self.prefill_outer(batch * prompt, prompt)

    def graph_record_s(self, batch: int, context: float) -> float:
        """Recording the decode step's CUDA graph, once a generation: the first step's time over a replayed step's
        (0 where it was not timed)."""
        rb, ro = self.decode_graph_record_block, self.decode_graph_record_outer
        return self.num_blocks * rb(batch, context) + ro(batch, context) if rb is not None and ro is not None else 0.0

    def decode_s(self, batch: int, context: float) -> float:
        """One decode step with every block resident."""
        return self.num_blocks * self.decode_block_s(batch, context) + self.decode_outer_s(batch, context)

    def prefill_s(self, batch: int, prompt: int) -> float:
        """The prefill pass with every block resident."""
        return self.num_blocks * self.prefill_block_s(batch, prompt) + self.prefill_outer_s(batch, prompt)

    def to_dict(self) -> Dict[str, Any]:
        def coefficients(f: Optional[Linear3]) -> Optional[List[float]]:
            return None if f is None else [f.c0, f.c1, f.c2]
        kv = {k: [coefficients(f) for f in pair] for k, pair in self.kv_blocks.items()}
        return {"num_blocks": self.num_blocks, "key": self.key, **{k: coefficients(getattr(self, k)) for k in FITS},
                "kv_blocks": kv, "samples": self.samples, "host_read_gbps": self.host_read_gbps,
                "shared_read_gbps": self.shared_read_gbps, "uplink_gbps": self.uplink_gbps,
                "cpu_busy_factor": self.cpu_busy_factor, "copy_busy_factor": self.copy_busy_factor,
                **{k: coefficients(getattr(self, k)) for k in OPTIONAL_FITS}}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ComputeModel:
        fits = {k: Linear3(*d[k]) for k in FITS if k in d}  # no decode_loop: calibrated before it was timed
        kv = {k: (Linear3(*dec), Linear3(*pre)) for k, (dec, pre) in d.get("kv_blocks", {}).items()}
        return cls(num_blocks=int(d["num_blocks"]), key=str(d.get("key", "")), samples=list(d.get("samples", [])),
                   kv_blocks=kv, host_read_gbps=d.get("host_read_gbps"),
                   shared_read_gbps=d.get("shared_read_gbps"), uplink_gbps=d.get("uplink_gbps"),
                   cpu_busy_factor=d.get("cpu_busy_factor"), copy_busy_factor=d.get("copy_busy_factor"),
                   **{k: Linear3(*d[k]) for k in OPTIONAL_FITS if d.get(k)}, **fits)


@dataclass
class ModelSizes:
    """What the batch planner needs to know of a checkpoint, in the loader's units (``plan_load``'s)."""

    block_bytes: List[int]            # per block, as it crosses the link (checkpoint dtype)
    device_block_bytes: List[int]     # per block on the device (converted to the compute dtype)
    outer_bytes: int                  # embeddings, final norm, head, on the device
    reserve: Callable[[int, int], int]  # (batch, seq) -> bytes the loader keeps for KV cache and activations
    max_positions: int
    # (batch, seq, kv_offload, micro_batch) -> the reserve for any KV placement and micro-batch (``of`` sets it)
    reserve_of: Optional[Callable[[int, int, str, Optional[int]], int]] = None
    kv_layer_bytes: Optional[Callable[[int, int], int]] = None  # (batch, seq) -> one layer's keys and values
    host_budget: Optional[int] = None  # host bytes a host KV cache may take (None: no limit)
    graph_bytes: Optional[Callable[[int, int], int]] = None  # (batch, seq) -> a decode graph's own device bytes

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @classmethod
    def of(cls, facts: CheckpointFacts, host_budget: Optional[int] = None) -> ModelSizes:
        """The sizes as ``plan_load`` computes them: blocks on the device in the compute dtype, the reserve of
        ``reserve_bytes`` (with room for a dequantized block when blocks are quantized), for every KV placement;
        ``host_budget``: the host memory a host KV cache may take."""
        family, dtype, quant = facts.family, facts.dtype, facts.quant
        return cls(block_bytes=list(facts.block_bytes), device_block_bytes=facts.device_block_bytes,
                   outer_bytes=facts.device_outer_bytes,
                   reserve=lambda batch, seq: reserve_bytes(family, batch, seq, dtype, quant),
                   max_positions=family.max_positions,
                   reserve_of=lambda batch, seq, kv, micro: reserve_bytes(family, batch, seq, dtype, quant, kv, micro),
                   kv_layer_bytes=lambda batch, seq: kv_layer_bytes(family, batch, seq, dtype), host_budget=host_budget,
                   graph_bytes=lambda batch, seq: decode_graph_bytes(family, batch, seq, dtype))

    def reserve_for(self, batch: int, seq: int, kv: str = "none", micro: Optional[int] = None) -> int:
        if kv == "none" and micro is None:
            return self.reserve(batch, seq)
        if self.reserve_of is None:
            raise ValueError(f"these sizes have no reserve for kv_offload={kv!r}, micro_batch={micro}")
        return self.reserve_of(batch, seq, kv, micro)

    def host_kv_bytes(self, batch: int, seq: int, kv: str) -> int:
        """Host bytes of the KV cache of ``kv_offload=kv`` (0 for "none")."""
        if kv == "none" or self.kv_layer_bytes is None:
            return 0
        return self.num_blocks * self.kv_layer_bytes(batch, seq)

    def memory_bytes(self, batch: int, resident: int, seq: int, ring_slots: int, kv: str = "none",
                     micro: Optional[int] = None) -> int:
        """Device bytes the loader holds for ``resident`` blocks kept and the rest streamed: outer weights, resident
        blocks, a ring of the largest streamed block (``plan_load``'s ring: ``ring_slots``, or as many slots as
        blocks stream where fewer do), and the reserve."""
        streamed = self.device_block_bytes[resident:]
        ring = min(ring_slots, len(streamed)) * max(streamed, default=0)
        return (self.outer_bytes + sum(self.device_block_bytes[:resident]) + ring
                + self.reserve_for(batch, seq, kv, micro))

    def graph_memory(self, batch: int, seq: int) -> int:
        """A decode graph's own device bytes (``residency.decode_graph_bytes``; 0 where these sizes lack them)."""
        return self.graph_bytes(batch, seq) if self.graph_bytes is not None else 0

    def graph_fits(self, budget: Optional[int], batch: int, seq: int) -> bool:
        """Whether a decode graph's memory fits beside every block resident (``residency.decode_graph_fits``; a
        graphed batch is one micro-batch, whose reserve is the whole batch's)."""
        return decode_graph_fits(self.memory_bytes(batch, self.num_blocks, seq, 0), self.graph_memory(batch, seq),
                                 budget)

    def max_resident(self, budget: Optional[int], batch: int, seq: int, ring_slots: int,
                     kv: str = "none", micro: Optional[int] = None) -> Optional[int]:
        """The most blocks ``load`` keeps resident for this batch (``choose_residency`` itself); None if not even
        the outer weights, the reserve and the ring fit, or a host KV cache does not fit ``host_budget``."""
        if self.host_budget is not None and self.host_kv_bytes(batch, seq, kv) > self.host_budget:
            return None
        try:
            resident, _ = choose_residency(self.device_block_bytes, self.outer_bytes, budget, ring_slots,
                                           self.reserve_for(batch, seq, kv, micro), where="plan")
        except OutOfMemoryError:
            return None
        return len(resident)


@dataclass
class ThroughputModel:
    """Predicted prefill and decode times of a residency, from the measured compute and the measured link.

    A pass runs the outer work and the resident blocks (the first ``resident``, as the loader keeps them), then the
    streamed ones through a ring of ``ring_slots`` device slots: the copy of streamed block g waits for the link and
    for the compute of block g - slots (its slot's previous tenant); block g's compute waits for its copy. The ring
    runs across passes (``streaming.ring``): the next pass's first copies are queued behind this pass's last blocks.
    A generation waits for each step's tokens, not for those copies, so they land while the next pass's resident
    blocks compute, and its decode steps settle at max(streamed bytes / link, compute) unless the slots hold the
    copies back (``ring_schedule`` plays the passes out until they do). A loop that synchronises the whole device
    after each step (``device_sync``: ``zstream bench``'s rows without a ``step_wait``) also waits for the next
    pass's first copies, and the link idles while the resident blocks compute.

    The link's copies and the CPUs attending a host cache read the same host memory. On the H200 host the two
    together read 93-111 GB/s (the calibration's probe, runs 8-9 of 2026-12-04, docs/performance.md), about the
    link's 55 and the CPUs' 42-56 alone added up (run 6's 54-63 were the two taking turns): a pass takes at least
    all the bytes read from host memory (streamed, brought up, attended on the CPUs) at the rate host memory serves
    both at once, as calibrated (``ComputeModel.shared_read_gbps``), and never slower than either alone
    (``host_gbps``)."""

    compute: ComputeModel
    block_bytes: List[int]          # per block, as it crosses the link
    link_gbps: Optional[float]      # GB/s; None: nothing may stream
    ring_slots: int = 3             # prefetch + 1
    step_overhead_s: float = 0.0    # per pass, on top of the schedule and the calibrated decode loop (given)
    graphs: bool = False            # load's cuda_graphs: an all-resident step replays a CUDA graph where calibrated
    graph_fits: Optional[Callable[[int], bool]] = None  # batch -> whether its graph's memory fits (None: it does)
    device_sync: bool = False       # each step waits for every stream, the ring's copies too (see above)

    @property
    def host_gbps(self) -> Optional[float]:
        """The rate host memory serves the link and the CPUs' attention together: the calibrated shared rate, at
        least the faster of the two alone (None: neither the link nor the CPUs' rate known)."""
        if not self.link_gbps or not self.compute.host_read_gbps:
            return None
        return max(self.link_gbps, self.compute.host_read_gbps, self.compute.shared_read_gbps or 0.0)

    @property
    def kv_up_gbps(self) -> float:
        """The rate a host cache comes up at: the engine's uplink as calibrated, at most the link's (the link's where
        it was not timed). Callers check ``link_gbps`` first."""
        assert self.link_gbps
        up = self.compute.uplink_gbps
        return min(self.link_gbps, up) if up else self.link_gbps

    def pass_s(self, resident: int, block_s: float, outer_s: float, shared_bytes: int = 0,
               cpu_bytes: int = 0, lead_s: float = 0.0, first: bool = False,
               idle_s: float = 0.0) -> Tuple[float, float, float]:
        """(seconds, transfer seconds, compute seconds) of a pass: a decode step in the loop's steady state, or with
        ``first`` the pass after the device was synchronised (the prefill: the ring's first slots landed before it,
        and it ends with its compute). ``shared_bytes``: what else crosses the link in the pass, inside the blocks'
        compute (a host KV cache coming up, at ``kv_up_gbps``: ``block_s`` was timed without it), so a step takes at
        least every byte over the link. ``cpu_bytes``: the host caches the CPUs attend to in the pass, read from the
        host memory the link reads too (``host_gbps``). ``lead_s``: the compute stream's wait for the first host
        layer's cache (``first_cache_wait``). ``idle_s``: the device's idling while the host runs the step's loop
        (``ComputeModel.eager_extra_s``): it lengthens the compute, but not the link's copies, which the ring queued
        ahead."""
        n = len(self.block_bytes)
        compute = n * block_s + outer_s + idle_s
        if (resident < n or shared_bytes) and not self.link_gbps:
            raise ValueError("bytes cross the link, but no link bandwidth was given")
        host = self.host_gbps
        read = sum(self.block_bytes[resident:]) + shared_bytes + cpu_bytes
        floor = outer_s + read / (host * 1e9) if host and cpu_bytes else 0.0  # the host memory both read
        shared = shared_bytes / (self.kv_up_gbps * 1e9) if shared_bytes else 0.0
        if resident >= n:
            return max(compute + lead_s, outer_s + shared, floor) + self.step_overhead_s, shared, compute
        assert self.link_gbps  # (blocks stream: checked above)
        copies = [self.block_bytes[i] / (self.link_gbps * 1e9) for i in range(resident, n)]
        transfer = sum(copies) + shared
        if first:
            ends = ring_schedule(copies, self.ring_slots, resident, block_s, outer_s + lead_s, 1, self.device_sync)
            return max(ends[0], outer_s + shared, floor) + self.step_overhead_s, transfer, compute
        step = steady_period(copies, self.ring_slots, resident, block_s, outer_s + lead_s, self.device_sync)
        return max(step, outer_s + transfer, floor, compute + lead_s) + self.step_overhead_s, transfer, compute

    def decode_step(self, batch: int, resident: int, context: float, kv: str = "none",
                    kv_bytes: int = 0, micro: Optional[int] = None, cpu_layers: int = 0,
                    cpu_bytes: int = 0, gen: Optional[int] = None) -> Tuple[float, float, float]:
        """A decode step; ``kv_bytes``: the host KV cache that comes up over the link in it ("host", "split");
        ``micro``: rows a block computes at a time (a block costs its micro-batches' times, one after another);
        ``cpu_layers``: with "split", the layers attended on the CPUs (a block costs their mean); ``cpu_bytes``:
        the caches the CPUs read ("host-compute", "split"). With the cache on the device, its blocks run slower by
        the streamed blocks' copies landing beside them (``copy_slowdown``). A step the engine replays as a CUDA
        graph (every block resident, the cache on the device, no micro-batches; with ``gen``, a generation long
        enough to record it) costs the graphed block's and step's timings."""
        c = self.compute
        if self.graphed(batch, resident, kv, micro, gen):
            assert c.decode_graph_block is not None and c.decode_graph_outer is not None
            return self.pass_s(resident, c.decode_graph_block(batch, context),
                               c.decode_graph_outer(batch, context) + c.decode_loop(batch, 0.0))
        busy = self.link_busy_share(batch, resident, context, kv, kv_bytes, micro, cpu_layers)
        block = self._block(partial(self.compute.decode_block_s, link_busy=busy), batch, context, kv, micro,
                            cpu_layers)
        if kv == "split":
            block += self._pairs_s(self.compute.split_extra_s, batch, context, micro, cpu_layers)
        if kv == "none":
            block *= self.copy_slowdown(block, resident)
        outer = self.compute.decode_outer_s(batch, context)
        # (a host cache's blocks were timed as the engine runs them, their waits included)
        idle = sum(self.compute.eager_extra_s(b, context) for b in micro_batches(batch, micro)) if kv == "none" else 0.0
        lead = self.first_cache_wait(batch, context, kv, kv_bytes, micro, cpu_layers)
        return self.pass_s(resident, block, outer, kv_bytes, cpu_bytes, lead, idle_s=idle)

    def graphed(self, batch: int, resident: int, kv: str = "none", micro: Optional[int] = None,
                gen: Optional[int] = None) -> bool:
        """Whether the engine replays this decode step as a CUDA graph (``residency.decode_graph_allowed``, and
        calibrated so): every block resident, the cache on the device, the batch in one piece, the graph's memory
        within the budget (``graph_fits``); with ``gen``, a generation long enough to record one
        (``GRAPH_MIN_STEPS``)."""
        c = self.compute
        if c.decode_graph_block is None or c.decode_graph_outer is None:  # (timed on a GPU, plain weights only)
            return False
        if micro is not None and micro < batch:  # run in pieces (``StreamingModel._graphable``)
            return False
        options = PlanOptions(kv_offload=kv, cuda_graphs=self.graphs)
        return (decode_graph_allowed(options, "cuda", streams=resident < len(self.block_bytes), coded=False)
                and (gen is None or gen > GRAPH_MIN_STEPS) and (self.graph_fits is None or self.graph_fits(batch)))

    def copy_slowdown(self, block_s: float, resident: int) -> float:
        """How much longer a decode pass's device blocks (``block_s`` each, the cache on the device) take for the
        streamed blocks' copies landing beside them (``ComputeModel.copy_busy_factor``), in the share of the blocks'
        time the link copies: 1 where nothing streams or it was not timed."""
        n, factor = len(self.block_bytes), self.compute.copy_busy_factor
        if not factor or resident >= n or not self.link_gbps or block_s <= 0:
            return 1.0
        copy_s = sum(self.block_bytes[resident:]) / (self.link_gbps * 1e9)
        return 1.0 + (factor - 1.0) * min(1.0, copy_s / (n * block_s))

    def link_busy_share(self, batch: int, resident: int, context: float, kv: str, kv_bytes: int,
                        micro: Optional[int], cpu_layers: int) -> float:
        """The share of a decode pass's CPU layers that the link copies beside: its bytes in the pass (streamed
        weights, caches brought up) against the CPUs' layers' time, at most all of it (0: no layer on the CPUs or
        nothing crosses the link)."""
        n = len(self.block_bytes)
        on_cpus = cpu_layers if kv == "split" else n if kv == "host-compute" else 0
        if not on_cpus or not self.link_gbps:
            return 0.0
        link_s = sum(self.block_bytes[resident:]) / (self.link_gbps * 1e9)
        link_s += kv_bytes / (self.kv_up_gbps * 1e9) if kv_bytes else 0.0
        cpu_s = on_cpus * sum(self.compute.decode_block_s(b, context, "host-compute")
                              for b in micro_batches(batch, micro))
        return min(1.0, link_s / cpu_s) if cpu_s > 0 else 0.0

    def first_cache_wait(self, batch: int, context: float, kv: str, kv_bytes: int, micro: Optional[int] = None,
                         cpu_layers: int = 0) -> float:
        """Seconds a decode pass's compute waits for its first host layer's cache ("host", "split"; run 8 of
        2026-12-04: 2.5 and 10 ms a bloom-7b1 step at batches 16 and 64). Its copy up starts as the pass does
        (``cache.Uplink.begin`` waits for the step before, which wrote its newest rows); meanwhile only the pass's
        context and embedding run (the decode loop's work ran before the copy began), and the CPUs' attention of the
        "split" layers before it (``cpu_layers_of`` places them)."""
        n = len(self.block_bytes)
        on_cpus = set(cpu_layers_of(n, cpu_layers)) if kv == "split" else set()
        first_up = next((i for i in range(n) if i not in on_cpus), None) if kv in ("host", "split") else None
        if first_up is None or not kv_bytes or not self.link_gbps:
            return 0.0
        copy = kv_bytes / (n - len(on_cpus)) / (self.kv_up_gbps * 1e9)
        # the CPUs' layers ahead of it ("split" only: a "host" model need not be calibrated with "host-compute")
        # (they run while that copy does)
        cpu_block = partial(self.compute.decode_block_s, link_busy=1.0)
        ahead = first_up * self._block(cpu_block, batch, context, "host-compute", micro, 0) if first_up else 0.0
        return max(0.0, copy - self.compute.decode_outer(batch, context) - ahead)

    def prefill(self, batch: int, resident: int, prompt: int, kv: str = "none",
                micro: Optional[int] = None, cpu_layers: int = 0) -> Tuple[float, float, float]:
        block = self._block(self.compute.prefill_block_s, batch, prompt, kv, micro, cpu_layers)
        if kv == "split":
            block += self._pairs_s(self.compute.split_prefill_extra_s, batch, prompt, micro, cpu_layers)
        return self.pass_s(resident, block, self.compute.prefill_outer_s(batch, prompt), first=True)

    def _block(self, time: Callable[[int, Any, str], float], batch: int, x: Any, kv: str, micro: Optional[int],
               cpu_layers: int) -> float:
        parts = micro_batches(batch, micro)
        if kv != "split":
            return sum(time(b, x, kv) for b in parts)
        n = len(self.block_bytes)
        device, cpu = (sum(time(b, x, k) for b in parts) for k in ("host", "host-compute"))
        return (cpu_layers * cpu + (n - cpu_layers) * device) / n

    def _pairs_s(self, extra: Callable[[int, Any], float], batch: int, x: Any, micro: Optional[int],
                 cpu_layers: int) -> float:
        """A split block's share of what its pairs add: each layer brought up next to a layer on the CPUs pays
        ``extra`` (a pair's time beyond its two blocks) for their interleaving, once a micro-batch."""
        n = len(self.block_bytes)
        pairs = min(cpu_layers, n - cpu_layers)
        return pairs * sum(extra(b, x) for b in micro_batches(batch, micro)) / n

    def split_step(self, batch: int, resident: int, context: float, layer_kv_bytes: int, micro: Optional[int],
                   cpu: int) -> float:
        """The decode step of a "split" cache with ``cpu`` layers' caches (``layer_kv_bytes`` each) attended on
        the CPUs and every other layer's brought up."""
        n = len(self.block_bytes)
        return self.decode_step(batch, resident, context, "split", (n - cpu) * layer_kv_bytes, micro, cpu,
                                cpu * layer_kv_bytes)[0]

    def best_split(self, batch: int, resident: int, context: float, layer_kv_bytes: int,
                   micro: Optional[int] = None, prompt: Optional[int] = None, gen: Optional[int] = None) -> int:
        """The layers a "split" cache should attend on the CPUs: the count whose decode step (with ``prompt`` and
        ``gen``: whose prefill and ``gen - 1`` steps) is shortest on the schedule. Up to half the layers, each one
        on the CPUs sits between two brought up and pays for their interleaving (``split_extra_s``); past half, each
        one brought up does: two regimes, each a balance of the compute stream (the CPUs' attention added for each
        layer) against the link (each other layer's cache added). In each, the search starts where the two meet
        (which saves steps, not accuracy) and walks to the schedule's best, which the pairs, the busy link and the
        first cache's wait move off that point; the better of the two wins."""
        n = len(self.block_bytes)
        if not self.link_gbps:
            return n

        def cost(cpu: int) -> float:
            step = self.split_step(batch, resident, context, layer_kv_bytes, micro, cpu)
            if prompt is None or gen is None:
                return step
            return self.prefill(batch, resident, prompt, "split", micro, cpu)[0] + (gen - 1) * step

        t_dev = self._block(self.compute.decode_block_s, batch, context, "none", micro, 0)
        # the CPUs' layers run beside the other layers' caches coming up
        t_cpu = self._block(partial(self.compute.decode_block_s, link_busy=1.0), batch, context, "host-compute",
                            micro, 0)
        up = layer_kv_bytes / (self.kv_up_gbps * 1e9)
        weights = sum(self.block_bytes[resident:]) / (self.link_gbps * 1e9)
        balance = round((weights + n * up - n * t_dev) / max(t_cpu - t_dev + up, 1e-12))
        seen: Dict[int, float] = {}
        ends = [descend(cost, min(hi, max(lo, balance)), lo, hi, seen) for lo, hi in ((0, n // 2), (n // 2, n))]
        return min(ends, key=lambda k: seen[k])


def ring_schedule(copies: Sequence[float], ring_slots: int, resident: int, block_s: float, head_s: float,
                  passes: int, device_sync: bool = False) -> List[float]:
    """When each of ``passes`` back-to-back passes ends, from 0 (the device synchronised, the ring's first slots
    landed). A pass runs ``head_s`` and ``resident`` blocks, then one block of ``block_s`` per streamed block, whose
    copy (``copies`` seconds each, in streamed order, one link) the ring issued as the block ``slots`` before it
    was released and runs once that block's compute is done (``DeviceRing._issue``). The next pass starts when the
    compute is done (``device_sync``: and every copy issued has landed)."""
    return [end for end, _ in itertools.islice(_passes(copies, ring_slots, resident, block_s, head_s, device_sync),
                                               passes)]


def _passes(copies: Sequence[float], ring_slots: int, resident: int, block_s: float, head_s: float,
            device_sync: bool) -> Iterator[Tuple[float, Tuple[float, ...]]]:
    """``ring_schedule``'s passes, each (its end, what the next pass starts from, relative to that end: when the
    copies already issued for it land)."""
    s = len(copies)
    slots = max(1, min(ring_slots, s))
    landed = [0.0] * slots          # by global index g = pass * s + j
    link = end = 0.0
    for p in itertools.count():
        t = end + head_s + resident * block_s
        for j in range(s):
            t = max(t, landed[p * s + j]) + block_s
            link = max(link, t) + copies[(j + slots) % s]  # block g + slots, into the slot g frees
            landed.append(link)
        end = max(t, link) if device_sync else t
        yield end, tuple(x - end for x in landed[-slots:])  # (the last: when the link frees)


STEADY_PASSES = 64  # at most: a ring settles within a few passes, unless its link falls behind slowly (below)


def steady_period(copies: Sequence[float], ring_slots: int, resident: int, block_s: float, head_s: float,
                  device_sync: bool = False) -> float:
    """Seconds a pass takes once the ring's schedule has settled: played out (``ring_schedule``) until a pass
    leaves the next one what it was left itself, so that every later pass repeats it. Passes can run faster at
    first, while the link falls behind the compute a little each pass, until its copies hold the compute back: where
    that takes longer than ``STEADY_PASSES``, the link is the bound, and a settled pass its copies' time."""
    last_end, last_state, period = 0.0, None, 0.0
    for end, state in itertools.islice(_passes(copies, ring_slots, resident, block_s, head_s, device_sync),
                                       STEADY_PASSES):
        period = end - last_end
        if last_state is not None and all(abs(a - b) <= 1e-12 for a, b in zip(state, last_state)):
            return period
        last_end, last_state = end, state
    return max(period, sum(copies))


def descend(cost: Callable[[int], float], start: int, lo: int, hi: int, seen: Dict[int, float],
            look: int = 3) -> int:
    """The count in ``lo``..``hi`` reached from ``start`` by stepping to the lowest ``cost`` among the next ``look``
    counts, down then up, while that is lower: the minimum of a cost that falls then rises, past bumps of fewer
    than ``look`` counts. ``seen`` keeps every cost taken (shared between searches)."""

    def at(k: int) -> float:
        if k not in seen:
            seen[k] = cost(k)
        return seen[k]

    best = start
    for way in (-1, 1):
        while True:
            lower = [k for k in range(best + way, best + way * (look + 1), way) if lo <= k <= hi and at(k) < at(best)]
            if not lower:
                break
            best = min(lower, key=at)
    at(best)
    return best


def micro_batches(batch: int, micro: Optional[int]) -> List[int]:
    """The rows in each micro-batch of ``batch`` (``residency.micro_batch_rows``, the engine's split)."""
    return [len(range(batch)[rows]) for rows in micro_batch_rows(batch, micro)]


@dataclass
class Candidate:
    """One (batch, residency) that fits the budget, and what it is predicted to do."""

    batch: int
    resident_blocks: int
    num_blocks: int
    offload: str             # "none" when every block is resident, else the streaming mode ("cpu", "nvme")
    memory_bytes: int        # what the loader budgets: outer + resident weights + ring + KV cache and activations
    prefill_s: float
    decode_step_s: float     # at the mean context of the decode steps
    transfer_s: float        # of a decode step: streamed bytes over the link
    compute_s: float         # of a decode step: every block's compute and the outer work
    tokens_per_s: float      # batch * gen / (prefill + (gen - 1) decode steps), as ``zstream bench`` counts
    kv_offload: str = "none"  # where the KV cache lives and attention runs (residency.KV_OFFLOADS)
    micro_batch: Optional[int] = None  # rows a block computes at a time (None: the whole batch)
    kv_cpu_layers: int = 0   # layers attended on the CPUs ("host-compute": all; "split": the planner's choice)

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks

    @property
    def limit(self) -> str:
        """What bounds the decode step: the link, the compute, or the ring (the link idles while resident blocks
        compute and the slots are full)."""
        if self.transfer_s == 0.0:
            return "compute"
        if self.decode_step_s > 1.02 * max(self.transfer_s, self.compute_s):
            return "ring"
        return "link" if self.transfer_s >= self.compute_s else "compute"

    def to_dict(self) -> Dict[str, Any]:
        return {"batch": self.batch, "resident_blocks": self.resident_blocks, "offload": self.offload,
                "memory_bytes": self.memory_bytes, "prefill_s": self.prefill_s, "decode_step_s": self.decode_step_s,
                "transfer_s": self.transfer_s, "compute_s": self.compute_s, "tokens_per_s": self.tokens_per_s,
                "kv_offload": self.kv_offload, "micro_batch": self.micro_batch, "kv_cpu_layers": self.kv_cpu_layers,
                "limit": self.limit}


@dataclass
class BatchPlan:
    """Every (batch, residency) that fits, predicted; ``best`` maximises tokens/s."""

    best: Optional[Candidate]
    table: List[Candidate]          # every candidate, by batch then resident blocks
    budget_bytes: Optional[int]
    prompt: int
    gen: int
    link_gbps: Optional[float]
    prefetch: int
    compute: ComputeModel
    device: str = ""
    dtype: Optional[torch.dtype] = None
    link: str = ""                  # what the link is ("pinned host-to-device", "disk read (O_DIRECT)", given)
    quantize: Dict[str, Any] = field(default_factory=dict)  # load's quantize arguments (empty: none, or packed)
    tensor_parallel: int = 1        # ranks: every size, budget and time is one rank's (its shard, its GPU, its link)
    cuda_graphs: bool = False       # load's: planned with all-resident steps replayed as CUDA graphs

    def candidate(self, batch: int, resident: int, kv: str = "none",
                  micro: Optional[int] = None) -> Optional[Candidate]:
        for c in self.table:
            if (c.batch, c.resident_blocks, c.kv_offload, c.micro_batch) == (batch, resident, kv, micro):
                return c
        return None

    def frontier(self, kv: Optional[str] = None) -> List[Candidate]:
        """For each batch, its best residency and KV placement (of placement ``kv`` only, when given)."""
        by_batch: Dict[int, List[Candidate]] = {}
        for c in self.table:
            if kv is None or c.kv_offload == kv:
                by_batch.setdefault(c.batch, []).append(c)
        best = (best_of(by_batch[b]) for b in sorted(by_batch))
        return [c for c in best if c is not None]

    def max_batch(self, offload: Optional[str] = None, kv: Optional[str] = None) -> int:
        """The largest batch that fits; with ``offload="none"`` the largest with every block resident, with ``kv``
        the largest with that KV placement (0: none)."""
        pool = [c.batch for c in self.table if (offload != "none" or c.offload == "none")
                and (kv is None or c.kv_offload == kv)]
        return max(pool, default=0)

    def load_kwargs(self, candidate: Optional[Candidate] = None) -> Dict[str, Any]:
        """Arguments of ``zstream.load`` that give ``candidate`` (default: the best) under the same budget."""
        c = candidate or self.best
        if c is None:
            raise OutOfMemoryError(f"nothing fits the budget of {fmt_bytes(self.budget_bytes or 0)}")
        kw: Dict[str, Any] = {"offload": c.offload, "gpu_memory": self.budget_bytes, "max_batch": c.batch,
                              "max_seq_len": self.prompt + self.gen, "prefetch": self.prefetch}
        if c.offload != "none":
            kw["max_resident_blocks"] = c.resident_blocks
        if c.kv_offload != "none":
            kw["kv_offload"] = c.kv_offload
        if c.micro_batch is not None:
            kw["micro_batch"] = c.micro_batch
        if c.kv_offload == "split":
            kw["kv_cpu_layers"] = c.kv_cpu_layers
        if self.device:
            kw["device"] = self.device
        if self.dtype is not None:
            kw["dtype"] = self.dtype
        kw.update(self.quantize)
        if self.tensor_parallel > 1:
            kw["tensor_parallel"] = self.tensor_parallel
        kw["cuda_graphs"] = self.cuda_graphs  # planned with or without graphs: load's default would graph
        return kw

    def summary(self, rows: Optional[List[int]] = None) -> str:
        """The best choice, then the frontier at batches 1, 2, 4, ..., the largest, the best (or ``rows``)."""
        front = self.frontier()
        if not front or self.best is None:
            return f"predicted: nothing fits the budget of {fmt_bytes(self.budget_bytes or 0)}"
        b = self.best
        link = f"{self.link_gbps:.1f} GB/s" + (f" ({self.link})" if self.link else "") if self.link_gbps else "none"
        head = [f"predicted best: batch {b.batch}, {b.resident_blocks}/{b.num_blocks} blocks resident "
                f"(offload={b.offload}, kv_offload={b.kv_offload}"
                + (f", micro_batch={b.micro_batch}" if b.micro_batch else "")
                + f"), {b.tokens_per_s:.1f} tokens/s; budget "
                + (fmt_bytes(self.budget_bytes) if self.budget_bytes is not None else "unlimited")
                + f", prompt {self.prompt}, gen {self.gen}, link {link}"
                + (f"; one rank of {self.tensor_parallel} (its piece, its GPU, its link; all-reduces not counted)"
                   if self.tensor_parallel > 1 else ""),
                f"{'batch':>5} {'resident':>8} {'offload':>7} {'kv':>12} {'memory':>10} {'prefill ms':>10} "
                f"{'step ms':>8} {'xfer ms':>8} {'comp ms':>8} {'tok/s':>8} limit"]
        wanted = set(rows) if rows is not None else (
            {1 << k for k in range(16)} | {front[-1].batch, b.batch, self.max_batch("none")})
        for c in front:
            if c.batch in wanted:
                head.append(f"{c.batch:5d} {c.resident_blocks:4d}/{c.num_blocks:<3d} {c.offload:>7} {c.kv_offload:>12} "
                            f"{fmt_bytes(c.memory_bytes):>10} {c.prefill_s * 1e3:10.1f} {c.decode_step_s * 1e3:8.1f} "
                            f"{c.transfer_s * 1e3:8.1f} {c.compute_s * 1e3:8.1f} {c.tokens_per_s:8.1f} {c.limit}")
        return "\n".join(head)

    def to_dict(self) -> Dict[str, Any]:
        """The choice, the inputs and the frontier (not every candidate), for JSON."""
        return {"best": self.best.to_dict() if self.best else None, "budget_bytes": self.budget_bytes,
                "prompt": self.prompt, "gen": self.gen, "link_gbps": self.link_gbps, "link": self.link,
                "prefetch": self.prefetch, "compute": self.compute.to_dict(),
                "frontier": [c.to_dict() for c in self.frontier()]}


def choose_batch(sizes: ModelSizes, compute: ComputeModel, *, budget: Optional[int], prompt: int, gen: int,
                 link_gbps: Optional[float], stream: Optional[str] = "cpu", prefetch: int = 2,
                 max_batch: int = 1024, step_overhead_s: float = 0.0,
                 kv_offloads: Sequence[str] = ("none",),
                 micro_batch_sizes: Sequence[Optional[int]] = (None,),
                 kv_cpu_layers: Optional[int] = None, cuda_graphs: bool = False,
                 device_sync: bool = False) -> BatchPlan:
    """Every (batch, resident blocks) the loader would accept under ``budget``, with its predicted tokens/s; the
    best of them. ``stream``: the offload mode that streams ("cpu" or "nvme"), or None to keep every block resident
    (offload="none"). Batches run from 1 to the largest that fits (at most ``max_batch``); for each, every
    residency from 0 blocks to the most that fit. Tokens/s counts as ``zstream bench`` does: batch * gen tokens over
    the prefill (which gives the first token) and gen - 1 decode steps, taken at their mean context. Each KV
    placement of ``kv_offloads`` is planned too: its reserve on the device, its cache within ``sizes.host_budget``,
    its blocks' measured compute, and with "host" the cache's bytes on the link beside the streamed blocks. Each
    micro-batch size of ``micro_batch_sizes`` (None: the whole batch) is planned for the batches it splits: its
    smaller working set on the device, its blocks computing one micro-batch after another. ``kv_cpu_layers``: with
    "split", the layers attended on the CPUs (None: for each candidate the count ``best_split`` finds).
    ``cuda_graphs``: load's; an all-resident step is planned as the CUDA graph the engine would replay.
    ``device_sync``: each step waits for every stream (``ThroughputModel.device_sync``), not only for its tokens."""
    if prompt < 1 or gen < 1:
        raise ValueError(f"prompt and gen must be at least 1, not {prompt} and {gen}")
    if stream is not None and not link_gbps:
        raise ValueError(f"stream={stream!r} needs the link bandwidth (link_gbps), or stream=None")
    seq = min(prompt + gen, sizes.max_positions)
    n, slots = sizes.num_blocks, prefetch + 1
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps, slots, step_overhead_s, graphs=cuda_graphs,
                         device_sync=device_sync)
    if cuda_graphs:  # a graph where its memory fits beside every block, as ``plan_load`` decides
        tm.graph_fits = lambda batch: sizes.graph_fits(budget, batch, seq)
    context = prompt + gen / 2  # decode steps attend to prompt + 1 .. prompt + gen - 1 keys
    table: List[Candidate] = []
    for kv, micro in itertools.product(kv_offloads, micro_batch_sizes):
        for batch, lowest, most in fitting_batches(sizes, budget, seq, slots, stream is not None, max_batch, kv,
                                                   micro):
            whole = micro is not None and micro >= batch  # no split: the batch is one micro-batch
            if whole and None in micro_batch_sizes:
                continue  # planned already, without micro-batches
            micro_here = None if whole else micro
            in_host = kv != "none" and sizes.kv_layer_bytes is not None
            layer_kv = sizes.kv_layer_bytes(batch, round(context)) if in_host else 0  # type: ignore[misc]
            for resident in range(lowest, most + 1):
                cpu = n if kv == "host-compute" else 0
                if kv == "split":
                    cpu = (tm.best_split(batch, resident, context, layer_kv, micro_here, prompt, gen)
                           if kv_cpu_layers is None
                           else max(0, min(kv_cpu_layers, n)))
                # the caches that come up every step ("host", "split"), and those the CPUs read where they are
                kv_up = (n - cpu) * layer_kv if kv in ("host", "split") else 0
                kv_cpu = cpu * layer_kv
                prefill, _, _ = tm.prefill(batch, resident, prompt, kv, micro_here, cpu)
                step, xfer, comp = tm.decode_step(batch, resident, context, kv, kv_up, micro_here, cpu, kv_cpu,
                                                  gen=gen)
                graphed = tm.graphed(batch, resident, kv, micro_here, gen)  # its graph recorded at the first step
                total = prefill + (gen - 1) * step + (compute.graph_record_s(batch, context) if graphed else 0.0)
                memory = (sizes.memory_bytes(batch, resident, seq, slots, kv, micro_here)
                          + (sizes.graph_memory(batch, seq) if graphed else 0))
                table.append(Candidate(batch=batch, resident_blocks=resident, num_blocks=n,
                                       offload="none" if resident == n else str(stream), memory_bytes=memory,
                                       prefill_s=prefill, decode_step_s=step, transfer_s=xfer, compute_s=comp,
                                       tokens_per_s=batch * gen / total, kv_offload=kv, micro_batch=micro_here,
                                       kv_cpu_layers=cpu))
    return BatchPlan(best=best_of(table), table=table, budget_bytes=budget, prompt=prompt, gen=gen,
                     link_gbps=link_gbps, prefetch=prefetch, compute=compute, cuda_graphs=cuda_graphs)


TIE = 1e-9  # tokens/s this close (relative) are the same prediction


def best_of(table: Sequence[Candidate]) -> Optional[Candidate]:
    """The candidate with the most tokens/s; of those that tie (a streamed block whose copy hides entirely behind
    the other blocks' compute costs nothing), the one streaming the fewest blocks, which leaves the link and the
    host memory to the rest and rests on no overlap."""
    if not table:
        return None
    top = max(c.tokens_per_s for c in table)
    return max((c for c in table if c.tokens_per_s >= top * (1 - TIE)), key=lambda c: c.resident_blocks)


def fitting_batches(sizes: ModelSizes, budget: Optional[int], seq: int, slots: int, stream: bool,
                    max_batch: int, kv: str = "none", micro: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """(batch, fewest, most resident blocks) for every batch from 1 that the loader accepts, up to ``max_batch``,
    with KV placement ``kv``. Without streaming only "every block resident" counts. Memory grows with the batch, so
    the first batch that does not fit ends the list."""
    n, out = sizes.num_blocks, []
    for batch in range(1, max_batch + 1):
        most = sizes.max_resident(budget, batch, seq, slots, kv, micro)
        lowest = 0 if stream else n
        if most is None or most < lowest:
            break
        out.append((batch, lowest, most))
    return out
