"""The KV cache: keys and values of every layer, allocated once for a batch and its longest sequence."""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from ..errors import ModelError
from ..foundations.models import Family


class LayerCache:
    """One layer's slice of a KVCache: keys and values, each (B, nkv, max_len, hs)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k = k
        self.v = v

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) at slots [start, start + T); return slots [0, start + T)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ModelError(f"KV cache overflow: {end} tokens, the cache holds {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer, allocated once for the batch and the longest sequence.

    k, v: (num_blocks, B, nkv, max_len, hs). ``length`` is the number of filled slots (the same for
    every row: prompts are left-padded to a common length); ``mask`` (B, length) marks real tokens.
    """

    def __init__(self, num_blocks: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> None:
        shape = (num_blocks, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @classmethod
    def for_family(cls, family: Family, batch: int, max_len: int, dtype: torch.dtype,
                   device: Union[str, torch.device] = "cpu") -> KVCache:
        return cls(family.num_blocks, batch, max_len, family.num_kv_heads, family.head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i])

    def extend(self, attention_mask: Tensor) -> Tuple[Tensor, int]:
        """Append the mask of T new tokens (B, T); return the mask of all tokens so far (B, S) and the
        start slot of the new ones. Raises ModelError if the cache is too short."""
        rows, T = attention_mask.shape
        if rows != self.batch:
            raise ModelError(f"batch of {rows} rows, the KV cache was allocated for {self.batch}")
        if self.length + T > self.max_len:
            raise ModelError(f"{self.length + T} tokens do not fit the KV cache of {self.max_len}")
        start = self.length
        self.mask = torch.cat([self.mask, attention_mask.to(self.mask.device, torch.long)], dim=1)
        self.length += T
        return self.mask, start

    def reset(self) -> None:
        self.length = 0
        self.mask = self.mask[:, :0]
