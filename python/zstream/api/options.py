"""The arguments of ``zstream.load``, checked once: every bad value becomes one ``UsageError`` (or a
``QuantizationError``) naming the value and the fix, before anything is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

from ..errors import UsageError
from ..foundations.hardware import resolve_device
from ..foundations.parallel import DEFAULT_TIMEOUT_S
from ..foundations.quant import QuantConfig
from ..foundations.units import parse_bytes, parse_dtype
from ..planning.offload import OFFLOADS
from ..planning.residency import KV_OFFLOADS, PlanOptions, graphs_for_ranks

READERS = ("auto", "uring", "pread", "mmap")

# from_pretrained arguments people pass by habit, and what to use instead
_HABITS = {
    "device_map": "zstream places the weights itself: give the device budget with gpu_memory='20GiB' and where "
                  "the rest lives with offload='cpu' or 'nvme'",
    "max_memory": "give the device budget with gpu_memory='20GiB'",
    "low_cpu_mem_usage": "zstream always reads weights in place, block by block: leave it out",
    "trust_remote_code": "zstream runs its own code for BLOOM, OPT, LLaMA, Mistral and Qwen2 only: leave it out",
    "load_in_8bit": "use quantize='int8'",
    "load_in_4bit": "use quantize='int4'",
    "quantization_config": "use quantize='int4' or 'int8' (and group_size=)",
    "attn_implementation": "zstream picks its attention kernels itself: leave it out",
}


@dataclass(frozen=True)
class LoadOptions:
    offload: str
    device: torch.device
    dtype: Optional[torch.dtype]
    budget: Optional[int]
    prefetch: int
    disk_prefetch: int
    max_batch: int
    max_seq_len: Optional[int]
    max_resident_blocks: Optional[int]
    reader: str
    quantize: Optional[QuantConfig]
    copy_from_tokens: Optional[int]
    progress: bool
    tensor_parallel: Optional[int] = None
    parallel_timeout: float = DEFAULT_TIMEOUT_S
    compress: Optional[str] = None  # "lossless": blocks entropy-coded at load, bit-exact
    kv_offload: str = "none"        # "host", "host-compute": every layer's KV cache in pinned host memory
    micro_batch: Optional[int] = None  # rows a block computes at a time
    kv_cpu_layers: Optional[int] = None  # kv_offload="split": layers attended on the CPUs (None: half)
    # decode steps of an all-resident model replayed as one CUDA graph (None: wherever that applies; True: asked)
    cuda_graphs: Optional[bool] = None

    def plan_options(self) -> PlanOptions:
        return PlanOptions(offload=self.offload, budget=self.budget, prefetch=self.prefetch,
                           max_batch=self.max_batch, max_seq_len=self.max_seq_len,
                           max_resident_blocks=self.max_resident_blocks, kv_offload=self.kv_offload,
                           micro_batch=self.micro_batch, kv_cpu_layers=self.kv_cpu_layers,
                           cuda_graphs=graphs_for_ranks(self.cuda_graphs, 1))  # (a rank's: resolved)


def _count(name: str, value: Any, lowest: int, *, or_none: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise UsageError(f"{name} must be an integer >= {lowest}{' or None' if or_none else ''}, not {value!r}")
    return value


def _count_or_none(name: str, value: Any, lowest: int) -> Optional[int]:
    return None if value is None else _count(name, value, lowest, or_none=True)


def load_options(*, offload: str = "auto", device: Union[str, torch.device, None] = None,
                 dtype: Union[str, torch.dtype, None] = None, torch_dtype: Union[str, torch.dtype, None] = None,
                 gpu_memory: Union[int, str, None] = None, prefetch: int = 2, disk_prefetch: int = 2,
                 max_batch: int = 1, max_seq_len: Optional[int] = None, max_resident_blocks: Optional[int] = None,
                 reader: str = "auto", quantize: Optional[str] = None, group_size: int = 64, symmetric: bool = False,
                 copy_from_tokens: Optional[int] = None, progress: bool = True, tensor_parallel: Optional[int] = None,
                 parallel_timeout: float = DEFAULT_TIMEOUT_S, compress: Optional[str] = None,
                 kv_offload: str = "none", micro_batch: Optional[int] = None,
                 kv_cpu_layers: Optional[int] = None, cuda_graphs: Optional[bool] = None,
                 unknown: Optional[Dict[str, Any]] = None) -> LoadOptions:
    """``LoadOptions`` from ``load``'s keywords; ``unknown`` holds keywords ``load`` does not take."""
    if unknown:
        name = sorted(unknown)[0]
        hint = _HABITS.get(name, "see help(zstream.load) for what it takes")
        raise UsageError(f"load() takes no argument {name!r}: {hint}")
    if offload not in OFFLOADS:
        raise UsageError(f"offload must be one of {', '.join(OFFLOADS)}, not {offload!r} (offload='none' keeps "
                         "every weight on the GPU)")
    if reader not in READERS:
        raise UsageError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
    wanted = parse_dtype(dtype)
    alias = parse_dtype(torch_dtype, what="torch_dtype")
    if wanted is not None and alias is not None and wanted != alias:
        raise UsageError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: give one of them")
    _count("group_size", group_size, 1)
    if compress not in (None, "none", "lossless"):
        raise UsageError(f"compress must be 'lossless' or None, not {compress!r}")
    if compress == "lossless" and quantize not in (None, "none"):
        raise UsageError(f"compress='lossless' keeps every bit of the weights and quantize={quantize!r} changes them: "
                         "give one of them")
    if kv_offload not in (*KV_OFFLOADS, "auto"):
        raise UsageError(f"kv_offload must be one of {', '.join(map(repr, KV_OFFLOADS))}, 'auto', not {kv_offload!r} "
                         "('host' keeps the KV cache in pinned host memory and brings each layer's up as it computes; "
                         "'host-compute' runs attention on the CPUs there; 'split' does both, layer by layer)")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise UsageError(f"cuda_graphs must be True, False or None (where it applies), not {cuda_graphs!r}")
    if isinstance(parallel_timeout, bool) or not isinstance(parallel_timeout, (int, float)) or parallel_timeout <= 0:
        raise UsageError(f"parallel_timeout must be a positive number of seconds, not {parallel_timeout!r}")
    return LoadOptions(
        offload=offload, device=resolve_device(device), dtype=wanted or alias,
        budget=parse_bytes(gpu_memory, what="gpu_memory"),
        prefetch=_count("prefetch", prefetch, 1), disk_prefetch=_count("disk_prefetch", disk_prefetch, 1),
        max_batch=_count("max_batch", max_batch, 1), max_seq_len=_count_or_none("max_seq_len", max_seq_len, 1),
        max_resident_blocks=_count_or_none("max_resident_blocks", max_resident_blocks, 0), reader=reader,
        quantize=QuantConfig.parse(quantize, group_size, symmetric),
        copy_from_tokens=_count_or_none("copy_from_tokens", copy_from_tokens, 1), progress=bool(progress),
        tensor_parallel=_count_or_none("tensor_parallel", tensor_parallel, 1), parallel_timeout=float(parallel_timeout),
        compress=None if compress == "none" else compress, kv_offload=kv_offload,
        micro_batch=_count_or_none("micro_batch", micro_batch, 1),
        kv_cpu_layers=_count_or_none("kv_cpu_layers", kv_cpu_layers, 0), cuda_graphs=cuda_graphs)
