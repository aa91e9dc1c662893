"""The device seam: buffers, streams and events, on a CUDA GPU or on the CPU.

The ring (``ring.py``) is written against this seam only, so the same streaming code runs on the GPU and in CPU
CI. ``CudaDevice`` is a thin veneer over ``torch.cuda``. ``CpuDevice`` gives the CPU the same semantics: the
compute stream is the calling thread (torch on the CPU is synchronous: work is done when the call returns), and
every other stream is a worker thread that runs its work in the order it was enqueued, as a CUDA stream does; an
event completes when the stream that recorded it reaches the record, and a stream told to wait for an event runs
nothing further until it has. Copies on the CPU's copy stream therefore overlap compute, as they do on a GPU.

    device = device_for(torch.device("cuda", 0))          # or "cpu"
    stream, done = device.new_stream(), device.new_event()
    device.copy(dst, src, stream)                           # enqueued on `stream`
    device.record(done, stream)
    device.wait(device.compute_stream(), done)              # compute waits for the copy
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Protocol

import torch
from torch import Tensor


class Device(Protocol):
    """What the ring needs of a device. Streams and events are opaque handles of the implementation."""

    torch_device: torch.device

    def empty(self, nbytes: int) -> Tensor: ...                        # an uninitialised uint8 buffer on the device
    def new_stream(self) -> Any: ...
    def compute_stream(self) -> Any: ...                               # where the blocks' kernels run (now)
    def new_event(self, timing: bool = False) -> Any: ...
    def copy(self, dst: Tensor, src: Tensor, stream: Any) -> None: ...  # enqueue dst <- src on `stream`
    def wait(self, stream: Any, event: Any) -> None: ...               # `stream` runs nothing more until `event`
    def record(self, event: Any, stream: Any) -> None: ...             # `event` completes when `stream` gets here
    def query(self, event: Any) -> bool: ...                           # completed?
    def wait_host(self, event: Any) -> None: ...                       # block the calling thread until completed
    def synchronize(self) -> None: ...                                 # every stream idle
    def elapsed_ms(self, start: Any, end: Any) -> float: ...           # between two completed timing events
    def close(self) -> None: ...


class CudaDevice:  # GPU only
    """The seam on a CUDA GPU: ``torch.cuda`` streams and events."""

    def __init__(self, device: torch.device) -> None:
        self.torch_device = device

    def empty(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.torch_device)

    def compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.torch_device)

    def new_event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)

    def copy(self, dst: Tensor, src: Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def query(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def wait_host(self, event: torch.cuda.Event) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def elapsed_ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end)

    def close(self) -> None:
        pass


class CpuEvent:
    """An event on the CPU: ``recorded`` counts records, ``done`` the records reached; ``time_ns`` is when the last
    one was reached (``time.monotonic_ns``, the clock of the store's read times)."""

    __slots__ = ("done", "recorded", "time_ns")

    def __init__(self) -> None:
        self.recorded = 0
        self.done = 0
        self.time_ns = 0


class CpuStream:
    """A stream on the CPU: the compute stream runs work in the calling thread, at once; any other runs it in order
    on its own worker thread (started at the first enqueue)."""

    def __init__(self, inline: bool) -> None:
        self.inline = inline
        self.queue: Deque[Callable[[], object]] = deque()
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None


class _CpuState:
    """What the worker threads share with the device, kept apart from it so that an unreferenced ``CpuDevice`` can
    be collected and its finalizer stop the threads."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closed = False
        self.streams: List[CpuStream] = []

    def shutdown(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for s in self.streams:
            if s.thread is not None and s.thread is not threading.current_thread():
                s.thread.join()


def _block_until(state: _CpuState, event: CpuEvent, target: int) -> None:
    with state.cond:
        state.cond.wait_for(lambda: event.done >= target or state.closed)


def _work(state: _CpuState, stream: CpuStream) -> None:
    """A CPU stream's worker: run the queue in order until the device closes."""
    cond = state.cond
    while True:
        with cond:
            cond.wait_for(lambda: bool(stream.queue) or state.closed)
            if not stream.queue:
                return
            fn = stream.queue[0]
        try:
            fn()
        except BaseException as e:  # kept for the next wait on the host; later work still runs
            stream.error = stream.error or e
        del fn  # what it refers to (buffers, the device) must not outlive the work
        with cond:
            stream.queue.popleft()
            cond.notify_all()


class CpuDevice:
    """The seam on the CPU (see the module docstring)."""

    def __init__(self) -> None:
        self.torch_device = torch.device("cpu")
        self._state = _CpuState()
        self._compute = CpuStream(inline=True)
        self._finalizer = weakref.finalize(self, self._state.shutdown)

    def empty(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def new_stream(self) -> CpuStream:
        stream = CpuStream(inline=False)
        with self._state.cond:
            self._state.streams.append(stream)
        return stream

    def compute_stream(self) -> CpuStream:
        return self._compute

    def new_event(self, timing: bool = False) -> CpuEvent:
        return CpuEvent()

    def _enqueue(self, stream: CpuStream, fn: Callable[[], object]) -> None:
        if stream.inline:
            fn()
            return
        state = self._state
        with state.cond:
            if state.closed:
                raise RuntimeError("the CPU device was closed")
            stream.queue.append(fn)
            if stream.thread is None:
                stream.thread = threading.Thread(target=_work, args=(state, stream), name="zstream-cpu-stream",
                                                 daemon=True)
                stream.thread.start()
            state.cond.notify_all()

    def copy(self, dst: Tensor, src: Tensor, stream: CpuStream) -> None:
        self._enqueue(stream, lambda: dst.copy_(src))

    def record(self, event: CpuEvent, stream: CpuStream) -> None:
        state = self._state  # the work refers to the state, never to the device: see _CpuState
        with state.cond:
            event.recorded += 1
            target = event.recorded

        def reach() -> None:
            with state.cond:
                event.done = max(event.done, target)
                event.time_ns = time.monotonic_ns()
                state.cond.notify_all()

        self._enqueue(stream, reach)

    def wait(self, stream: CpuStream, event: CpuEvent) -> None:
        state = self._state
        with state.cond:
            target = event.recorded  # the latest record now, as a CUDA stream waits for it
        self._enqueue(stream, lambda: _block_until(state, event, target))

    def query(self, event: CpuEvent) -> bool:
        with self._state.cond:
            return event.done >= event.recorded

    def wait_host(self, event: CpuEvent) -> None:
        with self._state.cond:
            target = event.recorded
        _block_until(self._state, event, target)
        self._raise_errors()

    def synchronize(self) -> None:
        state = self._state
        with state.cond:
            state.cond.wait_for(lambda: state.closed or not any(s.queue for s in state.streams))
        self._raise_errors()

    def _raise_errors(self) -> None:
        for s in self._state.streams:
            if s.error is not None:
                error, s.error = s.error, None
                raise error

    def elapsed_ms(self, start: CpuEvent, end: CpuEvent) -> float:
        return (end.time_ns - start.time_ns) / 1e6

    def close(self) -> None:
        """Finish the work enqueued, then stop the worker threads."""
        try:
            self.synchronize()
        finally:
            self._finalizer()


def device_for(device: torch.device) -> Device:
    """The seam's implementation for a torch device."""
    return CudaDevice(device) if device.type == "cuda" else CpuDevice()
