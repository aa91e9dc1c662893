"""Tensor parallelism's process group: joining one, the collectives the engine runs, and a failing rank named.

One process per GPU (or per CPU worker in tests), started by ``torchrun --nproc-per-node N`` or ``zstream.launch``:
``join`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) or takes a
process group the program set up itself, and gives each model a group of its own (NCCL on CUDA, gloo on the CPU).

A rank that raises during a pass posts what it raised to the group's store before it re-raises (``Group.fail``). The
others are waiting in a collective: on gloo they poll the store while they wait and stop at once with a
``ParallelError`` naming the rank; on NCCL (whose collectives are queued on the GPU, never waited for by the host)
the process group's timeout ends the wait. A rank that dies without a word (killed) ends the others' wait at the
timeout too, with an error saying that no rank reported a failure.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import pickle
import time
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParallelError, UsageError

DEFAULT_TIMEOUT_S = 300.0  # a collective waits at most this long for the other ranks
_POLL_STORE_S = 0.05  # how often a rank waiting on gloo looks for a failure report
_groups = itertools.count()  # every rank creates its groups in the same order: the n-th group's store keys


def launched_world() -> int:
    """How many ranks this process is one of: the initialized process group's size, else torchrun's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its host (which GPU it takes): torchrun's LOCAL_RANK, else its global rank."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Group:
    """The ranks one model is sharded over, and the three collectives it needs."""

    def __init__(self, pg: Any, backend: str, timeout_s: float, device: torch.device) -> None:
        self.pg = pg
        self.backend = backend
        self.timeout_s = timeout_s
        # NCCL queues a collective on the GPU's stream and the host goes on; gloo runs it on the host, and the host
        # waits (watching for failure reports) before it uses the result
        self.waits = device.type == "cpu" or "nccl" not in backend
        self.rank = dist.get_rank(pg)
        self.world = dist.get_world_size(pg)
        self._key = f"zstream/group{next(_groups)}/"
        self._store = dist.distributed_c10d._get_default_store()
        self._broken: Optional[str] = None
        self._gathers = itertools.count()

    def all_reduce(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks, in place (every rank gets the same bits)."""
        self._run(lambda: dist.all_reduce(t, group=self.pg, async_op=self.waits), "an all-reduce")
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank, in place: what every rank must agree on (the next tokens)."""
        src = dist.get_global_rank(self.pg, 0)
        self._run(lambda: dist.broadcast(t, src=src, group=self.pg, async_op=self.waits), "a broadcast")
        return t

    def gather(self, obj: Any, what: str) -> List[Any]:
        """Every rank's ``obj`` (picklable, small), in rank order, through the store: a rank that fails before it
        gets here (a missing file at load) is named at once, on any backend. Also a barrier."""
        self._check()
        key = f"{self._key}gather{next(self._gathers)}/"
        # (the store takes bytes; its type stub says str)
        self._store.set(f"{key}{self.rank}", pickle.dumps(obj))  # type: ignore[arg-type]
        names = [f"{key}{r}" for r in range(self.world)]
        self._poll(lambda: self._store.check(names), what)
        return [pickle.loads(self._store.get(name)) for name in names]

    def fail(self, error: BaseException) -> None:
        """This rank is abandoning a pass: tell the others (who are waiting in a collective) what it raised. Only the
        first failure is posted: a ParallelError is a consequence (of another rank's failure, or this one's)."""
        if self._broken is not None or isinstance(error, ParallelError):
            return
        message = f"{type(error).__name__}: {error}"
        self._broken = f"rank {self.rank} (this one) failed earlier: {message}"
        with contextlib.suppress(Exception):  # the store went with a dead rank 0: the others' timeout ends their wait
            self._store.set(f"{self._key}failed/{self.rank}", message)

    def close(self) -> None:
        """Let go of the group's communicators (each rank closes its own model)."""
        with contextlib.suppress(Exception):  # a group already torn down by a failure
            dist.destroy_process_group(self.pg)

    # ---- waiting --------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._broken is not None:
            raise ParallelError(f"the tensor-parallel group is broken ({self._broken}); load the model again")

    def _run(self, start: Any, what: str) -> None:
        self._check()
        try:
            work = start()
        except RuntimeError as e:
            raise self._peer_failure(what, e) from e
        if work is None:  # NCCL: queued on the GPU's stream; its timeout ends a hang
            return
        self._poll(work.is_completed, what)
        try:
            work.wait()
        except RuntimeError as e:
            raise self._peer_failure(what, e) from e

    def _poll(self, done: Callable[[], bool], what: str) -> None:
        """Wait until ``done()``, looking for failure reports every 50 ms; ParallelError at one, or at the timeout."""
        deadline = time.monotonic() + self.timeout_s
        next_look = time.monotonic() + _POLL_STORE_S
        delay = 0.0001
        while not done():
            now = time.monotonic()
            if now >= next_look:
                failed = self._failures()
                if failed:
                    raise self._broke(f"{failed}; rank {self.rank} stopped waiting in {what}")
                if now >= deadline:
                    raise self._broke(f"rank {self.rank} waited {self.timeout_s:.0f} s in {what} and no rank "
                                      "reported a failure: one was killed, or hangs")
                next_look = now + _POLL_STORE_S
            time.sleep(delay)
            delay = min(2 * delay, 0.002)

    def _failures(self) -> str:
        """'rank 1 failed: ValueError: ...' for every rank that posted a failure; '' if none did."""
        found = []
        for r in range(self.world):
            key = f"{self._key}failed/{r}"
            if r != self.rank and self._store.check([key]):
                found.append(f"rank {r} failed: {self._store.get(key).decode(errors='replace')}")
        return "; ".join(found)

    def _peer_failure(self, what: str, error: BaseException) -> ParallelError:
        try:
            failed = self._failures()
        except Exception:  # the store lived in a rank that is gone
            failed = ""
        return self._broke(f"{failed or 'a rank left the group without reporting a failure'}; rank {self.rank} "
                           f"stopped in {what} ({type(error).__name__}: {str(error).splitlines()[0][:200]})")

    def _broke(self, message: str) -> ParallelError:
        self._broken = message
        return ParallelError(message)


def join(tensor_parallel: Optional[int], device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[Group]:
    """The group a model shards over, or None to run alone.

    ``tensor_parallel`` None: every rank this process was launched with (torchrun's environment, or a process group
    already initialized), alone when there is one; 1: alone; N: the launch must have N ranks. The default process
    group is initialized here from torchrun's environment when the program has not done so."""
    world = launched_world()
    if tensor_parallel == 1 or (tensor_parallel is None and world == 1):
        return None
    if tensor_parallel is not None and tensor_parallel != world:
        raise UsageError(f"tensor_parallel={tensor_parallel}, but this process is one of {world} ranks: start "
                         f"{tensor_parallel} processes (`torchrun --nproc-per-node {tensor_parallel} script.py`, or "
                         f"zstream.launch(fn, {tensor_parallel})), or leave tensor_parallel unset")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        backend = str(dist.get_backend())  # the program's choice (gloo over CUDA tensors works too, slowly)
    else:
        if "MASTER_ADDR" not in os.environ:
            raise UsageError(f"WORLD_SIZE={world} but no MASTER_ADDR: start the ranks with torchrun or zstream.launch")
        if device.type == "cuda":  # GPU only
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timeout)
    return Group(dist.new_group(backend=backend, timeout=timeout), backend, timeout_s, device)
