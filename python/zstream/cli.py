"""The ``zstream`` command: demo, generate, info, make-checkpoint, pack, bench."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import ZStreamError


def _cache_dir() -> Path:
    base = os.environ.get("ZSTREAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zstream")
    return Path(base)


def _dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise SystemExit(f"unknown dtype {name!r}: use one of {', '.join(table)}")
    return table[name]


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory or Hugging Face repo id (from the local cache)")
    p.add_argument("--offload", default="auto", choices=["auto", "none", "cpu", "nvme", "ats"])
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: the checkpoint's; fp32 on CPU)")
    p.add_argument("--gpu-memory", default=None, help="device budget, e.g. 16GiB (default: free memory)")
    p.add_argument("--prefetch", type=int, default=2, help="blocks in flight ahead of the compute")
    p.add_argument("--max-resident-blocks", type=int, default=None, help="0 streams every block")
    p.add_argument("--download", action="store_true", help="allow downloading a repo id missing from the cache")
    p.add_argument("--quantize", default=None, choices=["int4", "int8"],
                   help="quantize the blocks' linear weights while loading (offload none/cpu/auto)")
    p.add_argument("--group-size", type=int, default=64, help="inputs per quantization group (default 64)")


def _load(a: argparse.Namespace, **extra):
    from .loading import load

    return load(a.model, offload=a.offload, device=a.device, dtype=_dtype(a.dtype), gpu_memory=a.gpu_memory,
                prefetch=a.prefetch, max_resident_blocks=a.max_resident_blocks, download=a.download,
                quantize=a.quantize, group_size=a.group_size, **extra)


def cmd_demo(a: argparse.Namespace) -> int:
    """Write a small synthetic BLOOM once, stream it from disk (offload="nvme"), generate, report speed."""
    import torch

    from . import synthetic
    from .loading import load

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = _cache_dir() / "demo" / a.preset
    if not (path / "config.json").exists():
        print(f"writing a random-weight {a.preset} checkpoint to {path} (once)")
        synthetic.make_checkpoint(a.preset, path, dtype=torch.float16)
    model = load(path, offload="nvme", device=device, max_resident_blocks=0, progress=False)
    print(model.plan)
    base = ["The Grace Hopper superchip", "Streaming weights from disk"]
    prompts = [base[i % len(base)] for i in range(a.batch)]
    model.generate(prompts[:1], max_new_tokens=1)  # warm-up: kernels, allocator, page tables
    t0 = time.perf_counter()
    texts = model.generate(prompts, max_new_tokens=a.max_new_tokens)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for t in texts if isinstance(texts, list) else [texts]:
        print(repr(t[:120]))
    steps = a.max_new_tokens  # one forward pass per new token (the first one is the prefill)
    step_s = dt / steps
    moved = model.plan.streamed_bytes / step_s / 1e9
    print(f"\n{len(prompts) * a.max_new_tokens / dt:.2f} tokens/s, {step_s * 1e3:.1f} ms per forward pass on {device}")
    if model.plan.link_gbps:
        print(f"streamed {model.plan.streamed_bytes / 1e9:.2f} GB per pass at {moved:.2f} GB/s: "
              f"{100 * moved / model.plan.link_gbps:.0f}% of the {model.plan.link} limit "
              f"({model.plan.link_gbps:.2f} GB/s, measured in this run)")
    model.close()
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    model = _load(a)
    out = model.generate(a.prompt, max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                         temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print(out)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    model = _load(a, progress=False)
    print(model.plan)
    return 0


def cmd_make_checkpoint(a: argparse.Namespace) -> int:
    from . import synthetic

    path = synthetic.make_checkpoint(a.name, a.out, dtype=_dtype(a.dtype) or _dtype("fp16"))
    print(path)
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from .packing import pack

    path = pack(a.model, a.out, quantize=a.quantize, group_size=a.group_size, symmetric=a.symmetric,
                shard_size=a.shard_size, device=a.device, progress=not a.quiet)
    print(path)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zstream", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="write a small synthetic BLOOM, stream it from disk, generate, report speed")
    d.add_argument("--preset", default="bloom-560m")
    d.add_argument("--device", default=None)
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_load_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="the plan: resident vs streamed, bytes per step, predicted step time")
    _add_load_args(i)
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint of real shapes")
    m.add_argument("name", help="preset (bloom-7b1, llama-2-7b, ...) or a config.json path")
    m.add_argument("out")
    m.add_argument("--dtype", default="fp16")
    m.set_defaults(func=cmd_make_checkpoint)

    k = sub.add_parser("pack", help="write a copy of a checkpoint with its linear weights quantized (int4/int8)")
    k.add_argument("model", help="checkpoint directory or Hugging Face repo id (from the local cache)")
    k.add_argument("out", help="new directory for the packed checkpoint (must not exist, or be empty)")
    k.add_argument("--quantize", required=True, choices=["int4", "int8"])
    k.add_argument("--group-size", type=int, default=64, help="inputs per fp16 scale (default 64)")
    k.add_argument("--symmetric", action="store_true", help="no per-group zero: scale only")
    k.add_argument("--shard-size", default="4GB", help="largest shard, e.g. 4GB or 2GiB (blocks are never split)")
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where quantization runs")
    k.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    k.set_defaults(func=cmd_pack)

    from .bench import add_arguments

    b = sub.add_parser("bench", help="decode/prefill timings against the link bound (see docs/performance.md)")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ZStreamError as e:
        print(f"zstream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
