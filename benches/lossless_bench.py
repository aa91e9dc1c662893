"""zstream's lossless code beside DFloat11 on the same tensors, in one run: compressed size, encode time, and (on a
GPU) decode GB/s, each decode checked bit for bit. Decode times twice: a call between CUDA events (what a caller
waits for, the host's launch work included) and the kernels alone (the profiler's records).

    python benches/lossless_bench.py --elements 16777216 --dfloat11 .device/df11 --json out.json

``--dfloat11 DIR``: the unpacked ``dfloat11`` 0.5.0 wheel and ``dahuffman`` (its encoder is pure Python); its own
encoder functions (``dfloat11_utils``) and its CUDA kernel (``decode.ptx``) are called directly, the kernel through
the CUDA driver API (ctypes) rather than cupy, which the GPU machine does not have. Tensors: bfloat16 Gaussian
N(0, 0.02) and Student-t(3) x 0.02 (heavy tails), plus fp16 Gaussian for zstream alone (DFloat11 is bf16 only).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from zstream.foundations.lossless import encode
from zstream.foundations.lossless.kernels import decode_many
from zstream.foundations.measure import cuda_median_ms


def tensor(dist: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        x = torch.randn(n, generator=g)
    else:
        torch.manual_seed(seed)
        x = torch.distributions.StudentT(3.0).sample((n,))
    return (0.02 * x).to(dtype)


def gpu_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Median milliseconds of a call of ``fn`` on the GPU after a warm-up, between events around it: the kernels and
    whatever of the call's host work (building arguments, launching) the GPU waits for."""
    fn()
    torch.cuda.synchronize()
    return cuda_median_ms(fn, repeats)


def kernel_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Milliseconds a call of ``fn`` keeps the GPU's kernels busy, from the profiler's kernel records (CUPTI): the
    decoder's own speed, without the host's launch overhead (copies are left out; ours copies a descriptor of a
    few dozen bytes a call)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.lower().startswith(("memcpy", "memset"))]
    if not kernels:  # a profiler without CUPTI records none
        return float("nan")
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / repeats


def timings(fn: Callable[[], Any], numel: int) -> Dict[str, float]:
    """A decode's call and kernel times and the GB/s of each (output bytes)."""
    call, kern = gpu_ms(fn), kernel_ms(fn)
    return {"decode_ms": call, "decode_gbps": 2 * numel / call / 1e6, "kernel_ms": kern,
            "kernel_gbps": 2 * numel / kern / 1e6}


def ours(ws: List[torch.Tensor], gpu: bool) -> Dict[str, Any]:
    """Code ``ws``; on a GPU, decode them all in one launch (``decode_many``, as a streamed block is decoded)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        cs = [encode(w) for w in ws]
        times.append(time.perf_counter() - t)
    numel = sum(w.numel() for w in ws)
    row: Dict[str, Any] = {"system": "zstream", "ratio": sum(c.nbytes for c in cs) / (2 * numel),
                           "encode_s": statistics.median(times), "lanes": sum(c.lanes for c in cs)}
    if gpu:
        ds = [c.to("cuda") for c in cs]
        outs = [torch.empty(w.shape, dtype=w.dtype, device="cuda") for w in ws]
        row.update(**timings(lambda: decode_many(ds, outs), numel),
                   bit_exact=all(torch.equal(o.cpu().view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, ws)))
    return row


# ---- DFloat11 ------------------------------------------------------------------------------------------------------
def _load_utils(root: Path) -> Any:
    sys.path.insert(0, str(root))  # dahuffman
    spec = importlib.util.spec_from_file_location("dfloat11_utils", root / "dfloat11" / "dfloat11_utils.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Ptx:
    """A kernel of a PTX file, launched through the CUDA driver API on torch's current context and stream."""

    def __init__(self, path: Path, name: str) -> None:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the primary context is current now
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.module, self.fn = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.cu.cuModuleLoadData(ctypes.byref(self.module), path.read_bytes() + b"\0"))
        self._check(self.cu.cuModuleGetFunction(ctypes.byref(self.fn), self.module, name.encode()))

    def _check(self, status: int) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA driver error {status}")

    def __call__(self, grid: int, block: int, shared: int, args: List[Any]) -> None:
        if shared > 48 * 1024:
            self._check(self.cu.cuFuncSetAttribute(self.fn, 8, shared))  # MAX_DYNAMIC_SHARED_SIZE_BYTES
        values = [ctypes.c_uint64(a) if i < 6 else ctypes.c_uint32(a) for i, a in enumerate(args)]
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.cu.cuLaunchKernel(self.fn, grid, 1, 1, block, 1, 1, shared, stream, params, None))


