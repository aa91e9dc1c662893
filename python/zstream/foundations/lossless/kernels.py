"""Decoding ``codec`` tensors on the GPU, bit-identical to the native decoder: two Triton kernels, one building each
tensor's lookup table, one decoding.

A program owns ``BLOCK`` lanes of one tensor; one launch covers every tensor of a block (``decode_many``), so that
their lanes fill the GPU together: a 4096 x 4096 weight has only 32768 lanes, 8 warps an SM, too few to hide the
latency of a lane's chain of codes (on the H200: 134-188 GB/s decoded alone, 444-480 GB/s four in one launch).
Each lane keeps a 64-bit window of its bit stream (``have`` valid bits at the top), refills it one 32-bit word at a
time when fewer bits than the longest code (12) remain, looks the next 12 bits up in a 4096-entry table (``symbol |
length << 8``, 8 KiB: it stays in L1; built from the checkpoint's compact tables by ``_lookup_kernel``, one program a
tensor, before the decode) and shifts the code out. Finding the length by comparing with the codes' limits instead
compiled to 89 PTX instructions an element against 35, and measured 348 against 480 GB/s.

In step ``k`` lane ``j`` decodes run ``k * lanes + j`` (4 consecutive elements): it reads the run's raw bytes as one
int32, loaded a step ahead, and writes its four words as one int64, so a warp reads 128 and writes 256 consecutive
bytes a step. Only the words of the streams are gathered, one 4-byte load every 10 or so elements.

``decode`` runs the kernel for CUDA tensors when Triton imports and the native host decoder otherwise;
``triton_decode`` runs it on any tensors, which with ``TRITON_INTERPRET=1`` set before Triton is imported means
Triton's interpreter on CPU tensors: how ``tests/test_lossless.py`` checks the kernel's bits without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .codec import CodedTensor, decode_host

try:  # Triton is optional: without it everything decodes on the host
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
RUN = 4  # codec: a lane takes this many consecutive elements at a time (lossless.rs: RUN)
LOOKUP_LEN = 1 << 12  # entries of a lookup table: one per 12-bit window
DEFAULT_BLOCK = 64  # lanes per program
DEFAULT_WARPS = 2


def backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and HAS_TRITON else "host"


def decode(c: CodedTensor, out: Optional[Tensor] = None) -> Tensor:
    """The tensor ``c`` codes, on ``c``'s device (into ``out`` when given)."""
    if out is None:
        out = torch.empty(c.shape, dtype=c.dtype, device=c.words.device)
    decode_many([c], [out])
    return out


def triton_decode(c: CodedTensor, out: Optional[Tensor] = None, **tuning: Any) -> Tensor:
    """``decode`` through the kernel, wherever ``c`` is (on CPU tensors: in Triton's interpreter); ``tuning`` as
    ``decode_many`` takes it."""
    if out is None:
        out = torch.empty(c.shape, dtype=c.dtype, device=c.words.device)
    decode_many([c], [out], kernel=True, **tuning)
    return out


def decode_many(coded: Sequence[CodedTensor], outs: Sequence[Tensor], *, kernel: Optional[bool] = None,
                block: int = DEFAULT_BLOCK, warps: int = DEFAULT_WARPS) -> None:
    """Decode ``coded[i]`` into ``outs[i]`` for every i: on a GPU in one launch (after one that builds their lookup
    tables), so that the lanes of all of them (a block's weights) fill the GPU together; elsewhere with the native
    decoder. ``kernel`` forces the choice; ``block`` and ``warps`` are the kernel's tuning (the benchmark sweeps
    them)."""
    if not coded:
        return
    device = coded[0].words.device
    if not (backend(device) == "triton" if kernel is None else kernel):
        for c, out in zip(coded, outs):
            out.copy_(decode_host(c).to(out.device))
        return
    rows, keep, programs = [], [], 0
    for c, out in zip(coded, outs):
        n = c.raw.numel()
        if n == 0:
            continue
        raw, dst = c.raw.reshape(-1), out.view(torch.int16).view(-1)
        # a lane reads its run's raw bytes as one int32 and writes its outputs as one int64 (block buffers align
        # parts to 256 bytes; anything else goes through aligned copies)
        raw = raw if raw.data_ptr() % 4 == 0 else raw.clone()
        into = dst if dst.data_ptr() % 8 == 0 else torch.empty_like(dst)
        programs += triton.cdiv(c.lanes, block)
        rows.append([t.data_ptr() for t in (c.words, c.offsets, raw, c.table, into)] + [n, c.lanes, programs])
        keep.append((raw, into, dst))
    if not rows:
        return
    desc = _descriptor(rows, device)
    luts = torch.empty((len(rows), LOOKUP_LEN), dtype=torch.int16, device=device)
    _lookup_kernel[(len(rows),)](desc, luts, SIZE=LOOKUP_LEN, num_warps=4)
    _decode_kernel[(programs,)](desc, luts, len(rows), BLOCK=block, RUN=RUN, num_warps=warps)
    for _, into, dst in keep:
        if into is not dst:
            dst.copy_(into)


