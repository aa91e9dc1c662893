"""``zstream.load``: open a checkpoint in place, plan where every block lives, and build the streaming model."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Union

import torch

from .detect import HardwareReport, choose_offload, hardware
from .engine import Streamer, StreamingModel, Weights, _DeviceRing, _HostTickets, _local
from .engine import to_device as block_to_device
from .errors import ModelError, OutOfMemoryError
from .generation import read_config
from .models import Family, family_for
from .plan import (
    OFFLOADS,
    Plan,
    Stopwatch,
    choose_residency,
    fmt_bytes,
    host_available_bytes,
    measure_disk_gbps,
    measure_h2d_gbps,
    parse_bytes,
)
from .quant import CODES, BlockQuant, QuantConfig, QuantizationError, block_quant_for
from .store import FlatRead, WeightStore

READ_CONCURRENCY = 3  # blocks read (and pinned) at once while loading
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(model: Union[str, os.PathLike], *, download: bool = False,
                       revision: Optional[str] = None) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id found in the local cache (downloaded only when
    ``download`` is True). Only config, tokenizer and safetensors files are considered."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = os.fspath(model)
    if not _REPO_ID.match(name):
        raise ModelError(f"{name}: no such checkpoint directory (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{name}: looks like a Hugging Face repo id, but huggingface_hub is not installed "
                         "(pip install 'zstream[hub]')") from None
    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=not download,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # huggingface_hub raises several types for "not cached" / offline / missing repo
        if download:
            raise ModelError(f"{name}: could not download from the Hugging Face hub: {e}") from e
        raise ModelError(f"{name}: not in the local Hugging Face cache, and download=False: pass download=True "
                         "to fetch it, or give a local directory") from e


def _tokenizer(path: Path) -> Any:
    if not (path / "tokenizer.json").exists():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reserve_bytes(family: Family, batch: int, seq: int, dtype: torch.dtype) -> int:
    """KV cache for ``batch`` x ``seq`` tokens plus a working set for activations and last-position logits."""
    kv = 2 * family.num_blocks * batch * seq * family.num_kv_heads * family.head_dim * dtype.itemsize
    acts = batch * seq * family.hidden_size * 24 * dtype.itemsize + batch * family.vocab_size * 8
    return kv + acts + (256 << 20)


def load(model: Union[str, os.PathLike], *, offload: str = "auto", device: Optional[str] = None,
         dtype: Optional[torch.dtype] = None, gpu_memory: Union[int, str, None] = None, prefetch: int = 2,
         disk_prefetch: int = 2, max_batch: int = 1, max_seq_len: Optional[int] = None,
         max_resident_blocks: Optional[int] = None, reader: str = "auto",
         quantize: Optional[str] = None, group_size: int = 64, symmetric: bool = False,
         download: bool = False, revision: Optional[str] = None, progress: bool = True) -> StreamingModel:
    """Load a checkpoint for streaming inference.

    ``offload``: "none" (everything on the device), "cpu" (weights read once into pinned host arenas, streamed
    every pass), "nvme" (blocks read from disk every pass through a small ring of host slots), "ats" (GH200 mode)
    or "auto" (none if it fits with room for the KV cache, else cpu if host memory allows, else nvme).
    ``gpu_memory``: the device budget (bytes or "20GiB"); default: free memory. Within it the non-block weights
    stay resident first, then the ring, then as many blocks as fit; ``max_batch`` x ``max_seq_len`` sizes the
    KV cache the budget keeps room for; ``max_resident_blocks`` caps the resident blocks (0: stream every block).
    ``device`` defaults to "cuda" when there is one, else "cpu", where "nvme" streams every block from disk
    unless ``gpu_memory`` gives a host budget for resident ones.
    ``quantize``: "int8" or "int4" quantizes each block's linear weights group-wise (``group_size`` inputs per
    fp16 scale and minimum, or ``symmetric``) as the block is loaded, for offload "none" or "cpu"; fewer bytes then
    cross the link, and the GPU dequantizes each block in its slot. A checkpoint written by ``zstream pack`` is
    quantized already (its header says how) and loads with any offload, "nvme" included.
    """
    clock = Stopwatch()
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, not {offload!r}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, not {prefetch}")
    dev = torch.device(device or _default_device())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("device='cuda' but torch sees no CUDA device; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    path = resolve_checkpoint(model, download=download, revision=revision)
    if offload == "ats" and quantize is not None:
        raise QuantizationError(f"{path}: offload='ats' reads checkpoint weights in place and cannot quantize them; "
                                "use offload='cpu' with quantize, or pack the checkpoint and stream it with 'nvme'")
    if offload == "ats":
        from .ats import load_ats  # the GH200 mode has its own module

        return load_ats(path, device=dev, dtype=dtype, progress=progress, reader=reader, prefetch=prefetch)

    config = read_config(path)
    streaming = offload in ("cpu", "nvme", "auto")
    wanted = QuantConfig.parse(quantize, group_size, symmetric)
    # Quantizing at load reads each block once into temporary arenas: pinning those would be wasted work.
    store = WeightStore.open(path, reader=reader, pin=dev.type == "cuda" and streaming and wanted is None,
                             workers=READ_CONCURRENCY, threads=min(16, os.cpu_count() or 8))
    family = family_for(config, store.names())
    block_names = [family.block_tensors(i) for i in range(family.num_blocks)]
    outer_names = family.outer_tensors()
    ckpt_dtype = store.info(next(iter(outer_names.values()))).torch_dtype
    if dtype is None:
        dtype = ckpt_dtype if dev.type == "cuda" else torch.float32
    try:
        bq, packed = checkpoint_quant(store, family, dtype, wanted, where=str(path))
        if bq is not None and not packed and offload in ("nvme", "ats"):
            raise QuantizationError(f"{path}: quantize={quantize!r} quantizes while loading into memory, so it "
                                    f"works with offload 'none', 'cpu' or 'auto'; for offload={offload!r} write a "
                                    f"quantized checkpoint once with `zstream pack {path} OUT --quantize {quantize}`")
        family.validate(_tensor_infos(store, family, bq.cfg if packed and bq is not None else None))
    except Exception:
        store.close()
        raise
    unquantized: Optional[List[int]] = None  # block bytes before quantization, for the plan's before/after
    if bq is None:
        raw = [sum(store.info(n).nbytes for n in names.values()) for names in block_names]
    else:
        shapes = family.block_shapes()
        unquantized = [sum(math.prod(shape) for shape in shapes.values()) * ckpt_dtype.itemsize] * family.num_blocks
        if packed:  # the store holds the packed tensors: stream them under their own names
            block_names = [bq.names(names) for names in block_names]
            raw = [sum(store.info(n).nbytes for n in names.values()) for names in block_names]
        else:
            raw = [bq.nbytes(shapes, {local: ckpt_dtype.itemsize for local in shapes})] * family.num_blocks
    scale = max(1.0, dtype.itemsize / ckpt_dtype.itemsize)  # converted blocks are larger on the device
    on_device = [int(b * scale) for b in raw]
    outer_bytes = int(sum(store.info(n).nbytes for n in set(outer_names.values())) * scale)
    seq = min(max_seq_len or 2048, family.max_positions)
    reserve = _reserve_bytes(family, max_batch, seq, dtype)
    if bq is not None:  # a block's weights exist dequantized while it computes
        reserve += bq.dequantized_nbytes
    total = outer_bytes + sum(on_device)

    budget = parse_bytes(gpu_memory)
    if dev.type == "cuda" and budget is None:
        budget = torch.cuda.mem_get_info(dev)[0]
    notes: List[str] = []
    if offload == "auto":
        room = budget if budget is not None else host_available_bytes()
        rep = hardware(dev.index or 0, measure=False) if dev.type == "cuda" else HardwareReport()
        offload = choose_offload(rep, total, room, host_available_bytes(), reserve)
        if offload == "cpu" and dev.type == "cpu":
            offload = "nvme"  # on the CPU, weights that do not fit host memory can only come from disk
        notes.append(f"offload='auto' chose {offload!r}: weights {fmt_bytes(total)}, KV+activations "
                     f"{fmt_bytes(reserve)}, budget {fmt_bytes(room)}")
        if bq is not None and offload == "ats":
            offload = "cpu"  # ats reads checkpoint weights in place: quantized blocks stream by copies instead
            notes.append("quantized weights: offload 'cpu' instead of 'ats'")
        if bq is not None and not packed and offload == "nvme":
            store.close()
            raise QuantizationError(f"{path}: the weights quantized ({fmt_bytes(total)}) do not fit host memory "
                                    f"({fmt_bytes(host_available_bytes())} available), and quantize= quantizes into "
                                    f"memory; write a quantized checkpoint with `zstream pack {path} OUT --quantize "
                                    f"{quantize}` and load that with offload='nvme'")
        if offload == "ats":
            store.close()
            from .ats import load_ats

            return load_ats(path, device=dev, dtype=dtype, progress=progress, reader=reader, prefetch=prefetch)
    if offload == "none" and budget is not None and total + reserve > budget:
        raise OutOfMemoryError(f"{path}: the weights ({fmt_bytes(total)}) and KV cache ({fmt_bytes(reserve)}) "
                               f"do not fit the {fmt_bytes(budget)} device budget: use offload='cpu' or 'nvme'")
    if offload == "none":
        resident, streamed = list(range(family.num_blocks)), []
    elif dev.type == "cpu" and offload == "cpu":
        resident, streamed = list(range(family.num_blocks)), []  # host memory is the device: nothing to stream
    elif dev.type == "cpu" and budget is None:
        resident, streamed = [], list(range(family.num_blocks))  # nvme on the CPU: only staging slots in memory
    else:
        resident, streamed = choose_residency(on_device, outer_bytes, budget, prefetch + 1, reserve,
                                              where=str(path))
    if max_resident_blocks is not None and len(resident) > max_resident_blocks:
        resident, streamed = resident[:max_resident_blocks], sorted(streamed + resident[max_resident_blocks:])
    plan = Plan(offload=offload, device=str(dev), dtype=dtype, block_bytes=raw, outer_bytes=outer_bytes,
                resident_blocks=resident, streamed_blocks=streamed,
                ring_slots=min(prefetch + 1, len(streamed)) if dev.type == "cuda" else 0,
                kv_reserve_bytes=reserve, budget_bytes=budget, notes=notes,
                quantization=bq.cfg.describe() if bq is not None else None,
                unquantized_block_bytes=unquantized)

    def to_device(flat: FlatRead, names: Dict[str, str]) -> Weights:
        if dev.type == "cpu":
            return _local(flat.view(), names, dtype)
        return _local(block_to_device(flat, dev).view(), names, dtype)  # one transfer per block

    bar = None
    if progress:
        from tqdm.auto import tqdm

        host_bytes = sum(raw[i] for i in streamed) if offload == "cpu" else 0
        bar = tqdm(total=outer_bytes + sum(raw[i] for i in resident) + host_bytes, unit="B", unit_scale=True,
                   desc=f"zstream load ({offload})", leave=False)

    def read(names: Dict[str, str]) -> FlatRead:
        flat = store.read_flat(list(dict.fromkeys(names.values())))
        if bar is not None:
            bar.update(sum(store.info(n).nbytes for n in set(names.values())))
        return flat

    quantize_now = bq is not None and not packed
    if quantize_now:
        assert bq is not None
        fp_names = block_names
        block_names = [bq.names(names) for names in fp_names]

        def quantized(i: int, flat: FlatRead, dest: Union[torch.device, str]) -> FlatRead:
            """Block i read in its checkpoint dtype -> its packed form in ``dest`` (quantized on the device)."""
            assert bq is not None
            buf, layout = bq.pack(flat.view(), fp_names[i], work=dev, dest=dest)
            return FlatRead(buf, layout)

    outer = to_device(read(outer_names), outer_names)
    resident_w: Dict[int, Weights] = {}
    host_blocks: List[Optional[FlatRead]] = [None] * family.num_blocks
    # Several reads at a time: blocks pin their arenas while others are being read.
    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        if quantize_now:
            for i, flat in zip(resident, _bounded_map(pool, lambda i: read(fp_names[i]), resident)):
                resident_w[i] = _local(quantized(i, flat, dev).view(), block_names[i], dtype)
            if offload == "cpu" and streamed:
                dest = "pinned" if dev.type == "cuda" else dev
                for i, flat in zip(streamed, _bounded_map(pool, lambda i: read(fp_names[i]), streamed)):
                    host_blocks[i] = quantized(i, flat, dest)
        else:
            for i, flat in zip(resident, _bounded_map(pool, lambda i: read(block_names[i]), resident)):
                resident_w[i] = to_device(flat, block_names[i])
            if offload == "cpu" and streamed:
                for i, flat in zip(streamed, _bounded_map(pool, lambda i: read(block_names[i]), streamed)):
                    host_blocks[i] = flat
    if bar is not None:
        bar.close()

    streamer: Optional[Streamer] = None
    if streamed:
        if dev.type == "cpu":
            streamer = _HostTickets(store, streamed, block_names, dtype, disk_prefetch)
        else:
            if offload == "cpu" and not all(host_blocks[i].buffer.is_pinned() for i in streamed):  # type: ignore
                warnings.warn("zstream: host arenas are not pinned; copies to the GPU will be slow",
                              RuntimeWarning, stacklevel=2)
            source: Union[List[Optional[FlatRead]], WeightStore] = host_blocks if offload == "cpu" else store
            # A slot holds a block as its arena lays it out: tensor bytes plus alignment at the extents' ends.
            if quantize_now:
                slot_bytes = max(host_blocks[i].nbytes for i in streamed)  # type: ignore[union-attr]
            else:
                slot_bytes = max(store.plan(block_names[i].values())[1] for i in streamed)
            streamer = _DeviceRing(dev, streamed, slot_bytes, prefetch + 1, source,
                                   block_names, dtype, disk_prefetch)
        plan.link, plan.link_gbps = _measure_link(store, dev, offload, [block_names[i] for i in streamed[:4]])
    return StreamingModel(store=store, family=family, plan=plan, config=config, outer=outer, resident=resident_w,
                          streamer=streamer, tokenizer=_tokenizer(path), path=str(path), load_s=clock(),
                          quant=bq)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[int], FlatRead], items: List[int]) -> Iterator[FlatRead]:
    """``pool.map`` with at most READ_CONCURRENCY + 1 results alive: blocks arrive as fast as they are read, but
    a consumer slower than the disk (quantizing, copying to the device) does not pile up the whole model in host
    memory."""
    pending: Deque[Future[FlatRead]] = deque()
    for i in items:
        pending.append(pool.submit(fn, i))
        if len(pending) > READ_CONCURRENCY:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def checkpoint_quant(store: WeightStore, family: Family, dtype: torch.dtype, wanted: Optional[QuantConfig], *,
                     where: str) -> tuple[Optional[BlockQuant], bool]:
    """(how a checkpoint's blocks are quantized, whether the store holds them packed). A packed checkpoint's headers
    decide, and a different ``wanted`` is refused; otherwise ``wanted`` (quantized at load), refused if its group
    size divides none of the linear weights; otherwise (None, False). ``load`` and ``plan_batch`` both ask here."""
    packed = QuantConfig.from_metadata(store.metadata(), where=where)
    linear, shapes = family.linear_weights(), family.block_shapes()
    if packed is not None:
        if wanted is not None and wanted != packed:
            raise QuantizationError(f"{where} is packed as {packed.describe()}; it cannot be loaded as "
                                    f"{wanted.describe()} (leave quantize unset)")
        first = family.block_tensors(0) if family.num_blocks else {}
        present = {local: local in first and first[local] + CODES in store for local in linear}
        return block_quant_for(packed, shapes, linear, dtype, present), True
    if wanted is None:
        return None, False
    bq = block_quant_for(wanted, shapes, linear, dtype)
    if not bq.shapes:
        raise QuantizationError(f"{where}: group_size {wanted.group_size} divides the input dimension of none of "
                                f"{family.name}'s linear weights ({', '.join(linear)})")
    return bq, False


def _tensor_infos(store: WeightStore, family: Family, packed: Optional[QuantConfig]) -> Dict[str, Any]:
    """{checkpoint name: (shape, dtype)} of what the family expects; a packed weight counts as the (out, in)
    floating-point matrix it stands for, once its packed tensors' shapes have been checked against each other."""
    infos: Dict[str, Any] = {}
    for name in family.expected_shapes():
        if name in store:
            infos[name] = store.info(name)
        elif packed is not None and name + CODES in store:
            codes = store.info(name + CODES).shape
            if len(codes) != 2:
                raise QuantizationError(f"{store.info(name + CODES).file}: {name + CODES} has shape {list(codes)}, "
                                        "not (out, in) codes")
            shape = (codes[0], codes[1] * (2 if packed.bits == 4 else 1))
            for part, (dt, want) in packed.packed(name, shape).items():
                info = store.info(part) if part in store else None
                if info is None or tuple(info.shape) != want or info.torch_dtype != dt:
                    got = "missing" if info is None else f"{info.dtype} {list(info.shape)}"
                    raise QuantizationError(f"{store.info(name + CODES).file}: packed tensor {part} is {got}; "
                                            f"{packed} packs {name} {list(shape)} as {str(dt)[6:]} {list(want)}")
            infos[name] = (shape, torch.float16)
    return infos


def _measure_link(store: WeightStore, dev: torch.device, offload: str,
                  blocks: List[Dict[str, str]]) -> tuple[str, float]:
    """The bandwidth that bounds streaming, measured now: pinned host-to-device copies for cpu offload; for nvme
    the slower of that and the O_DIRECT read of a few blocks through the pool, as the engine reads them."""
    h2d = measure_h2d_gbps(dev) if dev.type == "cuda" else float("inf")
    if offload == "cpu":
        return "pinned host-to-device", h2d
    disk = measure_disk_gbps(store, [list(b.values()) for b in blocks])
    if disk < h2d:
        return "disk read (O_DIRECT)", disk
    return "pinned host-to-device", h2d
