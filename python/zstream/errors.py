"""The zstream exception hierarchy: every exception class zstream defines lives here, and the one way zstream
warns (``warn``: at the user's line).

Every error zstream raises on purpose is a ``ZStreamError``; its message names the file, model or value and the
fault, and where there is one, the fix. The Rust core raises these same classes (``rust/zstream-py/src/error.rs``
maps its errors onto them). Classes that stand for a kind of built-in error also derive from it (a ``ReadError``
is an ``OSError``, a ``UsageError`` a ``ValueError``), so ``except OSError`` and friends keep working.

    ZStreamError
    ├── UsageError             an argument zstream cannot use (also ValueError)
    ├── CheckpointError        a malformed checkpoint: header, index, shards
    ├── ReadError              reading weights failed (also OSError)
    │   └── ReadTimeoutError   ... because a wait ran past its timeout (also TimeoutError)
    ├── ModelError             a model cannot be built or run: architecture, config, tensors, lengths
    │   └── ModelClosedError   the model was closed
    ├── QuantizationError      a tensor or checkpoint cannot be quantized as asked (also ValueError)
    ├── OutOfMemoryError       GPU or pinned host memory ran out (also MemoryError)
    ├── ParallelError          a tensor-parallel group cannot run: a rank failed or timed out, ranks disagree
    └── OutputExistsError      an output directory already holds something (also FileExistsError)
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ZStreamError(Exception):
    """Base class of every error zstream raises on purpose."""


class UsageError(ZStreamError, ValueError):
    """An argument zstream cannot use: the message names the value and what to pass instead."""


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


class ReadTimeoutError(ReadError, TimeoutError):
    """A wait for a read ran past its timeout; the read itself goes on in the background."""


class ModelError(ZStreamError):
    """A model cannot be built or run: unsupported architecture, missing config keys, tensors that disagree."""


class ModelClosedError(ModelError):
    """The model was closed (``close()``, or the end of its ``with`` block): load it again to use it."""


class QuantizationError(ZStreamError, ValueError):
    """A tensor cannot be quantized as asked (non-finite values, a shape the group size does not divide), or a
    checkpoint's quantization does not fit the request."""


class OutOfMemoryError(ZStreamError, MemoryError):
    """GPU or pinned host memory ran out; the message says which ``gpu_memory`` or ``offload`` would fit."""


class ParallelError(ZStreamError):
    """A tensor-parallel group cannot go on: a rank failed (the message names it and what it raised), a collective
    ran past its timeout, or the ranks opened different checkpoints."""


class OutputExistsError(ZStreamError, FileExistsError):
    """A command that writes a new checkpoint was pointed at an output that already holds something; zstream never
    overwrites."""


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn``, pointed at the first frame outside zstream: at the user's line, however many zstream
    frames (wrappers, generators, decorators) lie between."""
    frame: Optional[FrameType] = sys._getframe(0)  # this function: warnings.warn's stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


__all__ = ["CheckpointError", "ModelClosedError", "ModelError", "OutOfMemoryError", "OutputExistsError",
           "ParallelError", "QuantizationError", "ReadError", "ReadTimeoutError", "UsageError", "ZStreamError"]
