"""``zstream pack``: write a checkpoint whose linear weights are already quantized (the packed layout of
``zstream.quant``), so that streaming it moves ~0.28x (int4, group 64) or ~0.53x (int8) of the bytes per block and
no quantization runs at load time.

    zstream.pack("ckpt/", "ckpt-int4/", quantize="int4")          # or: zstream pack ckpt/ ckpt-int4/ --quantize int4

What changes: for every block, each linear weight ``NAME`` (``Family.linear_weights``) whose input dimension the
group size divides becomes ``NAME.qcodes`` / ``.qscale`` / ``.qzero`` (``QuantConfig.packed``), with the values
of ``zstream.quant.quantize``. Everything else (embeddings, norms, biases, head, weights the group size does not
divide) is copied byte for byte in its original dtype.

Layout of the output, which the streaming reader relies on:
  * tensors in ``Family.expected_shapes`` order (outer tensors stored before the blocks, block 0, block 1, ...,
    final norm and head, then anything else the source held), so each block's tensors are one contiguous byte
    range and the store reads a block with one coalesced read;
  * shards split only between blocks (a block never straddles two files); one ``model.safetensors`` when it all
    fits in ``shard_size``, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``;
  * every shard header's ``__metadata__`` is ``{"format": "pt", "zstream.quantization": "{...}"}``.

The safetensors files are written here directly, in streaming fashion (header first, from shapes known up front,
then data block by block), so peak memory is about two blocks (the one being written and the one being read
ahead), never the model. Everything goes to a hidden temporary directory next to ``out`` that is renamed into
place at the end: an interrupted pack leaves no half-written checkpoint under ``out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, List, Optional, Tuple, Union

import torch

from .errors import ZStreamError
from .quant import CODES, METADATA_KEY, QuantConfig, QuantizationError, QuantizedTensor
from .quant import quantize as quantize_weight

if TYPE_CHECKING:  # the store and the families load lazily (the native core, the model math)
    from .models import Family
    from .store import WeightStore

PathLike = Union[str, "os.PathLike[str]"]

# Files besides the weights that travel with a checkpoint (config.json is rewritten, not copied).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
               "chat_template.jinja", "chat_template.json")

_ST_DTYPE = {torch.uint8: "U8", torch.float16: "F16"}  # the dtypes of the packed tensors


class OutputExistsError(ZStreamError, FileExistsError):
    """``zstream pack`` was pointed at an output that already holds something; it never overwrites."""


@dataclass
class _Entry:
    """One tensor of the output: its header entry, and where its bytes come from.

    ``source`` is the checkpoint tensor it derives from; ``part`` is None for a byte-for-byte copy, else the
    packed tensor's name (``source + ".qcodes"`` ...)."""

    name: str
    dtype: str  # safetensors dtype name
    shape: Tuple[int, ...]
    nbytes: int
    source: str
    part: Optional[str] = None


@dataclass
class _Unit:
    """Tensors that must land in one shard, contiguously: one block, or the outer tensors before / after the
    blocks. ``per_tensor`` units are read one tensor at a time (an embedding can outweigh a block)."""

    label: str
    entries: List[_Entry] = field(default_factory=list)
    per_tensor: bool = False

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def sources(self) -> List[str]:
        return list(dict.fromkeys(e.source for e in self.entries))


