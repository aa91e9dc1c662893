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

The safetensors files are written in streaming fashion (``foundations.writer``: header first, from shapes known up
front, then data block by block), so peak memory is about two blocks (the one being written and the one being read
ahead), never the model. Everything goes to a hidden temporary directory next to ``out`` that is renamed into
place at the end: an interrupted pack leaves no half-written checkpoint under ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

import torch

from ..errors import QuantizationError, UsageError, warn
from ..foundations import checkpoint
from ..foundations.hardware import resolve_device
from ..foundations.lossless import BlockCode, LosslessConfig, block_code_for
from ..foundations.lossless import encode as lossless_encode
from ..foundations.lossless.codec import parts as lossless_parts
from ..foundations.models import Cut, Family, family_for, piece
from ..foundations.quant import METADATA_KEY, QuantConfig, QuantizedTensor, packed_config, quantize
from ..foundations.store import WeightStore
from ..foundations.units import fmt_bytes, parse_bytes
from ..foundations.writer import Entry, header, new_checkpoint_dir, shard_names, split_shards, write_index, write_tensor

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class _Item:
    """One tensor of the output, and where its bytes come from: ``source`` is the checkpoint tensor it derives from;
    ``part`` is None for a byte-for-byte copy, else the packed tensor's name (``source + ".qcodes"`` ...); ``cut``
    the rank's piece of ``source`` (``Family.shard_cut``) in a tensor-parallel layout."""

    entry: Entry
    source: str
    part: Optional[str] = None
    cut: Optional[Cut] = None  # tensor-parallel layout: the rank's piece of ``source``


@dataclass
class _Unit:
    """Tensors that must land in one shard, contiguously: one block, or the outer tensors before / after the
    blocks. ``per_tensor`` units are read one tensor at a time (an embedding can outweigh a block)."""

    label: str
    items: List[_Item] = field(default_factory=list)
    per_tensor: bool = False

    @property
    def nbytes(self) -> int:
        return sum(i.entry.nbytes for i in self.items)

    @property
    def sources(self) -> List[str]:
        return list(dict.fromkeys(i.source for i in self.items))


def _quantize(w: torch.Tensor, cfg: QuantConfig, device: torch.device) -> QuantizedTensor:
    """``quantize`` of a host weight, computed on ``device``; the packed tensors come back on the host."""
    if device.type == "cpu":
        return quantize(w, cfg.bits, cfg.group_size, cfg.symmetric)
    qt = quantize(w.to(device, non_blocking=True), cfg.bits, cfg.group_size, cfg.symmetric)
    zero = None if qt.zero is None else qt.zero.cpu()
    return QuantizedTensor(qt.codes.cpu(), qt.scale.cpu(), zero, qt.shape, qt.bits, qt.group_size)


