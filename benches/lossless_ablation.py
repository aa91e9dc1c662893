"""Where a lane-parallel Huffman decoder's time goes: the first version of ``zstream.foundations.lossless.kernels``
(one element a step, a 4096-entry lookup table) with parts of its per-element work taken out, on one 16M-element
bf16 tensor. The variants time what is left (only "all" decodes anything). On the H200 (docs/compression.md) the raw
byte loaded each step cost 3x: the reason the kernel now reads a run's raw bytes as one word, a step ahead.

    python benches/lossless_ablation.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from zstream.foundations.lossless import encode
from zstream.foundations.lossless.codec import LANE_GROUP
from zstream.foundations.measure import cuda_median_ms


@triton.jit
def _ablate(words_ptr, offsets_ptr, raw_ptr, table_ptr, out_ptr, n, lanes, steps, BLOCK: tl.constexpr,
            REFILL: tl.constexpr, LOOKUP: tl.constexpr, RAW: tl.constexpr, STORE: tl.constexpr, WIDE: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < lanes
    pos = tl.load(offsets_ptr + lane, mask=live, other=0)
    window = tl.zeros([BLOCK], dtype=tl.uint64)
    have = tl.zeros([BLOCK], dtype=tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    i = lane.to(tl.int64) if WIDE else lane
    for _ in range(steps):
        m = live & (i < n)
        need = m & (have < 12)
        word = tl.load(words_ptr + pos, mask=need, other=0) if REFILL else pos * 40503 + have
        shift = (32 - have).to(tl.uint64)
        window = tl.where(need, window | (tl.cast(word, tl.uint32, bitcast=True).to(tl.uint64) << shift), window)
        have = tl.where(need, have + 32, have)
        pos = tl.where(need, pos + 1, pos)
        hi = (window >> 32).to(tl.uint32)
        v = (hi >> 20).to(tl.int32)
        entry = tl.load(table_ptr + v, mask=m, other=0).to(tl.int32) if LOOKUP else ((v & 7) + 1) << 8 | (v & 0xFF)
        length = entry >> 8
        window = window << length.to(tl.uint64)
        have -= length
        raw = tl.load(raw_ptr + i, mask=m, other=0).to(tl.int32) if RAW else v
        value = ((raw & 0x80) << 8) | ((entry & 0xFF) << 7) | (raw & 0x7F)
        if STORE:
            tl.store(out_ptr + i, value.to(tl.int16), mask=m)
        else:
            acc ^= value
        i += lanes
    if not STORE:
        tl.store(out_ptr + lane, acc.to(tl.int16), mask=live & (acc == 0x5EED))


# (refill, lookup, raw, store, 64-bit index): which loads and stores each variant keeps
VARIANTS = (("all", (1, 1, 1, 1, 1)), ("no-refill", (0, 1, 1, 1, 1)), ("no-lookup", (1, 0, 1, 1, 1)),
            ("no-raw", (1, 1, 0, 1, 1)), ("no-store", (1, 1, 1, 0, 1)), ("int32-index", (1, 1, 1, 1, 0)),
            ("alu-only", (0, 0, 0, 0, 0)))


def first_words(offsets: torch.Tensor, lanes: int) -> torch.Tensor:
    """The word each lane's stream starts in (int32, one a lane), from the format's offsets (``codec``: each group's
    base word, then each lane's first bit from it as u16). The variants start there, at bit 0 of the word: they time,
    they do not decode."""
    groups = -(-lanes // LANE_GROUP)
    start = offsets[groups:].contiguous().view(torch.int16)[:lanes].to(torch.int32) & 0xFFFF
    base = offsets[:groups].repeat_interleave(LANE_GROUP)[:lanes]
    return (base + (start >> 5)).to(torch.int32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=1 << 24)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    w = (0.02 * torch.randn(a.elements, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    rows = []
    for per_lane in (512, 128):
        c = encode(w, lanes=w.numel() // per_lane)
        words, offsets, raw = c.words.cuda(), first_words(c.offsets, c.lanes).cuda(), c.raw.cuda().view(-1)
        table = (torch.randint(0, 256, (4096,), dtype=torch.int16) | (3 << 8)).cuda()  # 3-bit codes: ~ the real mean
        out = torch.empty(w.numel(), dtype=torch.int16, device=words.device)
        lanes = c.lanes
        for block, warps in ((32, 1), (128, 4)):
            for name, flags in VARIANTS:
                run = functools.partial(_ablate[(triton.cdiv(lanes, block),)], words, offsets, raw, table, out,
                                        w.numel(), lanes, -(-w.numel() // lanes), BLOCK=block, REFILL=flags[0],
                                        LOOKUP=flags[1], RAW=flags[2], STORE=flags[3], WIDE=flags[4], num_warps=warps)
                run()
                torch.cuda.synchronize()
                ms = cuda_median_ms(run, 20)
                rows.append({"per_lane": per_lane, "block": block, "warps": warps, "variant": name, "ms": ms,
                             "gbps": 2 * w.numel() / ms / 1e6})
                print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
