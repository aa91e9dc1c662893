"""``zstream.WeightStore``: the Rust weight store, with tensors handed to torch through DLPack.

    store = WeightStore.open("ckpt/")                       # validates every safetensors header
    host = store.read(["h.0.mlp.dense_4h_to_h.weight"])     # {name: torch.Tensor}, zero-copy views of an arena
    ticket = store.fetch(block_names)                       # background read into a reusable pool slot
    weights = ticket.wait()                                 # {name: torch.Tensor}
    ...; del weights; ticket.release()                      # the slot returns once nothing views it

Where a byte goes: ``rust/zstream-core/src/reader`` reads it into an arena (``arena.rs``), pinned through
``zstream.foundations.cuda``; ``rust/zstream-py/src/dlpack.rs`` hands it to torch here, in ``_to_torch``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple, Optional, Union

import torch

from .. import _core
from ..errors import ReadError, warn
from .cuda import install_host_register
from .units import VIEWED_DTYPES, torch_dtype


class TensorInfo(NamedTuple):
    name: str
    dtype: str  # safetensors name: "F16", "BF16", ...
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int  # absolute byte offset in `file`

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


def host_buffer(nbytes: int, *, pin: bool) -> torch.Tensor:
    """A fresh page-aligned host arena of ``nbytes`` as a uint8 tensor, pinned (registered with CUDA through the
    runtime torch loaded) when ``pin``; for bytes zstream makes rather than reads, such as weights quantized at load.
    Unlike torch's pinned allocator, which keeps freed pinned memory cached for the process, the arena is unpinned
    and unmapped when its last tensor dies, and it counts in ``zstream._core.pinned_bytes()``."""
    pinned = pin and install_host_register()
    capsule, pin_error, _ = _core.host_buffer(nbytes, pin=pinned, flags=_core.HOST_REGISTER_PORTABLE)
    if pin and (not pinned or pin_error):
        why = pin_error or "no CUDA runtime is available"
        warn(f"zstream: a host buffer of {nbytes} bytes stays pageable: {why}", RuntimeWarning)
    return torch.from_dlpack(capsule)


def mapped_host_buffer(nbytes: int, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A fresh host arena of ``nbytes`` pinned and mapped into ``device``'s address space, as two uint8 tensors of
    the same bytes: (on the CPU, on the GPU). A kernel reading the GPU one reads host memory in place, through no
    copy engine, so it never queues behind copies in flight (the ats mode's path). None where it cannot be mapped."""
    if device.type != "cuda" or not install_host_register():
        return None
    flags = _core.HOST_REGISTER_PORTABLE | _core.HOST_REGISTER_MAPPED
    capsule, pin_error, cuda = _core.host_buffer(nbytes, pin=True, flags=flags, cuda_device=device.index or 0)
    if pin_error or cuda is None:
        return None
    return torch.from_dlpack(capsule), torch.from_dlpack(cuda)


