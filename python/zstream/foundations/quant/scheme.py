"""Group-wise int8 / int4 weight quantization: the scheme, and the torch reference of its arithmetic.

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

Where it is used:
  * ``zstream.load(..., quantize="int4")`` quantizes a block's linear weights (``Family.linear_weights``) as the
    block is read, and keeps the packed bytes in pinned host memory (offload="cpu") or on the device;
  * ``zstream pack MODEL OUT --quantize int4`` writes a packed checkpoint that loads (and streams from disk) with
    no quantization at run time;
  * the engine copies the packed bytes of a block into its device slot and dequantizes them there
    (``zstream.kernels``) just before the block's matmuls.

The packed layout (in a checkpoint and in host memory alike): a linear weight ``NAME`` (out, in) becomes

    NAME.qcodes  uint8 (out, in) for int8, (out, in / 2) for int4 (two codes a byte, even column low nibble)
    NAME.qscale  fp16  (out, in / group_size)
    NAME.qzero   fp16  (out, in / group_size)    asymmetric only: each group's minimum

and a packed checkpoint's safetensors header says so in ``__metadata__["zstream.quantization"]``: a JSON object
``{"version": 1, "bits": 4, "group_size": 64, "symmetric": false}`` (``QuantConfig.to_metadata``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ...errors import QuantizationError

METADATA_KEY = "zstream.quantization"
FORMAT_VERSION = 1
CODES, SCALE, ZERO = ".qcodes", ".qscale", ".qzero"  # suffixes of a packed weight's tensors


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear weights are quantized: ``bits`` 4 or 8, ``group_size`` inputs per scale."""

    bits: int
    group_size: int = 64
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"bits must be 4 or 8, not {self.bits}")
        if self.group_size <= 0 or (self.bits == 4 and self.group_size % 2):
            raise QuantizationError(f"group_size must be positive (and even for int4), not {self.group_size}")

    @classmethod
    def parse(cls, quantize: Optional[str], group_size: int = 64, symmetric: bool = False) -> Optional[QuantConfig]:
        """``"int4"`` / ``"int8"`` -> a QuantConfig; None or ``"none"`` -> None."""
        if quantize is None or quantize == "none":
            return None
        if quantize not in ("int4", "int8"):
            raise QuantizationError(f"quantize must be 'int4', 'int8' or None, not {quantize!r}")
        return cls(int(quantize[3:]), group_size, symmetric)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def describe(self) -> str:
        return f"{self.name}, group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"

    def to_metadata(self) -> Dict[str, str]:
        """The safetensors ``__metadata__`` entry of a packed checkpoint (values must be strings)."""
        body = {"version": FORMAT_VERSION, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}
        return {METADATA_KEY: json.dumps(body, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: Optional[Mapping[str, str]], where: str = "") -> Optional[QuantConfig]:
        """The QuantConfig a safetensors header's ``__metadata__`` declares; None for an unquantized file."""
        if not metadata or METADATA_KEY not in metadata:
            return None
        try:
            body = json.loads(metadata[METADATA_KEY])
            version = int(body["version"])
            cfg = cls(int(body["bits"]), int(body["group_size"]), bool(body["symmetric"]))
        except (ValueError, KeyError, TypeError) as e:
            raise QuantizationError(f"{where}: unreadable {METADATA_KEY} metadata {metadata[METADATA_KEY]!r}: "
                                    f"{e}") from e
        if version != FORMAT_VERSION:
            raise QuantizationError(f"{where}: packed with format version {version}; this zstream reads "
                                    f"version {FORMAT_VERSION} (re-run zstream pack)")
        return cfg

    def packed(self, name: str, shape: Tuple[int, int]) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        """{tensor name: (dtype, shape)} of the packed form of weight ``name`` of ``shape`` (out, in)."""
        out_f, in_f = shape
        codes = (out_f, in_f // 2) if self.bits == 4 else (out_f, in_f)
        groups = (out_f, in_f // self.group_size)
        names: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {name + CODES: (torch.uint8, codes),
                                                                 name + SCALE: (torch.float16, groups)}
        if not self.symmetric:
            names[name + ZERO] = (torch.float16, groups)
        return names

    def packed_nbytes(self, shape: Tuple[int, int]) -> int:
        """Bytes of the packed form of a (out, in) weight."""
        return sum(dt.itemsize * math.prod(s) for dt, s in self.packed("", shape).values())

    def accepts(self, shape: Tuple[int, ...]) -> bool:
        """Whether a weight of ``shape`` can be quantized with this group size (else it stays unquantized)."""
        return len(shape) == 2 and shape[1] % self.group_size == 0


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


    def tensors(self, name: str) -> Dict[str, Tensor]:
        """The packed tensors of weight ``name``, by their names in the packed layout."""
        out = {name + CODES: self.codes, name + SCALE: self.scale}
        if self.zero is not None:
            out[name + ZERO] = self.zero
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], name: str, shape: Tuple[int, int],
                     cfg: QuantConfig) -> QuantizedTensor:
        """The QuantizedTensor of weight ``name`` (out, in) from its packed tensors (e.g. views of a slot)."""
        zero = None if cfg.symmetric else tensors[name + ZERO]
        return cls(tensors[name + CODES], tensors[name + SCALE], zero, shape, cfg.bits, cfg.group_size)


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
    # Divisors as tensors: CUDA divides by a Python number as a * (1 / b), which can differ from a / b by an ulp
    # (it moved 4-386 of 524k float32 scales on an H100); a tensor divisor takes the IEEE division on every device.
    levels = torch.tensor(float(qmax), device=g.device)
    if symmetric:
        half = 2 ** (bits - 1)
        amax = g.abs().amax(dim=-1)                                 # (out, G)
        scale = (amax / torch.tensor(float(half - 1), device=g.device)).half().float()
        flat = scale == 0                                           # an all-zero group
        safe = torch.where(flat, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / safe[..., None]), -(half - 1), half - 1) + half
        codes, zero = q.to(torch.uint8), None
    else:
        zero = g.amin(dim=-1).half().float()                        # (out, G)
        scale = ((g.amax(dim=-1) - zero) / levels).half().float()
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
