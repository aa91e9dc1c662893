"""Group-wise int8 / int4 weight quantization: the scheme that quantized streaming (issue 7) builds on.

A weight (out, in) is cut into groups of ``group_size`` consecutive inputs per output row. Each group keeps an fp16
``scale`` and, for the asymmetric scheme, an fp16 ``zero`` (the group's minimum, so a range that does not include
0 loses nothing to a clamped integer zero point):

    asymmetric:  zero = fp16(min),  scale = fp16((max - zero) / (2**bits - 1)),
                 q = clamp(round((w - zero) / scale), 0, 2**bits - 1),  w' = q * scale + zero
    symmetric:   scale = fp16(max|w| / (2**(bits-1) - 1)),  q = clamp(round(w / scale), -(2**(bits-1) - 1), ...),
                 stored as q + 2**(bits-1);  w' = (q - 2**(bits-1)) * scale

All arithmetic is float32 with round-half-to-even, so a plain numpy implementation of the same formulas gives the
same bits (``tests/test_quant.py`` checks that). A group whose values are all equal has scale 0 and comes back
exactly (as its fp16 value). int4 codes are packed two to a byte, the even column in the low nibble.

Not yet wired into ``zstream.load`` or the engine: that, ``zstream pack`` and the GPU kernels are the rest of issue 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .errors import ZStreamError


class QuantizationError(ZStreamError, ValueError):
    """A tensor cannot be quantized as asked (non-finite values, a shape the group size does not divide)."""


@dataclass
class QuantizedTensor:
    codes: Tensor            # uint8: (out, in) for int8, (out, in / 2) packed for int4
    scale: Tensor            # fp16 (out, in / group_size)
    zero: Optional[Tensor]   # fp16 (out, in / group_size): each group's minimum, asymmetric only
    shape: tuple[int, int]
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        """Bytes that cross the link for this weight."""
        n = self.codes.numel() + self.scale.numel() * self.scale.element_size()
        return n + (self.zero.numel() * self.zero.element_size() if self.zero is not None else 0)


def _check(w: Tensor, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise QuantizationError(f"bits must be 4 or 8, not {bits}")
    if w.dim() != 2:
        raise QuantizationError(f"group-wise quantization takes a (out, in) matrix, not shape {tuple(w.shape)}")
    if group_size <= 0 or w.shape[1] % group_size:
        raise QuantizationError(f"group_size {group_size} does not divide the input dimension {w.shape[1]}")
    if bits == 4 and group_size % 2:
        raise QuantizationError(f"int4 packs two codes a byte: group_size {group_size} must be even")
    if not bool(torch.isfinite(w).all()):
        raise QuantizationError("cannot quantize a tensor holding inf or NaN: its groups have no finite range")


def quantize(w: Tensor, bits: int = 4, group_size: int = 64, symmetric: bool = False) -> QuantizedTensor:
    """Quantize a (out, in) weight group-wise."""
    _check(w, bits, group_size)
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, G, gs)
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = g.abs().amax(dim=-1)                                 # (out, G)
        scale = (amax / (half - 1)).half().float()
        flat = scale == 0                                           # an all-zero group
        safe = torch.where(flat, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / safe[..., None]), -(half - 1), half - 1) + half
        codes, zero = q.to(torch.uint8), None
    else:
        zero = g.amin(dim=-1).half().float()                        # (out, G)
        scale = ((g.amax(dim=-1) - zero) / qmax).half().float()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round((g - zero[..., None]) / safe[..., None]), 0, qmax)
        codes, zero = q.to(torch.uint8), zero.half()
    codes = codes.reshape(out_f, in_f)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedTensor(codes.contiguous(), scale.half(), zero, (out_f, in_f), bits, group_size)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> Tensor:
    """The (out, in) weight a QuantizedTensor stands for, in ``dtype`` (computed in float32)."""
    out_f, in_f = qt.shape
    codes = qt.codes
    if qt.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(out_f, in_f)
    q = codes.float().reshape(out_f, in_f // qt.group_size, qt.group_size)
    scale = qt.scale.float()[..., None]
    w = q * scale + qt.zero.float()[..., None] if qt.zero is not None else (q - 2 ** (qt.bits - 1)) * scale
    return w.reshape(out_f, in_f).to(dtype)
