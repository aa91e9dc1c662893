"""``zstream.launch``: run a function on N ranks from a notebook or a script, as ``torchrun --nproc-per-node N``
would start them, and get each rank's result back.

    def serve(prompt):
        model = zstream.load("ckpt/", offload="cpu")      # sharded over the ranks
        return model.generate(prompt, max_new_tokens=32)

    texts = zstream.launch(serve, 2, "The Grace Hopper superchip")   # [rank 0's text, rank 1's text]

The ranks are forked, so ``fn`` may be defined in a notebook cell; for that reason ranks that use the GPU need a
calling process that has not touched CUDA yet (a forked child cannot use a CUDA context its parent made; ranks on
the CPU can). Scripts can use torchrun instead.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

import torch

from ..errors import ParallelError, UsageError

_GRACE_S = 10.0  # after a rank fails, how long the others get to stop on their own (naming it) before being killed


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, **kwargs: Any) -> List[Any]:
    """``fn(*args, **kwargs)`` on ``nprocs`` ranks (forked processes with torchrun's environment: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); returns their results in rank order. A rank that raises or dies makes
    ``launch`` raise ``ParallelError`` naming it, with its traceback; the other ranks are stopped."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise UsageError(f"launch: nprocs must be a positive number of ranks, not {nprocs!r}")
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nprocs),
           "LOCAL_WORLD_SIZE": str(nprocs)}
    procs = [ctx.Process(target=_rank_main, args=(fn, args, kwargs, {**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                                  r, results), name=f"zstream-rank{r}", daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], env: Dict[str, str], rank: int,
               results: Any) -> None:
    os.environ.update(env)
    # torch's CPU thread pool (OpenMP) does not survive a fork: a parallel region in the child would wait forever for
    # the parent's threads. One thread per rank; the ranks' real work runs on their GPUs.
    torch.set_num_threads(1)
    try:
        # pickled here, by value: the queue's own pickler would share tensors through file descriptors that die
        # with this process
        value = pickle.dumps(fn(*args, **kwargs))
        results.put((rank, True, value))
    except BaseException as e:
        results.put((rank, False, f"{type(e).__name__}: {e}\n{''.join(traceback.format_exc())}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs: List[Any], results: Any) -> List[Any]:
    """Each rank's result; ParallelError at the first failure (a rank's exception is worth more than the errors of
    the ranks that stopped because of it, so the root cause is the one reported)."""
    values: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    first_failure = None
    while len(values) + len(errors) < len(procs):
        try:
            rank, ok, value = results.get(timeout=0.1)
            (values if ok else errors)[rank] = value
            if not ok and first_failure is None:
                first_failure = time.monotonic()
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in values and r not in errors and not p.is_alive() and results.empty():
                errors[r] = f"died with exit code {p.exitcode} before returning"
                first_failure = first_failure or time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > _GRACE_S:
            break
    if errors:
        root = min(errors, key=lambda r: ("ParallelError" in errors[r], r))  # a rank that failed by itself first
        others = ", ".join(str(r) for r in sorted(errors) if r != root)
        hint = ("\n(this process used CUDA before zstream.launch forked it, and a forked child cannot: call launch "
                "before any CUDA work here, or start a script with torchrun)"
                if "re-initialize CUDA in forked subprocess" in errors[root] else "")
        raise ParallelError(f"rank {root} of {len(procs)} failed: {errors[root]}"
                            + (f"\n(ranks {others} stopped too)" if others else "") + hint)
    return [pickle.loads(values[r]) for r in range(len(procs))]
