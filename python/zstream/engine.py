"""The streaming engine: a family's forward pass with weights fetched block by block while the device computes.

Where a weight byte goes, in order:
  disk --(Rust reader, io_uring O_DIRECT)--> host arena (pinned)            [store.read_flat / store.fetch]
       --(one cudaMemcpyAsync per block, copy stream)--> device ring slot   [_DeviceRing._issue]
       --(views at the arena's offsets)--> family.block(...) matmuls        [StreamingModel.forward]
With quantized weights (``quantize="int4"`` or a packed checkpoint) the slot holds the packed block, and
``BlockQuant.dequantize`` (a Triton kernel, ``kernels.py``) turns it into the matrices on the compute stream,
just before the matmuls.

Streamed blocks go through a ring of ``prefetch + 1`` device slots. While block g computes on the compute
stream, blocks g+1 .. g+prefetch are being copied on the copy stream; a slot is refilled only after the compute
on it has finished (an event), and compute starts only after its copy has landed (another event). The ring runs
across forward passes: weights do not depend on the tokens, so the first blocks of the next step are copied
while the last blocks of this one compute, and the link never idles between steps.

For ``offload="nvme"`` a second, host-side ring of store tickets runs ``disk_prefetch`` blocks ahead of the
copies: disk -> pinned pool slot -> device slot. On the CPU (``device="cpu"``) there is no device ring: resident
weights are the host arenas themselves, and nvme blocks are computed straight from their ticket's slot.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

from .errors import ModelError, OutOfMemoryError
from .generation import KVCache, generate
from .models import Family
from .plan import Plan, fmt_bytes
from .quant import CODES, SCALE, ZERO, BlockQuant
from .store import FlatRead, Ticket, WeightStore

Weights = Dict[str, Tensor]
PACKED_SUFFIXES = (CODES, SCALE, ZERO)

# cuDNN's attention builds an execution plan for every new (batch, heads, query, key) shape. Decoding grows the key
# length by one every step, so each step paid a plan build (0.4-0.9 s on the H100, measured: docs/performance.md).
# Flash and memory-efficient attention need no plans.
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
except ImportError:  # torch < 2.3: no cuDNN attention to avoid
    sdpa_kernel = None


# cuBLAS picks its fastest kernels only for 16-byte (better: 256-byte) aligned operands, but a tensor sits in its
# arena at its file offset modulo 4096, which safetensors aligns to 8 bytes only. A block's tensors usually share
# one residue, so shifting the whole block by a pad on the device aligns them all.
DEVICE_ALIGN = 256


def block_pad(flat: FlatRead) -> int:
    """Bytes to shift ``flat`` by on the device so that its first tensor is DEVICE_ALIGN-aligned."""
    first = min((off for off, _, _ in flat.layout.values()), default=0)
    return -first % DEVICE_ALIGN


def to_device(flat: FlatRead, device: torch.device) -> FlatRead:
    """One transfer of a whole block to ``device``, shifted so that its tensors are aligned there."""
    pad = block_pad(flat)
    buf = torch.empty(flat.nbytes + pad, dtype=torch.uint8, device=device)
    buf[pad:].copy_(flat.buffer)
    return FlatRead(buf[pad:], flat.layout)


def _local(flat_views: Dict[str, Tensor], names: Dict[str, str], dtype: torch.dtype) -> Weights:
    """{local name: tensor} from {checkpoint name: view}, converted to the compute dtype where needed."""
    out = {}
    for local, ckpt in names.items():
        t = flat_views[ckpt]
        keep = t.dtype == dtype or not t.is_floating_point() or local.endswith(PACKED_SUFFIXES)
        out[local] = t if keep else t.to(dtype)  # packed scales stay fp16: they are part of the codes
    return out


class Streamer(Protocol):
    """Where streamed blocks come from during a forward pass, in block order."""

    def acquire(self, block: int) -> Weights: ...   # the block's weights, ready for the compute stream
    def release(self) -> None: ...                 # the acquired block's compute is enqueued
    def at_pass_start(self) -> bool: ...           # False after a pass that stopped midway
    def reset(self) -> None: ...                   # drop everything in flight


class _DeviceRing:
    """Streamed blocks through ``slots`` device buffers, copies on their own stream, ordered by events."""

    def __init__(self, device: torch.device, order: List[int], slot_bytes: int, slots: int,
                 source: Union[List[Optional[FlatRead]], WeightStore], block_names: List[Dict[str, str]],
                 dtype: torch.dtype, disk_prefetch: int = 2) -> None:
        self.device = device
        self.order = order                  # streamed block ids, in compute order
        self.slots = min(slots, len(order))
        self.source = source                # host FlatReads (offload="cpu") or the store (offload="nvme")
        self.block_names = block_names
        self.dtype = dtype
        self.disk_prefetch = disk_prefetch
        self.buffers = [torch.empty(slot_bytes + DEVICE_ALIGN, dtype=torch.uint8, device=device)
                        for _ in range(self.slots)]
        self.copy_stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(self.slots)]    # slot's copy landed
        self.computed = [torch.cuda.Event() for _ in range(self.slots)]  # slot's compute finished
        self.layouts: List[Optional[FlatRead]] = [None] * self.slots    # what each slot holds
        self.tickets: Deque[Tuple[int, Ticket]] = deque()                # nvme: (global index, ticket) ahead
        self.in_copy: Deque[Tuple[torch.cuda.Event, Ticket, FlatRead]] = deque()  # host slots still being read
        self.trace: Optional[List[Tuple[str, int, int, Any, Any]]] = None
        self.issued = 0    # global index of the next copy to issue (block order[g % m], slot g % slots)
        self.consumed = 0  # global index of the next block to compute
        self.busy = False  # between acquire and release: still set after a failure, so the next pass resets

    @property
    def nvme(self) -> bool:
        return isinstance(self.source, WeightStore)

    def _names(self, g: int) -> List[str]:
        return list(self.block_names[self.order[g % len(self.order)]].values())

    def _fetch_ahead(self, upto: int) -> None:
        """Keep store tickets queued for global indices up to ``upto`` (exclusive)."""
        assert isinstance(self.source, WeightStore)
        nxt = self.tickets[-1][0] + 1 if self.tickets else self.issued
        while nxt < upto:
            self.tickets.append((nxt, self.source.fetch(self._names(nxt))))
            nxt += 1

    def _retire_copies(self, block: bool = False) -> None:
        """Hand host staging slots back once their copy to the device is done."""
        while self.in_copy and (block or self.in_copy[0][0].query()):
            event, ticket, _flat = self.in_copy.popleft()
            event.synchronize()
            ticket.release()

    def _issue(self) -> None:
        """Start the copy of global index ``issued`` into its slot, behind the compute that last used it."""
        g = self.issued
        slot = g % self.slots
        if self.nvme:
            self._fetch_ahead(g + 1 + self.disk_prefetch)
            gi, ticket = self.tickets.popleft()
            assert gi == g
            host = ticket.wait_flat()  # blocks until the disk read is done; the device keeps computing
            if self.trace is not None:
                _queued, started, finished = ticket.times
                self.trace.append(("disk", g, self.order[g % len(self.order)], started, finished))
        else:
            assert not isinstance(self.source, WeightStore)
            host = self.source[self.order[g % len(self.order)]]
            assert host is not None
        stream = self.copy_stream
        with torch.cuda.stream(stream):
            if g >= self.slots:
                stream.wait_event(self.computed[slot])  # the block that used this slot has finished
            if self.trace is not None:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            pad = block_pad(host)
            self.buffers[slot][pad:pad + host.nbytes].copy_(host.buffer, non_blocking=True)
            self.copied[slot].record(stream)
            if self.trace is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                self.trace.append(("copy", g, self.order[g % len(self.order)], start, end))
        # Keep only the layout: the host buffer may go back to the pool once the copy is done.
        self.layouts[slot] = FlatRead(self.buffers[slot][pad:], host.layout)
        if self.nvme:
            done = torch.cuda.Event()
            done.record(stream)
            self.in_copy.append((done, ticket, host))
            self._retire_copies()
        self.issued += 1

    def acquire(self, block: int) -> Weights:
        """Weights of ``block`` (the next streamed one) on the device; the compute stream waits for the copy."""
        self.busy = True
        g = self.consumed
        if self.order[g % len(self.order)] != block:
            raise RuntimeError(f"ring out of order: expected block {self.order[g % len(self.order)]}, got {block}")
        while self.issued < g + self.slots:
            self._issue()
        slot = g % self.slots
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        host = self.layouts[slot]
        assert host is not None
        return _local(host.view(), self.block_names[block], self.dtype)

    def release(self) -> None:
        """The compute of the acquired block is enqueued: free its slot behind it and start the next copy."""
        slot = self.consumed % self.slots
        self.computed[slot].record(torch.cuda.current_stream(self.device))
        self.consumed += 1
        while self.issued < self.consumed + self.slots:
            self._issue()
        self.busy = False

    def at_pass_start(self) -> bool:
        return not self.busy and self.consumed % len(self.order) == 0

    def reset(self) -> None:
        """Drop everything in flight (after an interrupted pass) and start over."""
        torch.cuda.synchronize(self.device)
        for _, ticket in self.tickets:
            ticket.release()
        self.tickets.clear()
        self._retire_copies(block=True)
        self.layouts = [None] * self.slots
        self.issued = self.consumed = 0
        self.busy = False


class _HostTickets:
    """offload="nvme" on the CPU: blocks computed straight from their ticket's pool slot, read ahead."""

    def __init__(self, store: WeightStore, order: List[int], block_names: List[Dict[str, str]],
                 dtype: torch.dtype, prefetch: int) -> None:
        self.store = store
        self.order = order
        self.block_names = block_names
        self.dtype = dtype
        self.depth = max(1, prefetch)
        self.tickets: Deque[Tuple[int, Ticket]] = deque()
        self.current: Optional[Ticket] = None
        self.consumed = 0

    def _ahead(self) -> None:
        nxt = self.tickets[-1][0] + 1 if self.tickets else self.consumed
        while nxt < self.consumed + 1 + self.depth:
            names = list(self.block_names[self.order[nxt % len(self.order)]].values())
            self.tickets.append((nxt, self.store.fetch(names)))
            nxt += 1

    def acquire(self, block: int) -> Weights:
        self._ahead()
        g, ticket = self.tickets.popleft()
        assert g == self.consumed and self.order[g % len(self.order)] == block
        self.current = ticket
        return _local(ticket.wait_flat().view(), self.block_names[block], self.dtype)

    def release(self) -> None:
        # The block's tensors die with the caller's frame; the slot returns to the pool once they have.
        if self.current is not None:
            self.current.release()
            self.current = None
        self.consumed += 1
        self._ahead()

    def at_pass_start(self) -> bool:
        # A block still held means its pass stopped midway (a read error, an interrupt).
        return self.current is None and self.consumed % len(self.order) == 0

    def reset(self) -> None:
        for _, t in self.tickets:
            t.release()
        self.tickets.clear()
        if self.current is not None:
            self.current.release()
            self.current = None
        self.consumed = 0


