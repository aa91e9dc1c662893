"""The device ring: streamed blocks through a few device slots, copies overlapped with compute.

While block g computes on the compute stream, blocks g+1 .. g+slots-1 are being copied into the other slots on
the copy stream. Two events per slot order them: a slot is refilled only after the compute on it has finished
(``computed``), and compute starts only after its copy has landed (``copied``). The ring runs across forward passes:
weights do not depend on the tokens, so the first blocks of the next pass are copied while the last blocks of this
one compute, and the link never idles between steps.

Global index g counts every block the ring ever hands out: block ``order[g % len(order)]`` of pass
``g // len(order)``, in slot ``g % slots``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..foundations.store import FlatRead
from .device import Device
from .sources import HostSource
from .weights import DEVICE_ALIGN, Weights, device_placement, local_weights


@dataclass
class SlotView:
    """A slot holding one block, worked out once: where its copy lands, the block's tensors' places in the slot, and
    the weights handed to the compute where every one is a view of the slot (no dtype conversion, no unaligned
    copy), so a block that comes back to the slot reuses them. A decode step that launches faster than the device
    computes no longer pays a block's views on every pass (docs/performance.md item 48)."""

    host_layout: Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]]  # the host bytes' layout this was made for
    copies: Tuple[Tuple[Tensor, int, int], ...]  # (the slot's bytes a copy fills, from host offset, bytes): a run each
    flat: FlatRead                # the block's tensors in the slot
    weights: Optional[Weights] = None  # views of the slot, once made (None: not yet, or not views)


def views_of(weights: Weights, buffer: Tensor) -> bool:
    """Whether every tensor of ``weights`` lives in ``buffer``'s memory (a view; a converted or cloned one does not)."""
    storage = buffer.untyped_storage().data_ptr()
    return all(t.untyped_storage().data_ptr() == storage for t in weights.values())


class DeviceRing:
    """Streamed blocks through ``slots`` device buffers, copies on their own stream, ordered by events."""

    def __init__(self, device: Device, order: List[int], slot_bytes: int, slots: int, source: HostSource,
                 block_names: List[Dict[str, str]], dtype: torch.dtype) -> None:
        if not order:
            raise ValueError("a ring needs at least one streamed block")
        self.device = device
        self.source = source
        self.order = order                  # streamed block ids, in compute order
        self.slots = max(1, min(slots, len(order)))
        self.block_names = block_names
        self.dtype = dtype
        self.buffers = [device.empty(slot_bytes + DEVICE_ALIGN) for _ in range(self.slots)]
        self.copy_stream = device.new_stream()
        self.copied = [device.new_event() for _ in range(self.slots)]    # the slot's copy landed
        self.computed = [device.new_event() for _ in range(self.slots)]  # the slot's compute finished
        self.views: Dict[Tuple[int, int], SlotView] = {}                # (slot, block) -> its view, made once
        self.issued = 0    # global index of the next copy to issue
        self.consumed = 0  # global index of the next block to compute
        self.busy = False  # between acquire and release: still set after a failure, so the next pass resets
        self.waited_s = 0.0  # host time spent blocked on bytes: disk reads, and copies where the host waits for them

    def block_at(self, g: int) -> int:
        return self.order[g % len(self.order)]

    def _issue(self) -> None:
        """Start the copy of global index ``issued`` into its slot, behind the compute that last used it."""
        g, dev = self.issued, self.device
        slot = g % self.slots
        t0 = time.perf_counter()
        host = self.source.host(g)  # waits for a disk read (nvme); the device keeps computing meanwhile
        self.waited_s += time.perf_counter() - t0
        if g >= self.slots:
            dev.wait(self.copy_stream, self.computed[slot])  # the block that used this slot has finished
        # (the view keeps the host bytes' layout only: they may go back to the source once the copy is done)
        view = self.slot_view(slot, self.block_at(g), host)
        for dest, start, nbytes in view.copies:
            dev.copy(dest, host.buffer[start:start + nbytes], self.copy_stream)
        dev.record(self.copied[slot], self.copy_stream)
        self.source.copied(g, self.copied[slot])
        self.issued += 1

    def slot_view(self, slot: int, block: int, host: FlatRead) -> SlotView:
        """``block`` in ``slot``: made the first time, and again only if its host layout is not the one it was
        made for."""
        view = self.views.get((slot, block))
        if view is None or (view.host_layout is not host.layout and view.host_layout != host.layout):
            buffer = self.buffers[slot]
            place = device_placement(host)
            if place.nbytes > buffer.numel():  # (runs' padding past the slot: the block shifted once, as stored)
                place = device_placement(host, split=False)
            copies = tuple((buffer[dev:dev + nbytes], start, nbytes) for start, nbytes, dev in place.runs)
            view = SlotView(host.layout, copies, FlatRead(buffer, place.layout))
            self.views[(slot, block)] = view
        return view

    def begin_pass(self, tokens: int) -> None:
        """A forward pass starts: if the last one stopped midway (an error, Ctrl-C), start the schedule over."""
        if self.busy or self.consumed % len(self.order):
            self.reset()

    def acquire(self, block: int) -> Weights:
        """Weights of ``block`` (the next streamed one) on the device; the compute stream waits for its copy."""
        self.busy = True
        g = self.consumed
        if self.block_at(g) != block:
            raise RuntimeError(f"ring out of order: expected block {self.block_at(g)}, got {block}")
        while self.issued < g + self.slots:
            self._issue()
        slot = g % self.slots
        t0 = time.perf_counter()
        self.device.wait(self.device.compute_stream(), self.copied[slot])  # the CPU blocks here; a GPU queues it
        self.waited_s += time.perf_counter() - t0
        view = self.views[(slot, block)]  # made by the copy into the slot, issued above at the latest
        if view.weights is not None:
            return view.weights
        weights = local_weights(view.flat, self.block_names[block], self.dtype)
        if views_of(weights, self.buffers[slot]):
            view.weights = weights  # valid for as long as the slot exists: the events order its bytes
        return weights

    def release(self, block: int) -> None:
        """The compute of the acquired block is enqueued: free its slot behind it and start the next copy."""
        slot = self.consumed % self.slots
        self.device.record(self.computed[slot], self.device.compute_stream())
        self.consumed += 1
        while self.issued < self.consumed + self.slots:
            self._issue()
        self.busy = False

    def reset(self) -> None:
        """Drop everything in flight and start over at the first streamed block."""
        self.device.synchronize()
        self.source.reset()
        self.issued = self.consumed = 0
        self.busy = False

    def instrument(self, device: Device, source: HostSource) -> Tuple[Device, HostSource]:
        """Swap in instrumented versions of the device and the source (tracing); returns the ones replaced. Only
        between passes: what is in flight keeps its events."""
        old = (self.device, self.source)
        self.device, self.source = device, source
        return old

    def rings(self) -> List[DeviceRing]:
        return [self]

    def close(self) -> None:
        self.reset()
        self.views.clear()
        self.device.close()

