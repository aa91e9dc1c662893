"""``offload="ats"``: weights stay in host memory and the GPU's kernels read them where they lie.

On a GH200 the GPU reads ordinary pageable memory through the CPU's page tables (ATS over NVLink-C2C), so the
arenas are plain anonymous memory on the NUMA node next to the GPU: no pinning, no staging copies. On GPUs without
ATS (PCIe H100s) the same mode runs zero-copy through mapped pinned memory: each arena is registered with
``cudaHostRegisterMapped`` and exported to torch as a CUDA tensor whose pointer is the host address.

Reading remote memory from a kernel pays off while each weight byte is used by few tokens (decode). When a
forward pass carries many tokens (prefill), a weight byte is reused by every token and a copy into a GPU slot
with the copy engine wins; the crossover (tokens per pass) is measured at load, not guessed.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .detect import HardwareReport, hardware
from .engine import DEVICE_ALIGN, StreamingModel, Weights, _DeviceRing, _local, to_device
from .errors import ModelError
from .generation import read_config
from .models import family_for
from .plan import Plan, Stopwatch
from .quant import QuantConfig, QuantizationError
from .store import FlatRead, WeightStore


class _InPlaceBlocks:
    """Blocks read in place from host memory; passes with many tokens copy them through a device ring instead."""

    def __init__(self, in_place: List[FlatRead], ring: _DeviceRing, block_names: List[Dict[str, str]],
                 dtype: torch.dtype, copy_from_tokens: int) -> None:
        # The in-place views never change: build them once, not every pass.
        self.in_place = [_local(flat.view(), names, dtype) for flat, names in zip(in_place, block_names)]
        self.ring = ring
        self.block_names = block_names
        self.dtype = dtype
        self.copy_from_tokens = copy_from_tokens
        self.copying = False
        self.trace = None

    def begin_pass(self, tokens: int) -> None:
        copying = tokens >= self.copy_from_tokens
        if copying != self.copying and self.ring.issued:
            self.ring.reset()  # the ring prefetches across passes; switching modes drops what it holds
        self.copying = copying

    def acquire(self, block: int) -> Weights:
        if self.copying:
            return self.ring.acquire(block)
        return self.in_place[block]

    def release(self) -> None:
        if self.copying:
            self.ring.release()

    def at_pass_start(self) -> bool:
        return self.ring.at_pass_start()

    def reset(self) -> None:
        self.ring.reset()


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_crossover(in_place: torch.Tensor, host: torch.Tensor, device: torch.device) -> tuple[int, float, dict]:
    """Tokens per pass from which copying a weight to the device beats reading it in place, and the in-place read
    bandwidth (GB/s). ``in_place``/``host``: the same (out, in) weight as a CUDA view of host memory and as a CPU
    tensor."""
    w_dev = torch.empty_like(in_place, device=device)
    read_gbps = in_place.numel() * in_place.element_size() / (_median_ms(lambda: in_place.sum(dtype=torch.float32))
                                                               / 1e3) / 1e9
    copy_ms = _median_ms(lambda: w_dev.copy_(host, non_blocking=True))
    table = {}
    crossover = 1 << 30
    for n in (1, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(n, in_place.shape[1], dtype=in_place.dtype, device=device)
        remote = _median_ms(lambda x=x: x @ in_place.T)
        local = max(copy_ms, _median_ms(lambda x=x: x @ w_dev.T))  # the ring overlaps copy and compute
        table[n] = (remote, local)
        if remote > local and crossover == 1 << 30:
            crossover = n
    return crossover, read_gbps, {"copy_ms": copy_ms, "matmul_ms": table}


def load_ats(path: Path, *, device: torch.device, dtype: Optional[torch.dtype], progress: bool, reader: str = "auto",
             prefetch: int = 2, copy_from_tokens: Optional[int] = None,
             report: Optional[HardwareReport] = None) -> StreamingModel:
    clock = Stopwatch()
    if device.type != "cuda":
        raise ModelError("offload='ats' reads weights from GPU kernels: it needs a CUDA device")
    rep = report or hardware(device.index or 0, measure=False)
    native = rep.ats
    if not native and not (rep.can_map_host_memory and rep.host_pointer_for_registered_mem):
        raise ModelError(f"offload='ats' needs a GPU that reads host memory in place (ATS, or mapped pinned memory "
                         f"with host pointers); {rep.gpu} has neither: use offload='cpu'")
    config = read_config(path)
    node = rep.gpu_numa_node if len(rep.numa_nodes) > 1 else None
    store = WeightStore.open(path, reader=reader, pin=not native, mapped=not native, numa_node=node,
                             tensor_align=DEVICE_ALIGN)
    family = family_for(config, store.names())
    packed = QuantConfig.from_metadata(store.metadata(), where=str(path))
    if packed is not None:
        store.close()
        raise QuantizationError(f"{path} is packed ({packed.describe()}); offload='ats' reads checkpoint weights in "
                                "place for the kernels, so it needs an unquantized checkpoint: stream this one with "
                                "offload='cpu' or 'nvme'")
    family.validate({n: store.info(n) for n in family.expected_shapes() if n in store})
    block_names = [family.block_tensors(i) for i in range(family.num_blocks)]
    ckpt_dtype = store.info(next(iter(block_names[0].values()))).torch_dtype
    if dtype is not None and dtype != ckpt_dtype:
        raise ModelError(f"offload='ats' reads weights in place, so it computes in the checkpoint's dtype "
                         f"({ckpt_dtype}), not {dtype}")
    dtype = ckpt_dtype

    outer_names = family.outer_tensors()
    outer = _local(to_device(store.read_flat(list(dict.fromkeys(outer_names.values()))), device).view(),
                   outer_names, dtype)
    in_place: List[FlatRead] = []
    host: List[Optional[FlatRead]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=family.num_blocks, desc="zstream load (ats)", leave=False)
    for names in block_names:
        dev_flat, host_flat = store.read_in_place(names.values(), device_id=device.index or 0)
        in_place.append(dev_flat)
        host.append(host_flat)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    # The largest weight of block 0, read in place and copied: where does copying start to win?
    layout = in_place[0].layout
    name = max(layout, key=lambda n: layout[n][1].itemsize * math.prod(layout[n][2]))
    views_dev, views_host = in_place[0].view(), host[0].view()
    measured, read_gbps, detail = measure_crossover(views_dev[name], views_host[name], device)
    crossover = copy_from_tokens or measured

    raw = [sum(store.info(n).nbytes for n in dict.fromkeys(names.values())) for names in block_names]
    slot_bytes = max(store.plan(names.values())[1] for names in block_names)
    order = list(range(family.num_blocks))
    ring = _DeviceRing(device, order, slot_bytes, prefetch + 1, host, block_names, dtype)
    streamer = _InPlaceBlocks(in_place, ring, block_names, dtype, crossover)
    plan = Plan(offload="ats", device=str(device), dtype=dtype, block_bytes=raw,
                outer_bytes=sum(store.info(n).nbytes for n in set(outer_names.values())), resident_blocks=[],
                streamed_blocks=order, ring_slots=prefetch + 1, kv_reserve_bytes=0, budget_bytes=None,
                link=("ATS (pageable memory read in place)" if native else "mapped pinned memory read in place"),
                link_gbps=read_gbps,
                notes=[f"passes of >= {crossover} tokens copy blocks through the ring instead "
                       f"({'given' if copy_from_tokens else 'measured'}; in-place vs copy ms per token count: "
                       f"{ {n: (round(a, 2), round(b, 2)) for n, (a, b) in detail['matmul_ms'].items()} })"])
    model = StreamingModel(store=store, family=family, plan=plan, config=config, outer=outer, resident={},
                           streamer=streamer, tokenizer=None, path=str(path), load_s=clock())
    from .loading import _tokenizer

    model.tokenizer = _tokenizer(path)
    return model
