"""The KV cache: keys and values of every layer, allocated once for a batch and its longest sequence, on the device
or (``kv_offload``) in pinned host memory. A layer's cache stores each step's keys and values and runs the layer's
attention over them (``attend``): on the device, or on the host's CPUs where the cache lives ("host-compute")."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ModelError
from ..foundations.models import Family, StepContext
from ..foundations.models.ops import attention
from ..foundations.store import host_buffer, mapped_host_buffer


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
    prefix are contiguous: this step's k, v go down to the host, and the layer's earlier keys and values come up into
    a device buffer laid out as a device layer's (``Uplink``: ahead of time, on a stream of their own), so attention
    runs the same kernel on the same bits."""

    def __init__(self, uplink: Uplink, index: int, rows: slice = slice(None)) -> None:
        super().__init__(uplink.k_host[index], uplink.v_host[index])  # host: (max_len, B, nkv, hs), the whole batch
        self.uplink = uplink
        self.index = index           # among the host layers
        self.rows = rows             # of the batch: a micro-batch's rows (all by default)
        self.last = rows.stop is None or rows.stop >= uplink.batch  # the batch's last rows: the layer's last call

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
        out = super().attend(q, k, v, ctx)
        if self.last:  # the buffer may take the next layer once the whole batch's attention has run
            self.uplink.release(self.index)
        return out

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) at slots [start, start + T); return slots [0, start + T) on the
        device."""
        end = start + k.shape[2]
        if end > self.k.shape[0]:
            raise ModelError(f"KV cache overflow: {end} tokens, the cache holds {self.k.shape[0]}")
        out = []
        for new, host, dev in zip((k, v), (self.k, self.v), self.uplink.acquire(self.index, start)):
            dev[self.rows, :, start:end].copy_(new)
            out.append(dev[self.rows, :, :end])
            if self.last:  # the whole batch's new rows down at once: a micro-batch's rows of a prompt are strided
                _down(dev[:, :, start:end], host[start:end])  # on the host, and a strided copy there crawls
        return out[0], out[1]


DOWN_CHUNK_BYTES = 64 << 20  # the device staging of one copy down (a prompt's keys of a big batch: hundreds of MB)


def _host_zeros(shape: Tuple[int, ...], dtype: torch.dtype, pin: bool) -> Tensor:
    """Zeros in a host arena of exactly their size (a fresh mapping is zeroed), pinned when ``pin``: torch's pinned
    allocator rounds each allocation up to a power of two, and a 27 GB cache took 32 GiB of the host's memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    return host_buffer(nbytes, pin=pin).view(dtype).view(shape)


def _down(dev: Tensor, host: Tensor) -> None:
    """Device (B, nkv, T, hs) into host (T, B, nkv, hs), contiguous, a few tokens at a time: each piece goes through
    a contiguous device copy of at most ``DOWN_CHUNK_BYTES`` (the budget keeps no room for a whole prompt's)."""
    per_token = dev[:, :, 0].numel() * dev.element_size()
    step = max(1, DOWN_CHUNK_BYTES // max(1, per_token))
    for t in range(0, dev.shape[2], step):
        host[t:t + step].copy_(dev[:, :, t:t + step].permute(2, 0, 1, 3), non_blocking=True)


class Uplink:
    """Brings the host layers' earlier keys and values up to the device ahead of their attention: on a CUDA stream
    of its own, into ``slots`` device buffers (B, nkv, max_len, hs) that the layers take in turn, so that while layer
    j attends, layer j + 1's cache is crossing the link (beside the blocks' copies). A pass starts the first layers'
    copies (``begin``); each layer's release starts the copy of the layer ``slots`` after it into its buffer, once
    its attention is done with it. On the CPU the copies run in place, in the same order."""

    def __init__(self, k_host: Tensor, v_host: Tensor, device: torch.device, slots: int = 2) -> None:
        self.k_host, self.v_host = k_host, v_host            # (host layers, max_len, B, nkv, hs)
        shape = (k_host.shape[2], k_host.shape[3], k_host.shape[1], k_host.shape[4])
        kv = [torch.empty(shape, dtype=k_host.dtype, device=device) for _ in range(2 * min(slots, k_host.shape[0]))]
        self.slots = list(zip(kv[::2], kv[1::2]))  # a (K, V) pair of buffers a slot: (B, nkv, max_len, hs) each
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.device = device
        self.issued: Dict[int, Tuple[int, Optional[torch.cuda.Event]]] = {}  # layer -> (start, copy done)
        self.free: List[Optional[torch.cuda.Event]] = [None] * len(self.slots)  # last reader of each buffer done
        self.start = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.slots for t in pair)

    @property
    def batch(self) -> int:
        return self.k_host.shape[2]

    def begin(self, start: int) -> None:
        """A pass whose new tokens go to slots [start, ...): its first host layers' earlier rows start up."""
        self.start = start
        self.issued.clear()
        if self.stream is not None:  # the rows the last pass sent down must have landed before they go up again
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for j in range(min(len(self.slots), self.k_host.shape[0])):
            self._issue(j, start)

    def acquire(self, j: int, start: int) -> Tuple[Tensor, Tensor]:
        """Host layer ``j``'s buffers with slots [0, start) filled, ready on the current stream."""
        issued = self.issued.get(j)
        if issued is None or issued[0] != start:  # not started ahead (a pass without begin): start it now
            self._issue(j, start)
            issued = self.issued[j]
        if issued[1] is not None:  # (every micro-batch of the layer waits on the same copy: cheap after the first)
            torch.cuda.current_stream(self.device).wait_event(issued[1])
        return self.slots[j % len(self.slots)]

    def release(self, j: int) -> None:
        """Host layer ``j``'s attention is queued: its buffer may take layer ``j + slots`` once that has run."""
        self.issued.pop(j, None)
        if self.stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.free[j % len(self.slots)] = done
        if j + len(self.slots) < self.k_host.shape[0]:
            self._issue(j + len(self.slots), self.start)

    def _issue(self, j: int, start: int) -> None:
        slot = j % len(self.slots)
        if self.stream is None:
            self._copy(j, start, slot)
            self.issued[j] = (start, None)
            return
        with torch.cuda.stream(self.stream):
            last_reader = self.free[slot]
            if last_reader is not None:
                self.stream.wait_event(last_reader)
            self._copy(j, start, slot)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.issued[j] = (start, done)

    def _copy(self, j: int, start: int, slot: int) -> None:
        if start == 0:
            return
        for host, dev in zip((self.k_host[j], self.v_host[j]), self.slots[slot]):
            earlier = host[:start].to(self.device, non_blocking=True)           # (start, B, nkv, hs): one copy up
            dev[:, :, :start].copy_(earlier.permute(1, 2, 0, 3))