def dfloat11(ws: List[torch.Tensor], root: Path, gpu: bool) -> Dict[str, Any]:
    """DFloat11 on ``ws``: one code for all of them, decoded in one launch (as it decodes a transformer block)."""
    utils = _load_utils(root)
    threads, per_thread = 512, 8  # dfloat11.py's defaults
    w = torch.cat([x.reshape(-1) for x in ws])
    t = time.perf_counter()
    _, counter = utils.get_codec(w)
    codec, _, table = utils.get_32bit_codec(counter)
    luts = utils.get_luts(table)
    encoded, other, positions, gaps, _ = utils.encode_weights(ws, codec, per_thread, threads)
    encode_s = time.perf_counter() - t
    size = encoded.numel() + other.numel() + positions.numel() * 4 + gaps.numel() + luts.numel()
    row: Dict[str, Any] = {"system": "dfloat11 0.5.0", "ratio": size / (2 * w.numel()), "encode_s": encode_s}
    if gpu:
        kernel = _Ptx(root / "dfloat11" / "decode.ptx", "decode")
        dev = [x.cuda() for x in (luts, encoded, other, positions, gaps)]
        out = torch.empty(w.numel(), dtype=torch.bfloat16, device="cuda")
        pos = positions.view(torch.int32).numpy().view(np.uint32)
        shared = threads * 4 + 4 + int((pos[1:] - pos[:-1]).max()) * 2
        grid = -(-encoded.numel() // (threads * per_thread))

        def run() -> None:
            kernel(grid, threads, shared, [x.data_ptr() for x in dev] + [out.data_ptr(), luts.shape[0],
                                                                         encoded.numel(), w.numel()])

        row.update(**timings(run, w.numel()),
                   bit_exact=bool(torch.equal(out.cpu().view(torch.int16), w.view(torch.int16))))
    return row


def sweep(ws: List[torch.Tensor], configs: List[str]) -> List[Dict[str, Any]]:
    """The kernel's tuning (``decode_many``'s knobs) and the lane count, on the first of ``ws`` alone and on all of
    them in one launch, each decode checked bit for bit: ``--sweep "512:64:2,256:32:1"`` is elements a lane :
    lanes a program : warps."""
    rows = []
    for config in configs:
        per_lane, block, warps = (int(x) for x in config.split(":"))
        cs = [encode(w, lanes=max(1, w.numel() // per_lane)) for w in ws]
        ds = [c.to("cuda") for c in cs]
        outs = [torch.empty(w.shape, dtype=w.dtype, device="cuda") for w in ws]
        for k in sorted({1, len(ws)}):
            run = functools.partial(decode_many, ds[:k], outs[:k], block=block, warps=warps)
            numel = sum(w.numel() for w in ws[:k])
            times = timings(run, numel)
            exact = all(torch.equal(o.cpu().view(torch.int16), w.view(torch.int16)) for o, w in zip(outs, ws[:k]))
            rows.append({"config": config, "tensors": k, "ratio": cs[0].nbytes / (2 * ws[0].numel()), **times,
                         "bit_exact": exact})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=1 << 24)
    p.add_argument("--dfloat11", type=Path, default=None, help="the unpacked dfloat11 and dahuffman wheels")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--sweep", default=None, help="tune the kernel on the Gaussian bf16 tensor (see sweep())")
    p.add_argument("--together", type=int, default=4,
                   help="then this many Gaussian bf16 tensors decoded in one launch, as a block's weights are")
    a = p.parse_args()
    gpu = torch.cuda.is_available()
    rows = []
    if a.sweep and gpu:
        ws = [tensor("gaussian", a.elements, torch.bfloat16, seed) for seed in range(max(1, a.together))]
        rows = sweep(ws, a.sweep.split(","))
    for dist, dtype in (("gaussian", torch.bfloat16), ("student-t", torch.bfloat16), ("gaussian", torch.float16)):
        w = [tensor(dist, a.elements, dtype)]
        systems = [ours(w, gpu)]
        if a.dfloat11 is not None and dtype == torch.bfloat16:
            systems.append(dfloat11(w, a.dfloat11, gpu))
        for row in systems:
            row.update(dist=dist, dtype=str(dtype).removeprefix("torch."), elements=a.elements, tensors=1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.together > 1:
        ws = [tensor("gaussian", a.elements, torch.bfloat16, seed) for seed in range(a.together)]
        systems = [ours(ws, gpu)] + ([dfloat11(ws, a.dfloat11, gpu)] if a.dfloat11 is not None else [])
        for row in systems:
            row.update(dist="gaussian", dtype="bfloat16", elements=a.elements * a.together, tensors=a.together)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta: Dict[str, Optional[str]] = {"card": torch.cuda.get_device_name() if gpu else None,
                                      "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
