"""The load plan: what stays on the compute device, what streams, and what a step should cost.

``plan_load`` is a pure function of the checkpoint's facts, the machine's resources (a device budget, host
memory, a hardware report: real or made up in a test) and the load options; it does no device work. Under a
budget it keeps the non-block weights (embeddings, final norm, head) resident first, then a ring of
``prefetch + 1`` slots for streamed blocks, then as many whole blocks as still fit; everything else streams every
forward pass. The link bandwidth is measured later, by the builder, and ``predicted_step_s`` is the streamed bytes
over it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..errors import ModelError, OutOfMemoryError, QuantizationError, UsageError, warn
from ..foundations.hardware import HardwareReport
from ..foundations.models import Family
from ..foundations.quant import BlockQuant
from ..foundations.units import dtype_name, fmt_bytes
from .facts import CheckpointFacts
from .offload import OFFLOADS, choose_offload

# where the KV cache lives and attention runs: the device; pinned host memory, each layer's brought up to attend
# on the device; pinned host memory, attention on the host's CPUs; pinned host memory, some layers' attention on the
# CPUs and the others' caches brought up (so that the link and the CPUs work at once)
KV_OFFLOADS = ("none", "host", "host-compute", "split")
HOST_KV_DEVICE_LAYERS = 3  # device room a "host" KV cache needs: two layers' buffers, and one in transit up
DEFAULT_SEQ_LEN = 2048  # the KV cache a load keeps room for when max_seq_len is not given (or the model's limit)
WORKSPACE_BYTES = 256 << 20  # allocator slack and kernels' workspaces
# the cuBLAS workspaces torch keeps for the stream decode graphs are recorded on (``graph.recording_stream``): 33 MiB
# a stream on the H200 (runs 3-6 of 2026-12-05: each recording on a new stream held exactly 33 MiB more)
GRAPH_STREAM_WORKSPACE_BYTES = 33 << 20
# a graph's private pool starts with whole segments of torch's caching allocator: one of its small ones (2 MiB, for
# allocations under 1 MiB) and one of its large ones (20 MiB, for those up to 10 MiB, as a step's logits are)
GRAPH_POOL_SEGMENT_BYTES = (2 + 20) << 20


def kv_layer_bytes(family: Family, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Bytes of one layer's keys and values for ``batch`` x ``seq`` tokens."""
    return 2 * batch * seq * family.num_kv_heads * family.head_dim * dtype.itemsize