class AttentionUp:
    """Sends the CPUs' attention output up to the device through a kernel reading it in place from mapped pinned
    memory. A copy up (``.to(device)``) runs on the copy engine, queued behind the ring's and the uplink's copies:
    past 64 KB (a bloom-7b1 batch of 8) the CPUs waited for the link to drain before the next layer, so the link
    and the CPUs took turns (run 6 of 2026-12-04: the calibration's probe read at 0.3 GB/s on the CPUs beside the
    link, against 45 at batch 8). Where the buffer cannot be mapped it copies up as before."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: Optional[Tensor] = None     # uint8, the CPU's view of the buffer
        self.mapped: Optional[Tensor] = None   # uint8, the device's view of the same bytes
        self.read: Optional[torch.cuda.Event] = None  # the last read of the buffer by a kernel (on a GPU)
        self.unmappable = device.type != "cuda"

    def __call__(self, out: Tensor) -> Tensor:
        nbytes = out.numel() * out.element_size()
        if not self.unmappable and (self.host is None or self.host.numel() < nbytes):
            buffers = mapped_host_buffer(max(nbytes, 1 << 20), self.device)
            self.unmappable = buffers is None
            self.host, self.mapped = buffers if buffers is not None else (None, None)
        if self.host is None or self.mapped is None:
            return out.to(self.device)
        if self.read is not None:  # the kernel that read it last is done before the CPUs write it again
            self.read.synchronize()
        self.host[:nbytes].view(out.dtype).view(out.shape).copy_(out)
        # an elementwise kernel, not a copy: a copy of the mapped view would go to the copy engine again
        up = self.mapped[:nbytes].view(out.dtype).view(out.shape).mul(1)
        if self.device.type == "cuda":
            self.read = torch.cuda.Event()
            self.read.record()
        return up


class HostComputeLayerCache(LayerCache):
    """A layer whose keys and values live in host memory, (B, nkv, max_len, hs) as a device layer's, and whose
    attention runs on the host's CPUs: only this step's q, k, v go down and the attention's output comes up, instead
    of the whole cache (FlexGen's choice for long caches). The prompt's attention, which reads no earlier keys, runs
    on the device (as FlexGen's prefill does) and gives the device cache's bits. ``host_context`` gives the step's
    context with its mask on the host (once a step, shared by the layers)."""

    def __init__(self, k: Tensor, v: Tensor, host_context: Callable[[StepContext], StepContext],
                 up: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        super().__init__(k, v)
        self.host_context = host_context
        self.up = up

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        if k.device != self.k.device:  # down through pinned buffers: a pageable copy of a prompt's k, v crawls
            k, v = (torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x) for x in (k, v))
        return super().update(k, v, start)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
        if ctx.start == 0:  # the prompt: no earlier keys to read, so attend where q is and only send k, v down
            self.update(k, v, 0)
            return attention(q, k, v, ctx)
        keys, values = self.update(k, v, ctx.start)
        out = attention(q.to(keys.device), keys, values, self.host_context(ctx))            # (B, nh, T, hs)
        if out.device == q.device:
            return out
        return self.up(out) if self.up is not None else out.to(q.device)


class KVCache:
    """Keys and values of every layer, allocated once for the batch and the longest sequence.

    k, v: (device_layers, B, nkv, max_len, hs) on the device for the first ``device_layers`` layers. The others live
    in host memory, pinned where the device is a GPU: ``k_host`` / ``v_host`` (up, max_len, B, nkv, hs) for the
    layers brought up to attend (``HostLayerCache``), ``k_cpu`` / ``v_cpu`` (cpu, B, nkv, max_len, hs) for those
    attended to on the host's CPUs (``HostComputeLayerCache``): every host layer with ``host_compute=True``, the
    listed ones with a list of layer indices (a split: while the CPUs attend one layer, the link brings up the next).
    ``uplink_slots``: the device buffers the brought-up layers take in turn (``Uplink``).
    ``length`` is the number of filled slots (the same for every row: prompts are left-padded to a common length);
    ``mask`` (B, length) marks real tokens.
    """

    def __init__(self, num_blocks: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 device_layers: Optional[int] = None, host_compute: Union[bool, Sequence[int]] = False,
                 uplink_slots: int = 2) -> None:
        device = torch.device(device)
        on_device = num_blocks if device_layers is None else max(0, min(device_layers, num_blocks))
        self.k = torch.zeros((on_device, batch, num_kv_heads, max_len, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        host = range(on_device, num_blocks)
        cpu = set(host) if host_compute is True else set(host_compute or ()) & set(host)
        self.cpu_layers = sorted(cpu)                       # attended to on the host's CPUs
        self._cpu = frozenset(cpu)
        up = [i for i in host if i not in cpu]              # brought up to attend
        self._host_index = {i: j for j, i in enumerate(up)} | {i: j for j, i in enumerate(self.cpu_layers)}
        # by id: a step's contexts (one a micro-batch) and each with its mask on the host; emptied as a pass begins
        self._step: Dict[int, Tuple[StepContext, StepContext]] = {}
        pin = device.type == "cuda"
        up_shape = (len(up), max_len, batch, num_kv_heads, head_dim)
        cpu_shape = (len(cpu), batch, num_kv_heads, max_len, head_dim)
        self.k_host, self.v_host = _host_zeros(up_shape, dtype, pin), _host_zeros(up_shape, dtype, pin)
        self.k_cpu, self.v_cpu = _host_zeros(cpu_shape, dtype, pin), _host_zeros(cpu_shape, dtype, pin)
        # device buffers the host layers' caches come up into, ahead of their attention
        self._uplink = Uplink(self.k_host, self.v_host, device, uplink_slots) if up else None
        self._up = AttentionUp(device)  # the CPUs' attention output, to the device
        self.num_blocks = num_blocks
        self.max_len = max_len
        self.length = 0
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @classmethod
    def for_family(cls, family: Family, batch: int, max_len: int, dtype: torch.dtype,
                   device: Union[str, torch.device] = "cpu", device_layers: Optional[int] = None,
                   host_compute: Union[bool, Sequence[int]] = False) -> KVCache:
        return cls(family.num_blocks, batch, max_len, family.num_kv_heads, family.head_dim, dtype, device,
                   device_layers, host_compute)

    @property
    def host_compute(self) -> bool:
        """Whether any layer is attended to on the host's CPUs."""
        return bool(self.cpu_layers)

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
        """Device bytes: the device layers and the buffers the host ones come up into."""
        staging = self._uplink.nbytes if self._uplink is not None else 0
        return 2 * self.k.numel() * self.k.element_size() + staging

    @property
    def host_nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in (self.k_host, self.k_cpu))

    def layer(self, i: int, rows: slice = slice(None)) -> LayerCache:
        """Layer ``i``'s cache, of the batch's ``rows`` (a micro-batch's; all by default)."""
        if i < self.device_layers:
            return LayerCache(self.k[i][rows], self.v[i][rows])
        j = self._host_index[i]
        if i in self._cpu:
            return HostComputeLayerCache(self.k_cpu[j][rows], self.v_cpu[j][rows], self._host_context, self._up)
        assert self._uplink is not None
        return HostLayerCache(self._uplink, j, rows)

    def _host_context(self, ctx: StepContext) -> StepContext:
        """``ctx`` with its attention mask on the host, made once a step (every layer gets the same ``ctx``; each
        micro-batch its own)."""
        if id(ctx) not in self._step or self._step[id(ctx)][0] is not ctx:
            mask = ctx.mask.to(self.k_cpu.device) if ctx.mask is not None else None
            self._step[id(ctx)] = (ctx, dataclasses.replace(ctx, mask=mask))
        return self._step[id(ctx)][1]

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
        self._step.clear()
        if self._uplink is not None:  # the pass begins: the first host layers' caches start up now
            self._uplink.begin(start)
        return self.mask, start

    def reset(self) -> None:
        self.length = 0
        self.mask = self.mask[:, :0]
