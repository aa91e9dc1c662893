"""One 16M-element bf16 weight decoded by the lossless kernel, for Nsight Compute to profile (the third launch):

    ncu --kernel-name regex:_decode_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SourceCounters --section SchedulerStats --section Occupancy python3 benches/lossless_ncu.py 512:32:1

The argument is elements a lane : lanes a program : warps (as ``lossless_bench.py --sweep`` takes them)."""

from __future__ import annotations

import sys

import torch

from zstream.foundations.lossless import encode, kernels


def main() -> int:
    per_lane, block, warps = (int(x) for x in sys.argv[1].split(":"))
    w = (0.02 * torch.randn(1 << 24, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    c = encode(w, lanes=w.numel() // per_lane)
    d = c.to("cuda")
    out = torch.empty(w.shape, dtype=w.dtype, device="cuda")
    for _ in range(3):
        kernels.decode_many([d], [out], block=block, warps=warps)
    torch.cuda.synchronize()
    exact = torch.equal(out.cpu().view(torch.int16), w.view(torch.int16))
    print("bit-exact" if exact else "NOT bit-exact")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
