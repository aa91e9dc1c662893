"""Quantized blocks: which weights of a family's block are packed, packing a block at load, dequantizing it in its
slot; and ``checkpoint_quant``, the one place that decides how a checkpoint's blocks are quantized (a packed
checkpoint's headers, or ``quantize=`` at load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ...errors import QuantizationError
from ..coded import CodedWeights
from ..store import FlatRead
from . import kernels
from .scheme import CODES, METADATA_KEY, SCALE, ZERO, QuantConfig, QuantizedTensor, quantize

if TYPE_CHECKING:
    from ..models import Family
    from ..store import WeightStore

PACKED_ALIGN = 256  # each packed tensor starts 256-byte aligned in a block buffer (vector loads, cuBLAS)


@dataclass
class BlockQuant(CodedWeights):
    """Which weights of a block are packed, and how to turn them back into matrices in the slot.

    The same for every block of a model (families repeat one block). ``shapes`` maps the local name of each
    quantized weight to its (out, in) shape; ``dtype`` is the compute dtype the weights are dequantized to.
    """

    cfg: QuantConfig
    shapes: Dict[str, Tuple[int, int]]
    dtype: torch.dtype
    sized_by_values = False  # a packed block's size follows from its shapes (lossless.BlockCode's does not)

    def suffixes(self, local: str) -> Iterable[str]:
        """A quantized weight's packed tensors."""
        return self.cfg.packed("", self.shapes[local])

    def nbytes(self, block: Mapping[str, Tuple[int, ...]], itemsize: Mapping[str, int]) -> int:
        """Packed bytes of a block given {local: shape} and {local: bytes per element} of its tensors."""
        return sum(self.cfg.packed_nbytes(self.shapes[local]) if local in self.shapes
                   else math.prod(shape) * itemsize[local] for local, shape in block.items())

    def dequantize(self, w: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The block's weights for its matmuls: packed weights dequantized (on their device: the GPU slot, or the
        CPU), everything else passed through."""
        out = {k: v for k, v in w.items() if not k.endswith((CODES, SCALE, ZERO))}
        for local, shape in self.shapes.items():
            out[local] = kernels.dequantize(QuantizedTensor.from_tensors(w, local, shape, self.cfg), self.dtype)
        return out

    def pack(self, views: Mapping[str, Tensor], block: Mapping[str, str], *, work: torch.device,
             dest: Union[torch.device, str]) -> Tuple[Tensor, Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]]]:
        """Quantize one block read in its checkpoint dtype into one buffer laid out like a packed checkpoint's block.

        ``views``: {checkpoint name: tensor} of the block (host memory); ``work``: where quantization runs (the GPU
        when there is one); ``dest``: a device, or "pinned" for
        page-locked host memory that streams to the GPU at the link's speed. Returns (uint8 buffer, layout) with
        the layout {checkpoint name: (offset, dtype, shape)} that ``FlatRead`` takes.
        """
        tensors: Dict[str, Tensor] = {}
        for local, ckpt in block.items():
            if local in self.shapes:
                w = views[ckpt].to(work, non_blocking=False)
                qt = quantize(w, self.cfg.bits, self.cfg.group_size, self.cfg.symmetric)
                tensors.update(qt.tensors(ckpt))
            else:
                tensors[ckpt] = views[ckpt]
        flat = FlatRead.pack(tensors, dest, PACKED_ALIGN)
        return flat.buffer, flat.layout


def block_quant_for(cfg: QuantConfig, block_shapes: Mapping[str, Tuple[int, ...]], linear: Tuple[str, ...],
                    dtype: torch.dtype, present: Optional[Mapping[str, bool]] = None) -> BlockQuant:
    """The BlockQuant of a family's block: its linear weights whose input dimension the group size divides (or,
    for a packed checkpoint, those ``present`` says were packed)."""
    shapes: Dict[str, Tuple[int, int]] = {}
    for local in linear:
        shape = tuple(block_shapes[local])
        packed = present[local] if present is not None else cfg.accepts(shape)
        if packed:
            shapes[local] = (int(shape[0]), int(shape[1]))
    return BlockQuant(cfg, shapes, dtype)


def packed_config(store: WeightStore, *, where: str) -> Optional[QuantConfig]:
    """How the checkpoint's files are packed (its headers' ``__metadata__``, as ``zstream pack`` writes it); None for
    an unquantized checkpoint. The one test of "is this checkpoint packed": packed tensors without that metadata are
    refused rather than guessed at."""
    packed = QuantConfig.from_metadata(store.metadata(), where=where)
    if packed is None and any(n.endswith(CODES) for n in store.names()):
        raise QuantizationError(f"{where}: holds packed tensors (*{CODES}) but no {METADATA_KEY} metadata saying how "
                                "they were packed; write it again with `zstream pack`")
    return packed


def checkpoint_quant(store: WeightStore, family: Family, dtype: torch.dtype, wanted: Optional[QuantConfig], *,
                     where: str) -> Tuple[Optional[BlockQuant], bool]:
    """(how a checkpoint's blocks are quantized, whether the store holds them packed). A packed checkpoint's headers
    decide, and a different ``wanted`` is refused; otherwise ``wanted`` (quantized at load), refused if its group
    size divides none of the linear weights; otherwise (None, False)."""
    packed = packed_config(store, where=where)
    linear, shapes = family.linear_weights(), family.block_shapes()
    if packed is not None:
        if wanted is not None and wanted != packed:
            raise QuantizationError(f"{where} is packed as {packed.describe()}; it cannot be loaded as "
                                    f"{wanted.describe()} (leave quantize unset)")
        first = family.block_tensors(0) if family.num_blocks else {}
        present = {local: local in first and first[local] + CODES in store for local in linear}
        return block_quant_for(packed, shapes, linear, dtype, present), True
    if wanted is None:
        return None, False
    bq = block_quant_for(wanted, shapes, linear, dtype)
    if not bq.shapes:
        raise QuantizationError(f"{where}: group_size {wanted.group_size} divides the input dimension of none of "
                                f"{family.name}'s linear weights ({', '.join(linear)})")
    return bq, False


def tensor_infos(store: WeightStore, family: Family, packed: Optional[QuantConfig]) -> Dict[str, Any]:
    """{checkpoint name: (shape, dtype)} of what the family expects, for ``Family.validate``; a packed weight counts
    as the (out, in) floating-point matrix it stands for, once its packed tensors' shapes have been checked against
    each other."""
    infos: Dict[str, Any] = {}
    for name in family.expected_shapes():
        if name in store:
            infos[name] = store.info(name)
        elif packed is not None and name + CODES in store:
            codes = store.info(name + CODES).shape
            if len(codes) != 2:
                raise QuantizationError(f"{store.info(name + CODES).file}: {name + CODES} has shape {list(codes)}, "
                                        "not (out, in) codes")
            shape = (codes[0], codes[1] * (2 if packed.bits == 4 else 1))
            for part, (dt, want) in packed.packed(name, shape).items():
                info = store.info(part) if part in store else None
                if info is None or tuple(info.shape) != want or info.torch_dtype != dt:
                    got = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
                    raise QuantizationError(f"{store.info(name + CODES).file}: packed tensor {part} is {got}; "
                                            f"{packed} packs {name} {list(shape)} as {str(dt)[6:]} {list(want)}")
            infos[name] = (shape, torch.float16)
    return infos
