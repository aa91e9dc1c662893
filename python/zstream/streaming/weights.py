"""Weights as the engine hands them to a family: views of a block's bytes, aligned on the device, in the compute
dtype; and the attention kernels the engine runs them with."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict

import torch
from torch import Tensor

from ..foundations.lossless import SUFFIXES as CODED_SUFFIXES
from ..foundations.quant import CODES, SCALE, ZERO
from ..foundations.store import FlatRead

Weights = Dict[str, Tensor]  # {local name: tensor on the compute device}
PACKED_SUFFIXES = (CODES, SCALE, ZERO, *CODED_SUFFIXES)  # the parts of quantized and losslessly coded weights

# cuBLAS picks its fastest kernels only for 16-byte (better: 256-byte) aligned operands, but a tensor sits in its
# arena at its file offset modulo 4096, which safetensors aligns to 8 bytes only. A block's tensors usually share
# one residue, so shifting the whole block by a pad on the device aligns them all.
DEVICE_ALIGN = 256


def block_pad(flat: FlatRead) -> int:
    """Bytes to shift ``flat`` by on the device so that its first tensor is DEVICE_ALIGN-aligned."""
    first = min((off for off, _, _ in flat.layout.values()), default=0)
    return -first % DEVICE_ALIGN


def to_device(flat: FlatRead, device: torch.device) -> FlatRead:  # GPU only (the CPU views its arenas)
    """One transfer of a whole block to ``device``, shifted so that its tensors are aligned there."""
    pad = block_pad(flat)
    buf = torch.empty(flat.nbytes + pad, dtype=torch.uint8, device=device)
    buf[pad:].copy_(flat.buffer)
    return FlatRead(buf[pad:], flat.layout)


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
