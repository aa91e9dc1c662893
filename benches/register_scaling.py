"""What a pinned load cannot avoid, measured: touching fresh memory (the kernel zeroes every page), a 16-thread memcpy,
and cudaHostRegister of 14 GiB from 1, 2, 4, 8 and 14 threads at once (ctypes drops the GIL, so the threads really
call the driver concurrently).

    python benches/register_scaling.py out.json            (GPU machine; ~15 s)
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time
from pathlib import Path

import torch

from zstream.foundations.cuda import _bundled_cudart, _loaded_cudart

GiB = 1 << 30
N = 14  # GiB: the bloom-7b1 checkpoint


def main() -> int:
    torch.zeros(1, device="cuda")  # the runtime torch loads is the one zstream registers through
    lib = ctypes.CDLL(_loaded_cudart() or _bundled_cudart())
    reg, unreg = lib.cudaHostRegister, lib.cudaHostUnregister
    reg.argtypes, unreg.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint], [ctypes.c_void_p]
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    raw = libc.mmap(None, N * GiB + (2 << 20), 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    base = (raw + (2 << 20) - 1) & ~((2 << 20) - 1)  # 2 MiB aligned, THP advised: as zstream's arenas
    libc.madvise(ctypes.c_void_p(base), ctypes.c_size_t(N * GiB), 14)  # MADV_HUGEPAGE
    arena = torch.frombuffer((ctypes.c_uint8 * (N * GiB)).from_address(base), dtype=torch.uint8)
    res = {}
    t0 = time.perf_counter()
    arena.fill_(1)
    res["touch_fresh_s"] = time.perf_counter() - t0
    src = torch.full((N * GiB,), 2, dtype=torch.uint8)
    t0 = time.perf_counter()
    arena.copy_(src)
    res["memcpy_s"] = time.perf_counter() - t0
    res["memcpy_gbps"] = N * GiB / res["memcpy_s"] / 1e9
    pieces = [base + i * GiB for i in range(N)]
    for threads in (1, 2, 4, 8, 14):
        def work(mine: list) -> None:
            for p in mine:
                assert reg(p, GiB, 0) == 0
        ths = [threading.Thread(target=work, args=(pieces[i::threads],)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        res[f"register_{threads}_threads_s"] = time.perf_counter() - t0
        for p in pieces:
            unreg(p)
    for k, v in res.items():
        print(f"{k}: {v:.3f}")
    Path(sys.argv[1]).write_text(json.dumps({**res, "gib": N, "device": torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
