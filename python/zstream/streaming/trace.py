"""Tracing a streamed forward pass: per streamed block, its disk read, its copy (a copy a run of its tensors: two
where the block spans shards, ``weights.device_placement``) and its compute, as a Chrome / Perfetto trace (JSON,
open it in ui.perfetto.dev).

Tracing wraps, it does not check: ``Traced`` wraps the streamer of the streamed blocks (the compute and the Python
time around each block), and instruments the rings under it with a device that times each copy on the copy
stream and a source that reports each disk read. Nothing in the forward loop knows a trace is running.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import Tensor

from .blocks import Streamer
from .device import Device
from .ring import DeviceRing
from .sources import HostSource
from .weights import Weights

TRACKS = {"disk": (1, "disk -> pinned host (io_uring)"), "copy": (2, "host -> device copy (copy stream)"),
          "compute": (3, "block compute (compute stream)"), "cpu": (4, "python: acquire, launch, release")}


class Tracer:
    """The events of one trace: device events (copy, compute) timed against a reference event recorded at the
    start, host intervals (disk, cpu) in ``time.monotonic_ns``."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.ref = device.new_event(timing=True)
        device.record(self.ref, device.compute_stream())
        device.wait_host(self.ref)
        self.ref_ns = time.monotonic_ns()
        self.events: List[Tuple[str, int, int, Any, Any]] = []  # (kind, global index, block, start, end)

    def add(self, kind: str, g: int, block: int, start: Any, end: Any) -> None:
        self.events.append((kind, g, block, start, end))

    def chrome_events(self, pid: int = 1, process: Optional[str] = None) -> List[Dict[str, Any]]:
        """The trace as Chrome trace events (after the device has finished what was traced), as process ``pid``
        (one per tensor-parallel rank, named ``process``)."""
        self.device.synchronize()
        events: List[Dict[str, Any]] = [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                                         "args": {"name": name}} for tid, name in TRACKS.values()]
        if process is not None:
            events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}})
        for kind, g, block, a, b in self.events:
            if kind in ("disk", "cpu"):
                ts, dur = a / 1e3, (b - a) / 1e3
            else:
                ts = self.ref_ns / 1e3 + self.device.elapsed_ms(self.ref, a) * 1e3
                dur = self.device.elapsed_ms(a, b) * 1e3
            events.append({"ph": "X", "pid": pid, "tid": TRACKS[kind][0], "name": f"block {block}", "ts": ts,
                           "dur": dur, "args": {"global_index": g}})
        return events


def write_trace(path: Optional[Union[str, os.PathLike]], events: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The Perfetto JSON of ``events``, written to ``path`` (unless None); returns it. Host times are
    ``time.monotonic_ns``, one clock for every process of a host, so the ranks' tracks line up."""
    doc = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        Path(path).write_text(json.dumps(doc))
    return doc


class _TimedCopies:
    """A device whose copies are timed on the stream that runs them (everything else passes through)."""

    def __init__(self, inner: Device, tracer: Tracer, ring: DeviceRing) -> None:
        self.inner, self.tracer, self.ring = inner, tracer, ring
        self.torch_device = inner.torch_device

    def copy(self, dst: Tensor, src: Tensor, stream: Any) -> None:
        start, end = self.inner.new_event(timing=True), self.inner.new_event(timing=True)
        self.inner.record(start, stream)
        self.inner.copy(dst, src, stream)
        self.inner.record(end, stream)
        g = self.ring.issued
        self.tracer.add("copy", g, self.ring.block_at(g), start, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _ReportedReads:
    """A source that reports when each block's disk read ran."""

    def __init__(self, inner: HostSource, tracer: Tracer, ring: DeviceRing) -> None:
        self.inner, self.tracer, self.ring = inner, tracer, ring

    def host(self, g: int) -> Any:
        flat = self.inner.host(g)
        interval = self.inner.read_interval(g)
        if interval is not None:
            self.tracer.add("disk", g, self.ring.block_at(g), *interval)
        return flat

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Traced:
    """The streamed blocks' streamer, traced: each block's compute (device events around it) and the Python time
    from its acquire to its release; the rings underneath time their copies and report their disk reads."""

    def __init__(self, inner: Streamer, tracer: Tracer) -> None:
        self.inner = inner
        self.tracer = tracer
        self.g = 0
        self._open: Optional[Tuple[int, Any]] = None
        self._replaced = [(ring, ring.instrument(_TimedCopies(ring.device, tracer, ring),
                                                 _ReportedReads(ring.source, tracer, ring)))
                          for ring in inner.rings()]

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def acquire(self, block: int) -> Weights:
        cpu0 = time.monotonic_ns()
        w = self.inner.acquire(block)
        start = self.tracer.device.new_event(timing=True)
        self.tracer.device.record(start, self.tracer.device.compute_stream())
        self._open = (cpu0, start)
        return w

    def release(self, block: int) -> None:
        assert self._open is not None
        cpu0, start = self._open
        dev = self.tracer.device
        end = dev.new_event(timing=True)
        dev.record(end, dev.compute_stream())
        self.tracer.add("compute", self.g, block, start, end)
        self.inner.release(block)
        self.tracer.add("cpu", self.g, block, cpu0, time.monotonic_ns())
        self.g += 1
        self._open = None

    def reset(self) -> None:
        self.inner.reset()

    def rings(self) -> List[DeviceRing]:
        return self.inner.rings()

    def close(self) -> None:
        self.untrace()
        self.inner.close()

    def untrace(self) -> Streamer:
        """Put the rings' own device and source back; returns the streamer traced."""
        for ring, (device, source) in self._replaced:
            ring.instrument(device, source)
        self._replaced = []
        return self.inner
