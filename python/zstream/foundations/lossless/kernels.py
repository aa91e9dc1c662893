"""Decoding ``codec`` tensors on the GPU: one Triton kernel, bit-identical to the native decoder.

A program owns ``BLOCK`` lanes. Each lane keeps a 64-bit window of its bit stream (``have`` valid bits at the top),
refills it one 32-bit word at a time when fewer bits than the longest code (12) remain, looks the next 12 bits up in
the decode table (4096 entries, 8 KiB: it stays in L1/L2), and shifts the code out. In step ``k`` lane ``j`` decodes
element ``k * lanes + j``, so the lanes of a program read consecutive raw bytes and write consecutive outputs; only
the words of the streams are gathered, one 4-byte load every 10 or so elements.

``decode`` runs the kernel for CUDA tensors when Triton imports and the native host decoder otherwise; with
``TRITON_INTERPRET=1`` set before Triton is imported, ``triton_decode`` runs in Triton's interpreter on CPU tensors,
which is how ``tests/test_lossless.py`` checks the kernel's bits without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .codec import CodedTensor, decode_host

try:  # Triton is optional: without it everything decodes on the host
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
DEFAULT_BLOCK = 128  # lanes per program
DEFAULT_WARPS = 4


def backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and HAS_TRITON else "host"


def decode(c: CodedTensor, out: Optional[Tensor] = None) -> Tensor:
    """The tensor ``c`` codes, on ``c``'s device (into ``out`` when given)."""
    if backend(c.words.device) == "triton":  # GPU only
        return triton_decode(c, out)
    t = decode_host(c).to(c.words.device)
    if out is None:
        return t
    return out.copy_(t)


def triton_decode(c: CodedTensor, out: Optional[Tensor] = None, block: int = DEFAULT_BLOCK,
                  warps: int = DEFAULT_WARPS) -> Tensor:
    n = c.raw.numel()
    if out is None:
        out = torch.empty(c.shape, dtype=c.dtype, device=c.raw.device)
    if n == 0:
        return out
    lanes = c.lanes
    steps = -(-n // lanes)
    grid = (triton.cdiv(lanes, block),)
    _decode_kernel[grid](c.words, c.offsets, c.raw, c.table, out.view(torch.int16), n, lanes, steps,
                         BLOCK=block, num_warps=warps)
    return out


if HAS_TRITON:

    @triton.jit
    def _decode_kernel(words_ptr, offsets_ptr, raw_ptr, table_ptr, out_ptr, n, lanes, steps,
                       BLOCK: tl.constexpr):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < lanes
        pos = tl.load(offsets_ptr + lane, mask=live, other=0)
        first = tl.load(words_ptr + pos, mask=live, other=0)
        window = tl.cast(first, tl.uint32, bitcast=True).to(tl.uint64) << 32
        have = tl.full([BLOCK], 32, tl.int32)
        pos += 1
        for k in range(steps):
            i = k * lanes + lane.to(tl.int64)
            m = live & (i < n)
            need = m & (have < 12)
            word = tl.load(words_ptr + pos, mask=need, other=0)
            shift = (32 - have).to(tl.uint64)
            window = tl.where(need, window | (tl.cast(word, tl.uint32, bitcast=True).to(tl.uint64) << shift), window)
            have = tl.where(need, have + 32, have)
            pos = tl.where(need, pos + 1, pos)
            entry = tl.load(table_ptr + (window >> 52).to(tl.int32), mask=m, other=0).to(tl.int32)
            length = entry >> 8
            symbol = entry & 0xFF
            window = window << length.to(tl.uint64)
            have -= length
            raw = tl.load(raw_ptr + i, mask=m, other=0).to(tl.int32)
            value = ((raw & 0x80) << 8) | (symbol << 7) | (raw & 0x7F)
            tl.store(out_ptr + i, value.to(tl.int16), mask=m)
