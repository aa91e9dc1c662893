"""What planning needs to know of a checkpoint, read from its headers alone: the one home of its sizes.

``checkpoint_facts`` validates the checkpoint against its family, decides how its blocks are quantized (packed on
disk, quantized at load, or not at all) and works out the bytes of every block as it crosses the link and as it
sits on the device. ``load``, ``plan_batch`` and the GH200 mode all plan from these facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import QuantizationError
from ..foundations.lossless import BlockCode, block_code_for, coded_infos, packed_code
from ..foundations.models import Family
from ..foundations.quant import BlockQuant, QuantConfig, checkpoint_quant, tensor_infos
from ..foundations.store import WeightStore


def compute_dtype(requested: Optional[torch.dtype], checkpoint: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype blocks compute in: as asked; else the checkpoint's own on a GPU and float32 on the CPU (where half
    precision matmuls are slow or missing)."""
    if requested is not None:
        return requested
    return checkpoint if device_type == "cuda" else torch.float32


@dataclass(frozen=True)
class CheckpointFacts:
    """A checkpoint's family, dtypes, quantization and sizes, as the loader will hold them."""

    family: Family
    checkpoint_dtype: torch.dtype        # of the outer (embedding) tensors, as stored
    dtype: torch.dtype                   # compute dtype
    stored_block_names: List[Dict[str, str]]   # {local: checkpoint name} per block, as the files hold them
    block_names: List[Dict[str, str]]    # ... as the engine streams them (packed names once quantized)
    outer_names: Dict[str, str]          # embeddings, final norm, head
    block_bytes: List[int]               # per block, as it crosses the link
    outer_bytes: int                     # outer tensors, as stored
    quant: Optional[BlockQuant] = None   # how blocks are coded on the link: quantized (BlockQuant) or losslessly
                                         # compressed (lossless.BlockCode, the same methods); None: as stored
    packed: bool = False                 # the files hold the packed tensors (``zstream pack``)
    unquantized_block_bytes: Optional[List[int]] = None  # per block before quantization (checkpoint dtype)
    shard_at_load: bool = False          # the files hold whole blocks; this rank keeps its piece (family.shard_cut)

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)

    @property
    def quantize_at_load(self) -> bool:
        return self.quant is not None and not self.packed

    @property
    def device_scale(self) -> float:
        """How much larger weights are on the device: blocks converted to a wider compute dtype grow."""
        return max(1.0, self.dtype.itemsize / self.checkpoint_dtype.itemsize)

    @property
    def device_block_bytes(self) -> List[int]:
        return [int(b * self.device_scale) for b in self.block_bytes]

    @property
    def device_outer_bytes(self) -> int:
        return int(self.outer_bytes * self.device_scale)

    @property
    def device_bytes(self) -> int:
        """Every weight on the device: what offload="none" needs."""
        return self.device_outer_bytes + sum(self.device_block_bytes)


def checkpoint_facts(store: WeightStore, family: Family, *, dtype: Optional[torch.dtype], device_type: str,
                     quantize: Optional[QuantConfig], where: str, shard_at_load: bool = False,
                     compress: Optional[str] = None) -> CheckpointFacts:
    """The facts of the checkpoint ``store`` holds for ``family``; raises ModelError / QuantizationError where the
    tensors do not match the config or the quantization asked for does not fit.

    ``family`` may be one rank's shard (``Family.shard``); ``shard_at_load`` says the files hold whole blocks, which
    the checkpoint is validated against, while the sizes are those of the rank's pieces."""
    stored = [family.block_tensors(i) for i in range(family.num_blocks)]
    outer = family.outer_tensors()
    ckpt_dtype = store.info(next(iter(outer.values()))).torch_dtype
    dtype = compute_dtype(dtype, ckpt_dtype, device_type)
    whole = family.unsharded if shard_at_load and family.unsharded is not None else family
    code = packed_code(store, family, dtype, where)
    if code is not None:  # written by zstream pack --compress lossless
        return _coded_facts(store, family, whole, code, ckpt_dtype, dtype, stored, outer, where,
                            asked=quantize is not None or compress is not None or shard_at_load)
    bq, packed = checkpoint_quant(store, family, dtype, quantize, where=where)
    whole.validate(tensor_infos(store, whole, bq.cfg if packed and bq is not None else None))
    if compress is not None:  # "lossless": coded at load; its size is planned as the uncoded one until then
        if bq is not None:
            raise QuantizationError(f"{where}: compress={compress!r} codes the checkpoint's own weights; it does not "
                                    "combine with quantization")
        stored_dtype = store.info(family.block_tensors(0)[family.linear_weights()[0]]).torch_dtype
        bq = block_code_for(family.block_shapes(), family.linear_weights(), stored_dtype, dtype, where)  # type: ignore
    outer_bytes = sum(store.info(n).nbytes for n in set(outer.values()))
    if shard_at_load:
        return _shard_facts(store, family, ckpt_dtype, dtype, stored, outer, outer_bytes, bq, packed)
    if bq is None:
        return CheckpointFacts(family, ckpt_dtype, dtype, stored, stored, outer, _stored_bytes(store, stored),
                               outer_bytes)
    shapes = family.block_shapes()
    itemsize = _itemsizes(store, family, stored, ckpt_dtype)
    unquantized = [_unquantized_bytes(shapes, itemsize)] * family.num_blocks
    streamed = [bq.names(names) for names in stored]
    if packed:  # the files hold the packed tensors: stream them under their own names
        return CheckpointFacts(family, ckpt_dtype, dtype, streamed, streamed, outer,
                               _stored_bytes(store, streamed), outer_bytes, bq, True, unquantized)
    per_block = bq.nbytes(shapes, itemsize)
    return CheckpointFacts(family, ckpt_dtype, dtype, stored, streamed, outer, [per_block] * family.num_blocks,
                           outer_bytes, bq, False, unquantized)


