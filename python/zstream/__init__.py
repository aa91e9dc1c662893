"""zstream: run language models larger than the GPU by streaming their weights block by block.

    model = zstream.load("bigscience/bloom", offload="nvme")   # or "cpu", "none", "ats", "auto"
    model.generate("The Grace Hopper superchip", max_new_tokens=32)

    store = zstream.WeightStore.open("ckpt/")                   # the Rust weight store
    zstream.make_checkpoint("bloom-7b1", "b7/")                 # random weights, real shapes
    zstream.pack("b7/", "b7-int4/", quantize="int4")            # a quantized checkpoint that streams as it is
    zstream.plan_batch("b7/", gpu_memory="16GiB")               # the batch and residency with the most tokens/s

The package is layered (docs/architecture.md): interfaces (cli, bench) -> api (load, plan_batch, pack, synthetic
checkpoints) -> streaming (the engine) -> planning (pure decisions) -> foundations (store, models, quant, ...).
Heavy submodules (torch, the native core) load on first use, so ``import zstream`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from .errors import (
    CheckpointError,
    ModelClosedError,
    ModelError,
    OutOfMemoryError,
    OutputExistsError,
    ParallelError,
    QuantizationError,
    ReadError,
    ReadTimeoutError,
    UsageError,
    ZStreamError,
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .api.launch import launch
    from .api.load import load
    from .api.pack import pack
    from .api.plan_batch import plan_batch
    from .api.synthetic import PRESETS, make_checkpoint
    from .foundations.hardware import hardware
    from .foundations.store import TensorInfo, Ticket, WeightStore
    from .planning.batch import BatchPlan
    from .planning.residency import Plan
    from .streaming.model import StreamingModel

try:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _distribution_version

    __version__ = _distribution_version("zstream")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_LAZY = {
    "load": "zstream.api.load",
    "plan_batch": "zstream.api.plan_batch",
    "pack": "zstream.api.pack",
    "launch": "zstream.api.launch",
    "make_checkpoint": "zstream.api.synthetic",
    "PRESETS": "zstream.api.synthetic",
    "hardware": "zstream.foundations.hardware",
    "WeightStore": "zstream.foundations.store",
    "Ticket": "zstream.foundations.store",
    "TensorInfo": "zstream.foundations.store",
    "StreamingModel": "zstream.streaming.model",
    "Plan": "zstream.planning.residency",
    "BatchPlan": "zstream.planning.batch",
}
# submodules reachable as attributes: zstream.synthetic.make_checkpoint, zstream.models.family_for, ...
_LAZY_MODULES = {"synthetic": "zstream.api.synthetic", "models": "zstream.foundations.models",
                 "store": "zstream.foundations.store", "quant": "zstream.foundations.quant"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'zstream' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(__all__) | set(_LAZY_MODULES) | {"errors"})


__all__ = [
    "PRESETS",
    "BatchPlan",
    "CheckpointError",
    "ModelClosedError",
    "ModelError",
    "OutOfMemoryError",
    "OutputExistsError",
    "ParallelError",
    "Plan",
    "QuantizationError",
    "ReadError",
    "ReadTimeoutError",
    "StreamingModel",
    "TensorInfo",
    "Ticket",
    "UsageError",
    "WeightStore",
    "ZStreamError",
    "__version__",
    "hardware",
    "launch",
    "load",
    "make_checkpoint",
    "pack",
    "plan_batch",
]
