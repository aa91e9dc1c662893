"""The ``zstream`` command: demo, generate, info, make-checkpoint, pack, bench.

Every bad input ends in one line: argparse's usage error for what the parser can check, ``zstream: error: ...``
(exit status 2) for every ``ZStreamError``; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, List, Optional

from ..errors import ZStreamError
from .args import DTYPE_CHOICES, OFFLOAD_CHOICES, positive, size


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    p.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES)
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="compute dtype (default: the checkpoint's; fp32 on the CPU)")
    p.add_argument("--gpu-memory", type=size, default=None, help="device budget, e.g. 16GiB (default: free memory)")
    p.add_argument("--prefetch", type=positive, default=2, help="blocks in flight ahead of the compute")
    p.add_argument("--max-resident-blocks", type=int, default=None, help="0 streams every block")
    p.add_argument("--offline", action="store_true", help="never download a repo id missing from the local cache")
    p.add_argument("--quantize", default=None, choices=["int4", "int8"],
                   help="quantize the blocks' linear weights while loading (offload none/cpu/auto)")
    p.add_argument("--group-size", type=positive, default=64, help="inputs per quantization group (default 64)")
    p.add_argument("--compress", default=None, choices=["lossless"],
                   help="entropy-code the blocks' bf16/fp16 linear weights while loading, bit-exact (offload none/cpu)")


def load_model(a: argparse.Namespace, **extra: Any) -> Any:
    from ..api.load import load

    return load(a.model, offload=a.offload, device=a.device, dtype=a.dtype, gpu_memory=a.gpu_memory,
                prefetch=a.prefetch, max_resident_blocks=a.max_resident_blocks, download=False if a.offline else None,
                quantize=a.quantize, group_size=a.group_size, compress=a.compress, **extra)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import demo

    return demo(preset=a.preset, device=a.device, batch=a.batch, max_new_tokens=a.max_new_tokens)


def cmd_generate(a: argparse.Namespace) -> int:
    from transformers import TextStreamer

    with load_model(a) as model:
        if model.synthetic:
            print(f"note: {a.model} holds random weights: the text is noise", file=sys.stderr)
        prompt: Any = [{"role": "user", "content": a.prompt}] if a.chat else a.prompt
        streamer = (TextStreamer(model.tokenizer, skip_prompt=a.chat, skip_special_tokens=True)
                    if model.tokenizer is not None else None)
        kwargs = {"max_new_tokens": a.max_new_tokens, "do_sample": a.sample, "seed": a.seed}
        kwargs.update({k: v for k, v in (("temperature", a.temperature), ("top_k", a.top_k), ("top_p", a.top_p),
                                         ("repetition_penalty", a.repetition_penalty)) if v is not None})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the random-weights note is printed above
            out = model.generate(prompt, streamer=streamer, progress=False, **kwargs)
        if streamer is None:
            print(out)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    with load_model(a, progress=False) as model:
        print(repr(model))
        print(model.plan)
    return 0


def cmd_make_checkpoint(a: argparse.Namespace) -> int:
    from ..api.synthetic import make_checkpoint

    print(make_checkpoint(a.name, a.out, dtype=a.dtype, in_memory=a.in_memory, blocks=a.blocks))
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from ..api.pack import pack

    path = pack(a.model, a.out, quantize=None if a.quantize == "none" else a.quantize, group_size=a.group_size,
                symmetric=a.symmetric, tensor_parallel=a.tensor_parallel, compress=a.compress,
                shard_size=a.shard_size, device=a.device, progress=not a.quiet)
    print(path)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zstream", description=__doc__.split("\n")[0])
    from .. import __version__

    p.add_argument("--version", action="version", version=f"zstream {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="write a small random-weight BLOOM once, stream it from disk, report speed")
    d.add_argument("--preset", default="bloom-560m", help="synthetic preset to write and stream (default bloom-560m)")
    d.add_argument("--device", default=None)
    d.add_argument("--batch", type=positive, default=2)
    d.add_argument("--max-new-tokens", type=positive, default=8)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="generate text from a prompt, printed as it comes")
    add_load_arguments(g)
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    g.add_argument("--max-new-tokens", type=positive, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="the plan: resident vs streamed, bytes per step, predicted step time")
    add_load_arguments(i)
    i.set_defaults(func=cmd_info)

    from ..api.synthetic import PRESETS

    presets = ", ".join(PRESETS)
    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint of real shapes",
                       description=f"Write a random-weight checkpoint of real shapes. Presets: {presets}.")
    m.add_argument("name", help=f"a preset ({presets}) or a config.json path")
    m.add_argument("out", help="a new directory (must not exist, or be empty)")
    m.add_argument("--dtype", default="fp16", choices=DTYPE_CHOICES[1:])
    m.add_argument("--in-memory", action="store_true",
                   help="write only the config and tokenizer: a load makes the same weights in host memory (for "
                        "models larger than the disk, offload cpu or none)")
    m.add_argument("--blocks", type=positive, default=None,
                   help="only the first N blocks (real width, reduced depth)")
    m.set_defaults(func=cmd_make_checkpoint)

    k = sub.add_parser("pack", help="write a copy of a checkpoint with its linear weights quantized (int4/int8) or "
                                    "losslessly compressed, and/or laid out for tensor-parallel ranks")
    k.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    k.add_argument("out", help="new directory for the packed checkpoint (must not exist, or be empty)")
    k.add_argument("--quantize", default="none", choices=["int4", "int8", "none"],
                   help="int4/int8: quantize the blocks' linear weights; none (default): keep them as they are")
    k.add_argument("--compress", default="none", choices=["none", "lossless"],
                   help="lossless: entropy-code the blocks' bf16/fp16 linear weights, bit-exact (for offload nvme)")
    k.add_argument("--tensor-parallel", type=positive, default=1, metavar="N",
                   help="one checkpoint per rank, each with its piece of every block (for offload nvme over N GPUs)")
    k.add_argument("--group-size", type=positive, default=64, help="inputs per fp16 scale (default 64)")
    k.add_argument("--symmetric", action="store_true", help="no per-group zero: scale only")
    k.add_argument("--shard-size", type=size, default="4GB",
                   help="largest shard, e.g. 4GB or 2GiB (blocks are never split)")
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where quantization runs")
    k.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    k.set_defaults(func=cmd_pack)

    from .bench import add_arguments

    b = sub.add_parser("bench", help="decode/prefill timings against the link bound (see docs/performance.md)")
    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def _one_line_warnings(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                       line: Optional[str] = None) -> None:
    print(f"zstream: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings
        try:
            return args.func(args)
        except ZStreamError as e:
            print(f"zstream: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("zstream: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
