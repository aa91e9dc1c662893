"""Weights as the engine hands them to a family: views of a block's bytes, aligned on the device, in the compute
dtype; and the attention kernels the engine runs them with."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ContextManager, Dict, List, Tuple

import torch
from torch import Tensor

from ..foundations.lossless import SUFFIXES as CODED_SUFFIXES
from ..foundations.quant import CODES, SCALE, ZERO
from ..foundations.store import FlatRead

Weights = Dict[str, Tensor]  # {local name: tensor on the compute device}
PACKED_SUFFIXES = (CODES, SCALE, ZERO, *CODED_SUFFIXES)  # the parts of quantized and losslessly coded weights

# cuBLAS picks its fastest kernels only for 16-byte (better: 256-byte) aligned operands, but a tensor sits in its
# arena at its file offset modulo 4096, which safetensors aligns to 8 bytes only. The tensors of a block read from
# one file share one residue, so one shift on the device aligns them all; a block that spans two shards whose data
# start 8 bytes apart modulo 16 needs a shift for each (on an H100, bloom-7b1's blocks 9 and 23 ran three GEMMs
# on SM80 kernels 3.5x slower than the others': docs/performance.md item 55).
DEVICE_ALIGN = 256
TENSOR_ALIGN = 16  # the least a tensor's start on the device is aligned to


@dataclass(frozen=True)
class DevicePlacement:
    """Where a block's bytes go on the device: ``runs`` of (host offset, bytes, device offset), a copy each, that
    keep the host's layout within them, each starting ``DEVICE_ALIGN``-aligned; the tensors' ``layout`` there."""

    runs: Tuple[Tuple[int, int, int], ...]
    layout: Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]]
    nbytes: int


def device_placement(flat: FlatRead, split: bool = True) -> DevicePlacement:
    """``flat``'s tensors in host order, a run ending where the next tensor would sit off ``TENSOR_ALIGN`` from the
    run's start (a block's part in another shard); one run for a block read from one file. ``split=False``: one run
    whatever the tensors' residues (the whole block shifted once)."""
    runs: List[Tuple[int, int, int]] = []
    layout: Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]] = {}
    start = end = dev = 0
    opened = False
    for name, (off, dt, shape) in sorted(flat.layout.items(), key=lambda kv: kv[1][0]):
        size = math.prod(shape) * dt.itemsize
        if not size:  # (the reader points an empty tensor at its arena's start: it opens no run)
            layout[name] = (dev, dt, shape)
            continue
        if not opened or (split and (off - start) % TENSOR_ALIGN):
            if opened:
                runs.append((start, end - start, dev))
                dev = -(-(dev + end - start) // DEVICE_ALIGN) * DEVICE_ALIGN
            start, end, opened = off, off, True
        end = max(end, off + size)
        layout[name] = (dev + off - start, dt, shape)
    if opened:
        runs.append((start, end - start, dev))
    return DevicePlacement(tuple(runs), layout, dev + end - start if opened else 0)


def to_device(flat: FlatRead, device: torch.device) -> FlatRead:  # GPU only (the CPU views its arenas)
    """A block's transfer to ``device``, a copy a run (``device_placement``), so that its tensors are aligned there."""
    place = device_placement(flat)
    buf = torch.empty(place.nbytes, dtype=torch.uint8, device=device)
    for host, nbytes, dev in place.runs:
        buf[dev:dev + nbytes].copy_(flat.buffer[host:host + nbytes])
    return FlatRead(buf, place.layout)


def local_weights(flat: FlatRead, names: Dict[str, str], dtype: torch.dtype) -> Weights:
    """{local name: tensor} of a block (or the outer tensors) from its bytes, converted to the compute dtype where
    needed; packed scales stay fp16 (they are part of the codes)."""
    views = flat.view()
    out = {}
    for local, ckpt in names.items():
        t = views[ckpt]
        keep = t.dtype == dtype or not t.is_floating_point() or local.endswith(PACKED_SUFFIXES)
        out[local] = t if keep else t.to(dtype)
    return out


def attention_kernels(device: torch.device) -> ContextManager[object]:
    """Where the engine's attention runs. cuDNN's attention builds an execution plan for every new (batch, heads,
    query, key) shape; decoding grows the key length by one every step, so each step paid a plan build (0.4-0.9 s
    on the H100, measured: docs/performance.md). Flash and memory-efficient attention need no plans."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _without_cudnn()


def _without_cudnn() -> ContextManager[object]:  # GPU only
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no cuDNN attention to avoid
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
