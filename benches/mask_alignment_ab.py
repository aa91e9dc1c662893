"""A decode step's attention calls with the mask as the engine now builds it (rows rounded up to 8 elements,
``models.common.mask_buffer``) against the same mask made contiguous (as before), in one process, alternating
(issue 17; docs/performance.md item 49).

    python3 benches/mask_alignment_ab.py bloom-7b1 --batch 7 --keys 513-543 --rounds 5 --json out.json

For every key count S of ``--keys`` (a generation's decode steps after a prompt of 512 attend to 513..543), one
step's attention over ``--layers`` layers (default: the preset's blocks) is timed: ``ops.attention`` of a (B, nh, 1,
hs) query over keys and values of a (B, nkv, max_len, hs) cache, as the engine's layer caches hand them, with the
family's own context mask for S keys, under the engine's attention kernels. SDPA's memory-efficient kernel pads a
mask whose rows are not 16 bytes apart into a fresh copy at every call; the "contiguous" way pays it at every S not
a multiple of 8. Prints, per way, the step's median at S a multiple of 8 and at the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for, ops
from zstream.foundations.models.common import MASK_ALIGN
from zstream.streaming.weights import attention_kernels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def key_range(spec: str) -> List[int]:
    """"513-543" or "513,520" -> the key counts."""
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in spec.split(",")]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default="bloom-7b1")
    p.add_argument("--batch", type=int, default=7)
    p.add_argument("--keys", default="513-543")
    p.add_argument("--layers", type=int, default=None, help="attention calls a step (default: the preset's blocks)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    fam = family_for(resolve_config(a.preset))
    keys = key_range(a.keys)
    layers = a.layers or fam.num_blocks
    B, nh, nkv, hs, longest = a.batch, fam.num_heads, fam.num_kv_heads, fam.head_dim, max(keys)
    q = torch.randn(B, nh, 1, hs, dtype=dtype, device=dev)                                 # (B, nh, 1, hs)
    k_all = torch.randn(B, nkv, longest, hs, dtype=dtype, device=dev)                      # (B, nkv, L, hs)
    v_all = torch.randn_like(k_all)
    steps: Dict[str, Dict[int, List[float]]] = {"rounded": {S: [] for S in keys}, "contiguous": {S: [] for S in keys}}
    with torch.inference_mode(), attention_kernels(dev):
        contexts = {S: fam.context(torch.ones(B, S, dtype=torch.long, device=dev), 1, dtype) for S in keys}
        for _ in range(a.rounds):
            for S, ctx in contexts.items():
                k, v = k_all[:, :, :S], v_all[:, :, :S]
                for way in steps:
                    mask = ctx.mask if way == "rounded" or ctx.mask is None else ctx.mask.contiguous()
                    step_ctx = dataclasses.replace(ctx, mask=mask)
                    ops.attention(q, k, v, step_ctx)  # warm (allocator, kernel choice)
                    _sync(dev)
                    t0 = time.perf_counter()
                    for _ in range(layers):
                        ops.attention(q, k, v, step_ctx)
                    _sync(dev)
                    steps[way][S].append(time.perf_counter() - t0)
    out: Dict[str, Any] = {"preset": a.preset, "device": str(dev), "batch": B, "layers": layers, "keys": keys}
    for way, by_s in steps.items():
        med = {S: statistics.median(t) for S, t in by_s.items()}
        aligned = [m for S, m in med.items() if S % MASK_ALIGN == 0]
        other = [m for S, m in med.items() if S % MASK_ALIGN]
        out[way] = {"step_ms": {S: m * 1e3 for S, m in med.items()},
                    "aligned_ms": statistics.median(aligned) * 1e3 if aligned else None,
                    "other_ms": statistics.median(other) * 1e3 if other else None}
        print(f"{way:>10}: {layers} attention calls, S a multiple of {MASK_ALIGN} {out[way]['aligned_ms']:.3f} ms, "
              f"others {out[way]['other_ms']:.3f} ms" if aligned and other else f"{way:>10}: {out[way]['step_ms']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
