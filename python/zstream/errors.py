"""The zstream exception hierarchy.

Every error zstream raises on purpose is a ``ZStreamError``; its message names the file (or model) and the fault.
The Rust core raises these same classes (``rust/zstream-py/src/error.rs`` maps its errors onto them).
"""

from __future__ import annotations


class ZStreamError(Exception):
    """Base class of every error zstream raises on purpose."""


class CheckpointError(ZStreamError):
    """A checkpoint is malformed: bad safetensors header, index naming a missing shard, duplicate names, ..."""


class ReadError(ZStreamError, OSError):
    """Reading weights failed: an I/O error, a short read past the end of a file, a timeout.

    ``errno``, ``filename`` and ``offset`` say where.
    """

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = filename
        self.offset = offset

    def __str__(self) -> str:
        return str(self.args[0])


class ModelError(ZStreamError):
    """A model cannot be built: unsupported architecture, missing config keys, tensors that disagree."""


class OutOfMemoryError(ZStreamError, MemoryError):
    """GPU or pinned host memory ran out; the message says which ``gpu_memory`` or ``offload`` would fit."""


__all__ = ["CheckpointError", "ModelError", "OutOfMemoryError", "ReadError", "ZStreamError"]


class ReadTimeoutError(ReadError, TimeoutError):
    """A wait for a read ran past its timeout; the read itself goes on in the background."""


__all__ += ["ReadTimeoutError"]
