"""The KV cache: keys and values of every layer, allocated once for a batch and its longest sequence, on the device
or (``kv_offload``) in pinned host memory. A layer's cache stores each step's keys and values and runs the layer's
attention over them (``attend``): on the device, or on the host's CPUs where the cache lives ("host-compute")."""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import ModelError
from ..foundations.models import Family, StepContext
from ..foundations.models.ops import attention


class LayerCache:
    """One layer's slice of a KVCache: keys and values, each (B, nkv, max_len, hs)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k = k
        self.v = v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
        """Store this step's k, v (B, nkv, T, hs) and attend q (B, nh, T, hs) over the layer's cache: (B, nh, T, hs)."""
        keys, values = self.update(k, v, ctx.start)
        return attention(q, keys, values, ctx)

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) at slots [start, start + T); return slots [0, start + T)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ModelError(f"KV cache overflow: {end} tokens, the cache holds {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class HostLayerCache(LayerCache):
    """A layer whose keys and values live in host memory, (max_len, B, nkv, hs) so that every step's rows and every
    prefix are contiguous: this step's k, v go down to the host, and the layer's whole cache comes up into a device
    buffer (``staging``) laid out as a device layer's, so attention runs the same kernel on the same bits. The copies
    are ordered on the current stream (none waits on the host), so every host layer can share one staging buffer:
    a layer's attention has run before the next layer's cache comes up into it."""

    def __init__(self, k: Tensor, v: Tensor, staging: Tuple[Tensor, Tensor]) -> None:
        super().__init__(k, v)       # host: (max_len, B, nkv, hs)
        self.staging = staging       # device: (B, nkv, max_len, hs) each

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) at slots [start, start + T); return slots [0, start + T) on the
        device."""
        end = start + k.shape[2]
        if end > self.k.shape[0]:
            raise ModelError(f"KV cache overflow: {end} tokens, the cache holds {self.k.shape[0]}")
        out = []
        for new, host, dev in ((k, self.k, self.staging[0]), (v, self.v, self.staging[1])):
            earlier = host[:start].to(dev.device, non_blocking=True)           # (start, B, nkv, hs): one copy up
            dev[:, :, :start].copy_(earlier.permute(1, 2, 0, 3))
            dev[:, :, start:end].copy_(new)
            host[start:end].copy_(new.permute(2, 0, 1, 3), non_blocking=True)  # (T, B, nkv, hs): down
            out.append(dev[:, :, :end])
        return out[0], out[1]


class HostComputeLayerCache(LayerCache):
    """A layer whose keys and values live in host memory, (B, nkv, max_len, hs) as a device layer's, and whose
    attention runs on the host's CPUs: only this step's q, k, v go down and the attention's output comes up, instead
    of the whole cache (FlexGen's choice for long caches). The prompt's attention, which reads no earlier keys, runs
    on the device (as FlexGen's prefill does) and gives the device cache's bits. ``host_context`` gives the step's
    context with its mask on the host (once a step, shared by the layers)."""

    def __init__(self, k: Tensor, v: Tensor, host_context: Callable[[StepContext], StepContext]) -> None:
        super().__init__(k, v)
        self.host_context = host_context

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        if k.device != self.k.device:  # down through pinned buffers: a pageable copy of a prompt's k, v crawls
            k, v = (torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x) for x in (k, v))
        return super().update(k, v, start)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
        if ctx.start == 0:  # the prompt: no earlier keys to read, so attend where q is and only send k, v down
            self.update(k, v, 0)
            return attention(q, k, v, ctx)
        keys, values = self.update(k, v, ctx.start)
        return attention(q.to(keys.device), keys, values, self.host_context(ctx)).to(q.device)


class KVCache:
    """Keys and values of every layer, allocated once for the batch and the longest sequence.

    k, v: (device_layers, B, nkv, max_len, hs) on the device for the first ``device_layers`` layers; the others'
    in host memory, pinned where the device is a GPU: brought up to attend (``HostLayerCache``) or attended to there
    (``host_compute``: ``HostComputeLayerCache``). ``length`` is the number of filled slots
    (the same for every row: prompts are left-padded to a common length); ``mask`` (B, length) marks real tokens.
    """

    def __init__(self, num_blocks: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 device_layers: Optional[int] = None, host_compute: bool = False) -> None:
        device = torch.device(device)
        on_device = num_blocks if device_layers is None else max(0, min(device_layers, num_blocks))
        self.k = torch.zeros((on_device, batch, num_kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        host_shape = (num_blocks - on_device, max_len, batch, num_kv_heads, head_dim)
        if host_compute:  # attention on the host reads the cache as a device layer's is read
            host_shape = (num_blocks - on_device, batch, num_kv_heads, max_len, head_dim)
        self.host_compute = host_compute
        self._step: Optional[Tuple[StepContext, StepContext]] = None  # (a step's context, with its mask on the host)
        pin = device.type == "cuda"
        self.k_host = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        self.v_host = torch.zeros(host_shape, dtype=dtype, pin_memory=pin)
        # one staging pair on the device, which the host layers take in turn (HostLayerCache says why one is enough)
        self._staging: List[Tuple[Tensor, Tensor]] = []
        if host_shape[0] and not host_compute:
            self._staging = [(torch.empty(self.k.shape[1:], dtype=dtype, device=device),
                              torch.empty(self.k.shape[1:], dtype=dtype, device=device))]
        self.num_blocks = num_blocks
        self.max_len = max_len
        self.length = 0
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @classmethod
    def for_family(cls, family: Family, batch: int, max_len: int, dtype: torch.dtype,
                   device: Union[str, torch.device] = "cpu", device_layers: Optional[int] = None,
                   host_compute: bool = False) -> KVCache:
        return cls(family.num_blocks, batch, max_len, family.num_kv_heads, family.head_dim, dtype, device,
                   device_layers, host_compute)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def device_layers(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values, wherever they are."""
        return self.device_nbytes + self.host_nbytes

    @property
    def device_nbytes(self) -> int:
        """Device bytes: the device layers and the staging buffers of the host ones."""
        staging = sum(t.numel() * t.element_size() for pair in self._staging for t in pair)
        return 2 * self.k.numel() * self.k.element_size() + staging

    @property
    def host_nbytes(self) -> int:
        return 2 * self.k_host.numel() * self.k_host.element_size()

    def layer(self, i: int) -> LayerCache:
        if i < self.device_layers:
            return LayerCache(self.k[i], self.v[i])
        j = i - self.device_layers
        if self.host_compute:
            return HostComputeLayerCache(self.k_host[j], self.v_host[j], self._host_context)
        return HostLayerCache(self.k_host[j], self.v_host[j], self._staging[0])

    def _host_context(self, ctx: StepContext) -> StepContext:
        """``ctx`` with its attention mask on the host, made once a step (every layer gets the same ``ctx``)."""
        if self._step is None or self._step[0] is not ctx:
            mask = ctx.mask.to(self.k_host.device) if ctx.mask is not None else None
            self._step = (ctx, dataclasses.replace(ctx, mask=mask))
        return self._step[1]
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
