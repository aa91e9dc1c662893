"""A decode step of a model whose every block is resident, replayed as one CUDA graph.

Such a step is launch-bound at small batches: bloom-7b1's 30 blocks launch about 450 kernels from Python, 0.2-0.4 ms
a block where the GPU needs under 0.1, and the Python's speed is the machine's (the same step took 8.6 ms on one
H200 lease and 15.3 on another, runs 16 and 21 of 2026-12-04). A graph launches them all at once.

A graph replays fixed shapes at fixed addresses, so the graphed step differs from the eager one in two ways only:
its attention reads every slot of the cache (``max_len``), the slots not yet written hidden by the mask, and it
writes this step's keys and values at a slot held in a device tensor. The step's context (positions, the mask with
ALiBi, RoPE tables) is made eagerly, as for any step, and copied into the graph's inputs.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..foundations.models import Family, StepContext, mask_buffer
from .cache import KVCache, LayerCache
from .weights import Weights

# the stream each device's graphs are warmed up and recorded on, one for the process (``recording_stream``)
_RECORDING_STREAMS: Dict[int, torch.cuda.Stream] = {}


def recording_stream(device: torch.device) -> torch.cuda.Stream:  # GPU only
    """The one side stream every decode graph on ``device`` is warmed up and captured on. torch keeps a cuBLAS
    workspace for each stream a matmul has run on, for the life of the process (33 MiB on the H200): recording each
    graph on a stream of its own held 33 MiB more a recording, up to torch's pool of 32 streams: 1.03 GiB, and rows
    up to 0.96 GiB over their memory plans (runs 3-6 of 2026-12-05, docs/performance.md item 36)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _RECORDING_STREAMS:
        _RECORDING_STREAMS[index] = torch.cuda.Stream(index)
    return _RECORDING_STREAMS[index]


class SlotLayerCache(LayerCache):
    """A device layer's cache in a graphed step: this step's keys and values (one token) go to the slot held in
    ``slot`` (a (1,) device tensor); attention reads every slot, the mask hiding the unwritten ones."""

    def __init__(self, k: Tensor, v: Tensor, slot: Tensor) -> None:
        super().__init__(k, v)
        self.slot = slot

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        self.k.index_copy_(2, self.slot, k)  # (B, nkv, 1, hs) into (B, nkv, max_len, hs)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v


class DecodeGraph:
    """One-token decode steps of ``family`` over ``cache`` (every layer on the device) through the blocks of
    ``weights`` (the model's every block; the calibration's one block, several times).
    Call it with the step's token ids (B, 1) and its context -> logits (B, 1, vocab). ``capture``: record a CUDA
    graph on the first call and replay it after (False: run the same fixed-shape step eagerly, as the CPU tests
    do)."""

    def __init__(self, family: Family, outer: Weights, weights: List[Weights], cache: KVCache,
                 capture: bool = True) -> None:
        B, L = cache.batch, cache.max_len
        dev = cache.k.device
        self.family, self.outer, self.weights, self.cache = family, outer, weights, cache
        self.capture = capture
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=dev)                       # (B, 1)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)                          # (1,)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)                  # (B, 1)
        self.mask: Optional[Tensor] = None      # (B, 1 or nh, 1, max_len): made from the first step's context
        self.rope: Optional[Tuple[Tensor, Tensor]] = None
        # block i takes cache layer i (the calibration's few layers in turn, to bound its memory)
        n = cache.device_layers
        self.layers = [SlotLayerCache(cache.k[i % n], cache.v[i % n], self.slot) for i in range(len(weights))]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[Tensor] = None
        self.max_len = L

    def fits(self, cache: KVCache) -> bool:
        """Whether this graph decodes ``cache``: the same tensors (a new cache is a new graph)."""
        return cache is self.cache

    def __call__(self, input_ids: Tensor, ctx: StepContext) -> Tensor:
        self._load(input_ids, ctx)
        if not self.capture:
            return self._step()
        if self.graph is None:
            self.logits = self._record()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits.clone()  # the next replay writes over the graph's output

    def _load(self, input_ids: Tensor, ctx: StepContext) -> None:
        """The step's inputs into the graph's: token ids, positions, the write slot, the mask over every slot."""
        S = ctx.end
        if self.mask is None:
            heads = ctx.mask.shape[1] if ctx.mask is not None else 1
            self.mask = mask_buffer(self.ids.shape[0], heads, 1, self.max_len, dtype=self.cache.k.dtype,
                                    device=self.ids.device, fill=None)  # written at every step
            if ctx.rope is not None:
                self.rope = (torch.empty_like(ctx.rope[0]), torch.empty_like(ctx.rope[1]))
        self.ids.copy_(input_ids)
        self.positions.copy_(ctx.positions)
        self.slot.fill_(ctx.start)
        if ctx.mask is None:  # no padding, no window: every slot so far
            self.mask[..., :S].zero_()
        else:
            self.mask[..., :S].copy_(ctx.mask)
        self.mask[..., S:].fill_(float("-inf"))
        if self.rope is not None and ctx.rope is not None:
            self.rope[0].copy_(ctx.rope[0])
            self.rope[1].copy_(ctx.rope[1])

    def _step(self) -> Tensor:
        """The step at fixed shapes and addresses: embedding, every block, the head."""
        fam = self.family
        ctx = StepContext(start=0, positions=self.positions, mask=self.mask, is_causal=False, rope=self.rope)
        h = fam.embed(self.outer, self.ids, ctx)                                   # (B, 1, C)
        for w, layer in zip(self.weights, self.layers):
            h = fam.block(w, h, layer, ctx)
        return fam.head(self.outer, h)                                             # (B, 1, vocab)

    def _record(self) -> Tensor:  # GPU only
        """Capture the step, after one eager run on a side stream as CUDA graphs need (it writes the slot the replay
        writes, with the same values); both on the device's one recording stream; -> the graph's output."""
        side = recording_stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = self._step()
        self.graph = graph
        return out