def _plan(store: WeightStore, family: Family, cfg: Optional[QuantConfig], part: Family,
          coded: Optional[Dict[str, int]] = None) -> Tuple[List[_Unit], Dict[str, Tuple[int, ...]]]:
    """The output's tensors, grouped into units that stay contiguous in one shard; plus {local name: shape} of
    the linear weights left unquantized because the group size does not divide their input dimension. ``part``: the
    rank whose pieces of the blocks the output holds (``family`` itself for a whole checkpoint). ``coded``: the
    losslessly coded weights and the words of their streams (``_coded_words``)."""
    infos = {n: store.info(n) for n in store.names()}
    expected = list(family.expected_shapes())
    block_of: Dict[str, Tuple[int, str]] = {}
    for i in range(family.num_blocks):
        block_of.update({name: (i, local) for local, name in family.block_tensors(i).items()})
    pieces = part.block_shapes()
    to_quantize: Dict[str, Tuple[int, int]] = {}
    skipped: Dict[str, Tuple[int, ...]] = {}
    for i in range(family.num_blocks if cfg is not None else 0):
        names = family.block_tensors(i)
        for local in family.linear_weights():
            shape = pieces[local]
            if cfg.accepts(shape):  # type: ignore[union-attr]
                to_quantize[names[local]] = (int(shape[0]), int(shape[1]))
            else:
                skipped[local] = shape
    if cfg is not None and not to_quantize:
        shapes = ", ".join(f"{local} {list(s)}" for local, s in skipped.items())
        raise QuantizationError(f"group size {cfg.group_size} divides the input dimension of no linear weight "
                                f"({shapes}); pick a group size that divides them (e.g. 32, 64 or 128)")

    def items(name: str) -> List[_Item]:
        local = block_of[name][1] if name in block_of else None
        cut = part.shard_cut(local) if local is not None else None
        if coded is not None and name in coded:
            assert local is not None
            shape = tuple(pieces[local])
            return [_Item(Entry(p, s, dt), name, p, cut)
                    for p, (dt, s) in lossless_parts(name, shape, coded[name]).items()]
        if name in to_quantize:
            return [_Item(Entry(p, tuple(shape), dt), name, p, cut)
                    for p, (dt, shape) in cfg.packed(name, to_quantize[name]).items()]  # type: ignore[union-attr]
        info = infos[name]
        shape = tuple(pieces[local]) if local is not None else tuple(info.shape)
        return [_Item(Entry(name, shape, info.torch_dtype), name, None, cut)]

    before = _Unit("outer tensors", per_tensor=True)
    blocks = [_Unit(f"block {i}") for i in range(family.num_blocks)]
    after = _Unit("final tensors", per_tensor=True)
    seen_block = False
    for name in expected:
        if name in block_of:
            seen_block = True
            blocks[block_of[name][0]].items += items(name)
        else:
            (after if seen_block else before).items += items(name)
    wanted = set(expected)
    for name in store.names():  # anything else the source stores (an untied copy of the head, ...) goes last
        if name not in wanted:
            after.items += items(name)
    units = ([before] if before.items else []) + blocks + ([after] if after.items else [])
    return units, skipped


def _shards(units: List[_Unit], shard_size: int) -> List[List[_Unit]]:
    """Units packed greedily into shards of at most ``shard_size`` bytes, in order (``writer.split_shards``); a unit
    larger than that gets a shard of its own (a block is never split)."""
    split = split_shards([[i.entry for i in u.items] for u in units], shard_size)
    shards: List[List[_Unit]] = []
    k = 0
    for entries in split:
        shard: List[_Unit] = []
        while k < len(units) and sum(len(u.items) for u in shard) < len(entries):
            shard.append(units[k])
            k += 1
        shards.append(shard)
    return shards


class _Packer:
    """Reads units ahead in a background thread and writes them out, quantizing on the way."""

    def __init__(self, store: WeightStore, cfg: Union[QuantConfig, LosslessConfig, None], device: torch.device,
                 bar: Any) -> None:
        self.store, self.cfg, self.device, self.bar = store, cfg, device, bar
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zstream-pack-read")

    def _reads(self, units: List[_Unit]) -> List[List[str]]:
        """The reads, in order: a block in one coalesced read, outer tensors one by one."""
        out: List[List[str]] = []
        for unit in units:
            out += [[s] for s in unit.sources] if unit.per_tensor else [unit.sources]
        return out

    def write_shard(self, path: Path, units: List[_Unit], metadata: Dict[str, str]) -> None:
        items = [i for unit in units for i in unit.items]
        reads = self._reads(units)
        pending: Optional[Future] = self.pool.submit(self.store.read, reads[0]) if reads else None
        with open(path, "wb") as f:
            f.write(header([i.entry for i in items], metadata))
            k = 0
            for r, names in enumerate(reads):
                assert pending is not None
                tensors = pending.result()
                pending = self.pool.submit(self.store.read, reads[r + 1]) if r + 1 < len(reads) else None
                k = self._write_read(f, items, k, set(names), tensors)
                self.bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
                del tensors
            if k != len(items):
                raise QuantizationError(f"internal error: {path.name}: wrote {k} of {len(items)} tensors")

    def _write_read(self, f: BinaryIO, items: List[_Item], k: int, wanted: set,
                    tensors: Dict[str, torch.Tensor]) -> int:
        """Write the items from ``k`` on that derive from the tensors of one read; returns the next item's index."""
        packed: Dict[str, torch.Tensor] = {}
        while k < len(items) and items[k].source in wanted:
            item = items[k]
            t = tensors[item.source]
            if item.cut is not None:
                t = piece(t, item.cut, item.source)
            if item.part is None:
                write_tensor(f, t, item.entry)
            else:
                if item.part not in packed:
                    packed.update(self._code(t, item.source))
                write_tensor(f, packed[item.part], item.entry)
            k += 1
        return k

    def _code(self, t: torch.Tensor, name: str) -> Dict[str, torch.Tensor]:
        if isinstance(self.cfg, LosslessConfig):
            return lossless_encode(t).tensors(name)
        assert self.cfg is not None
        return _quantize(t, self.cfg, self.device).tensors(name)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _copy_side_files(src: Path, dst: Path, config: Dict[str, Any],
                     cfg: Union[QuantConfig, LosslessConfig, None]) -> None:
    """config.json (with a ``zstream_quantization`` entry for humans: the metadata the headers carry), plus the
    generation config and tokenizer files, when the source has them."""
    config = dict(config)
    if isinstance(cfg, QuantConfig):
        config["zstream_quantization"] = json.loads(cfg.to_metadata()[METADATA_KEY])
    elif cfg is not None:
        config["zstream_compression"] = json.loads(next(iter(cfg.to_metadata().values())))
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    folder = checkpoint.side_files_dir(src)
    for name in checkpoint.SIDE_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)


