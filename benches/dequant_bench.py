#!/usr/bin/env python3
"""Dequantization speed on the GPU: ``zstream.foundations.quant.kernels`` (Triton) against the torch code it replaces.

    python3 benches/dequant_bench.py --json dequant.json          # time, print a table, write JSON
    python3 benches/dequant_bench.py --check                      # also assert bit-equality on the GPU
    python3 benches/dequant_bench.py --block 2048,4096 --warps 4,8   # tiling sweep of the Triton kernel
    python3 benches/dequant_bench.py --linear 1,16                # also decode-shaped dequantize + F.linear

Why: the streaming engine dequantizes each block's linear weights in its GPU slot while the next block crosses the
link. For int4 bloom-7b1 that link time is ~2 ms a block on an H100, so dequantization must cost a small fraction
of it; the kernel's target is >= 1 TB/s of fp16 output written.

What: the four linear weights of a bloom-7b1 block, (out, in) = (12288, 4096) query_key_value, (4096, 4096)
dense, (16384, 4096) dense_h_to_4h, (4096, 16384) dense_4h_to_h: 201M parameters. Random fp16 weights quantized on
the GPU with ``quant.scheme.quantize`` (int4 and int8, ``--group-size``, ``--symmetric``), then dequantized into a
preallocated output: by ``quant.kernels._triton_dequantize`` for each tiling asked for, and by
``quant.scheme.dequantize`` (the torch fallback). Each is timed with CUDA events around one call, ``--reps``
times after ``--warmup`` calls; the median is reported. Before each timed call 256 MB of other writes evict the L2
cache (50 MB on an H100), so no call finds its inputs or outputs cached by the one before.

Reported per weight and per block (the sum over the four weights): ms, GB/s of output written (``out_gbps``) and
GB/s of device memory moved, codes + scales + zeros read plus output written (``mem_gbps``), set against the
ceiling: a device-to-device copy of the block's fp16 bytes, counting bytes read plus written. ``--check``
compares every Triton output with the torch one bit for bit, for float16, bfloat16 and float32, and exits
non-zero on any difference.

``--linear ROWS``: decode-shaped ``x @ W.T`` over the same weights, x of ROWS rows: dequantize + ``F.linear``
(dequantize, then ``F.linear``) and ``F.linear`` on resident fp16 weights; ms per block and GB/s of packed
weight bytes.

The checkout's ``python/`` goes first on ``sys.path``, so the bench measures this checkout's kernels even where an
older zstream is installed (the kernels need no native extension). Needs: CUDA, torch, Triton.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from zstream.foundations.measure import cuda_median_ms  # noqa: E402
from zstream.foundations.quant import kernels  # noqa: E402
from zstream.foundations.quant import scheme as quant  # noqa: E402

BLOOM_7B1_BLOCK = {
    "query_key_value": (12288, 4096),
    "dense": (4096, 4096),
    "dense_h_to_4h": (16384, 4096),
    "dense_4h_to_h": (4096, 16384),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def int_list(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


_L2_FLUSH: Optional[torch.Tensor] = None


def time_ms(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    """Median over ``reps`` of one call's device time, CUDA events on the current stream, each call after 256 MB
    of other writes so no input or output is still in the L2 cache (as with triton's do_bench)."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return cuda_median_ms(fn, reps, before=_L2_FLUSH.zero_)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that comparisons tell -0.0 from 0.0."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def check(qts: Dict[str, quant.QuantizedTensor], label: str) -> List[str]:
    """Bit-equality of the Triton kernel and the torch code for every weight and output dtype; the failures."""
    failures = []
    for name, qt in qts.items():
        for dname, dtype in DTYPES.items():
            got = kernels.dequantize(qt, dtype)
            want = quant.dequantize(qt, dtype)
            if got.dtype != want.dtype or not torch.equal(bits(got), bits(want)):
                n = int((bits(got) != bits(want)).sum()) if got.shape == want.shape else got.numel()
                failures.append(f"{label} {name} {dname}: {n} of {got.numel()} outputs differ")
            del got, want
    return failures


def bench_config(qts: Dict[str, quant.QuantizedTensor], dtype: torch.dtype, fn_for: Callable[..., Any],
                 reps: int, warmup: int) -> Dict[str, Any]:
    """Time ``fn_for(qt, out)`` for each weight; per-weight and per-block numbers."""
    rows: Dict[str, Any] = {}
    total_ms = total_out = total_mem = 0.0
    for name, qt in qts.items():
        out = torch.empty(qt.shape, dtype=dtype, device="cuda")
        ms = time_ms(lambda qt=qt, out=out: fn_for(qt, out), reps, warmup)
        out_bytes = out.numel() * out.element_size()
        mem_bytes = out_bytes + qt.nbytes
        rows[name] = {"ms": ms, "out_gbps": out_bytes / ms / 1e6, "mem_gbps": mem_bytes / ms / 1e6}
        total_ms += ms
        total_out += out_bytes
        total_mem += mem_bytes
        del out
    rows["block"] = {"ms": total_ms, "out_gbps": total_out / total_ms / 1e6, "mem_gbps": total_mem / total_ms / 1e6}
    return rows


def copy_ceiling(reps: int, warmup: int) -> Dict[str, float]:
    """The card's practical bandwidth: a device-to-device copy as large as the block's fp16 weights, counting bytes
    read plus written (what ``mem_gbps`` is to be set against)."""
    n = sum(a * b for a, b in BLOOM_7B1_BLOCK.values())
    src = torch.empty(n, dtype=torch.float16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps, warmup)
    return {"ms": ms, "mem_gbps": 2 * src.numel() * src.element_size() / ms / 1e6}


def bench_linear(qts: Dict[str, quant.QuantizedTensor], rows: int, dtype: torch.dtype, reps: int,
                 warmup: int) -> List[Dict[str, Any]]:
    """Decode-shaped matmuls over the block's weights: dequantize + F.linear against
    F.linear on resident fp16 weights (2 bytes a weight read, no dequantization): what a fused kernel would have
    to beat."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    xs = {n: torch.randn(rows, qt.shape[1], generator=gen, device="cuda").to(dtype) for n, qt in qts.items()}
    dense = {n: kernels.dequantize(qt, dtype) for n, qt in qts.items()}
    impls: List[Tuple[str, Callable[[str], Any]]] = [
        ("dequantize + F.linear", lambda n: torch.nn.functional.linear(xs[n], kernels.dequantize(qts[n], dtype))),
        ("F.linear fp16 resident", lambda n: torch.nn.functional.linear(xs[n], dense[n])),
    ]
    out = []
    for name, fn in impls:
        per = {}
        for n, qt in qts.items():
            ms = time_ms(lambda fn=fn, n=n: fn(n), reps, warmup)
            per[n] = {"ms": ms, "packed_gbps": qt.nbytes / ms / 1e6}
        total = sum(v["ms"] for v in per.values())
        per["block"] = {"ms": total, "packed_gbps": sum(qt.nbytes for qt in qts.values()) / total / 1e6}
        out.append({"impl": name, "rows": rows, "weights": per})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--check", action="store_true", help="assert bit-equality of Triton and torch on the GPU")
    ap.add_argument("--bits", type=int_list, default=[4, 8], help="comma list of 4, 8")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="output dtype timed")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--block", type=int_list, default=None, help="Triton outputs per program (default: the module's)")
    ap.add_argument("--warps", type=int_list, default=None, help="Triton warps per program (default: the module's)")
    ap.add_argument("--gather", action="store_true", help="also time the per-element scale gather variant")
    ap.add_argument("--no-torch", action="store_true", help="skip timing the torch fallback")
    ap.add_argument("--linear", type=int_list, default=None, metavar="ROWS",
                    help="also time dequantize + F.linear for these row counts, e.g. 1,16")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("dequant_bench: needs a CUDA device", file=sys.stderr)
        return 2
    if kernels.backend(torch.device("cuda")) != "triton":
        print("dequant_bench: Triton is not importable; nothing to measure", file=sys.stderr)
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    blocks = args.block or [kernels.DEFAULT_BLOCK]
    warps = args.warps or [kernels.DEFAULT_WARPS]
    gen = torch.Generator(device="cuda").manual_seed(0)
    results: Dict[str, Any] = {
        "bench": "dequant", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "group_size": args.group_size, "symmetric": args.symmetric,
        "dtype": args.dtype, "reps": args.reps, "shapes": BLOOM_7B1_BLOCK, "runs": [],
    }
    failures: List[str] = []
    table = []
    for nbits in args.bits:
        qts = {}
        for name, shape in BLOOM_7B1_BLOCK.items():
            w = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16) * 0.02
            qts[name] = quant.quantize(w, nbits, args.group_size, args.symmetric)
            del w
        label = f"int{nbits}{'-sym' if args.symmetric else ''}-g{args.group_size}"
        if args.check:
            failures += check(qts, label)
        configs = []
        for b in blocks:
            for nw in warps:
                configs.append((f"triton b{b} w{nw}", dict(block=b, num_warps=nw, broadcast=None)))
                if args.gather:
                    configs.append((f"triton-gather b{b} w{nw}", dict(block=b, num_warps=nw, broadcast=False)))
        for cname, kw in configs:
            def fn(qt: quant.QuantizedTensor, out: torch.Tensor, kw: Dict[str, Any] = kw) -> None:
                kernels._triton_dequantize(qt, dtype, out, **kw)
            rows = bench_config(qts, dtype, fn, args.reps, args.warmup)
            results["runs"].append({"quant": label, "bits": nbits, "impl": cname, **kw, "weights": rows})
            table.append((label, cname, rows["block"]))
        if not args.no_torch:
            def torch_fn(qt: quant.QuantizedTensor, out: torch.Tensor) -> None:
                out.copy_(quant.dequantize(qt, dtype))
            rows = bench_config(qts, dtype, torch_fn, max(5, args.reps // 5), 2)
            results["runs"].append({"quant": label, "bits": nbits, "impl": "torch", "weights": rows})
            table.append((label, "torch", rows["block"]))
        for m in args.linear or []:
            for r in bench_linear(qts, m, dtype, args.reps, args.warmup):
                results["runs"].append({"quant": label, "bits": nbits, "kind": "linear", **r})
                table.append((label, f"{r['impl']} m{m}", r["weights"]["block"]))
        del qts
        torch.cuda.empty_cache()

    results["copy"] = copy_ceiling(args.reps, args.warmup)
    copy_ms = results["copy"]["ms"]

    print(f"{results['card']}  torch {results['torch']}  triton {results['triton']}  output {args.dtype}")
    print(f"{'quant':<16} {'impl':<26} {'ms/block':>9} {'out GB/s':>9} {'mem GB/s':>9}")
    for label, cname, r in table:
        if "packed_gbps" in r:  # a linear row: GB/s of packed weight bytes consumed
            print(f"{label:<16} {cname:<26} {r['ms']:>9.3f} {'':>9} {'':>9}  packed {r['packed_gbps']:.0f} GB/s")
        else:
            print(f"{label:<16} {cname:<26} {r['ms']:>9.3f} {r['out_gbps']:>9.0f} {r['mem_gbps']:>9.0f}")
    print(f"{'copy (ceiling)':<16} {'fp16 block d2d copy':<26} {copy_ms:>9.3f} {'':>9} "
          f"{results['copy']['mem_gbps']:>9.0f}")
    results["check"] = None if not args.check else {"ok": not failures, "failures": failures}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if failures:
        print("BIT MISMATCH:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if args.check:
        print("check: Triton == torch bit for bit (float16, bfloat16, float32; every weight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
