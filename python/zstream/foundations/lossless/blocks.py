"""Losslessly coded blocks: which weights of a block are coded, coding a block at load, decoding it in its slot.

``BlockCode`` stands where a ``quant.BlockQuant`` stands (``CheckpointFacts.quant``: how a block is coded on the
link), with the same methods, so the engine's plumbing for packed blocks carries coded ones unchanged: the slot
holds the coded block and ``blocks.Dequantized`` expands it just before the block's matmuls. What differs: the
size of a coded block depends on its values, so until a block is coded its size is planned as the uncoded one.
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
from .codec import RAW, SUFFIXES, CodedTensor, encode, from_metadata, to_metadata

if TYPE_CHECKING:
    from ..models import Family
    from ..store import WeightStore

ALIGN = 256  # each coded part starts 256-byte aligned in a block buffer
# A coded weight carries 576 bytes of tables and about 2.2 bytes per lane of 128 elements, and a decode launch goes with
# it; below this size a weight stays raw (a 16384-element bf16 weight: 32 KiB, about 10.5 KiB saved).
MIN_CODED_ELEMENTS = 16384


@dataclass(frozen=True)
class LosslessConfig:
    """The code's description, as plans and headers show it (``QuantConfig``'s counterpart)."""

    dtype: torch.dtype  # the coded weights' dtype (bfloat16 or float16)
    name: str = "lossless"

    def describe(self) -> str:
        return f"lossless ({str(self.dtype).removeprefix('torch.')} exponents Huffman-coded)"

    def to_metadata(self) -> Dict[str, str]:
        return to_metadata(self.dtype)


@dataclass
class BlockCode(CodedWeights):
    """Which weights of a block are coded (its linear weights, by local name and shape), and how to decode them
    into the compute dtype ``dtype``."""

    cfg: LosslessConfig
    shapes: Dict[str, Tuple[int, ...]]
    dtype: torch.dtype
    sized_by_values = True  # a coded block's size is known once it is coded: the loader then updates the plan

    def suffixes(self, local: str) -> Iterable[str]:
        """A coded weight's four parts."""
        return SUFFIXES

    def nbytes(self, block: Mapping[str, Tuple[int, ...]], itemsize: Mapping[str, int]) -> int:
        """A block's bytes before it is coded: what planning assumes until the coded size is known."""
        return sum(math.prod(shape) * itemsize[local] for local, shape in block.items())

    def dequantize(self, w: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The block's weights for its matmuls: coded weights decoded on their device (the GPU slot: Triton; the CPU:
        the native decoder) and converted to the compute dtype, everything else passed through."""
        out = {k: v for k, v in w.items() if not k.endswith(SUFFIXES)}
        coded = [CodedTensor.from_tensors(w, local, self.cfg.dtype) for local in self.shapes]
        decoded = [torch.empty(c.shape, dtype=c.dtype, device=c.words.device) for c in coded]
        kernels.decode_many(coded, decoded)  # one launch for all: their lanes fill the GPU together
        for local, d in zip(self.shapes, decoded):
            out[local] = d if d.dtype == self.dtype else d.to(self.dtype)
        return out

    def pack(self, views: Mapping[str, Tensor], block: Mapping[str, str], *, work: torch.device,
             dest: Union[torch.device, str]) -> Tuple[Tensor, Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]]]:
        """Code one block read as stored into one buffer (``dest``: a device, or "pinned"); (buffer, layout) as
        ``BlockQuant.pack`` gives them. Coding runs on the host (``work`` is not used: the native coder is faster
        than a round trip)."""
        tensors: Dict[str, Tensor] = {}
        for local, ckpt in block.items():
            if local in self.shapes:
                if views[ckpt].dtype != self.cfg.dtype:
                    raise QuantizationError(f"{ckpt} is {views[ckpt].dtype}; the lossless code of this model is "
                                            f"for {self.cfg.dtype}")
                tensors.update(encode(views[ckpt]).tensors(ckpt))
            else:
                tensors[ckpt] = views[ckpt]
        flat = FlatRead.pack(tensors, dest, ALIGN)
        return flat.buffer, flat.layout


def block_code_for(block_shapes: Mapping[str, Tuple[int, ...]], linear: Tuple[str, ...], stored: torch.dtype,
                   dtype: torch.dtype, where: str) -> BlockCode:
    """The BlockCode of a family's block: its linear weights of at least ``MIN_CODED_ELEMENTS``, stored as
    ``stored`` (bfloat16 or float16)."""
    if stored not in (torch.bfloat16, torch.float16):
        raise QuantizationError(f"{where}: compress='lossless' codes bfloat16 or float16 weights; this checkpoint "
                                f"holds {stored}")
    shapes = {local: tuple(block_shapes[local]) for local in linear
              if math.prod(block_shapes[local]) >= MIN_CODED_ELEMENTS}
    if not shapes:
        raise QuantizationError(f"{where}: no linear weight has the {MIN_CODED_ELEMENTS} elements that make coding "
                                "pay for its decode table")
    return BlockCode(LosslessConfig(stored), shapes, dtype)


def packed_code(store: WeightStore, family: Family, dtype: torch.dtype, where: str) -> Optional[BlockCode]:
    """The BlockCode of a checkpoint ``zstream pack --compress lossless`` wrote (its headers say so: the one test of
    "is this checkpoint coded"); None for any other. The coded weights are those with parts in the files."""
    coded = from_metadata(store.metadata(), where)
    if coded is None:
        return None
    first = family.block_tensors(0) if family.num_blocks else {}
    shapes = {local: tuple(store.info(first[local] + RAW).shape) for local in family.linear_weights()
              if local in first and first[local] + RAW in store}
    return BlockCode(LosslessConfig(coded), shapes, dtype)


def coded_infos(store: WeightStore, family: Family, code: BlockCode) -> Dict[str, Any]:
    """{checkpoint name: (shape, dtype)} of what the family expects, for ``Family.validate``: a coded weight counts
    as the tensor it decodes to (its raw part has its shape)."""
    infos: Dict[str, Any] = {}
    for name in family.expected_shapes():
        if name in store:
            infos[name] = store.info(name)
        elif name + RAW in store:
            infos[name] = (tuple(store.info(name + RAW).shape), code.cfg.dtype)
    return infos