def pack(model: PathLike, out: PathLike, *, quantize: Optional[str] = "int4", group_size: int = 64,
         symmetric: bool = False, tensor_parallel: int = 1, compress: Optional[str] = None,
         shard_size: Union[int, str] = "4GB", device: Optional[str] = None, progress: bool = True) -> Path:
    """Write a copy of checkpoint ``model`` (a directory, or a Hugging Face repo id) to the new directory ``out``
    with every block's linear weights quantized (``"int4"`` or ``"int8"``, ``group_size`` inputs per fp16 scale,
    ``symmetric`` or with a per-group zero), and/or laid out for ``tensor_parallel`` ranks. Returns ``out``.

    ``tensor_parallel`` N > 1 writes one checkpoint per rank, ``out/rank{r}-of-{N}/``, holding that rank's piece of
    every block (``Family.shard_cut``: its heads, its MLP units) and the whole outer tensors, so that each rank of a
    tensor-parallel ``load`` reads its piece of a block from disk in one contiguous read (offload="nvme");
    ``out/tensor-parallel.json`` says so. ``quantize=None`` then keeps the weights as they are.
    ``compress="lossless"`` (with ``quantize=None``) entropy-codes every block's linear weights (bfloat16 or float16;
    ``lossless``): the same bits, about 0.67x of a bf16 block's bytes, streamed as they are with offload="nvme".
    ``device``: where quantization runs ("cuda" is much faster than the CPU for big models; None/"auto" picks it
    when present). The output is bit-identical either way. ``shard_size`` caps a shard (blocks are never split).
    Raises ``QuantizationError`` for an already packed source or a group size that divides no linear weight, and
    ``OutputExistsError`` for an ``out`` that is not empty.
    """
    cfg = QuantConfig.parse(quantize, group_size, symmetric)
    if compress not in (None, "none", "lossless"):
        raise UsageError(f"pack: compress must be 'lossless' or None, not {compress!r}")
    compress = None if compress == "none" else compress
    if compress is not None and cfg is not None:
        raise UsageError("pack: compress='lossless' keeps every bit and quantize changes them: give quantize=None")
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise UsageError(f"pack: tensor_parallel must be a number of ranks >= 1, not {tensor_parallel!r}")
    if cfg is None and compress is None and tensor_parallel == 1:
        raise QuantizationError("pack writes a quantized checkpoint (quantize 'int4' or 'int8'), a losslessly "
                                "compressed one (compress='lossless'), a tensor-parallel layout (tensor_parallel > 1), "
                                "or a combination")
    dev = resolve_device(None if device in (None, "auto") else device)
    limit = parse_bytes(shard_size, what="shard_size")
    assert limit is not None
    src = checkpoint.resolve(model)
    dst = Path(out).expanduser()
    if checkpoint.tensor_parallel_ranks(src) is not None:
        raise UsageError(f"{src}: already laid out for tensor parallelism; pack the checkpoint it came from")
    config = checkpoint.read_config(src)
    store = WeightStore.open(src, pin=dev.type == "cuda")
    try:
        names = store.names()
        already = packed_config(store, where=str(src))
        if already is not None:
            raise QuantizationError(f"{src}: already packed ({already.describe()}); pack an unquantized checkpoint")
        family = family_for(config, names)
        family.validate({n: store.info(n) for n in names})
        ranks = [family.shard(r, tensor_parallel, reduce=_no_reduce) for r in range(tensor_parallel)]
        code = None
        if compress is not None:
            stored = store.info(family.block_tensors(0)[family.linear_weights()[0]]).torch_dtype
            code = block_code_for(ranks[0].block_shapes(), family.linear_weights(), stored, stored, str(src))
        plans = [_plan(store, family, cfg, part, _coded_words(store, family, part, code) if code else None)
                 for part in ranks]
        for local, shape in plans[0][1].items():
            warn(f"zstream pack: {local} {list(shape)} stays unquantized: group size {cfg.group_size} does "  # type: ignore[union-attr]
                 f"not divide its input dimension", RuntimeWarning)
        _write(src, dst, store, [units for units, _ in plans], limit, config, code.cfg if code else cfg, dev, progress)
        block_in = sum(store.info(n).nbytes for i in range(family.num_blocks) for n in family.block_tensors(i).values())
        total_in = sum(store.info(n).nbytes for n in names)
    finally:
        store.close()
    if progress:
        block_out = sum(u.nbytes for units, _ in plans for u in units if u.label.startswith("block "))
        total_out = sum(u.nbytes for units, _ in plans for u in units)
        how = cfg.describe() if cfg else code.cfg.describe() if code else ""
        what = ", ".join(x for x in (how, f"{tensor_parallel} ranks" if tensor_parallel > 1 else "") if x)
        ratio = block_out / block_in
        per_pass = (f"{ratio:.2f}x streamed per pass" if tensor_parallel == 1 else
                    f"{ratio:.2f}x over the ranks; each rank streams {ratio / tensor_parallel:.2f}x per pass")
        print(f"packed {src} -> {dst} ({what}): blocks {fmt_bytes(block_in)} -> {fmt_bytes(block_out)} ({per_pass}), "
              f"all tensors {fmt_bytes(total_in)} -> {fmt_bytes(total_out)} ({total_out / total_in:.2f}x)",
              file=sys.stderr)
    return dst


