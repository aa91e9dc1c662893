"""zstream: run language models larger than the GPU by streaming their weights block by block.

    store = zstream.WeightStore.open("ckpt/")            # the Rust weight store (zstream._core)
    model = zstream.load("ckpt/", offload="nvme")         # the streaming engine
    model.generate("Hello", max_new_tokens=32)

Heavy submodules (torch, the native core) load on first use, so ``import zstream`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CheckpointError, ModelError, OutOfMemoryError, ReadError, ZStreamError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "WeightStore": "zstream.store",
    "Ticket": "zstream.store",
    "TensorInfo": "zstream.store",
    "load": "zstream.loading",
    "plan_batch": "zstream.plan",
    "hardware": "zstream.detect",
    "pack": "zstream.packing",
}
_LAZY_MODULES = {"synthetic", "models", "store", "cuda"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f"zstream.{name}")
    raise AttributeError(f"module 'zstream' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ModelError",
    "OutOfMemoryError",
    "ReadError",
    "TensorInfo",
    "Ticket",
    "WeightStore",
    "ZStreamError",
    "hardware",
    "load",
    "pack",
    "plan_batch",
]
