"""``offload="ats"``: weights stay in host memory and the GPU's kernels read them where they lie.

On a GH200 the GPU reads ordinary pageable memory through the CPU's page tables (ATS over NVLink-C2C), so the
arenas are plain anonymous memory on the NUMA node next to the GPU: no pinning, no staging copies. On GPUs without
ATS (PCIe H100s) the same mode runs zero-copy through mapped pinned memory: each arena is registered with
``cudaHostRegisterMapped`` and exported to torch as a CUDA tensor whose pointer is the host address.

Reading remote memory from a kernel pays off while each weight byte is used by few tokens (decode). When a
forward pass carries many tokens (prefill), a weight byte is reused by every token and a copy into a GPU slot
with the copy engine wins; the crossover (tokens per pass) is measured at load (``measure_crossover``), not
guessed. The builder (``build.build_in_place``) reads the arenas and measures.
"""

from __future__ import annotations

from functools import partial
from typing import List

import torch

from ..foundations.measure import cuda_median_ms
from .ring import DeviceRing
from .weights import Weights


class InPlaceBlocks:  # GPU only: kernels read host memory in place
    """Blocks read in place from host memory; passes with many tokens copy them through a device ring instead."""

    def __init__(self, in_place: List[Weights], ring: DeviceRing, copy_from_tokens: int) -> None:
        self.in_place = in_place  # views of host memory the kernels read: built once, at load
        self.ring = ring
        self.copy_from_tokens = copy_from_tokens
        self.copying = False

    def begin_pass(self, tokens: int) -> None:
        self.ring.begin_pass(tokens)  # restarts the ring after a pass that stopped midway
        copying = tokens >= self.copy_from_tokens
        if copying != self.copying and self.ring.issued:
            self.ring.reset()  # the ring prefetches across passes; switching modes drops what it holds
        self.copying = copying

    def acquire(self, block: int) -> Weights:
        if self.copying:
            return self.ring.acquire(block)
        return self.in_place[block]

    def release(self, block: int) -> None:
        if self.copying:
            self.ring.release(block)

    def reset(self) -> None:
        self.ring.reset()

    def rings(self) -> List[DeviceRing]:
        return [self.ring]

    def close(self) -> None:
        self.ring.close()


def measure_crossover(in_place: torch.Tensor, host: torch.Tensor,  # GPU only
                      device: torch.device) -> tuple[int, float, dict]:
    """Tokens per pass from which copying a weight to the device beats reading it in place, and the in-place read
    bandwidth (GB/s). ``in_place``/``host``: the same (out, in) weight as a CUDA view of host memory and as a CPU
    tensor."""
    w_dev = torch.empty_like(in_place, device=device)
    read_gbps = in_place.numel() * in_place.element_size() / (cuda_median_ms(lambda: in_place.sum(dtype=torch.float32))
                                                              / 1e3) / 1e9
    copy_ms = cuda_median_ms(lambda: w_dev.copy_(host, non_blocking=True))
    table = {}
    crossover = 1 << 30
    for n in (1, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(n, in_place.shape[1], dtype=in_place.dtype, device=device)
        remote = cuda_median_ms(partial(torch.matmul, x, in_place.T))
        local = max(copy_ms, cuda_median_ms(partial(torch.matmul, x, w_dev.T)))  # the ring overlaps copy and compute
        table[n] = (remote, local)
        if remote > local and crossover == 1 << 30:
            crossover = n
    return crossover, read_gbps, {"copy_ms": copy_ms, "matmul_ms": table}