def cpu_layers_of(num_blocks: int, count: int) -> List[int]:
    """Which ``count`` of ``num_blocks`` layers a "split" KV cache attends to on the CPUs: spread evenly, so that
    between two of them the link brings up the caches of the layers in between."""
    count = max(0, min(count, num_blocks))
    return [(2 * k + 1) * num_blocks // (2 * count) for k in range(count)]


def decode_graph_bytes(family: Family, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Device bytes a decode step's CUDA graph holds beside the eager reserve: its private memory pool, a step's
    working set at ``batch`` rows attending to ``seq`` keys (kept for its replays: eager passes cannot use it, nor
    it theirs) over the allocator's first segments, and the workspace of the stream it is recorded on."""
    step = activation_bytes(family, batch, 1, batch, dtype)
    scores = 2 * batch * family.num_heads * seq * 4  # attention's scores and weights, fp32 at most
    return step + scores + GRAPH_POOL_SEGMENT_BYTES + GRAPH_STREAM_WORKSPACE_BYTES


def activation_bytes(family: Family, rows: int, tokens: int, logit_rows: int, dtype: torch.dtype) -> int:
    """A pass's working set: 24 hidden-sized activations a token of ``rows`` x ``tokens`` in ``dtype``, and the
    last position's logits of ``logit_rows`` rows (8 bytes a vocabulary entry: fp32 and a copy)."""
    return rows * tokens * family.hidden_size * 24 * dtype.itemsize + logit_rows * family.vocab_size * 8


def graphs_for_ranks(cuda_graphs: Optional[bool], ranks: int) -> bool:
    """load's and plan_batch's ``cuda_graphs`` for a model over ``ranks`` tensor-parallel ranks. None (the default)
    is on for one rank and off for several; off where there are several either way (a rank's decode step
    all-reduces between blocks, and ``StreamingModel._graphable`` never graphs it), with a warning where it was
    asked for."""
    if ranks > 1:
        if cuda_graphs:
            warn("zstream: cuda_graphs has no effect under tensor parallelism: a rank's decode step all-reduces "
                 "between blocks, and runs eagerly", RuntimeWarning)
        return False
    return cuda_graphs is not False


def decode_graph_fits(used: int, graph: int, budget: Optional[int]) -> bool:
    """Whether a decode graph of ``graph`` bytes fits beside the ``used`` bytes of an all-resident plan. A graph never
    costs a resident block: where it does not fit, decode steps run eagerly."""
    return budget is None or used + graph <= budget


def micro_batch_rows(batch: int, micro_batch: Optional[int]) -> List[slice]:
    """The rows of each micro-batch of ``batch`` (one slice of every row when ``micro_batch`` does not split it):
    how the engine splits a pass, and what the planner times."""
    size = micro_batch if micro_batch is not None and micro_batch < batch else batch
    return [slice(r, min(r + size, batch)) for r in range(0, batch, size)] if size < batch else [slice(None)]


def reserve_bytes(family: Family, batch: int, seq: int, dtype: torch.dtype, quant: Optional[BlockQuant] = None,
                  kv_offload: str = "none", micro_batch: Optional[int] = None) -> int:
    """Device bytes kept free of weights: the KV cache for ``batch`` x ``seq`` tokens (with ``kv_offload="host"``
    only the layers in transit, with "host-compute" none), a working set for activations and last-position logits,
    and for quantized blocks room for one block's weights dequantized while it computes. With ``micro_batch`` rows a
    pass (fewer than ``batch``) the working set is a micro-batch's, beside every row's hidden state."""
    layers = {"host": HOST_KV_DEVICE_LAYERS, "split": HOST_KV_DEVICE_LAYERS, "host-compute": 0}.get(
        kv_offload, family.num_blocks)
    kv = min(layers, family.num_blocks) * kv_layer_bytes(family, batch, seq, dtype)
    rows = batch if micro_batch is None else min(batch, micro_batch)
    acts = activation_bytes(family, rows, seq, batch, dtype)
    if rows < batch:  # every row's hidden state (the micro-batches' between blocks)
        acts += batch * seq * family.hidden_size * dtype.itemsize
    dequantized = quant.dequantized_nbytes if quant is not None else 0
    return kv + acts + dequantized + WORKSPACE_BYTES


@dataclass(frozen=True)
class Resources:
    """What the machine offers a load: the compute device, its free memory, host memory, and what the GPU can do
    with host memory. Tests make these up."""

    device: str                               # "cuda:0", "cpu"
    device_free: Optional[int] = None         # free device memory (None on the CPU: host memory is the device's)
    host_available: int = 0                   # MemAvailable
    report: HardwareReport = field(default_factory=HardwareReport)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


@dataclass(frozen=True)
class PlanOptions:
    """The load arguments that shape the plan."""

    offload: str = "auto"
    budget: Optional[int] = None              # gpu_memory; None: the device's free memory (no limit on the CPU)
    prefetch: int = 2                         # blocks in flight ahead of the compute
    max_batch: int = 1
    max_seq_len: Optional[int] = None
    max_resident_blocks: Optional[int] = None
    kv_offload: str = "none"
    micro_batch: Optional[int] = None         # rows a block computes at a time (None: the whole batch)
    kv_cpu_layers: Optional[int] = None       # kv_offload="split": layers attended on the CPUs (None: half)
    cuda_graphs: bool = False                 # decode steps of an all-resident model replayed as one CUDA graph


@dataclass
class Plan:
    """Where every weight lives, and what a forward pass moves."""

    offload: str                   # "none", "cpu", "nvme" or "ats" (never "auto": resolved at load)
    device: str                    # "cuda:0", "cpu"
    dtype: torch.dtype             # compute dtype
    block_bytes: list[int]         # bytes streamed for each block (checkpoint dtype, as it crosses the link)
    outer_bytes: int               # embeddings, final norm, head
    resident_blocks: list[int]
    streamed_blocks: list[int]
    ring_slots: int                # device slots for streamed blocks (prefetch + 1), 0 if nothing streams
    kv_reserve_bytes: int          # KV cache + activations reserved at load (batch/sequence given to load)
    budget_bytes: Optional[int]    # memory budget on the compute device; None = unlimited (CPU)
    link: str = ""                 # what limits streaming: "pinned host-to-device", "disk read (O_DIRECT)", ...
    link_gbps: Optional[float] = None  # measured in this process (the median of several samples)
    link_spread: Optional[Tuple[float, float]] = None  # the lowest and highest sample, GB/s
    notes: list[str] = field(default_factory=list)
    quantization: Optional[str] = None  # e.g. "int4, group 64, asymmetric"; None: weights as in the checkpoint
    unquantized_block_bytes: Optional[list[int]] = None  # block_bytes before quantization (checkpoint dtype)
    rank: int = 0                  # tensor parallelism: this process's rank of ``ranks``; the sizes are its shard's
    ranks: int = 1
    kv_offload: str = "none"       # "host"/"host-compute": the KV cache in pinned host memory (KV_OFFLOADS)
    kv_host_bytes: int = 0         # host bytes of that cache at the planned batch and sequence
    micro_batch: Optional[int] = None  # rows a block computes at a time; None: the whole batch
    kv_cpu_layers: int = 0         # layers whose attention runs on the CPUs ("host-compute": all, "split": some)
    decode_graph: bool = False     # decode steps replayed as one CUDA graph (``decode_graph_allowed``)

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross the link every forward pass."""
        return sum(self.block_bytes[i] for i in self.streamed_blocks)

    @property
    def resident_bytes(self) -> int:
        return self.outer_bytes + sum(self.block_bytes[i] for i in self.resident_blocks)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * max((self.block_bytes[i] for i in self.streamed_blocks), default=0)

    @property
    def predicted_step_s(self) -> Optional[float]:
        """Transfer-bound time of one forward pass: streamed bytes over the measured link bandwidth."""
        if not self.streamed_blocks:
            return 0.0
        if not self.link_gbps:
            return None
        return self.streamed_bytes / (self.link_gbps * 1e9)

    def summary(self) -> str:
        pred = self.predicted_step_s
        lines = [
            f"offload={self.offload} device={self.device} dtype={dtype_name(self.dtype)}"
            + (f" tensor parallel: rank {self.rank} of {self.ranks} (the bytes below are this rank's shard of every "
               "block, over its own link)" if self.ranks > 1 else ""),
            f"resident: outer weights + {len(self.resident_blocks)}/{self.num_blocks} blocks "
            f"= {fmt_bytes(self.resident_bytes)}",
            f"streamed: {len(self.streamed_blocks)} blocks = {fmt_bytes(self.streamed_bytes)} per forward pass"
            + (f", through a ring of {self.ring_slots} slots ({fmt_bytes(self.ring_bytes)})"
               if self.ring_slots else ""),
            f"reserved for KV cache and activations: {fmt_bytes(self.kv_reserve_bytes)}"
            + (f" of a {fmt_bytes(self.budget_bytes)} budget" if self.budget_bytes is not None else "")
            + (f"; blocks compute {self.micro_batch} rows at a time" if self.micro_batch else ""),
        ]
        if self.kv_offload != "none":
            how = {"host": "each layer's crosses the link to the device ahead of its attention",
                   "host-compute": "attention runs on the host's CPUs, where it lives",
                   "split": f"{self.kv_cpu_layers} of {self.num_blocks} layers attended on the host's CPUs, the "
                            "others' brought up to the device"}[self.kv_offload]
            lines.append(f"KV cache in pinned host memory: {fmt_bytes(self.kv_host_bytes)} at the planned batch and "
                         f"sequence; {how}")
        if self.quantization is not None and self.unquantized_block_bytes is not None:
            before = sum(self.unquantized_block_bytes[i] for i in self.streamed_blocks)
            how = "compressed" if self.quantization.startswith("lossless") else "quantized"
            lines.append(f"{how} {self.quantization}: blocks {fmt_bytes(sum(self.block_bytes))} "
                         f"(from {fmt_bytes(sum(self.unquantized_block_bytes))}); streamed per pass "
                         f"{fmt_bytes(self.streamed_bytes)} instead of {fmt_bytes(before)}"
                         + (f" ({self.streamed_bytes / before:.3f}x)" if before else ""))
        if self.streamed_blocks:
            link = f"{self.link_gbps:.1f} GB/s" if self.link_gbps else "not measured"
            if self.link_gbps and self.link_spread:
                link += f" (samples {self.link_spread[0]:.1f}-{self.link_spread[1]:.1f})"
            lines.append(f"link: {self.link} {link}; predicted step (transfer bound): "
                         + (f"{pred * 1e3:.1f} ms" if pred is not None else "unknown"))
        lines += self.notes
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def choose_residency(block_bytes: List[int], outer_bytes: int, budget: Optional[int], ring_slots: int,
                     reserve: int, *, where: str) -> Tuple[List[int], List[int]]:
    """(resident blocks, streamed blocks) under ``budget``: the first blocks that fit stay. Raises OutOfMemoryError
    naming what would fit."""
    n = len(block_bytes)
    if budget is None or outer_bytes + sum(block_bytes) + reserve <= budget:
        return list(range(n)), []
    ring = ring_slots * max(block_bytes, default=0)
    avail = budget - outer_bytes - reserve - ring
    if avail < 0:
        need = outer_bytes + reserve + ring
        raise OutOfMemoryError(
            f"{where}: the budget of {fmt_bytes(budget)} cannot hold even the non-block weights "
            f"({fmt_bytes(outer_bytes)}), the KV cache and activations ({fmt_bytes(reserve)}) and a ring of "
            f"{ring_slots} block slots ({fmt_bytes(ring)}): give gpu_memory of at least {fmt_bytes(need)}, "
            f"a smaller batch or sequence, or prefetch=1")
    resident: List[int] = []
    for i in range(n):
        if block_bytes[i] > avail:
            break
        resident.append(i)
        avail -= block_bytes[i]
    return resident, list(range(len(resident), n))


def plan_load(facts: CheckpointFacts, resources: Resources, options: PlanOptions, *, where: str) -> Plan:
    """Where every weight lives for this checkpoint on this machine under these options."""
    if options.offload not in OFFLOADS:
        raise UsageError(f"offload must be one of {', '.join(OFFLOADS)}, not {options.offload!r}")
    family, device_type = facts.family, resources.device_type
    seq = min(options.max_seq_len or DEFAULT_SEQ_LEN, family.max_positions)
    budget = options.budget if options.budget is not None else resources.device_free
    notes: List[str] = []
    if options.kv_offload == "auto":
        kv, note = choose_kv_offload(facts, options, budget, device_type)
        options = dataclasses.replace(options, kv_offload=kv)
        notes.append(note)
    reserve = reserve_bytes(family, options.max_batch, seq, facts.dtype, facts.quant, options.kv_offload,
                            options.micro_batch)
    offload = options.offload
    if offload == "auto":
        offload, note = choose_offload(facts.device_bytes, reserve, budget, resources.host_available,
                                       device_type=device_type, ats=resources.report.ats,
                                       quantized=facts.quant is not None,
                                       quantize_at_load=facts.quantize_at_load, where=where)
        notes.append(note)
    _check_offload(facts, resources, offload, where)
    if offload == "ats":
        return _in_place_plan(facts, resources, options, notes)
    n = facts.num_blocks
    if offload == "none" and budget is not None and facts.device_bytes + reserve > budget:
        raise OutOfMemoryError(f"{where}: the weights ({fmt_bytes(facts.device_bytes)}) and KV cache "
                               f"({fmt_bytes(reserve)}) do not fit the {fmt_bytes(budget)} device budget: use "
                               "offload='cpu' or 'nvme'")
    if offload == "none" or (device_type == "cpu" and offload == "cpu"):
        resident = list(range(n))  # on the CPU, host memory is the device: blocks stream only under a cap
    elif device_type == "cpu" and budget is None:
        resident = []  # nvme on the CPU: only the ring's slots in memory, unless gpu_memory gives a host budget
    else:
        resident, _ = choose_residency(facts.device_block_bytes, facts.device_outer_bytes, budget,
                                       options.prefetch + 1, reserve, where=where)
    if options.max_resident_blocks is not None and offload != "none":  # "none" keeps every block on the device
        resident = resident[:options.max_resident_blocks]
    streamed = [i for i in range(n) if i not in set(resident)]
    graph = decode_graph_allowed(options, device_type, bool(streamed), facts.quant is not None)
    if graph:
        graph_bytes = decode_graph_bytes(family, options.max_batch, seq, facts.dtype)
        graph = decode_graph_fits(facts.device_bytes + reserve, graph_bytes, budget)
        if graph:
            reserve += graph_bytes
            notes.append(f"decode steps replay one CUDA graph (every block resident, the KV cache on the device; "
                         f"its memory, {fmt_bytes(graph_bytes)}, reserved)")
        else:
            notes.append(f"decode steps run eagerly: a CUDA graph ({fmt_bytes(graph_bytes)}) does not fit the budget "
                         "beside every block")
    return Plan(offload=offload, device=resources.device, dtype=facts.dtype, block_bytes=facts.block_bytes,
                outer_bytes=facts.device_outer_bytes, resident_blocks=resident, streamed_blocks=streamed,
                ring_slots=min(options.prefetch + 1, len(streamed)), kv_reserve_bytes=reserve, budget_bytes=budget,
                notes=notes, quantization=facts.quant.cfg.describe() if facts.quant is not None else None,
                unquantized_block_bytes=facts.unquantized_block_bytes, kv_offload=options.kv_offload,
                kv_host_bytes=_kv_host_bytes(facts, options), micro_batch=options.micro_batch,
                kv_cpu_layers=kv_cpu_layers(options, facts.num_blocks), decode_graph=graph)


# a cache with room for no more decode steps decodes eagerly: recording a graph costs 2-3 eager steps and a graphed
# step saves 9-10% of an eager one on most leases, so a graph paid after 22-32 steps on three of four leases and 6
# on the fourth, whose Python was slow (bloom-7b1 at batch 7: benches/graph_break_even.py, performance.md item 52)
GRAPH_MIN_STEPS = 24


def decode_graph_allowed(options: PlanOptions, device_type: str, streams: bool, coded: bool) -> bool:
    """Whether decode steps may replay one CUDA graph (``streaming.graph``): on a GPU, with every block resident and
    the KV cache on the device (a streamed block's weights move between slots; a host cache moves by the step), the
    weights plain (not dequantized or decoded per call). A batch larger than the micro-batch runs in pieces and is
    not graphed: the step decides that, as only it knows the batch (a micro-batch of 16 leaves a batch of 7 whole).
    Launching a resident step's kernels from Python took longer than the GPU ran them, and as long as the machine's
    Python was slow."""
    return (options.cuda_graphs and device_type == "cuda" and not streams and options.kv_offload == "none"
            and not coded)


def choose_kv_offload(facts: CheckpointFacts, options: PlanOptions, budget: Optional[int],
                      device_type: str) -> Tuple[str, str]:
    """kv_offload="auto" for a load: (placement, the plan's note). The device when the whole cache fits beside the
    non-block weights and a ring of blocks (beside every block for offload "none"); otherwise host memory: with
    attention on the CPUs when blocks may stream (no device buffers to bring caches up into, so more room for
    resident blocks; the CPUs read the cache from the host memory the link reads too, so neither way is faster on
    the H200: docs/performance.md), brought up over the link when none does. ``plan_batch(kv_offload="auto")``
    measures instead."""
    family = facts.family
    seq = min(options.max_seq_len or DEFAULT_SEQ_LEN, family.max_positions)
    on_device = reserve_bytes(family, options.max_batch, seq, facts.dtype, facts.quant,
                              micro_batch=options.micro_batch)
    weights = facts.device_outer_bytes + (facts.device_bytes - facts.device_outer_bytes
                                          if options.offload == "none" else
                                          (options.prefetch + 1) * max(facts.device_block_bytes, default=0))
    if device_type != "cuda" or budget is None or weights + on_device <= budget:
        return "none", "kv_offload=auto: the KV cache on the device" + (
            f" ({fmt_bytes(on_device)} with activations fits the {fmt_bytes(budget)} budget)" if budget else "")
    kv = "host" if options.offload == "none" else "host-compute"
    return kv, (f"kv_offload=auto: {kv}: the KV cache and activations ({fmt_bytes(on_device)} at batch "
                f"{options.max_batch} x {seq}) do not fit the {fmt_bytes(budget)} budget beside "
                f"{fmt_bytes(weights)} of weights")


def _check_offload(facts: CheckpointFacts, resources: Resources, offload: str, where: str) -> None:
    """Refuse an offload this checkpoint or machine cannot run, naming one that can."""
    if facts.quantize_at_load and offload in ("nvme", "ats"):
        assert facts.quant is not None
        name = facts.quant.cfg.name
        arg, flag = ("compress", "--compress") if name == "lossless" else ("quantize", "--quantize")
        raise QuantizationError(f"{where}: {arg}={name!r} codes blocks while loading into memory, so it works with "
                                f"offload 'none', 'cpu' or 'auto'; for offload={offload!r} write such a "
                                f"checkpoint once with `zstream pack {where} OUT {flag} {name}`")
    if offload != "ats":
        return
    if facts.packed:
        assert facts.quant is not None
        raise QuantizationError(f"{where} is packed ({facts.quant.cfg.describe()}); offload='ats' reads checkpoint "
                                "weights in place for the kernels, so it needs an unquantized checkpoint: stream this "
                                "one with offload='cpu' or 'nvme'")
    if resources.device_type != "cuda":
        raise ModelError("offload='ats' reads weights from GPU kernels: it needs a CUDA device")
    rep = resources.report
    if not rep.ats and not (rep.can_map_host_memory and rep.host_pointer_for_registered_mem):
        raise ModelError(f"offload='ats' needs a GPU that reads host memory in place (ATS, or mapped pinned memory "
                         f"with host pointers); {rep.gpu} has neither: use offload='cpu'")
    if facts.dtype != facts.checkpoint_dtype:
        raise ModelError(f"offload='ats' reads weights in place, so it computes in the checkpoint's dtype "
                         f"({facts.checkpoint_dtype}), not {facts.dtype}")


def _in_place_plan(facts: CheckpointFacts, resources: Resources, options: PlanOptions, notes: List[str]) -> Plan:
    """offload="ats": every block read in place from host memory (passes of many tokens copy them through a ring)."""
    n = facts.num_blocks
    link = "ATS (pageable memory read in place)" if resources.report.ats else "mapped pinned memory read in place"
    return Plan(offload="ats", device=resources.device, dtype=facts.dtype, block_bytes=facts.block_bytes,
                outer_bytes=facts.outer_bytes, resident_blocks=[], streamed_blocks=list(range(n)),
                ring_slots=options.prefetch + 1, kv_reserve_bytes=0, budget_bytes=None, link=link, notes=notes,
                kv_offload=options.kv_offload, kv_host_bytes=_kv_host_bytes(facts, options),
                micro_batch=options.micro_batch, kv_cpu_layers=kv_cpu_layers(options, n))


def kv_cpu_layers(options: PlanOptions, num_blocks: int) -> int:
    """How many layers' attention runs on the CPUs under ``options``."""
    if options.kv_offload == "host-compute":
        return num_blocks
    if options.kv_offload == "split":
        return num_blocks // 2 if options.kv_cpu_layers is None else max(0, min(options.kv_cpu_layers, num_blocks))
    return 0


def _kv_host_bytes(facts: CheckpointFacts, options: PlanOptions) -> int:
    """Host bytes of a host-placed KV cache at the planned batch and sequence (0 when it is on the device)."""
    if options.kv_offload == "none":
        return 0
    seq = min(options.max_seq_len or DEFAULT_SEQ_LEN, facts.family.max_positions)
    return facts.num_blocks * kv_layer_bytes(facts.family, options.max_batch, seq, facts.dtype)