def _coded_words(store: WeightStore, family: Family, part: Family, code: BlockCode) -> Dict[str, int]:
    """{checkpoint name: words of its streams} of the weights ``code`` codes, for rank ``part``'s pieces. A header is
    written before the data, and a coded size depends on the values: every weight is coded once here for its size
    (and once more when it is written; coding runs at hundreds of MB/s)."""
    words: Dict[str, int] = {}
    for i in range(family.num_blocks):
        names = family.block_tensors(i)
        tensors = store.read([names[local] for local in code.shapes])
        for local in code.shapes:
            t, cut = tensors[names[local]], part.shard_cut(local)
            words[names[local]] = lossless_encode(t if cut is None else piece(t, cut, names[local])).words.numel()
    return words


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t  # packing cuts pieces; it runs no forward pass


def _write(src: Path, dst: Path, store: WeightStore, ranks: List[List[_Unit]], limit: int, config: Dict[str, Any],
           cfg: Union[QuantConfig, LosslessConfig, None], dev: torch.device, progress: bool) -> None:
    """The shards, the index and the side files (per rank in a tensor-parallel layout), into a new directory renamed
    to ``dst`` when complete."""
    from tqdm.auto import tqdm

    total = sum(store.info(s).nbytes for units in ranks for u in units for s in u.sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"packing {dst.name}", disable=not progress)
    packer = _Packer(store, cfg, dev, bar)
    try:
        with new_checkpoint_dir(dst) as tmp:
            for rank, units in enumerate(ranks):
                metadata = {"format": "pt", **(cfg.to_metadata() if cfg else {})}
                out = tmp
                if len(ranks) > 1:
                    out = tmp / checkpoint.rank_dir_name(rank, len(ranks))
                    out.mkdir()
                    metadata.update(checkpoint.rank_metadata(rank, len(ranks)))
                shards = _shards(units, limit)
                for file, shard in zip(shard_names(len(shards)), shards):
                    packer.write_shard(out / file, shard, metadata)
                write_index(out, [[i.entry for u in shard for i in u.items] for shard in shards])
                _copy_side_files(src, out, config, cfg)
            if len(ranks) > 1:
                checkpoint.write_tensor_parallel_marker(tmp, len(ranks))
                _copy_side_files(src, tmp, config, cfg)
    finally:
        packer.close()
        bar.close()
