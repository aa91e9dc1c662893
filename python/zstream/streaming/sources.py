"""Where the ring takes a streamed block's bytes from: host arenas read once at load, or the disk every pass.

A source serves the ring's global indices in order (index g is block ``order[g % len(order)]`` of pass
``g // len(order)``): ``host(g)`` gives the block's bytes in host memory, waiting for them if they are still being
read, and ``copied(g, event)`` says that the copy out of them is enqueued and completes with ``event``, after which
the source may reuse the memory.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

from ..errors import ReadError
from ..foundations.store import FlatRead, Ticket, WeightStore
from .device import Device


class HostSource(Protocol):
    def host(self, g: int) -> FlatRead: ...
    def copied(self, g: int, event: Any) -> None: ...
    def read_interval(self, g: int) -> Optional[Tuple[int, int]]: ...  # when its disk read ran (ns), if it had one
    def reset(self) -> None: ...                                    # drop everything in flight


class HostBlocks:
    """offload="cpu" (and the GH200 mode's copy path): every streamed block in its own host arena, read at load."""

    def __init__(self, blocks: Sequence[Optional[FlatRead]], order: List[int]) -> None:
        self.blocks = blocks   # by block id (None for blocks that do not stream)
        self.order = order

    def host(self, g: int) -> FlatRead:
        flat = self.blocks[self.order[g % len(self.order)]]
        assert flat is not None, "a streamed block without host bytes"
        return flat

    def copied(self, g: int, event: Any) -> None:
        pass  # the arenas live as long as the model

    def read_interval(self, g: int) -> Optional[Tuple[int, int]]:
        return None

    def reset(self) -> None:
        pass


class StoreReads:
    """offload="nvme": each block read from disk into a pinned pool slot ``depth`` blocks ahead of its copy; the
    slot goes back to the pool once the copy out of it has completed."""

    def __init__(self, store: WeightStore, order: List[int], block_names: List[Dict[str, str]], depth: int,
                 device: Device) -> None:
        self.store = store
        self.order = order
        self.names = [list(dict.fromkeys(block_names[b].values())) for b in range(len(block_names))]
        self.depth = max(1, depth)
        self.device = device
        self.ahead: Deque[Tuple[int, Ticket]] = deque()                       # (g, ticket) read ahead
        self.current: Optional[Tuple[int, Ticket, FlatRead]] = None           # handed out, copy not yet enqueued
        self.in_copy: Deque[Tuple[Any, Ticket, FlatRead]] = deque()           # (event, ticket, bytes) being copied

    def host(self, g: int) -> FlatRead:
        nxt = self.ahead[-1][0] + 1 if self.ahead else g
        while nxt < g + 1 + self.depth:  # keep `depth` reads queued behind this one
            self.ahead.append((nxt, self.store.fetch(self.names[self.order[nxt % len(self.order)]])))
            nxt += 1
        gi, ticket = self.ahead[0]
        assert gi == g, f"read {gi} ahead, the ring asks for {g}"
        flat = ticket.wait_flat()  # blocks until the disk read is done; the device keeps computing
        self.ahead.popleft()  # only now: a wait interrupted (Ctrl-C) leaves the ticket where reset releases it
        self.current = (g, ticket, flat)
        return flat

    def read_interval(self, g: int) -> Optional[Tuple[int, int]]:
        if self.current is not None and self.current[0] == g:
            _queued, started, finished = self.current[1].times
            return started, finished
        return None

    def copied(self, g: int, event: Any) -> None:
        assert self.current is not None and self.current[0] == g
        _, ticket, flat = self.current
        self.current = None
        self.in_copy.append((event, ticket, flat))
        self._retire(block=False)

    def _retire(self, block: bool) -> None:
        """Hand pool slots back once the copies out of them are done."""
        while self.in_copy and (block or self.device.query(self.in_copy[0][0])):
            event, ticket, _flat = self.in_copy.popleft()
            self.device.wait_host(event)
            ticket.release()

    def reset(self) -> None:
        """Cancel the reads ahead and wait until the disk is done with their slots, so that the next pass finds them
        back in the pool instead of growing it."""
        pending = [t for _, t in self.ahead] + ([self.current[1]] if self.current is not None else [])
        self.ahead.clear()
        self.current = None
        for ticket in pending:
            ticket.cancel()
        for ticket in pending:
            with contextlib.suppress(ReadError):
                ticket.wait()  # completes (cancelled, or read) once the kernel has let go of the slot
            ticket.release()
        self._retire(block=True)
