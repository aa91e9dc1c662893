"""What a block's coded form shares, packed (``quant.BlockQuant``) or losslessly coded (``lossless.BlockCode``):
the weights it codes, by local name and shape, the dtype they decode to, and the checkpoint names of their parts."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Tuple

import torch


class CodedWeights:
    """The part of a coded block's description that does not depend on its code. A subclass (a dataclass) holds
    ``shapes`` ({local name of each coded weight: its shape}) and ``dtype``, and names a weight's parts."""

    shapes: Mapping[str, Tuple[int, ...]]
    dtype: torch.dtype

    def suffixes(self, local: str) -> Iterable[str]:
        """The suffixes of coded weight ``local``'s parts (each a tensor of the checkpoint, or of a block buffer)."""
        raise NotImplementedError

    @property
    def dequantized_nbytes(self) -> int:
        """Device bytes of one block's coded weights once decoded (they exist while the block computes)."""
        return sum(math.prod(s) for s in self.shapes.values()) * self.dtype.itemsize

    def names(self, block: Mapping[str, str]) -> Dict[str, str]:
        """A block's {local: checkpoint name} with each coded weight replaced by its parts."""
        out: Dict[str, str] = {}
        for local, ckpt in block.items():
            if local in self.shapes:
                out.update({local + s: ckpt + s for s in self.suffixes(local)})
            else:
                out[local] = ckpt
        return out