def _quantize(w: torch.Tensor, cfg: QuantConfig, device: torch.device) -> QuantizedTensor:
    """``quant.quantize`` of a host weight, computed on ``device``; the packed tensors come back on the host."""
    if device.type == "cpu":
        return quantize_weight(w, cfg.bits, cfg.group_size, cfg.symmetric)
    qt = quantize_weight(w.to(device, non_blocking=True), cfg.bits, cfg.group_size, cfg.symmetric)
    zero = None if qt.zero is None else qt.zero.cpu()
    return QuantizedTensor(qt.codes.cpu(), qt.scale.cpu(), zero, qt.shape, qt.bits, qt.group_size)


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ZStreamError(f"pack computes on 'cpu' or 'cuda', not {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZStreamError(f"device {device!r} asked for, but torch sees no CUDA device")
    return dev


def _check_output(out: Path) -> None:
    """Refuse an ``out`` that holds anything: packing never overwrites (nor mixes with) existing files."""
    if out.is_dir():
        if any(out.iterdir()):
            raise OutputExistsError(f"{out}: exists and is not empty; pack writes a new directory (remove it, or "
                                    "pick another output)")
    elif out.exists():
        raise OutputExistsError(f"{out}: exists and is not a directory")


def _plan(store: WeightStore, family: Family, cfg: QuantConfig) -> Tuple[List[_Unit], Dict[str, Tuple[int, ...]]]:
    """The output's tensors, grouped into units that stay contiguous in one shard; plus {local name: shape} of
    the linear weights left unquantized because the group size does not divide their input dimension."""
    infos = {n: store.info(n) for n in store.names()}
    expected = list(family.expected_shapes())
    block_of: Dict[str, int] = {}
    for i in range(family.num_blocks):
        block_of.update({name: i for name in family.block_tensors(i).values()})
    to_quantize: Dict[str, Tuple[int, int]] = {}
    skipped: Dict[str, Tuple[int, ...]] = {}
    for i in range(family.num_blocks):
        names = family.block_tensors(i)
        for local in family.linear_weights():
            shape = infos[names[local]].shape
            if cfg.accepts(shape):
                to_quantize[names[local]] = (int(shape[0]), int(shape[1]))
            else:
                skipped[local] = shape
    if not to_quantize:
        shapes = ", ".join(f"{local} {list(s)}" for local, s in skipped.items())
        raise QuantizationError(f"group size {cfg.group_size} divides the input dimension of no linear weight "
                                f"({shapes}); pick a group size that divides them (e.g. 32, 64 or 128)")

    def entries(name: str) -> List[_Entry]:
        if name in to_quantize:
            return [_Entry(part, _ST_DTYPE[dt], tuple(shape), dt.itemsize * math.prod(shape), name, part)
                    for part, (dt, shape) in cfg.packed(name, to_quantize[name]).items()]
        info = infos[name]
        return [_Entry(name, info.dtype, tuple(info.shape), info.nbytes, name)]

    before = _Unit("outer tensors", per_tensor=True)
    blocks = [_Unit(f"block {i}") for i in range(family.num_blocks)]
    after = _Unit("final tensors", per_tensor=True)
    seen_block = False
    for name in expected:
        if name in block_of:
            seen_block = True
            blocks[block_of[name]].entries += entries(name)
        else:
            (after if seen_block else before).entries += entries(name)
    wanted = set(expected)
    for name in store.names():  # anything else the source stores (an untied copy of the head, ...) goes last
        if name not in wanted:
            after.entries += entries(name)
    units = ([before] if before.entries else []) + blocks + ([after] if after.entries else [])
    return units, skipped


def _shards(units: List[_Unit], shard_size: int) -> List[List[_Unit]]:
    """Units packed greedily into shards of at most ``shard_size`` bytes, in order; a unit larger than that gets a
    shard of its own (a block is never split)."""
    shards: List[List[_Unit]] = [[]]
    used = 0
    for unit in units:
        if shards[-1] and used + unit.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(unit)
        used += unit.nbytes
    return shards


def _header(units: List[_Unit], metadata: Dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header of a shard holding ``units``, padded with spaces so the data starts
    8-byte aligned. Offsets tile the data with no gaps, as safetensors requires."""
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for unit in units:
        for e in unit.entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write(f: BinaryIO, t: torch.Tensor, entry: _Entry) -> None:
    """Write a host tensor's bytes, checking that they are the size the header promised."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != entry.nbytes:
        raise ZStreamError(f"internal error: {entry.name} has {raw.numel()} bytes, the header says {entry.nbytes}")
    if raw.numel():
        f.write(memoryview(raw.numpy()))


class _Packer:
    """Reads units ahead in a background thread and writes them out, quantizing on the way."""

    def __init__(self, store: WeightStore, cfg: QuantConfig, device: torch.device, bar: Any) -> None:
        self.store, self.cfg, self.device, self.bar = store, cfg, device, bar
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zstream-pack-read")

    def _reads(self, units: List[_Unit]) -> List[List[str]]:
        """The reads, in order: a block in one coalesced read, outer tensors one by one."""
        out: List[List[str]] = []
        for unit in units:
            out += [[s] for s in unit.sources] if unit.per_tensor else [unit.sources]
        return out

    def write_shard(self, path: Path, units: List[_Unit], metadata: Dict[str, str]) -> None:
        entries = [e for unit in units for e in unit.entries]
        reads = self._reads(units)
        pending: Optional[Future] = self.pool.submit(self.store.read, reads[0]) if reads else None
        with open(path, "wb") as f:
            f.write(_header(units, metadata))
            k = 0
            for r, names in enumerate(reads):
                assert pending is not None
                tensors = pending.result()
                pending = self.pool.submit(self.store.read, reads[r + 1]) if r + 1 < len(reads) else None
                packed: Dict[str, torch.Tensor] = {}
                wanted = set(names)
                while k < len(entries) and entries[k].source in wanted:
                    e = entries[k]
                    if e.part is None:
                        _write(f, tensors[e.source], e)
                    else:
                        if e.part not in packed:
                            qt = _quantize(tensors[e.source], self.cfg, self.device)
                            packed.update(qt.tensors(e.source))
                        _write(f, packed[e.part], e)
                    k += 1
                self.bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
                del tensors, packed
            if k != len(entries):
                raise ZStreamError(f"internal error: {path.name}: wrote {k} of {len(entries)} tensors")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _copy_side_files(src: Path, dst: Path, config: Dict[str, Any], cfg: QuantConfig) -> None:
    """config.json (with a ``zstream_quantization`` entry for humans: the metadata the headers carry), plus the
    generation config and tokenizer files, when the source has them."""
    config = dict(config)
    config["zstream_quantization"] = json.loads(cfg.to_metadata()[METADATA_KEY])
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem lets a directory be fsynced)."""
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


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def pack(model: PathLike, out: PathLike, *, quantize: str = "int4", group_size: int = 64, symmetric: bool = False,
         shard_size: Union[int, str] = "4GB", device: Optional[str] = None, progress: bool = True) -> Path:
    """Write a copy of checkpoint ``model`` (a directory, or a Hugging Face repo id in the local cache) to the new
    directory ``out`` with every block's linear weights quantized (``"int4"`` or ``"int8"``, ``group_size``
    inputs per fp16 scale, ``symmetric`` or with a per-group zero). Returns ``out``.

    ``device``: where quantization runs ("cuda" is much faster than the CPU for big models; None/"auto" picks it
    when present). The output is bit-identical either way. ``shard_size`` caps a shard (blocks are never split).
    Raises ``QuantizationError`` for an already packed source or a group size that divides no linear weight, and
    ``OutputExistsError`` for an ``out`` that is not empty.
    """
    from .generation import read_config
    from .loading import resolve_checkpoint
    from .models import family_for
    from .store import WeightStore
    from .synthetic import parse_size

    cfg = QuantConfig.parse(quantize, group_size, symmetric)
    if cfg is None:
        raise QuantizationError("pack writes a quantized checkpoint: quantize must be 'int4' or 'int8'")
    dev = _resolve_device(device)
    try:
        limit = parse_size(shard_size)
    except ValueError as e:
        raise ZStreamError(f"shard_size: {e}") from None
    src = resolve_checkpoint(model)
    dst = Path(out).expanduser()
    _check_output(dst)

    config = read_config(src)
    store = WeightStore.open(src, pin=dev.type == "cuda")
    try:
        names = store.names()
        if METADATA_KEY in store.metadata() or any(n.endswith(CODES) for n in names):
            raise QuantizationError(f"{src}: already packed ({store.metadata().get(METADATA_KEY, 'has .qcodes')}); "
                                    "pack an unquantized checkpoint")
        family = family_for(config, names)
        family.validate({n: store.info(n) for n in names})
        units, skipped = _plan(store, family, cfg)
        for local, shape in skipped.items():
            warnings.warn(f"zstream pack: {local} {list(shape)} stays unquantized: group size {cfg.group_size} does "
                          f"not divide its input dimension", RuntimeWarning, stacklevel=2)
        shards = _shards(units, limit)
        total_in = sum(store.info(n).nbytes for n in names)
        block_in = sum(store.info(s).nbytes for u in units if u.label.startswith("block ") for s in u.sources)
        metadata = {"format": "pt", **cfg.to_metadata()}

        tmp = dst.parent / f".{dst.name}.packing-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_in, unit="B", unit_scale=True, desc=f"packing {dst.name} ({cfg.name})",
                   disable=not progress)
        packer = _Packer(store, cfg, dev, bar)
        try:
            if len(shards) == 1:
                packer.write_shard(tmp / "model.safetensors", shards[0], metadata)
            else:
                weight_map: Dict[str, str] = {}
                for i, shard in enumerate(shards, 1):
                    file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    packer.write_shard(tmp / file, shard, metadata)
                    weight_map.update({e.name: file for unit in shard for e in unit.entries})
                index = {"metadata": {"total_size": sum(u.nbytes for u in units)}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            _copy_side_files(src, tmp, config, cfg)
            _check_output(dst)  # still nothing there (another process?) before taking the name
            os.replace(tmp, dst)  # atomic; replaces an empty directory
            _fsync_dir(dst.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            packer.close()
            bar.close()
    finally:
        store.close()

    if progress:
        block_out = sum(u.nbytes for u in units if u.label.startswith("block "))
        total_out = sum(u.nbytes for u in units)
        print(f"packed {src} -> {dst} ({cfg.name}, group {cfg.group_size}, "
              f"{'symmetric' if cfg.symmetric else 'asymmetric'}): blocks {_fmt(block_in)} -> {_fmt(block_out)} "
              f"({block_out / block_in:.2f}x streamed per pass), all tensors {_fmt(total_in)} -> {_fmt(total_out)} "
              f"({total_out / total_in:.2f}x)", file=sys.stderr)
    return dst
