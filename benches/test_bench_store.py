"""pytest-benchmark: ``WeightStore.read`` and ``fetch``/``wait``/``release`` of one transformer block, per reader.

The block has bloom-7b1's structure (fp16): query_key_value 3H x H, dense H x H, dense_h_to_4h 4H x H,
dense_4h_to_h H x 4H, plus the layernorm weights/biases and the linear biases. H is 1024 by default so CI stays
fast (about 24 MiB a block); set ``ZSTREAM_BENCH_HIDDEN=4096`` for bloom-7b1's real size (about 384 MiB a block).

    pytest benches/ --benchmark-disable                   # smoke run (CI): every benchmark once, checked
    ZSTREAM_BENCH_HIDDEN=4096 pytest benches/ --benchmark-columns=median,rounds --benchmark-sort=name

Environment: ``ZSTREAM_BENCH_HIDDEN`` (1024), ``ZSTREAM_BENCH_ROUNDS`` (10), ``ZSTREAM_BENCH_DIR`` (where the
checkpoint is written and kept between runs; default: a pytest temporary directory, rewritten each session).

Each benchmark's ``extra_info`` carries ``GB/s`` (decimal, tensor bytes over the median of its own timed calls,
so it is there even with ``--benchmark-disable``), ``block_bytes`` and ``read_bytes`` (what the plan moves).
``uring`` and ``pread`` read with O_DIRECT where the filesystem allows it; ``mmap`` goes through the page cache,
which holds this small file after the first round, so its numbers are warm-cache numbers.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import zstream
from zstream import _core

HIDDEN = int(os.environ.get("ZSTREAM_BENCH_HIDDEN", "1024"))
ROUNDS = max(1, int(os.environ.get("ZSTREAM_BENCH_ROUNDS", "10")))
BLOCKS = 3  # the benchmarks read the middle one: neither at the start nor at the end of the file
READERS = ["uring", "pread", "mmap"]


def block_shapes(prefix: str, h: int) -> dict[str, tuple[int, ...]]:
    """bloom's per-block tensors, in its checkpoint order."""
    return {
        f"{prefix}.input_layernorm.weight": (h,),
        f"{prefix}.input_layernorm.bias": (h,),
        f"{prefix}.self_attention.query_key_value.weight": (3 * h, h),
        f"{prefix}.self_attention.query_key_value.bias": (3 * h,),
        f"{prefix}.self_attention.dense.weight": (h, h),
        f"{prefix}.self_attention.dense.bias": (h,),
        f"{prefix}.post_attention_layernorm.weight": (h,),
        f"{prefix}.post_attention_layernorm.bias": (h,),
        f"{prefix}.mlp.dense_h_to_4h.weight": (4 * h, h),
        f"{prefix}.mlp.dense_h_to_4h.bias": (4 * h,),
        f"{prefix}.mlp.dense_4h_to_h.weight": (h, 4 * h),
        f"{prefix}.mlp.dense_4h_to_h.bias": (h,),
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bloom-shaped checkpoint of BLOCKS blocks, fp16, random bytes."""
    base = os.environ.get("ZSTREAM_BENCH_DIR")
    d = Path(base) if base else tmp_path_factory.mktemp("bench")
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"bloom-h{HIDDEN}-b{BLOCKS}.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        tensors = {}
        for b in range(BLOCKS):
            for name, shape in block_shapes(f"h.{b}", HIDDEN).items():
                n = torch.Size(shape).numel()
                tensors[name] = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, generator=gen).view(
                    torch.float16).reshape(shape)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def block() -> list[str]:
    return list(block_shapes(f"h.{BLOCKS // 2}", HIDDEN))


def reader_or_skip(reader: str) -> str:
    if reader == "uring":
        why = _core.uring_unavailable_reason()
        if why is not None:
            pytest.skip(f"io_uring unavailable: {why}")
    return reader


def run(benchmark, fn: Callable[[], int], nbytes: int, read_bytes: int, reader: str) -> None:
    """Benchmark ``fn`` (which returns the bytes it delivered) and record GB/s from our own timings."""
    times: list[float] = []

    def timed() -> int:
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
        assert n == nbytes
        return n

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = statistics.median(times[1:] or times)  # the warm-up call (first) is left out, unless it is all
    benchmark.extra_info.update({
        "reader": reader,
        "hidden": HIDDEN,
        "block_bytes": nbytes,
        "read_bytes": read_bytes,
        "GB/s": round(nbytes / median / 1e9, 3),
        "rounds": max(1, len(times) - 1),
    })


def check_against_safetensors(ckpt: Path, got: dict[str, torch.Tensor]) -> None:
    with safe_open(ckpt, "pt") as ref:
        for name, t in got.items():
            want = ref.get_tensor(name)
            assert t.dtype == want.dtype and t.shape == want.shape, name
            assert torch.equal(t.view(torch.int16), want.view(torch.int16)), name


@pytest.mark.parametrize("reader", READERS)
def test_read_block(benchmark, ckpt: Path, block: list[str], reader: str) -> None:
    reader_or_skip(reader)
    with zstream.WeightStore.open(ckpt, pin=False) as store:
        nbytes = sum(store.info(n).nbytes for n in block)
        last: dict[str, torch.Tensor] = {}

        def read() -> int:
            last.clear()
            last.update(store.read(block, reader=reader))
            return sum(t.nbytes for t in last.values())

        run(benchmark, read, nbytes, store.plan(block)[0], reader)
        check_against_safetensors(ckpt, last)


@pytest.mark.parametrize("reader", READERS)
def test_fetch_wait_release_block(benchmark, ckpt: Path, block: list[str], reader: str) -> None:
    reader_or_skip(reader)
    with zstream.WeightStore.open(ckpt, pin=False, max_slots=2) as store:
        nbytes = sum(store.info(n).nbytes for n in block)
        checked = False

        def fetch() -> int:
            nonlocal checked
            ticket = store.fetch(block, reader=reader)
            weights = ticket.wait()
            n = sum(t.nbytes for t in weights.values())
            if not checked:  # once, outside the steady state: the slot's bytes are the checkpoint's
                check_against_safetensors(ckpt, weights)
                checked = True
            del weights
            ticket.release()
            return n

        run(benchmark, fetch, nbytes, store.plan(block)[0], reader)
        # Every slot comes back once released. Not necessarily at once: the reader thread drops its own
        # reference to the job just after waking the waiter, so give it a moment.
        deadline = time.monotonic() + 2.0
        while store.pool_stats[1] != store.pool_stats[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        slots, free = store.pool_stats
        assert free == slots <= 2
