"""``zstream.load``: resolve the arguments and the checkpoint, read its facts, plan, build."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..errors import CheckpointError, ParallelError, UsageError, warn
from ..foundations import checkpoint
from ..foundations.hardware import HardwareReport, hardware
from ..foundations.measure import host_available_bytes
from ..foundations.models import family_for
from ..foundations.parallel import DEFAULT_TIMEOUT_S, Group, join, launched_world, local_rank
from ..foundations.store import WeightStore
from ..foundations.units import dtype_name
from ..planning.facts import CheckpointFacts, checkpoint_facts
from ..planning.residency import Plan, Resources, graphs_for_ranks, plan_load
from ..streaming.build import READ_CONCURRENCY, build, build_in_place
from ..streaming.model import StreamingModel
from . import synthetic
from .options import LoadOptions, load_options


def load(model: Union[str, os.PathLike], *, offload: str = "auto", device: Union[str, torch.device, None] = None,
         dtype: Union[str, torch.dtype, None] = None, torch_dtype: Union[str, torch.dtype, None] = None,
         gpu_memory: Union[int, str, None] = None, prefetch: int = 2, disk_prefetch: int = 2, max_batch: int = 1,
         max_seq_len: Optional[int] = None, max_resident_blocks: Optional[int] = None, reader: str = "auto",
         quantize: Optional[str] = None, group_size: int = 64, symmetric: bool = False,
         copy_from_tokens: Optional[int] = None, download: Optional[bool] = None, revision: Optional[str] = None,
         tensor_parallel: Optional[int] = None, parallel_timeout: float = DEFAULT_TIMEOUT_S,
         compress: Optional[str] = None, kv_offload: str = "none", micro_batch: Optional[int] = None,
         kv_cpu_layers: Optional[int] = None, cuda_graphs: Optional[bool] = None, progress: bool = True,
         **unknown: Any) -> StreamingModel:
    """Load a checkpoint for streaming inference.

    ``model``: a checkpoint directory, one .safetensors file (its config and tokenizer beside it), or a Hugging Face
    repo id (from the local cache; downloaded when missing, as ``from_pretrained`` does, unless ``download=False`` or
    ``HF_HUB_OFFLINE=1``; ``revision`` picks a branch, tag or commit).
    ``offload``: "none" (everything on the device), "cpu" (weights read once into pinned host arenas, streamed
    every pass), "nvme" (blocks read from disk every pass through a small ring of host slots), "ats" (GH200 mode:
    read in place) or "auto" (none if it fits with room for the KV cache; ats on a GH200; cpu if host memory holds
    the weights; else nvme).
    ``gpu_memory``: the device budget (bytes or "20GiB"); default: free memory. Within it the non-block weights
    stay resident first, then the ring, then as many blocks as fit; ``max_batch`` x ``max_seq_len`` sizes the KV
    cache the budget keeps room for; ``max_resident_blocks`` caps the resident blocks of offload cpu and nvme (0: stream
    every block).
    ``device``: "cuda", "cuda:1" or "cpu" (default: cuda when there is one). ``dtype`` (or ``torch_dtype``):
    "auto", "fp16"/"float16", "bf16"/"bfloat16", "fp32"/"float32" or a torch dtype (default: the checkpoint's on a
    GPU, float32 on the CPU).
    ``quantize``: "int8" or "int4" quantizes each block's linear weights group-wise (``group_size`` inputs per fp16
    scale and minimum, or ``symmetric``) as the block is loaded, for offload "none" or "cpu"; fewer bytes then
    cross the link, and the GPU dequantizes each block in its slot. A checkpoint written by ``zstream pack`` is
    quantized already (its header says how) and loads with any offload but "ats", "nvme" included.
    ``prefetch``: blocks in flight ahead of the compute (the ring has prefetch + 1 slots); ``disk_prefetch``: disk
    reads ahead of the copies (nvme); ``reader``: "auto", "uring", "pread" or "mmap"; ``copy_from_tokens`` (ats):
    passes of this many tokens copy blocks instead of reading them in place (default: measured at load).
    ``compress``: "lossless" entropy-codes each block's linear weights (bfloat16 or float16) as it is loaded, for
    offload "none" or "cpu": about 0.67x of the bytes of a bf16 block cross the link, the GPU decodes them in the slot,
    and every weight, logit and token is bit-identical (docs/compression.md).
    ``kv_offload``: "none" (the KV cache on the device), "host": every layer's keys and values live in pinned host
    memory and cross the link ahead of the layer's attention (on a stream of their own, beside the weights' copies),
    so the device budget holds only the layers in transit and larger batches fit, logits and tokens bit-identical; or
    "host-compute": the cache in pinned host memory and attention computed there by the CPUs (only q, k, v and the
    attention's output cross the link; CPU arithmetic, so logits agree to rounding); "split": ``kv_cpu_layers``
    layers (default half, spread evenly) attended on the CPUs and the others' caches brought up, so that the link and
    the CPUs work at once; or "auto": on the device when
    the cache fits there beside the non-block weights and a ring of blocks, else in host memory, attended to by the
    CPUs when blocks stream (the link is theirs) and brought up when none does ("host"). ``plan_batch(...,
    kv_offload="auto")`` chooses by measuring instead, with the batch.
    ``micro_batch``: rows a block computes at a time (FlexGen's GPU batches): a larger batch runs as several
    micro-batches through each block while the block is on the device, so its weights cross the link once for all of
    them and the device keeps activations for one micro-batch only (None: the whole batch at once).
    ``cuda_graphs``: on a GPU with every block resident, the KV cache on the device and plain weights, decode steps
    replay one CUDA graph instead of launching each block's kernels from Python (their attention reads the cache's
    every slot, the unwritten ones masked: logits agree to rounding). The plan reserves the graph's memory, and where
    it does not fit beside every block, decodes eagerly; a tensor-parallel rank always does, and so does a
    generation too short to pay for recording one (``GRAPH_MIN_STEPS``). None (the default): on wherever it
    applies; False: every step eager. bloom-7b1's graphed step at batch 7 took 9-35% less time than
    the eager one on H100 and H200 leases, the more the slower the host's Python (docs/performance.md, items 29 and
    50).
    ``tensor_parallel``: shard the model over the ranks this process was started with (``torchrun --nproc-per-node
    N``, or ``zstream.launch``): each rank holds and streams only its piece of every block (its heads, its MLP units)
    over its own link, and the ranks all-reduce activations twice a block (docs/parallel.md). None: every rank of the
    launch (one process: no sharding); 1: no sharding; N: the launch must have N ranks. Every rank calls ``load``
    with the same arguments and runs the same calls on the model; ``generate`` returns the same tokens on each. A
    collective waits ``parallel_timeout`` seconds at most; a rank that fails is named by the others.

    The model is a context manager: ``with zstream.load(...) as model:`` closes it at the end.
    """
    started = time.perf_counter()
    options = load_options(offload=offload, device=device, dtype=dtype, torch_dtype=torch_dtype,
                           gpu_memory=gpu_memory, prefetch=prefetch, disk_prefetch=disk_prefetch, max_batch=max_batch,
                           max_seq_len=max_seq_len, max_resident_blocks=max_resident_blocks, reader=reader,
                           quantize=quantize, group_size=group_size, symmetric=symmetric,
                           copy_from_tokens=copy_from_tokens, progress=progress, tensor_parallel=tensor_parallel,
                           parallel_timeout=parallel_timeout, compress=compress, kv_offload=kv_offload,
                           micro_batch=micro_batch, kv_cpu_layers=kv_cpu_layers, cuda_graphs=cuda_graphs,
                           unknown=unknown)
    group = join(options.tensor_parallel, _rank_device(options, device), options.parallel_timeout)
    if group is not None:
        options = _rank_options(options, device, group.world)
    try:
        return _load(model, options, group, download=download, revision=revision, started=started)
    except BaseException as e:
        if group is not None:
            group.fail(e)  # the other ranks stop at once, naming this one, instead of waiting for it
        raise


def _load(model: Union[str, os.PathLike], options: LoadOptions, group: Optional[Group], *, download: Optional[bool],
          revision: Optional[str], started: float) -> StreamingModel:
    path = checkpoint.resolve(model, download=download, revision=revision)
    laid_out = checkpoint.tensor_parallel_ranks(path) is not None  # zstream pack --tensor-parallel: a dir per rank
    if laid_out:
        path = checkpoint.rank_checkpoint(path, group.rank if group else None, group.world if group else 1)
    shard_at_load = group is not None and not laid_out
    config = checkpoint.read_config(path)
    store = _open_store(path, config, options, sharded=shard_at_load)
    try:
        family = family_for(config, store.names())
        if group is None and checkpoint.TENSOR_PARALLEL_KEY in store.metadata():
            raise UsageError(f"{path} holds one rank's pieces of a tensor-parallel layout: load the layout's directory "
                             "(its parent) on all of its ranks")
        if group is not None:
            _check_rank_files(store, group, laid_out, where=str(path))
            family = family.shard(group.rank, group.world, group.all_reduce)
        facts = checkpoint_facts(store, family, dtype=options.dtype, device_type=options.device.type,
                                 quantize=options.quantize, where=str(path), shard_at_load=shard_at_load,
                                 compress=options.compress)
        resources = _resources(options)
        plan = plan_load(facts, resources, options.plan_options(), where=str(path))
        if plan.offload in ("nvme", "ats") and synthetic.is_in_memory(config):
            raise UsageError(f"{path} makes its random weights in host memory at load, so they cannot stream with "
                             f"offload={plan.offload!r}: give offload='cpu' (the host must hold them) or 'none'")
        if group is not None:
            plan = _rank_plan(plan, facts, resources, options, group, store, where=str(path))
        if plan.offload == "ats":
            store.close()  # the GH200 mode reads into arenas of its own kind
            return build_in_place(path, facts, plan, config=config, report=resources.report, reader=options.reader,
                                  prefetch=options.prefetch, copy_from_tokens=options.copy_from_tokens,
                                  progress=options.progress, started=started)
        return build(store, facts, plan, config=config, path=str(path), prefetch=options.prefetch,
                     disk_prefetch=options.disk_prefetch, progress=options.progress, started=started, group=group)
    except BaseException:
        store.close()
        raise


def _open_store(path: Path, config: Dict[str, Any], options: LoadOptions, sharded: bool) -> WeightStore:
    """The checkpoint's store (an in-memory synthetic checkpoint's weights are made, not read). Arenas are pinned
    when blocks may stream to a GPU from host memory; weights quantized or sharded at load go through temporary
    arenas, where pinning would be wasted work."""
    streaming = options.offload in ("cpu", "nvme", "auto")
    coded = options.quantize is not None or options.compress is not None
    pin = options.device.type == "cuda" and streaming and not coded and not sharded
    # (an in-memory checkpoint's offload is checked against plan_load's in _load)
    return synthetic.open_store(path, config, pin=pin, reader=options.reader, workers=READ_CONCURRENCY,
                                threads=min(16, os.cpu_count() or 8))


def _resources(options: LoadOptions) -> Resources:
    """What this machine offers, as the plan needs it (the GPU's abilities only when the offload depends on them)."""
    dev = options.device
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    report = HardwareReport()
    if dev.type == "cuda" and options.offload in ("auto", "ats"):
        report = hardware(dev.index or 0, measure=False)
    return Resources(device=str(dev), device_free=free, host_available=host_available_bytes(), report=report)


# ---- tensor parallelism ----------------------------------------------------------------------------------------


def _rank_device(options: LoadOptions, device: Union[str, torch.device, None]) -> torch.device:
    """A rank's GPU: its LOCAL_RANK, unless ``device`` named one."""
    asked = torch.device(device) if device is not None else None
    if options.device.type != "cuda" or launched_world() == 1 or options.tensor_parallel == 1:
        return options.device
    if asked is not None and asked.index is not None:  # GPU only
        return options.device
    return torch.device("cuda", local_rank())  # GPU only


def _rank_options(options: LoadOptions, device: Union[str, torch.device, None], ranks: int) -> LoadOptions:
    offload = options.offload
    if offload == "ats":
        warn("zstream: offload='ats' reads whole blocks in place and cannot give a rank its piece; tensor "
             "parallelism streams them from pinned host memory instead (offload='cpu')", RuntimeWarning)
        offload = "cpu"
    return replace(options, device=_rank_device(options, device), offload=offload,
                   cuda_graphs=graphs_for_ranks(options.cuda_graphs, ranks))


def _rank_plan(plan: Plan, facts: CheckpointFacts, resources: Resources, options: LoadOptions, group: Group,
               store: WeightStore, *, where: str) -> Plan:
    """The plan of one rank: never "ats" (no piece to read in place), and the same checkpoint on every rank."""
    if plan.offload == "ats":  # offload="auto" on a GH200
        plan = plan_load(facts, resources, replace(options, offload="cpu").plan_options(), where=where)
    if plan.offload == "nvme" and facts.shard_at_load:
        raise UsageError(f"{where}: offload='nvme' under tensor parallelism reads each rank's piece of a block from "
                         "disk in one read, from a checkpoint laid out for it; this one holds whole blocks. Write "
                         f"the layout once with `zstream pack {where} OUT --tensor-parallel {group.world} --quantize "
                         "none`, or use offload='cpu' (the pieces are cut at load)")
    mine = _fingerprint(store, facts, plan)
    everyone = group.gather((where, mine), "comparing the ranks' checkpoints")
    differ = [f"rank {r}: {path} ({fp})" for r, (path, fp) in enumerate(everyone) if fp != mine]
    if differ:
        raise ParallelError(f"the ranks opened different checkpoints or options: rank {group.rank}: {where} ({mine}) "
                            f"but {'; '.join(differ)}; every rank must load the same checkpoint the same way")
    plan.rank, plan.ranks = group.rank, group.world
    return plan


def _check_rank_files(store: WeightStore, group: Group, laid_out: bool, *, where: str) -> None:
    """A rank's directory of a tensor-parallel layout holds that rank's pieces (its headers say so); a plain
    checkpoint holds no pieces at all."""
    found = store.metadata().get(checkpoint.TENSOR_PARALLEL_KEY)
    want = checkpoint.rank_metadata(group.rank, group.world)[checkpoint.TENSOR_PARALLEL_KEY] if laid_out else None
    if found != want:
        raise CheckpointError(f"{where}: its headers say {checkpoint.TENSOR_PARALLEL_KEY}={found}, rank {group.rank} "
                              f"of {group.world} expects {want}; write the layout again with zstream pack")


def _fingerprint(store: WeightStore, facts: CheckpointFacts, plan: Plan) -> str:
    """What every rank must agree on: the model, its tensors (names, shapes, dtypes), the compute dtype and the
    quantization. (Residency may differ: a rank with less free memory streams more blocks.)"""
    tensors = hashlib.sha256(repr(sorted((n, tuple(store.info(n).shape), store.info(n).dtype)
                                         for n in store.names())).encode()).hexdigest()[:12]
    whole = facts.family.unsharded or facts.family
    return f"{whole!r}, tensors {tensors}, {dtype_name(plan.dtype)}, {plan.quantization or 'unquantized'}"
