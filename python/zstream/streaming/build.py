"""Building a ``StreamingModel`` from a plan: read what stays resident, read (or quantize) what streams from host
memory, set up the ring and measure the link that bounds it.

``build`` serves offload "none", "cpu" and "nvme"; ``build_in_place`` the GH200 mode ("ats"), whose arenas are
mapped for the GPU to read in place. ``load`` calls one or the other; nothing else changes between them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

import torch

from ..errors import warn
from ..foundations.hardware import HardwareReport
from ..foundations.measure import Rate, measure_link
from ..foundations.parallel import Group
from ..foundations.store import FlatRead, WeightStore
from ..planning.facts import CheckpointFacts
from ..planning.residency import Plan
from .blocks import Streamer
from .device import Device, device_for
from .inplace import InPlaceBlocks, measure_crossover
from .model import StreamingModel
from .ring import DeviceRing
from .sources import HostBlocks, StoreReads
from .weights import DEVICE_ALIGN, Weights, local_weights, to_device

READ_CONCURRENCY = 3  # blocks read (and pinned) at once while loading


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


class _Reader:
    """Reads blocks and outer tensors for the builder, with a progress bar, quantizing blocks when the plan says."""

    def __init__(self, store: WeightStore, facts: CheckpointFacts, plan: Plan, progress: bool) -> None:
        self.store, self.facts, self.plan = store, facts, plan
        self.device = torch.device(plan.device)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            host = sum(facts.block_bytes[i] for i in plan.streamed_blocks) if plan.offload == "cpu" else 0
            total = facts.outer_bytes + sum(facts.block_bytes[i] for i in plan.resident_blocks) + host
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"zstream load ({plan.offload})",
                            leave=False)

    def read(self, names: Dict[str, str]) -> FlatRead:
        flat = self.store.read_flat(list(dict.fromkeys(names.values())))
        if self.bar is not None:
            self.bar.update(sum(self.store.info(n).nbytes for n in set(names.values())))
        return flat

    def block(self, i: int, dest: Any) -> FlatRead:
        """Block i as it streams: read as stored; cut to this rank's piece under tensor parallelism; packed into
        ``dest`` when quantized at load (on the device, the GPU where there is one)."""
        names = self.facts.stored_block_names[i]
        flat = self.read(names)
        if not (self.facts.shard_at_load or self.facts.quantize_at_load):
            return flat
        views = flat.view()
        if self.facts.shard_at_load:
            views = self.facts.family.shard_block(views, names)
            if not self.facts.quantize_at_load:
                return FlatRead.pack(views, dest, DEVICE_ALIGN)
        assert self.facts.quant is not None
        buf, layout = self.facts.quant.pack(views, names, work=self.device, dest=dest)
        return FlatRead(buf, layout)

    def weights(self, flat: FlatRead, names: Dict[str, str]) -> Weights:
        """Resident weights: views of the arena on the CPU, one transfer of the whole block to a GPU."""
        if self.device.type != "cpu" and flat.buffer.device != self.device:
            flat = to_device(flat, self.device)
        return local_weights(flat, names, self.plan.dtype)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build(store: WeightStore, facts: CheckpointFacts, plan: Plan, *, config: Dict[str, Any], path: str,
          prefetch: int, disk_prefetch: int, progress: bool, started: float,
          group: Optional[Group] = None) -> StreamingModel:
    """The model of ``plan`` (offload "none", "cpu" or "nvme"), its weights read from ``store``; one rank's shard of
    it in ``group``."""
    dev = torch.device(plan.device)
    reader = _Reader(store, facts, plan, progress)
    names = facts.block_names
    outer = reader.weights(reader.read(facts.outer_names), facts.outer_names)
    resident: Dict[int, Weights] = {}
    host: List[Optional[FlatRead]] = [None] * facts.num_blocks
    pinned = "pinned" if dev.type == "cuda" else dev  # where blocks quantized at load are kept when they stream
    coded: Dict[int, int] = {}  # bytes of each block as read (and coded)
    try:
        with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:  # blocks pin their arenas while others read
            for i, flat in zip(plan.resident_blocks,
                               _bounded_map(pool, lambda i: reader.block(i, dev), plan.resident_blocks)):
                resident[i] = reader.weights(flat, names[i])
                coded[i] = flat.nbytes
            if plan.offload == "cpu" and plan.streamed_blocks:
                for i, flat in zip(plan.streamed_blocks,
                                   _bounded_map(pool, lambda i: reader.block(i, pinned), plan.streamed_blocks)):
                    host[i] = flat
                    coded[i] = flat.nbytes
    finally:
        reader.close()
    if facts.quant is not None and facts.quant.sized_by_values and facts.quantize_at_load:
        for i, nbytes in coded.items():  # planned as uncoded until now: the step's bytes are the coded ones
            plan.block_bytes[i] = nbytes
    seam = device_for(dev)
    ring = _ring(store, facts, plan, seam, host, prefetch, disk_prefetch) if plan.streamed_blocks else None
    if group is not None:  # every rank measures its link while the others measure theirs: all links busy
        group.gather(None, "waiting for the other ranks to load")
    if ring is not None:
        _set_link(plan, *measure_link(plan.offload, dev, store,
                                      [list(facts.stored_block_names[i].values()) for i in plan.streamed_blocks]))
    return StreamingModel(store=store, facts=facts, plan=plan, config=config, outer=outer, resident=resident,
                          streamed=ring, device=seam, path=path, load_s=time.perf_counter() - started, group=group)


def _ring(store: WeightStore, facts: CheckpointFacts, plan: Plan, seam: Device, host: List[Optional[FlatRead]],
          prefetch: int, disk_prefetch: int) -> DeviceRing:
    streamed = plan.streamed_blocks
    if plan.offload == "cpu":
        if seam.torch_device.type == "cuda" and not all(host[i].buffer.is_pinned() for i in streamed):  # type: ignore
            warn("zstream: host arenas are not pinned; copies to the GPU will be slow", RuntimeWarning)
        source: Any = HostBlocks(host, streamed)
        slot_bytes = max(host[i].nbytes for i in streamed)  # type: ignore[union-attr]
    else:
        source = StoreReads(store, streamed, facts.block_names, disk_prefetch, seam)
        # A slot holds a block as its arena lays it out: tensor bytes plus alignment at the extents' ends.
        slot_bytes = max(store.plan(facts.block_names[i].values())[1] for i in streamed)
    return DeviceRing(seam, streamed, slot_bytes, prefetch + 1, source, facts.block_names, plan.dtype)


def _set_link(plan: Plan, link: str, rate: Rate) -> None:
    plan.link, plan.link_gbps, plan.link_spread = link, rate.gbps, (rate.low, rate.high)


def build_in_place(  # GPU only: the GH200 mode (ATS, or mapped pinned memory on PCIe GPUs)
        path: Path, facts: CheckpointFacts, plan: Plan, *, config: Dict[str, Any], report: HardwareReport, reader: str,
        prefetch: int, copy_from_tokens: Optional[int], progress: bool, started: float) -> StreamingModel:
    """offload="ats": every block read into arenas the GPU reads in place (pageable memory next to the GPU under
    ATS, mapped pinned memory elsewhere); passes of many tokens copy them through a ring instead."""
    dev = torch.device(plan.device)
    native = report.ats
    node = report.gpu_numa_node if len(report.numa_nodes) > 1 else None
    store = WeightStore.open(path, reader=reader, pin=not native, mapped=not native, numa_node=node,
                             tensor_align=DEVICE_ALIGN)
    try:
        outer_flat = store.read_flat(list(dict.fromkeys(facts.outer_names.values())))
        outer = local_weights(to_device(outer_flat, dev), facts.outer_names, plan.dtype)
        in_place: List[FlatRead] = []
        host: List[FlatRead] = []
        from tqdm.auto import tqdm

        for names in tqdm(facts.block_names, desc="zstream load (ats)", leave=False, disable=not progress):
            dev_flat, host_flat = store.read_in_place(names.values(), device_id=dev.index or 0)
            in_place.append(dev_flat)
            host.append(host_flat)
        # The largest weight of block 0, read in place and copied: where does copying start to win?
        layout = in_place[0].layout
        name = max(layout, key=lambda n: layout[n][1].itemsize * math.prod(layout[n][2]))
        measured, read_gbps, detail = measure_crossover(in_place[0].view()[name], host[0].view()[name], dev)
        crossover = copy_from_tokens or measured
        seam = device_for(dev)
        order = list(range(facts.num_blocks))
        slot_bytes = max(store.plan(names.values())[1] for names in facts.block_names)
        ring = DeviceRing(seam, order, slot_bytes, prefetch + 1, HostBlocks(host, order), facts.block_names,
                          plan.dtype)
        views = [local_weights(flat, names, plan.dtype) for flat, names in zip(in_place, facts.block_names)]
        streamer: Streamer = InPlaceBlocks(views, ring, crossover)
    except BaseException:
        store.close()
        raise
    plan.link_gbps = read_gbps
    matmul = {n: (round(a, 2), round(b, 2)) for n, (a, b) in detail["matmul_ms"].items()}
    plan.notes.append(f"passes of >= {crossover} tokens copy blocks through the ring instead "
                      f"({'given' if copy_from_tokens else 'measured'}; in-place vs copy ms per token count: "
                      f"{matmul})")
    return StreamingModel(store=store, facts=facts, plan=plan, config=config, outer=outer, resident={},
                          streamed=streamer, device=seam, path=str(path), load_s=time.perf_counter() - started)