class FlatRead:
    """Tensors read into one arena, kept as one flat byte tensor (``buffer``) plus where each tensor starts.

    One ``buffer`` copy moves all of them to the GPU at once; ``view(buffer_on_gpu)`` then gives per-tensor views
    at the same offsets. ``aligned`` says whether every offset suits its dtype (safetensors writers align them).
    """

    __slots__ = ("buffer", "layout")

    def __init__(self, buffer: torch.Tensor, layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]]) -> None:
        self.buffer = buffer  # (nbytes,) uint8
        self.layout = layout  # name -> (offset, dtype, shape)

    @classmethod
    def pack(cls, tensors: dict[str, torch.Tensor], dest: Union[torch.device, str], align: int = 256) -> FlatRead:
        """``tensors`` copied into one new buffer, each ``align``-aligned, in order: for blocks zstream makes (packed
        at load, a rank's shard). ``dest``: a device, or "pinned" for page-locked host memory that streams to the GPU
        at the link's speed. Host memory is a core arena (``host_buffer``); device memory is torch's."""
        layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        size = 0
        for name, t in tensors.items():
            size = -(-size // align) * align
            layout[name] = (size, t.dtype, tuple(t.shape))
            size += t.numel() * t.element_size()
        if dest == "pinned" or torch.device(dest).type == "cpu":
            buf = host_buffer(size, pin=dest == "pinned")
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=dest)
        for name, t in tensors.items():
            off, dt, shape = layout[name]
            buf[off:off + t.numel() * t.element_size()].view(dt).view(shape).copy_(t)
        return cls(buf, layout)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def aligned(self) -> bool:
        return all(off % dt.itemsize == 0 for off, dt, _ in self.layout.values())

    def view(self, buffer: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-tensor views into ``buffer`` (default: the host arena), which must hold these bytes at these
        offsets."""
        buf = self.buffer if buffer is None else buffer
        out = {}
        for name, (off, dt, shape) in self.layout.items():
            raw = buf[off:off + dt.itemsize * math.prod(shape)]
            if off % dt.itemsize:
                raw = raw.clone()  # an unaligned tensor (unusual writer): a copy is the only aligned view
            out[name] = raw.view(dt).view(shape)
        return out


def _to_torch(capsules: dict[str, object], meta: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, capsule in capsules.items():
        t = torch.from_dlpack(capsule)  # adopts the arena memory: no copy
        dtype = meta[name][0]
        out[name] = t.view(torch_dtype(dtype)) if dtype in VIEWED_DTYPES else t
    return out


class Ticket:
    """A background read into a pool slot. ``wait()`` gives the tensors; ``release()`` gives the slot back.

    The slot is reused only when the ticket is released *and* no tensor from it is alive, so a tensor can never
    change under you; keep the tensors no longer than you need them, or the pool grows instead.
    """

    __slots__ = ("_meta", "_ticket")

    def __init__(self, ticket: _core.Ticket, meta: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        self._ticket = ticket
        self._meta = meta

    def wait(self, timeout: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Block (GIL released, Ctrl-C honoured) until the read is done; raises ReadError if it failed."""
        out = _to_torch(self._ticket.wait(timeout), self._meta)
        self._warn_unpinned()
        return out

    def _warn_unpinned(self) -> None:
        err = self._ticket.pin_error
        if err:
            warn(f"zstream: staging slot left unpinned (copies to the GPU will be slower): {err}",
                 RuntimeWarning)

    def wait_flat(self, timeout: Optional[float] = None) -> FlatRead:
        """Like ``wait``, as one flat buffer (the whole slot) plus offsets: see ``FlatRead``."""
        capsule, offsets = self._ticket.wait_flat(timeout)
        self._warn_unpinned()
        return FlatRead(torch.from_dlpack(capsule), self._layout(offsets))

    def _layout(self, offsets: list[int]) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
        return {n: (off, torch_dtype(dt), shape) for (n, (dt, shape)), off in zip(self._meta.items(), offsets)}

    def done(self) -> bool:
        return self._ticket.done()

    def cancel(self) -> None:
        self._ticket.cancel()

    def release(self) -> None:
        self._ticket.release()

    @property
    def released(self) -> bool:
        return self._ticket.released

    @property
    def read_bytes(self) -> int:
        """Bytes this read moves from disk (aligned, gaps between tensors included)."""
        return self._ticket.read_bytes

    @property
    def times(self) -> tuple[int, int, int]:
        """(queued, started, finished) in ``time.monotonic_ns()`` nanoseconds; 0 where not yet."""
        return self._ticket.times

    @property
    def reader(self) -> str:
        return self._ticket.reader

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        ticket = getattr(self, "_ticket", None)
        if ticket is not None:
            ticket.release()

    def __repr__(self) -> str:
        return repr(self._ticket)


PathLike = Union[str, "os.PathLike[str]"]


class WeightStore:
    """A safetensors checkpoint (file or sharded directory), indexed in place, read at the speed of the disk."""

    def __init__(self, core: _core.Store, pinned: bool) -> None:
        self._core = core
        self._pinned = pinned
        self._metas: dict[str, tuple[str, tuple[int, ...]]] = {}

    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        reader: str = "auto",
        pin: Union[bool, str] = "auto",
        queue_depth: Optional[int] = None,
        chunk_size: Optional[int] = None,
        threads: Optional[int] = None,
        workers: Optional[int] = None,
        max_slots: Optional[int] = None,
        mapped: bool = False,
        numa_node: Optional[int] = None,
        tensor_align: int = 0,
        io_timeout: Optional[float] = 60.0,
    ) -> WeightStore:
        """Open and validate a checkpoint.

        ``reader``: "auto" (io_uring with O_DIRECT where possible, else the pread pool), "uring", "pread" or
        "mmap". ``pin``: register arenas with CUDA ("auto": when a GPU is present). ``mapped`` registers them
        mapped into the GPU's address space too (zero-copy reads by kernels). ``queue_depth`` and ``chunk_size``
        tune io_uring, ``threads`` the pread pool, ``workers`` how many reads run at once, ``max_slots`` caps the
        streaming pool. ``numa_node`` places arenas on that host node; ``tensor_align`` shifts each read so that
        its first tensor starts on that boundary (kernels reading weights in place want 256). A read whose I/Os
        make no progress for ``io_timeout`` seconds fails with ``ReadTimeoutError`` (None: wait, interruptibly).
        """
        if pin == "auto":
            pin = torch.cuda.is_available()
        pinned = bool(pin) and install_host_register()
        if pin and not pinned:
            warn("zstream: pinning asked for, but no CUDA runtime is available; arenas stay pageable",
                 RuntimeWarning)
        flags = None
        if pinned:
            flags = _core.HOST_REGISTER_PORTABLE | (_core.HOST_REGISTER_MAPPED if mapped else 0)
        core = _core.Store.open(
            os.fspath(path), reader=reader, queue_depth=queue_depth, chunk_size=chunk_size, threads=threads,
            workers=workers, max_slots=max_slots, pin_flags=flags, numa_node=numa_node, tensor_align=tensor_align,
            io_timeout=io_timeout,
        )
        return cls(core, pinned)

    # --- the index -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names, shard by shard in file order."""
        return self._core.names()

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the shard headers, merged (the first shard to set a key wins)."""
        return dict(self._core.metadata())

    def info(self, name: str) -> TensorInfo:
        dtype, shape, nbytes, file, offset = self._core.info(name)
        return TensorInfo(name, dtype, tuple(shape), nbytes, file, offset)

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._core

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    @property
    def files(self) -> list[str]:
        return self._core.files

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data in the checkpoint."""
        return self._core.nbytes

    @property
    def pinned(self) -> bool:
        """Whether arenas are registered with CUDA."""
        return self._pinned

    @property
    def pool_stats(self) -> tuple[int, int]:
        """(slots in existence, slots free) of the streaming pool."""
        return self._core.pool_stats

    def plan(self, names: Iterable[str]) -> tuple[int, int, int]:
        """(bytes read from disk, arena bytes, number of coalesced reads) for reading ``names``."""
        return self._core.plan(list(names))

    @property
    def auto_reader(self) -> str:
        """What reader="auto" resolves to on this checkpoint and machine."""
        return self._core.auto_reader()

    def _meta(self, names: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{name: (safetensors dtype, shape)}, cached: the engine asks for the same blocks every pass."""
        m = self._metas
        for n in names:
            if n not in m:
                dtype, shape, *_ = self._core.info(n)
                m[n] = (dtype, tuple(shape))
        return {n: m[n] for n in names}

    # --- reading ---------------------------------------------------------------------------------------------
    def read(self, names: Iterable[str], *, reader: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Read ``names`` into a fresh arena: host tensors, bytes identical to ``safetensors.safe_open``.

        The arena lives as long as any of the returned tensors does, even past ``close()``.
        """
        names = list(names)
        capsules, pin_error = self._core.read(names, reader=reader)
        if pin_error:
            warn(f"zstream: arena left unpinned: {pin_error}", RuntimeWarning)
        return _to_torch(capsules, self._meta(names))

    def read_flat(self, names: Iterable[str], *, reader: Optional[str] = None) -> FlatRead:
        """Like ``read``, as one flat arena buffer plus offsets (one copy moves a whole block): see ``FlatRead``."""
        names = list(dict.fromkeys(names))
        capsule, offsets, pin_error, _ = self._core.read_flat(names, reader=reader)
        if pin_error:
            warn(f"zstream: arena left unpinned: {pin_error}", RuntimeWarning)
        meta = self._meta(names)
        layout = {n: (off, torch_dtype(meta[n][0]), meta[n][1]) for n, off in zip(names, offsets)}
        return FlatRead(torch.from_dlpack(capsule), layout)

    def read_in_place(self, names: Iterable[str], device_id: int = 0) -> tuple[FlatRead, FlatRead]:
        """Read ``names`` into a fresh arena and hand it over twice: as a CUDA tensor whose pointer is the host
        memory (kernels read it in place: ATS, or a store opened with ``mapped=True``) and as a CPU tensor (the copy
        engine's source). Raises ReadError if the arena could not be mapped."""
        names = list(dict.fromkeys(names))
        cap_dev, offsets, pin_error, cap_host = self._core.read_flat(
            names, device_type=_core.KDL_CUDA, device_id=device_id, host_too=True)
        if pin_error:
            raise ReadError(f"{self._core.files[0]}: could not map an arena into the GPU: {pin_error}")
        meta = self._meta(names)
        layout = {n: (off, torch_dtype(meta[n][0]), meta[n][1]) for n, off in zip(names, offsets)}
        return FlatRead(torch.from_dlpack(cap_dev), layout), FlatRead(torch.from_dlpack(cap_host), layout)

    def fetch(self, names: Iterable[str], *, reader: Optional[str] = None) -> Ticket:
        """Start reading ``names`` in the background into a reusable slot; returns at once with a Ticket."""
        names = list(dict.fromkeys(names))
        return Ticket(self._core.fetch(names, reader=reader), self._meta(names))

    def inject_fault(self, kind: str, *, after: int = 0, count: int = 1) -> None:
        """For tests: the next reads meet ``kind`` ("eio", "short", "eintr", "hang") on ``count`` I/Os, starting after
        ``after`` more I/Os (io_uring and pread readers)."""
        self._core.inject_fault(kind, after=after, count=count)

    def clear_faults(self) -> None:
        self._core.clear_faults()

    def close(self) -> None:
        """Stop the reader threads; tensors already read stay valid."""
        self._core.close()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._core).replace("<Store", "<WeightStore", 1)