def _coded_facts(store: WeightStore, family: Family, whole: Family, code: BlockCode, ckpt_dtype: torch.dtype,
                 dtype: torch.dtype, stored: List[Dict[str, str]], outer: Dict[str, str], where: str,
                 asked: bool) -> CheckpointFacts:
    """The facts of a losslessly compressed checkpoint: its coded parts stream as they are."""
    if asked:
        raise QuantizationError(f"{where} is compressed ({code.cfg.describe()}): load it without quantize, compress "
                                "or tensor parallelism (for that, pack the original with --tensor-parallel too)")
    whole.validate(coded_infos(store, whole, code))
    streamed = [code.names(names) for names in stored]
    unquantized = [_unquantized_bytes(family.block_shapes(), _itemsizes(store, family, stored, ckpt_dtype))
                   ] * family.num_blocks
    outer_bytes = sum(store.info(n).nbytes for n in set(outer.values()))
    return CheckpointFacts(family, ckpt_dtype, dtype, streamed, streamed, outer, _stored_bytes(store, streamed),
                           outer_bytes, code, True, unquantized)  # type: ignore[arg-type]


def _shard_facts(store: WeightStore, family: Family, ckpt_dtype: torch.dtype, dtype: torch.dtype,
                 stored: List[Dict[str, str]], outer: Dict[str, str], outer_bytes: int, bq: Optional[BlockQuant],
                 packed: bool) -> CheckpointFacts:
    """The facts of one rank's pieces of whole blocks: sizes from the shard's shapes, not the files'."""
    shapes = family.block_shapes()
    itemsize = _itemsizes(store, family, stored, ckpt_dtype)
    unquantized = _unquantized_bytes(shapes, itemsize)
    if bq is None:
        return CheckpointFacts(family, ckpt_dtype, dtype, stored, stored, outer, [unquantized] * family.num_blocks,
                               outer_bytes, shard_at_load=True)
    streamed = [bq.names(names) for names in stored]
    per_block = bq.nbytes(shapes, itemsize)
    return CheckpointFacts(family, ckpt_dtype, dtype, streamed if packed else stored, streamed, outer,
                           [per_block] * family.num_blocks, outer_bytes, bq, packed,
                           [unquantized] * family.num_blocks, shard_at_load=True)


def _itemsizes(store: WeightStore, family: Family, stored: List[Dict[str, str]], ckpt_dtype: torch.dtype
               ) -> Dict[str, int]:
    """Each block tensor's element size as its first block stores it (norms may be kept wider than the weights); a
    packed or coded weight, which has no tensor under its own name, counts in the checkpoint's dtype."""
    first = stored[0] if stored else {}
    names = {local: first.get(local, "") for local in family.block_shapes()}
    return {local: store.info(name).torch_dtype.itemsize if name in store else ckpt_dtype.itemsize
            for local, name in names.items()}


def _unquantized_bytes(shapes: Dict[str, Tuple[int, ...]], itemsize: Dict[str, int]) -> int:
    """A block's bytes before quantization or coding."""
    return sum(math.prod(shape) * itemsize[local] for local, shape in shapes.items())


def facts_from_shapes(family: Family, dtype: torch.dtype) -> CheckpointFacts:
    """The facts a checkpoint of ``family`` in ``dtype`` would have (unquantized), from its config alone: planning a
    model before (or without) writing it."""
    shapes = family.expected_shapes()
    blocks = [family.block_tensors(i) for i in range(family.num_blocks)]
    outer = family.outer_tensors()
    block_bytes = [sum(math.prod(shapes[n]) for n in names.values()) * dtype.itemsize for names in blocks]
    outer_bytes = sum(math.prod(shapes[n]) for n in set(outer.values())) * dtype.itemsize
    return CheckpointFacts(family, dtype, dtype, blocks, blocks, outer, block_bytes, outer_bytes)


def _stored_bytes(store: WeightStore, blocks: List[Dict[str, str]]) -> List[int]:
    return [sum(store.info(n).nbytes for n in dict.fromkeys(names.values())) for names in blocks]
