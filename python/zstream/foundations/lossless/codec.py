"""One tensor's lossless code (``rust/zstream-core/src/lossless.rs`` has the format): encode on the host through the
native module, decode on the host (native) or on the GPU (``kernels``).

A 16-bit float weight ``NAME`` (bfloat16 or float16) is stored as four tensors:

    NAME.lwords    int32 (W,)        the lanes' bit streams end to end (u32 words, MSB-first), then two zero words
    NAME.loffsets  int32 (G + L/2)   where each lane starts: each group of 32 lanes' first word, then each lane's
                                     first bit from its group's as u16 (``offsets_len``; lanes from the element count)
    NAME.lraw      uint8  NAME's shape: each element's sign and 7 low bits (so the shape travels with it)
    NAME.ltable    int16 (288,)      the decode tables: where each code length ends, then the symbols in code order

and a checkpoint holding them says so in its headers' ``__metadata__["zstream.compression"]``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ... import _core
from ...errors import CheckpointError, UsageError

METADATA_KEY = "zstream.compression"
FORMAT_VERSION = 3  # 1 had a 4096-entry lookup table, 2 lanes of 512 elements with word offsets (neither released)
WORDS, OFFSETS, RAW, TABLE = ".lwords", ".loffsets", ".lraw", ".ltable"
SUFFIXES = (WORDS, OFFSETS, RAW, TABLE)
TABLE_LEN = 288  # 16 code-length limits, 16 index offsets, 256 symbols (lossless.rs: decode_tables)
ELEMENTS_PER_LANE = 128  # at most this many elements a lane decodes one after another (in runs of 4), lanes in parallel
LANE_GROUP = 32  # lanes whose starts share one base word (lossless.rs: LANE_GROUP)
CODED_DTYPES = (torch.bfloat16, torch.float16)


def to_metadata(dtype: torch.dtype) -> Dict[str, str]:
    """The safetensors ``__metadata__`` entry of a compressed checkpoint."""
    body = {"version": FORMAT_VERSION, "codec": "huffman-exponent", "dtype": str(dtype).removeprefix("torch.")}
    return {METADATA_KEY: json.dumps(body, sort_keys=True)}


def from_metadata(metadata: Optional[Mapping[str, str]], where: str) -> Optional[torch.dtype]:
    """The dtype of the coded weights a checkpoint's headers declare; None for a checkpoint without coded weights."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        body = json.loads(metadata[METADATA_KEY])
        version, dtype = int(body["version"]), getattr(torch, body["dtype"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: unreadable {METADATA_KEY} metadata {metadata[METADATA_KEY]!r}: {e}") from e
    if version != FORMAT_VERSION or body.get("codec") != "huffman-exponent" or dtype not in CODED_DTYPES:
        raise CheckpointError(f"{where}: compressed as {body}; this zstream reads version {FORMAT_VERSION} "
                              "huffman-exponent of bfloat16/float16 weights (re-run zstream pack)")
    return dtype


def lanes_for(numel: int) -> int:
    return max(1, -(-numel // ELEMENTS_PER_LANE))


def offsets_len(lanes: int) -> int:
    """int32 words of the offsets of ``lanes`` lanes: one a group's base, then one for two lanes' starts."""
    return -(-lanes // LANE_GROUP) + -(-lanes // 2)


def parts(name: str, shape: Tuple[int, ...], words: int) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of the code of weight ``name`` of ``shape`` whose streams take ``words``."""
    numel = 1
    for d in shape:
        numel *= d
    return {name + WORDS: (torch.int32, (words,)), name + OFFSETS: (torch.int32, (offsets_len(lanes_for(numel)),)),
            name + RAW: (torch.uint8, tuple(shape)), name + TABLE: (torch.int16, (TABLE_LEN,))}


@dataclass
class CodedTensor:
    """A 16-bit float tensor, coded: its four parts (host or device tensors) and what it decodes to."""

    words: Tensor    # int32 (W,)
    offsets: Tensor  # int32 (offsets_len(lanes),)
    raw: Tensor      # uint8, the tensor's shape
    table: Tensor    # int16 (TABLE_LEN,)
    dtype: torch.dtype
    lanes: int = 0   # 0: lanes_for(the element count), as checkpoints are coded; encode(lanes=...) sets others

    def __post_init__(self) -> None:
        self.lanes = self.lanes or lanes_for(self.raw.numel())
        if self.offsets.numel() != offsets_len(self.lanes):
            raise CheckpointError(f"a coded tensor of {self.raw.numel()} elements has {self.offsets.numel()} offset "
                                  f"words; {self.lanes} lanes take {offsets_len(self.lanes)} (coded by another "
                                  "version? re-run zstream pack)")

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.raw.shape)

    def to(self, device: Union[str, torch.device]) -> CodedTensor:
        """The same code with its parts on ``device``."""
        return CodedTensor(self.words.to(device), self.offsets.to(device), self.raw.to(device), self.table.to(device),
                           self.dtype, self.lanes)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.offsets, self.raw, self.table))

    def tensors(self, name: str) -> Dict[str, Tensor]:
        return {name + WORDS: self.words, name + OFFSETS: self.offsets, name + RAW: self.raw,
                name + TABLE: self.table}

    @classmethod
    def from_tensors(cls, w: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> CodedTensor:
        return cls(w[name + WORDS], w[name + OFFSETS], w[name + RAW], w[name + TABLE], dtype)


def encode(t: Tensor, lanes: Optional[int] = None) -> CodedTensor:
    """The code of a bfloat16 / float16 tensor (copied to the host if it is not there), over ``lanes`` lanes (default:
    one per ``ELEMENTS_PER_LANE`` elements)."""
    if t.dtype not in CODED_DTYPES:
        raise UsageError(f"lossless coding takes bfloat16 or float16 weights, not {t.dtype}")
    flat = t.detach().contiguous().view(torch.int16).cpu().reshape(-1)
    lanes = lanes_for(flat.numel()) if lanes is None else lanes
    words, offsets, raw, table = _core.lossless_encode(flat.numpy().tobytes(), lanes)
    return CodedTensor(_tensor(words, torch.int32), _tensor(offsets, torch.int32),
                       _tensor(raw, torch.uint8).view(t.shape), _tensor(table, torch.int16), t.dtype, lanes)


def _tensor(data: bytes, dtype: torch.dtype) -> Tensor:
    """A tensor over ``data`` without a copy. Read-only: nothing writes coded parts (they are copied into a block's
    buffer, or decoded)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": it is not written
        return torch.frombuffer(data, dtype=dtype)


def decode_host(c: CodedTensor) -> Tensor:
    """The tensor ``c`` codes, decoded on the host (the native decoder)."""
    words, offsets, raw, table = (p.detach().cpu().contiguous().numpy().tobytes()
                                  for p in (c.words, c.offsets, c.raw, c.table))
    data = _core.lossless_decode(words, offsets, c.lanes, raw, table)
    out = torch.frombuffer(bytearray(data), dtype=torch.int16) if data else torch.empty(0, dtype=torch.int16)
    return out.view(c.dtype).view(c.shape)  # writable: it may become a model's weight