_DESCRIPTORS: OrderedDict[Tuple[Tuple[int, ...], ...], Tensor] = OrderedDict()  # by their rows, most recent last
_DESCRIPTORS_KEPT = 64  # a ring's slots hold the same parts at the same addresses pass after pass


def _descriptor(rows: List[List[int]], device: torch.device) -> Tensor:
    """(tensors, 8) int64 on ``device``: addresses of words, offsets, raw, tables and output; elements, lanes, programs
    up to each tensor. Kept by content: a block decoded from the same slot again reuses its descriptor, which saves
    the call a pinned allocation and a copy up (a call of one weight spends more on the host than in the kernels)."""
    key = tuple(tuple(r) for r in rows)
    desc = _DESCRIPTORS.get(key) if device.type == "cuda" else None
    if desc is not None and desc.device == device:
        _DESCRIPTORS.move_to_end(key)
        return desc
    desc = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        desc = desc.pin_memory().to(device, non_blocking=True)
        _DESCRIPTORS[key] = desc
        while len(_DESCRIPTORS) > _DESCRIPTORS_KEPT:
            _DESCRIPTORS.popitem(last=False)
    return desc


if HAS_TRITON:

    @triton.jit
    def _decode_kernel(desc_ptr, luts_ptr, tensors, BLOCK: tl.constexpr, RUN: tl.constexpr):
        """One launch for several tensors: program ``p`` decodes lanes of the tensor whose programs it falls in."""
        p = tl.program_id(0)
        t = 0
        for j in range(tensors):
            t += (p >= tl.load(desc_ptr + j * 8 + 7)).to(tl.int32)
        d = desc_ptr + t * 8
        first = tl.load(d + 7 - 8, mask=t > 0, other=0)  # programs of the tensors before
        lane = (p - first) * BLOCK + tl.arange(0, BLOCK)
        _decode_lanes(tl.load(d).to(tl.pointer_type(tl.int32)), tl.load(d + 1).to(tl.pointer_type(tl.int32)),
                      tl.load(d + 2).to(tl.pointer_type(tl.int32)), luts_ptr + t * 4096,
                      tl.load(d + 4).to(tl.pointer_type(tl.int64)), tl.load(d + 5), tl.load(d + 6), lane, BLOCK, RUN)

    @triton.jit
    def _decode_lanes(words_ptr, offsets_ptr, raw_ptr, lut_ptr, out_ptr, n, lanes, lane,
                      BLOCK: tl.constexpr, RUN: tl.constexpr, GROUP: tl.constexpr = 32):
        """Lanes ``lane`` of one tensor: ``raw_ptr`` reads 4 raw bytes at a time, ``out_ptr`` writes 4 outputs."""
        live = lane < lanes
        # where the lane starts: its group's first word, and its first bit from there (u16, two to an int32)
        groups = (lanes + GROUP - 1) // GROUP
        base = tl.load(offsets_ptr + lane // GROUP, mask=live, other=0)
        start = tl.load(offsets_ptr.to(tl.pointer_type(tl.int16)) + 2 * groups + lane, mask=live, other=0)
        start = start.to(tl.int32) & 0xFFFF
        pos = base + (start >> 5)
        # the lane's first word, without the bits before its start (the lane before's): 32 - skip valid bits
        skip = start & 31
        first = tl.cast(tl.load(words_ptr + pos, mask=live, other=0), tl.uint32, bitcast=True).to(tl.uint64)
        window = (first << 32) << skip.to(tl.uint64)  # MSB-first: `have` valid bits at the top
        have = 32 - skip
        pos += 1
        full = n // (RUN * lanes)  # steps in which every lane decodes a whole run
        run = lane.to(tl.int64)  # step k: lane j decodes run k * lanes + j, elements RUN * run ..
        # the raw bytes of two steps in flight (loaded a step before they are needed, into two registers that take
        # turns, so that no register copy waits on a load)
        now = tl.load(raw_ptr + run, mask=live & (run < full * lanes), other=0)
        then = tl.load(raw_ptr + run + lanes, mask=live & (run + lanes < full * lanes), other=0)
        for _ in range(full // 2):
            window, have, pos = _step(words_ptr, lut_ptr, out_ptr, window, have, pos, now, run, live)
            now = tl.load(raw_ptr + run + 2 * lanes, mask=live & (run + 2 * lanes < full * lanes), other=0)
            run += lanes
            window, have, pos = _step(words_ptr, lut_ptr, out_ptr, window, have, pos, then, run, live)
            then = tl.load(raw_ptr + run + 2 * lanes, mask=live & (run + 2 * lanes < full * lanes), other=0)
            run += lanes
        if full % 2 == 1:
            window, have, pos = _step(words_ptr, lut_ptr, out_ptr, window, have, pos, now, run, live)
            run += lanes
        if full * lanes * RUN < n:  # the last step: runs cut short by the end of the tensor, element by element
            raw8 = raw_ptr.to(tl.pointer_type(tl.uint8))
            out16 = out_ptr.to(tl.pointer_type(tl.int16))
            for u in tl.static_range(RUN):
                i = run * RUN + u
                m = live & (i < n)
                window, have, pos, symbol = _code(words_ptr, lut_ptr, window, have, pos, m)
                raw = tl.load(raw8 + i, mask=m, other=0).to(tl.int32)
                tl.store(out16 + i, _word(symbol, raw).to(tl.int16), mask=m)

    @triton.jit
    def _step(words_ptr, lut_ptr, out_ptr, window, have, pos, raws, run, live):
        """Run ``run`` of each lane: four codes, their words written as one int64."""
        window, have, pos, s0 = _code(words_ptr, lut_ptr, window, have, pos, live)
        window, have, pos, s1 = _code(words_ptr, lut_ptr, window, have, pos, live)
        window, have, pos, s2 = _code(words_ptr, lut_ptr, window, have, pos, live)
        window, have, pos, s3 = _code(words_ptr, lut_ptr, window, have, pos, live)
        values = _word(s0, raws).to(tl.int64) | (_word(s1, raws >> 8).to(tl.int64) << 16)  # each in [0, 0xFFFF]
        values |= (_word(s2, raws >> 16).to(tl.int64) << 32) | (_word(s3, raws >> 24).to(tl.int64) << 48)
        tl.store(out_ptr + run, values, mask=live)
        return window, have, pos

    @triton.jit
    def _code(words_ptr, lut_ptr, window, have, pos, m):
        """Each lane's next code (where ``m``): refill the window if fewer bits than the longest code remain, look
        the next 12 bits up, shift the code out. Returns the state and the code's symbol."""
        need = m & (have < 12)
        word = tl.load(words_ptr + pos, mask=need, other=0)
        window = tl.where(need, window | (tl.cast(word, tl.uint32, bitcast=True).to(tl.uint64) << (32 - have)), window)
        have = tl.where(need, have + 32, have)
        pos = tl.where(need, pos + 1, pos)
        entry = tl.load(lut_ptr + ((window >> 32).to(tl.uint32) >> 20).to(tl.int32), mask=m, other=0).to(tl.int32)
        length = entry >> 8
        window = window << length.to(tl.uint64)
        have -= length
        return window, have, pos, entry & 0xFF

    @triton.jit
    def _word(symbol, raw):
        """The 16-bit word of a symbol and a raw byte (the low byte of ``raw``)."""
        return ((raw & 0x80) << 8) | ((symbol & 0xFF) << 7) | (raw & 0x7F)

    @triton.jit
    def _lookup_kernel(desc_ptr, luts_ptr, SIZE: tl.constexpr):
        """Tensor ``t``'s lookup table (``symbol | length << 8`` for every 12-bit window) from its compact tables
        (``codec``): the length is how many of the codes' limits the window reaches, and the symbol is in code order
        at the length's offset plus the code."""
        t = tl.program_id(0)
        tables_ptr = tl.load(desc_ptr + t * 8 + 3).to(tl.pointer_type(tl.int16))
        v = tl.arange(0, SIZE)
        length = tl.zeros([SIZE], dtype=tl.int32)
        for j in tl.static_range(16):
            length += (v >= tl.load(tables_ptr + j).to(tl.int32)).to(tl.int32)
        length = tl.minimum(length, 12)
        first = tl.load(tables_ptr + 16 + length).to(tl.int32)
        symbol = tl.load(tables_ptr + 32 + ((first + (v >> (12 - length))) & 255)).to(tl.int32)
        tl.store(luts_ptr + t * SIZE + v, ((length << 8) | (symbol & 0xFF)).to(tl.int16))
