"""``zstream.plan_batch``: the batch and residency that maximise tokens/s under a device budget, predicted from the
checkpoint's facts, the link measured now and a compute model measured on the device."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import QuantizationError, UsageError
from ..foundations import checkpoint
from ..foundations.hardware import resolve_device
from ..foundations.measure import host_available_bytes, measure_link
from ..foundations.models import family_for
from ..foundations.quant import QuantConfig
from ..foundations.store import WeightStore
from ..foundations.units import parse_bytes, parse_dtype
from ..planning.batch import BatchPlan, ComputeModel, ModelSizes, choose_batch, fitting_batches
from ..planning.facts import CheckpointFacts, checkpoint_facts
from ..planning.offload import streaming_offload
from ..planning.residency import KV_OFFLOADS, graphs_for_ranks
from ..streaming.calibrate import calibrate_compute
from ..streaming.model import StreamingModel
from . import synthetic


def plan_batch(model: Any, *, gpu_memory: Union[int, str, None] = None, prompt: int = 512, gen: int = 32,
               offload: str = "cpu", device: Optional[str] = None, dtype: Union[str, torch.dtype, None] = None,
               prefetch: int = 2, link_gbps: Optional[float] = None, compute: Optional[ComputeModel] = None,
               max_batch: int = 1024, cache: Union[str, os.PathLike, None] = None,
               step_overhead_s: float = 0.0, quantize: Optional[str] = None, group_size: int = 64,
               symmetric: bool = False, tensor_parallel: int = 1, kv_offload: str = "none",
               micro_batch: Union[int, Sequence[Optional[int]], None] = None,
               kv_cpu_layers: Optional[int] = None, cuda_graphs: Optional[bool] = None) -> BatchPlan:
    """The batch and residency that maximise tokens/s for a budget, predicted from measurements made now.

    ``model``: a checkpoint directory (only its headers are read) or a model ``zstream.load`` returned (its plan's
    sizes and link). ``gpu_memory``: the budget (default: free device memory; a loaded model's own budget).
    ``offload``: the mode that may stream ("cpu", "nvme", "auto": the rule of ``offload="auto"``), or "none". The
    link is measured as the loader measures it unless ``link_gbps`` is given; the compute is calibrated on the
    device (``calibrate_compute``) unless given. ``zstream.load(path, **plan.load_kwargs())`` then loads the chosen
    configuration. Quantized blocks (a packed checkpoint, a loaded quantized model, or ``quantize=`` as ``load``
    takes it) are planned with their packed bytes, the room ``load`` keeps for one dequantized block, and a compute
    model that times the dequantization too. ``tensor_parallel`` N plans one rank of N (a loaded model: its own
    rank): its piece of every block, its GPU's budget, its link, its share of the compute; the all-reduces between
    the ranks (two a block, of batch x hidden activations) are not in the prediction. ``kv_offload``: where the KV
    cache lives ("none", "host", "host-compute", "split", as ``load`` takes it), or "auto" to plan all and pick (on
    a CUDA device; elsewhere the cache is in host memory already); a host cache must fit the host memory left after
    the pinned weights, and the block is timed with it.
    ``micro_batch``: rows a block computes at a time, as ``load`` takes it, or a list of sizes to plan and pick
    from (None among them: the whole batch). ``kv_cpu_layers``: with "split", the layers attended on the CPUs, as
    ``load`` takes it (None: the planner's choice, given in ``plan.load_kwargs()``). ``cuda_graphs``: as ``load``
    takes it (None: on where it applies); a step with every block resident and the cache on the device is planned as
    the CUDA graph it replays, where the graph's memory fits beside the blocks (never under tensor parallelism)."""
    if offload not in ("auto", "none", "cpu", "nvme"):
        raise UsageError(f"offload must be one of auto, none, cpu, nvme for planning, not {offload!r}")
    if prompt < 1 or gen < 1:
        raise UsageError(f"prompt and gen must be at least 1, not {prompt} and {gen}")
    if kv_offload not in (*KV_OFFLOADS, "auto"):
        raise UsageError(f"kv_offload must be one of {', '.join(KV_OFFLOADS)}, auto for planning, not {kv_offload!r}")
    kv_offloads = KV_OFFLOADS if kv_offload == "auto" else (kv_offload,)
    asked: List[Any] = list(micro_batch) if isinstance(micro_batch, (list, tuple)) else [micro_batch]
    if any(m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1) for m in asked):
        raise UsageError(f"micro_batch must be None, a number of rows >= 1 or a list of them, not {micro_batch!r}")
    micros: List[Optional[int]] = asked
    loaded = isinstance(model, StreamingModel)
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise UsageError(f"tensor_parallel must be a number of ranks >= 1, not {tensor_parallel!r}")
    if loaded:
        tensor_parallel = model.plan.ranks
    cuda_graphs = graphs_for_ranks(cuda_graphs, tensor_parallel)
    store, facts, dev = _facts(model, device, dtype, QuantConfig.parse(quantize, group_size, symmetric),
                               tensor_parallel)
    if kv_offload == "auto" and dev.type != "cuda":  # the device's memory is host memory: load's auto says "none"
        kv_offloads = ("none",)
    try:
        stream = _stream(offload, facts, dev)
        sizes = ModelSizes.of(facts, host_budget=_host_budget(facts, stream, loaded) if dev.type == "cuda" else None)
        budget = _budget(gpu_memory, model if loaded else None, dev)
        # a host cache brought up to attend crosses the link even when every block stays resident
        crosses = stream is not None or bool({"host", "split"} & set(kv_offloads))
        link = "given"
        if crosses and link_gbps is None:
            link, link_gbps = _link(model if loaded else None, stream, dev, store, facts)
        if compute is None:  # calibrated over the batches that can run: the fit is trusted inside its range
            seq = min(prompt + gen, facts.family.max_positions)
            largest = max((b for kv in kv_offloads for m in micros
                           for b, _, _ in fitting_batches(sizes, budget, seq, prefetch + 1, stream is not None,
                                                          max_batch, kv, m)), default=1)
            compute = calibrate_compute(facts.family, dev, facts.dtype, max_batch=largest, prompt=prompt, gen=gen,
                                        cache=cache, quant=facts.quant, kv_offloads=kv_offloads,
                                        batches=[m for m in micros if m is not None and m < largest],
                                        graphs=cuda_graphs)
    finally:
        if not loaded:
            store.close()
    plan = choose_batch(sizes, compute, budget=budget, prompt=prompt, gen=gen, link_gbps=link_gbps, stream=stream,
                        prefetch=prefetch, max_batch=max_batch, step_overhead_s=step_overhead_s,
                        kv_offloads=kv_offloads, micro_batch_sizes=micros, kv_cpu_layers=kv_cpu_layers,
                        cuda_graphs=cuda_graphs)
    plan.device, plan.dtype, plan.link = str(dev), facts.dtype, link if crosses else ""
    plan.tensor_parallel = tensor_parallel
    if facts.quantize_at_load and not loaded:
        assert facts.quant is not None
        cfg = facts.quant.cfg
        plan.quantize = {"quantize": cfg.name, "group_size": cfg.group_size, "symmetric": cfg.symmetric}
    return plan


def _facts(model: Any, device: Optional[str], dtype: Union[str, torch.dtype, None], quantize: Optional[QuantConfig],
           ranks: int) -> Tuple[WeightStore, CheckpointFacts, torch.device]:
    """(store, facts, device) of a loaded model (its own), or of a checkpoint's headers (a store opened here); of
    rank 0's shard for ``ranks`` > 1 (every rank holds as much)."""
    if isinstance(model, StreamingModel):
        model.ensure_open()
        return model.store, model.facts, model.device
    dev = resolve_device(device)
    path = checkpoint.resolve(model)
    config = checkpoint.read_config(path)
    store = synthetic.open_store(path, config, pin=False)
    try:
        family = family_for(config, store.names()).shard(0, ranks, reduce=_no_reduce)
        facts = checkpoint_facts(store, family, dtype=parse_dtype(dtype), device_type=dev.type, quantize=quantize,
                                 where=str(path), shard_at_load=ranks > 1)
    except BaseException:
        store.close()
        raise
    return store, facts, dev


def _budget(gpu_memory: Union[int, str, None], loaded: Optional[StreamingModel], dev: torch.device) -> Optional[int]:
    """The budget planned under: ``gpu_memory``, else a loaded model's own, else the device's free memory; on the
    CPU, the host memory available (host memory is the device's: ``load`` keeps blocks resident only under one)."""
    budget = parse_bytes(gpu_memory, what="gpu_memory")
    if budget is None and loaded is not None:
        budget = loaded.plan.budget_bytes
    if budget is None and dev.type == "cuda":
        budget = torch.cuda.mem_get_info(dev)[0]
    if budget is None:
        budget = host_available_bytes() or None
    return budget


def _link(loaded: Optional[StreamingModel], stream: Optional[str], dev: torch.device, store: WeightStore,
          facts: CheckpointFacts) -> Tuple[str, float]:
    """(what limits the link, its GB/s): a loaded model's own, measured at its load, where it streams the same way;
    else measured now as the loader measures it, over a few blocks."""
    if loaded is not None and loaded.plan.link_gbps and loaded.plan.offload == stream:
        return loaded.plan.link, loaded.plan.link_gbps
    blocks = [list(names.values()) for names in facts.stored_block_names[:4]]
    link, rate = measure_link(stream or "cpu", dev, store, blocks)
    return link, rate.gbps


def _host_budget(facts: CheckpointFacts, stream: Optional[str], loaded: bool) -> int:
    """Host memory a host KV cache may take: what is available, less the blocks ``offload="cpu"`` will pin (a loaded
    model's are pinned already), less a tenth for everything else."""
    pinned = 0 if loaded or stream != "cpu" else sum(facts.block_bytes)
    return max(0, int(0.9 * host_available_bytes()) - pinned)


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t  # calibration times one rank's matmuls alone


def _stream(offload: str, facts: CheckpointFacts, dev: torch.device) -> Optional[str]:
    """The mode blocks stream in, or None when every block stays resident (offload "none"; "cpu" on the CPU, where
    ``load`` keeps every block in host memory)."""
    if offload == "auto":
        stream: Optional[str] = streaming_offload(facts.device_bytes, host_available_bytes(), device_type=dev.type)
    elif offload == "nvme" or (offload == "cpu" and dev.type == "cuda"):
        stream = offload
    else:
        stream = None
    if facts.quantize_at_load and stream == "nvme":
        raise QuantizationError("quantize= quantizes into memory at load, so nothing quantized can stream from "
                                "disk: plan a checkpoint written by `zstream pack` for offload='nvme'")
    return stream
