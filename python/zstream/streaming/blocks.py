"""The streamer protocol: how the forward pass gets each block's weights, whatever their home.

    blocks.begin_pass(tokens)
    for i in range(num_blocks):
        w = blocks.acquire(i)          # the weights of block i, ready for the compute stream
        hidden = family.block(w, ...)
        del w                          # views of a slot must be gone before the slot is reused
        blocks.release(i)              # block i's compute is enqueued

Streamers compose: ``Resident`` serves the blocks kept on the device and passes the rest to the streamer of the
streamed ones (a ``DeviceRing``, or ``InPlaceBlocks`` for the GH200 mode); ``Dequantized`` turns packed blocks
into matrices in their slot; ``trace.Traced`` records what happens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence

from torch import Tensor

from ..foundations.models import Family, StepContext
from ..foundations.quant import BlockQuant
from .weights import Weights

if TYPE_CHECKING:
    from .cache import LayerCache
    from .ring import DeviceRing


class Streamer(Protocol):
    def begin_pass(self, tokens: int) -> None: ...   # a pass of `tokens` new tokens starts (restarts after a failure)
    def acquire(self, block: int) -> Weights: ...
    def release(self, block: int) -> None: ...
    def reset(self) -> None: ...                     # drop everything in flight
    def rings(self) -> List[DeviceRing]: ...        # the device rings underneath (tracing instruments them)
    def close(self) -> None: ...


def run_blocks(family: Family, blocks: Streamer, hidden: List[Tensor], layer: Callable[[int, slice], LayerCache],
               parts: Sequence[slice], ctxs: Sequence[StepContext]) -> List[Tensor]:
    """Every block of a pass over each micro-batch's ``hidden`` (b, T, C), ``layer(i, rows)`` its cache: the engine's
    loop (``StreamingModel``), and the calibration's eager step (``calibrate``) times this same loop."""
    for i in range(family.num_blocks):
        w = blocks.acquire(i)   # the block's weights cross once for every micro-batch (FlexGen's zig-zag)
        for j, (rows, ctx) in enumerate(zip(parts, ctxs)):
            hidden[j] = family.block(w, hidden[j], layer(i, rows), ctx)  # all-reduced twice under TP
        del w  # the views of a slot must be gone before the slot is reused
        blocks.release(i)
    return hidden


class Resident:
    """Blocks kept on the device (a dict of weights), and the rest from ``streamed``."""

    def __init__(self, resident: Dict[int, Weights], streamed: Optional[Streamer]) -> None:
        self.resident = resident
        self.streamed = streamed

    def begin_pass(self, tokens: int) -> None:
        if self.streamed is not None:
            self.streamed.begin_pass(tokens)

    def acquire(self, block: int) -> Weights:
        w = self.resident.get(block)
        if w is not None:
            return w
        assert self.streamed is not None, f"block {block} is neither resident nor streamed"
        return self.streamed.acquire(block)

    def release(self, block: int) -> None:
        if block not in self.resident:
            assert self.streamed is not None
            self.streamed.release(block)

    def reset(self) -> None:
        if self.streamed is not None:
            self.streamed.reset()

    def rings(self) -> List[DeviceRing]:
        return self.streamed.rings() if self.streamed is not None else []

    def close(self) -> None:
        if self.streamed is not None:
            self.streamed.close()
        self.resident.clear()


class Dequantized:
    """Packed blocks dequantized on the compute stream as they are acquired: before ``release``, so the slot they
    are read from is not refilled under them."""

    def __init__(self, inner: Streamer, quant: BlockQuant) -> None:
        self.inner = inner
        self.quant = quant

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def acquire(self, block: int) -> Weights:
        return self.quant.dequantize(self.inner.acquire(block))

    def release(self, block: int) -> None:
        self.inner.release(block)

    def reset(self) -> None:
        self.inner.reset()

    def rings(self) -> List[DeviceRing]:
        return self.inner.rings()

    def close(self) -> None:
        self.inner.close()
