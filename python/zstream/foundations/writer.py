"""Writing safetensors checkpoints, streaming: headers from shapes known up front, then the bytes in order.

Used by ``zstream make-checkpoint`` (random weights) and ``zstream pack`` (quantized copies). The format: an 8-byte
little-endian header length, a JSON header (dtype, shape and data_offsets per tensor, and ``__metadata__``) padded
with spaces so the data starts 8-byte aligned, then the tensors' bytes in header order with no gaps.

A new checkpoint is written into a hidden temporary directory beside its destination and renamed into place when
complete (``new_checkpoint_dir``), so an interrupted write never leaves a half-written checkpoint behind, and an
output that already holds something is refused, never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch

from ..errors import OutputExistsError, ZStreamError
from .units import safetensors_dtype


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard's header."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header(entries: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus the JSON header of a shard holding ``entries`` in this order."""
    body: Dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        body[e.name] = {"dtype": safetensors_dtype(e.dtype), "shape": list(e.shape),
                        "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def split_shards(units: Sequence[Sequence[Entry]], shard_size: int) -> List[List[Entry]]:
    """Units (tensors that must stay together in one shard, in order: a block, or a single tensor) packed greedily
    into shards of at most ``shard_size`` bytes; a unit larger than that gets a shard of its own."""
    shards: List[List[Entry]] = [[]]
    used = 0
    for unit in units:
        size = sum(e.nbytes for e in unit)
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].extend(unit)
        used += size
    return shards


def shard_names(count: int) -> List[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` (save_pretrained's names)."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, shards: Sequence[Sequence[Entry]]) -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint (nothing for a single file)."""
    if len(shards) == 1:
        return
    files = shard_names(len(shards))
    weight_map = {e.name: file for file, shard in zip(files, shards) for e in shard}
    total = sum(e.nbytes for shard in shards for e in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tensor(f: BinaryIO, t: torch.Tensor, entry: Entry) -> None:
    """Write a host tensor's bytes, checking that they are what the header promised."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != entry.nbytes or t.dtype != entry.dtype:
        raise ZStreamError(f"internal error: {entry.name} is {t.dtype} of {raw.numel()} bytes, the header says "
                           f"{entry.dtype} of {entry.nbytes}")
    if raw.numel():
        f.write(raw.numpy().data)


def check_output(out: Path) -> None:
    """Refuse an ``out`` that holds anything: zstream writes new checkpoints, never over (or among) existing files."""
    if out.is_dir():
        if any(out.iterdir()):
            raise OutputExistsError(f"{out}: exists and is not empty; zstream writes a new directory (remove it, or "
                                    "pick another output)")
    elif out.exists():
        raise OutputExistsError(f"{out}: exists and is not a directory")


@contextmanager
def new_checkpoint_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write a checkpoint into; renamed to ``out`` when the block ends
    without an error, removed otherwise (Ctrl-C included)."""
    out = Path(out).expanduser()
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        check_output(out)  # still nothing there (another process?) before taking the name
        os.replace(tmp, out)  # atomic; replaces an empty directory
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    """Make a file's bytes (or a rename in a directory) durable; best effort where the filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