_F = TypeVar("_F", bound=Callable[..., Any])


def _serialised(method: _F) -> _F:
    """Run ``method`` holding the model's lock. Why: the streamer is one ring of blocks in flight, consumed in block
    order; two threads in passes at once would take each other's blocks (or reset the ring under each other). A
    second caller waits instead. Reentrant: generate -> forward, __call__ -> forward."""

    @functools.wraps(method)
    def locked(self: StreamingModel, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class StreamingModel:
    """A causal LM whose blocks live where the plan says: on the device, in pinned host memory, or on disk.

    ``model(input_ids, attention_mask) -> logits`` and ``model.generate(...)``; built by ``zstream.load``.
    """

    def __init__(self, *, store: WeightStore, family: Family, plan: Plan, config: Dict[str, Any],
                 outer: Weights, resident: Dict[int, Weights], streamer: Optional[Streamer],
                 tokenizer: Any = None, path: str = "", load_s: float = 0.0,
                 quant: Optional[BlockQuant] = None) -> None:
        self.store = store
        self.family = family
        self.plan = plan
        self.config = config
        self.outer = outer
        self.resident = resident
        self.streamer = streamer
        self.tokenizer = tokenizer
        self.path = path
        self.load_s = load_s
        self.quant = quant  # packed blocks: dequantized on the device just before their matmuls
        self.device = torch.device(plan.device)
        self.dtype = plan.dtype
        self._trace: Optional[List[Tuple[str, int, int, Any, Any]]] = None
        self._trace_ref: Optional[Tuple[int, Any]] = None
        self._lock = threading.RLock()  # one pass at a time through the streamer: see _serialised

    # --- the forward pass --------------------------------------------------------------------------------------
    @_serialised
    def forward(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """Run T new tokens (B, T) through every block, appending them to ``cache``; -> logits (B, T, vocab), or
        (B, 1, vocab) of the last position with ``last_only`` (generation needs no more)."""
        if sdpa_kernel is None or self.device.type != "cuda":
            return self._forward(input_ids, attention_mask, cache, last_only)
        with sdpa_kernel(_SDPA_BACKENDS):
            return self._forward(input_ids, attention_mask, cache, last_only)

    @torch.inference_mode()
    def _forward(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, last_only: bool) -> Tensor:
        """Run T new tokens (B, T) through every block, appending them to ``cache``; -> logits (B, T, vocab), or
        (B, 1, vocab) of the last position with ``last_only`` (generation needs no more)."""
        fam, streamer = self.family, self.streamer
        if streamer is not None and not streamer.at_pass_start():
            streamer.reset()  # an earlier pass was interrupted midway
        if streamer is not None and hasattr(streamer, "begin_pass"):
            streamer.begin_pass(input_ids.numel())  # the ats mode copies blocks for passes with many tokens
        input_ids = input_ids.to(self.device)
        mask, _start = cache.extend(attention_mask.to(self.device))
        ctx = fam.context(mask, input_ids.shape[1], self.dtype)   # positions, mask, ALiBi/RoPE: once per pass
        hidden = fam.embed(self.outer, input_ids, ctx)              # (B, T, C)
        quant = self.quant
        for i in range(fam.num_blocks):
            w = self.resident.get(i)
            if w is not None:
                if quant is not None:
                    w = quant.dequantize(w)
                hidden = fam.block(w, hidden, cache.layer(i), ctx)  # (B, T, C)
                continue
            assert streamer is not None
            if self._trace is not None:
                cpu0 = time.monotonic_ns()
            w = streamer.acquire(i)
            if self._trace is not None:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            if quant is not None:
                w = quant.dequantize(w)  # reads the slot: must be enqueued before release
            hidden = fam.block(w, hidden, cache.layer(i), ctx)      # (B, T, C)
            if self._trace is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._trace.append(("compute", i, i, start, end))
            del w  # the views of the slot must be gone before the slot is reused
            streamer.release()
            if self._trace is not None:
                self._trace.append(("cpu", i, i, cpu0, time.monotonic_ns()))
        if last_only:
            hidden = hidden[:, -1:]                                 # (B, 1, C)
        return fam.head(self.outer, hidden)                         # (B, T, vocab)

    def block_tensors(self, i: int) -> Dict[str, str]:
        """{local: checkpoint name} of block ``i`` as the store holds it: a packed checkpoint's packed tensors."""
        names = self.family.block_tensors(i)
        if self.quant is not None:
            packed = self.quant.names(names)
            if all(n in self.store for n in packed.values()):
                return packed
        return names

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        try:
            return KVCache.for_family(self.family, batch, max_len, self.dtype, self.device)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"a KV cache for batch {batch} x {max_len} tokens") from e

    @_serialised
    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Logits (B, T, vocab) of whole sequences (left-padded where ``attention_mask`` has zeros)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, 0)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        try:
            return self.forward(input_ids, attention_mask, cache)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"a forward pass of {tuple(input_ids.shape)} tokens") from e

    # --- generation --------------------------------------------------------------------------------------------
    @_serialised
    def generate(self, inputs: Union[Tensor, str, Sequence[str]], max_new_tokens: int = 20,
                 attention_mask: Optional[Tensor] = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None,
                 pad_token_id: Optional[int] = None) -> Union[Tensor, str, List[str]]:
        """Prompt + new tokens. ``inputs``: a LongTensor (B, T) -> LongTensor (B, T + n), like transformers; or a
        string / list of strings (needs the checkpoint's tokenizer) -> text. Batched prompts of different lengths
        are left-padded with an attention mask."""
        as_text = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs
                                              and isinstance(inputs[0], str))
        if as_text:
            input_ids, attention_mask = self._encode([inputs] if isinstance(inputs, str) else list(inputs))
        else:
            assert isinstance(inputs, Tensor)
            input_ids = inputs if inputs.dim() == 2 else inputs[None]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, max_new_tokens)
        if pad_token_id is None:
            pad_token_id = self.config.get("pad_token_id")
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        try:
            out = generate(self._step, input_ids.to(self.device), max_new_tokens, cache=cache,
                           attention_mask=attention_mask.to(self.device), do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, seed=seed)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(f"generating for batch {input_ids.shape[0]}") from e
        if not as_text:
            return out
        texts = [self.tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
                 for row, mrow in zip(out.tolist(), self._full_mask(attention_mask, out).tolist())]
        return texts[0] if isinstance(inputs, str) else texts

    def _step(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache) -> Tensor:
        return self.forward(input_ids, attention_mask, cache, last_only=True)

    def _full_mask(self, attention_mask: Tensor, out: Tensor) -> Tensor:
        new = torch.ones(out.shape[0], out.shape[1] - attention_mask.shape[1], dtype=attention_mask.dtype)
        return torch.cat([attention_mask.cpu(), new], dim=1)

    def _encode(self, prompts: List[str]) -> Tuple[Tensor, Tensor]:
        if self.tokenizer is None:
            raise ModelError(f"{self.path}: text prompts need a tokenizer (tokenizer.json), and this checkpoint "
                             "has none; pass token ids as a LongTensor")
        rows = [self.tokenizer.encode(p) for p in prompts]
        rows = [r.ids if hasattr(r, "ids") else list(r) for r in rows]
        pad = self.config.get("pad_token_id")
        if pad is None:
            eos = self.config.get("eos_token_id")
            pad = (eos[0] if isinstance(eos, list) else eos) or 0
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding: the last token of every row is aligned
            if r:
                ids[b, T - len(r):] = torch.tensor(r)
                mask[b, T - len(r):] = 1
        return ids, mask

    def _check_length(self, attention_mask: Tensor, max_new_tokens: int) -> None:
        longest = int(attention_mask.sum(dim=1).max()) + max_new_tokens if attention_mask.numel() else 0
        if longest > self.family.max_positions:
            raise ModelError(f"{longest} tokens (prompt + new) exceed the {self.family.max_positions} positions "
                             f"of {self.path}")

    def _oom(self, what: str) -> OutOfMemoryError:
        p = self.plan
        hint = (f"a smaller gpu_memory (now {fmt_bytes(p.budget_bytes)}) leaves more room for the KV cache"
                if p.budget_bytes is not None else "offload='cpu' or 'nvme' frees device memory")
        if p.offload == "none":
            hint = "offload='cpu' (or 'nvme') streams the weights and frees device memory"
        return OutOfMemoryError(f"{self.path}: out of device memory for {what} ({p.offload} offload, "
                                f"{fmt_bytes(p.resident_bytes)} resident): {hint}, or use a smaller batch")

    # --- tracing -------------------------------------------------------------------------------------------------
    def trace_start(self) -> None:
        """Record, until ``trace_stop``, per streamed block: disk read, copy and compute (CUDA devices only)."""
        if self.device.type != "cuda":
            raise ModelError("tracing needs a CUDA device")
        ref = torch.cuda.Event(enable_timing=True)
        ref.record()
        ref.synchronize()
        self._trace_ref = (time.monotonic_ns(), ref)
        self._trace = []
        if isinstance(self.streamer, _DeviceRing):
            self.streamer.trace = self._trace

    def trace_stop(self, path: Union[str, os.PathLike]) -> None:
        """Write what was recorded since ``trace_start`` as a Chrome/Perfetto trace (JSON)."""
        torch.cuda.synchronize(self.device)
        assert self._trace is not None and self._trace_ref is not None
        ref_ns, ref = self._trace_ref
        tracks = {"disk": (1, "disk -> pinned host (io_uring)"), "copy": (2, "host -> device copy (copy stream)"),
                  "compute": (3, "block compute (compute stream)"),
                  "cpu": (4, "python: acquire, launch, release")}
        events: List[Dict[str, Any]] = [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name",
                                         "args": {"name": name}} for tid, name in tracks.values()]
        for kind, g, block, a, b in self._trace:
            if kind in ("disk", "cpu"):
                ts, dur = a / 1e3, (b - a) / 1e3
            else:
                ts = ref_ns / 1e3 + ref.elapsed_time(a) * 1e3
                dur = a.elapsed_time(b) * 1e3
            events.append({"ph": "X", "pid": 1, "tid": tracks[kind][0], "name": f"block {block}", "ts": ts,
                           "dur": dur, "args": {"global_index": g}})
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        self._trace = None
        if isinstance(self.streamer, _DeviceRing):
            self.streamer.trace = None

    # --- housekeeping ------------------------------------------------------------------------------------------
    def peak_memory(self) -> int:
        """Peak device memory allocated by torch in this process (bytes); 0 on the CPU."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    @_serialised  # waits for a pass in progress on another thread
    def close(self) -> None:
        """Finish everything in flight and let go of the store; the model cannot run afterwards."""
        if self.streamer is not None:
            self.streamer.reset()
            self.streamer = None
        self.resident.clear()
        self.outer = {}
        self.store.close()

    def __repr__(self) -> str:
        return f"<StreamingModel {self.path}: {type(self.family).__name__}, {self.plan.offload} offload>"
