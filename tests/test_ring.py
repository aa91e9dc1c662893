"""The device ring, on the CPU: the same code that streams on the GPU, over the CPU's device seam (a worker thread
runs the copy stream). A recording device logs every copy, event record and wait; a checking streamer compares
each block's weights with the checkpoint's own bytes (read with safetensors, not with zstream) when its compute
starts and when it ends. Together they check what the ring promises: every block computes with its own bytes, a
slot is refilled only after the compute on it, copies run ``prefetch`` blocks ahead and carry over between passes,
and a pass that stopped midway leaves the ring able to start over."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from safetensors import safe_open

import zstream
from zstream.foundations.store import FlatRead
from zstream.streaming.device import CpuDevice
from zstream.streaming.ring import views_of

from tiny_models import padded_batch, reference_logits, reference_model, save_with_transformers

PRESET = "tiny-llama"
NUM_BLOCKS = 5
CONFIG = {**zstream.PRESETS[PRESET], "num_hidden_layers": NUM_BLOCKS}


@dataclass
class Op:
    kind: str                 # "copy", "record", "wait", "acquire", "release"
    stream: str = ""          # "copy" or "compute"
    event: Optional[int] = None
    seq: int = 0              # the event's record count: after the record, or the one waited for
    g: int = -1               # the ring's global index: of the copy, or of the compute a record closes
    slot: int = -1
    block: int = -1


@dataclass
class Log:
    ops: List[Op] = field(default_factory=list)
    ring: Any = None          # the model's ring, once built

    def of(self, kind: str) -> List[Op]:
        return [o for o in self.ops if o.kind == kind]


class RecordingDevice(CpuDevice):
    """The CPU seam, logging what the ring asks of it (in the order it asks)."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def _stream(self, stream: Any) -> str:
        return "compute" if stream is self.compute_stream() else "copy"

    def _slot(self, dst: torch.Tensor) -> int:
        for s, buf in enumerate(self.log.ring.buffers):
            if buf.data_ptr() <= dst.data_ptr() < buf.data_ptr() + buf.numel():
                return s
        return -1

    def copy(self, dst, src, stream) -> None:
        ring = self.log.ring
        self.log.ops.append(Op("copy", self._stream(stream), g=ring.issued, slot=self._slot(dst),
                               block=ring.block_at(ring.issued)))
        super().copy(dst, src, stream)

    def record(self, event, stream) -> None:
        super().record(event, stream)
        self.log.ops.append(Op("record", self._stream(stream), id(event), event.recorded, g=self.log.ring.consumed))

    def wait(self, stream, event) -> None:
        self.log.ops.append(Op("wait", self._stream(stream), id(event), event.recorded))
        super().wait(stream, event)


class Checking:
    """Wraps the model's streamer chain: each block's weights equal the checkpoint's own when its compute starts
    and still when it ends; ``fail_at`` (pass, block) raises there, like a read error midway through a pass."""

    def __init__(self, inner: Any, truth: List[Dict[str, torch.Tensor]], log: Log) -> None:
        self.inner, self.truth, self.log = inner, truth, log
        self.passes = 0
        self.fail_at: Optional[Tuple[int, int]] = None
        self.held: Dict[str, torch.Tensor] = {}
        self.checked = 0

    def begin_pass(self, tokens: int) -> None:
        self.passes += 1
        self.inner.begin_pass(tokens)

    def _check(self, block: int, w: Dict[str, torch.Tensor], when: str) -> None:
        for name, want in self.truth[block].items():
            assert torch.equal(w[name], want), f"block {block}: {name} is not its own bytes {when}"
        self.checked += 1

    def acquire(self, block: int) -> Dict[str, torch.Tensor]:
        if self.fail_at == (self.passes, block):
            self.fail_at = None
            raise OSError(f"injected failure at block {block}")
        w = self.inner.acquire(block)
        self.log.ops.append(Op("acquire", block=block, g=self.log.ring.consumed))  # the block's compute starts
        self._check(block, w, "when its compute starts")
        self.held = w
        return w

    def release(self, block: int) -> None:
        self._check(block, self.held, "when its compute ends")
        self.held = {}
        self.log.ops.append(Op("release", block=block))
        self.inner.release(block)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_with_transformers(CONFIG, tmp_path_factory.mktemp("ring") / "m")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    family = zstream.models.family_for(CONFIG)
    truth = [{local: tensors[name] for local, name in family.block_tensors(i).items()} for i in range(NUM_BLOCKS)]
    return path, reference_model(path), truth


def streaming_model(path: Path, truth, monkeypatch, **kw) -> Tuple[Any, Checking, Log]:
    """A model whose streamed blocks go through a recording device, its chain wrapped in a checking streamer."""
    log = Log()
    monkeypatch.setattr("zstream.streaming.build.device_for", lambda dev: RecordingDevice(log))
    model = zstream.load(path, device="cpu", progress=False, **kw)
    rings = model.blocks.rings()
    assert len(rings) == 1, "the plan must stream"
    log.ring = rings[0]
    log.ops.clear()  # the link measurement at load copies nothing through the ring; start clean anyway
    checking = Checking(model.blocks, truth, log)
    model.blocks = checking
    return model, checking, log


MODES = [("cpu", {"max_resident_blocks": 0}), ("cpu", {"max_resident_blocks": 2}),
         ("nvme", {}), ("nvme", {"prefetch": 1, "disk_prefetch": 1}), ("nvme", {"prefetch": 3})]


@pytest.mark.parametrize(("offload", "kw"), MODES, ids=[f"{o}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                       for o, kw in MODES])
def test_every_block_computes_with_its_own_bytes_and_logits_equal_transformers(checkpoint, monkeypatch, offload, kw):
    path, ref, truth = checkpoint
    model, checking, log = streaming_model(path, truth, monkeypatch, offload=offload, **kw)
    ids, mask = padded_batch(vocab=CONFIG["vocab_size"], lengths=(9, 6))
    want = reference_logits(ref, ids, mask)
    real = mask.bool()
    for _ in range(3):  # passes carry the ring over
        got = model(ids, mask)
        assert (got[real] - want[real]).abs().max().item() <= 1e-4
    streamed = model.plan.streamed_blocks
    assert checking.checked == 2 * 3 * NUM_BLOCKS  # every block, at the start and the end of its compute
    assert [o.block for o in log.of("copy")][:3 * len(streamed)] == streamed * 3  # only streamed blocks are copied
    model.close()


def test_a_slot_is_refilled_only_after_the_compute_on_it(checkpoint, monkeypatch):
    """Every copy into a slot for global index g >= slots is ordered, on the copy stream, after a wait for the event
    the compute stream recorded when it enqueued the compute of index g - slots: the copy cannot overwrite weights a
    block is still reading (on a GPU, the compute runs behind the Python thread)."""
    path, _, truth = checkpoint
    model, _, log = streaming_model(path, truth, monkeypatch, offload="cpu", max_resident_blocks=0, prefetch=2)
    ids = torch.randint(3, 300, (2, 7))
    for _ in range(3):
        model(ids)
    ring = log.ring
    slots = ring.slots
    computed = {s: id(e) for s, e in enumerate(ring.computed)}
    closing = {o.g: o for o in log.of("record") if o.stream == "compute" and o.event in computed.values()}
    copies = log.of("copy")
    assert len(copies) >= 3 * NUM_BLOCKS
    for k, copy in enumerate(copies):
        assert copy.stream == "copy" and copy.slot == copy.g % slots and copy.g == k
        if copy.g < slots:
            continue
        before = log.ops[:log.ops.index(copy)]
        waits = [o for o in before if o.kind == "wait" and o.stream == "copy" and o.event == computed[copy.slot]]
        done = closing[copy.g - slots]
        assert any(w.seq >= done.seq for w in waits), f"copy {copy.g} into slot {copy.slot} does not wait for " \
                                                      f"the compute of {copy.g - slots}"
    model.close()


def test_copies_run_prefetch_ahead_and_carry_over_between_passes(checkpoint, monkeypatch):
    path, _, truth = checkpoint
    for prefetch in (1, 2, 3):
        model, _, log = streaming_model(path, truth, monkeypatch, offload="nvme", prefetch=prefetch)
        slots = prefetch + 1
        model(torch.randint(3, 300, (1, 5)))
        for i, op in enumerate(log.ops):
            if op.kind == "acquire":  # when block g computes, g+1 .. g+prefetch are already on their way
                issued = len([o for o in log.ops[:i + 2] if o.kind == "copy"])
                assert issued >= min(op.g + slots, op.g + slots), (prefetch, op.g, issued)
        # the pass is over: the next pass's first `slots` blocks are copied already
        assert [o.g for o in log.of("copy")] == list(range(NUM_BLOCKS + slots))
        assert [o.block for o in log.of("copy")][NUM_BLOCKS:] == list(range(slots))
        model.close()


def test_a_pass_that_stops_midway_restarts_the_ring(checkpoint, monkeypatch):
    path, ref, truth = checkpoint
    model, checking, log = streaming_model(path, truth, monkeypatch, offload="nvme", prefetch=2)
    ids, mask = padded_batch(vocab=CONFIG["vocab_size"], lengths=(8, 8))
    want = reference_logits(ref, ids, mask)
    model(ids, mask)
    checking.fail_at = (2, 3)  # the second pass fails at block 3, with copies of blocks 4, 0, 1 in flight
    with pytest.raises(OSError, match="injected failure at block 3"):
        model(ids, mask)
    n = len(log.of("copy"))
    got = model(ids, mask)  # the third pass: the ring starts over from the first block
    assert (got - want).abs().max().item() <= 1e-4
    restart = log.of("copy")[n:]
    assert [o.g for o in restart][:3] == [0, 1, 2] and [o.block for o in restart][:3] == [0, 1, 2]
    model.blocks.reset()
    total, free = model.store.pool_stats
    assert free == total  # the failed pass's read slots came back to the pool
    model.close()


class FakeClock:
    """The ring's clock: time moves only where the test says, so what ``waited_s`` adds up is known exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class SlowSource:
    """A host source whose every block takes a second of the fake clock, like a disk read the ring waits for."""

    def __init__(self, inner: Any, clock: FakeClock) -> None:
        self.inner, self.clock, self.calls = inner, clock, 0

    def host(self, g: int) -> Any:
        self.clock.now += 1.0
        self.calls += 1
        return self.inner.host(g)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SlowCopies:
    """The ring's device, where a compute stream's wait for a copy takes half a second of the fake clock."""

    def __init__(self, inner: Any, clock: FakeClock) -> None:
        self.inner, self.clock, self.compute_waits = inner, clock, 0

    def wait(self, stream, event) -> None:
        if stream is self.inner.compute_stream():
            self.clock.now += 0.5
            self.compute_waits += 1
        self.inner.wait(stream, event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_time_blocked_on_bytes_is_counted(checkpoint, monkeypatch):
    """``waited_s``, from which the bench tells a link-bound step from a compute-bound one, adds up the time the ring
    blocks on bytes: the reads it waits for and the copies the compute waits for, nothing else."""
    path, _, truth = checkpoint
    model, _, log = streaming_model(path, truth, monkeypatch, offload="cpu", max_resident_blocks=0)
    ring = log.ring
    assert model.waited_s == 0.0  # nothing streamed yet
    clock = FakeClock()
    monkeypatch.setattr("zstream.streaming.ring.time", clock)
    slow, device = SlowSource(ring.source, clock), SlowCopies(ring.device, clock)
    ring.instrument(device, slow)
    ids = torch.randint(3, 300, (1, 4))
    for _ in range(2):
        before = model.waited_s
        model(ids)
        assert slow.calls >= NUM_BLOCKS - ring.slots and device.compute_waits == NUM_BLOCKS
        assert model.waited_s - before == 1.0 * slow.calls + 0.5 * device.compute_waits
        slow.calls = device.compute_waits = 0
    model.close()


class BrokenUntilReset:
    """A host source whose read of global index ``at`` fails and keeps failing until the ring resets it, as a disk
    read that failed does (the failed ticket stays queued until ``reset`` releases it)."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at, self.broken, self.failures = inner, at, False, 0

    def host(self, g: int) -> Any:
        if g == self.at and self.failures == 0:
            self.broken = True
        if self.broken:
            self.failures += 1
            raise OSError(f"injected read error at {g}")
        return self.inner.host(g)

    def reset(self) -> None:
        self.broken = False
        self.inner.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_read_that_fails_in_the_first_block_is_retried_after_a_reset(checkpoint, monkeypatch):
    """A pass that fails while acquiring its first block has computed nothing, yet the next pass must still reset
    the ring: the failed read stays in the source until then."""
    path, ref, truth = checkpoint
    model, _, log = streaming_model(path, truth, monkeypatch, offload="cpu", max_resident_blocks=0)
    ring = log.ring
    broken = BrokenUntilReset(ring.source, at=0)
    ring.instrument(ring.device, broken)
    ids, mask = padded_batch(vocab=CONFIG["vocab_size"], lengths=(6, 4))
    with pytest.raises(OSError, match="injected read error at 0"):
        model(ids, mask)
    got = model(ids, mask)
    assert broken.failures == 1
    real = mask.bool()  # padded positions' logits are nobody's
    assert (got[real] - reference_logits(ref, ids, mask)[real]).abs().max().item() <= 1e-4
    model.close()


def test_a_checkpoint_in_another_dtype_streams_in_the_compute_dtype(tmp_path, monkeypatch):
    """fp16 bytes on disk, float32 compute: each streamed block is converted on its way out of the slot; the logits
    equal transformers' float32 model of the same fp16 weights."""
    path = zstream.make_checkpoint(CONFIG, tmp_path / "m", torch.float16, progress=False)
    ref = reference_model(path)
    with zstream.load(path, offload="nvme", device="cpu", dtype=torch.float32, max_resident_blocks=0,
                      progress=False) as model:
        assert model.blocks.rings() and model.plan.streamed_blocks == list(range(NUM_BLOCKS))
        ids, mask = padded_batch(vocab=CONFIG["vocab_size"], lengths=(7, 5))
        got = model(ids, mask)
    assert got.dtype == torch.float32
    real = mask.bool()
    assert (got[real] - reference_logits(ref, ids, mask)[real]).abs().max().item() <= 1e-4


def test_a_block_back_in_a_slot_it_held_is_handed_out_as_the_same_views(checkpoint, monkeypatch):
    """Five blocks through two slots: each block comes back to each slot every other pass. The weights handed out for
    a (slot, block) are made once, views of the slot, and reused; each still reads its block's own bytes when its
    compute starts and ends (``Checking``), and the logits stay transformers'."""
    path, ref, truth = checkpoint
    model, checking, log = streaming_model(path, truth, monkeypatch, offload="cpu", max_resident_blocks=0, prefetch=1)
    ring = log.ring
    handed: Dict[Tuple[int, int], set] = {}
    acquire = ring.acquire

    def spying(block: int) -> Dict[str, torch.Tensor]:
        w = acquire(block)
        handed.setdefault((ring.consumed % ring.slots, block), set()).add(id(w))
        return w

    monkeypatch.setattr(ring, "acquire", spying)
    ids, mask = padded_batch(vocab=CONFIG["vocab_size"], lengths=(9, 6))
    want = reference_logits(ref, ids, mask)
    for _ in range(4):
        got = model(ids, mask)
        assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() <= 1e-4
    assert ring.slots == 2 and len(handed) == 2 * NUM_BLOCKS  # every block in both slots
    assert all(len(ids_) == 1 for ids_ in handed.values())   # ... each time the same weights
    slot_memory = {buf.untyped_storage().data_ptr() for buf in ring.buffers}
    for view in ring.views.values():
        assert view.weights is not None
        assert {t.untyped_storage().data_ptr() for t in view.weights.values()} <= slot_memory
    assert checking.checked == 2 * 4 * NUM_BLOCKS
    kept = ring.views[(0, 0)]
    moved = {name: (off + 4096, dt, shape) for name, (off, dt, shape) in kept.host_layout.items()}
    again = ring.slot_view(0, 0, FlatRead(kept.flat.buffer, moved))
    assert again is not kept and again.host_layout == moved  # a new layout: made again
    other = ring.views[(1, 1)]
    assert ring.slot_view(1, 1, FlatRead(other.flat.buffer, dict(other.host_layout))) is other  # an equal one: not
    model.close()
    assert not ring.views  # closing lets them go


def test_weights_are_views_of_a_slot_only_if_every_tensor_is():
    slot = torch.zeros(64, dtype=torch.uint8)
    view = slot[8:24].view(torch.float32)
    assert views_of({"a": view, "b": slot[32:].view(torch.float16)}, slot)
    assert not views_of({"a": view, "b": view.to(torch.float16)}, slot)
    assert not views_of({"a": view.clone()}, slot)


def _shard_shifted_by_8(path: Path, shard: str) -> None:
    """Move ``shard``'s data 8 bytes further into the file (its JSON header padded with 8 more spaces, as a writer
    with a longer header would), so that its tensors sit 8 bytes off modulo 16 from those of a shard that was not."""
    raw = (path / shard).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    (path / shard).write_bytes((n + 8).to_bytes(8, "little") + raw[8:8 + n] + b" " * 8 + raw[8 + n:])


def test_a_block_read_from_two_shards_is_aligned_in_its_slot_run_by_run(tmp_path):
    """A block whose tensors span two shards whose data start 8 bytes apart modulo 16 (safetensors aligns data to 8
    only) reaches its slot in two copies, each tensor 16-byte aligned there (one shift for the whole block left the
    second shard's tensors 8 bytes off: cuBLAS then runs SM80 kernels, 3.5x slower on an H100, item 55), its bytes
    the checkpoint's own."""
    path = zstream.make_checkpoint(CONFIG, tmp_path / "m", torch.float32, progress=False, shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    spanning = [b for b in range(NUM_BLOCKS) if len({f for n, f in index.items() if f".layers.{b}." in n}) > 1]
    assert spanning  # the shard size splits a block
    later = sorted({f for n, f in index.items() if f".layers.{spanning[0]}." in n})[1]
    _shard_shifted_by_8(path, later)
    handed: List[Dict[str, torch.Tensor]] = []  # each block's weights as its compute starts (copies: slots refill)
    offsets: List[int] = []                       # their addresses modulo 16

    def spying(block: int) -> Dict[str, torch.Tensor]:
        w = acquire(block)
        handed.append({k: t.clone() for k, t in w.items()})
        offsets.extend(t.data_ptr() % 16 for t in w.values())
        return w

    with zstream.load(path, offload="cpu", device="cpu", dtype=torch.float32, max_resident_blocks=0,
                      progress=False) as model:
        (ring,) = model.blocks.rings()
        acquire = ring.acquire
        ring.acquire = spying  # type: ignore[method-assign]
        ids = torch.randint(3, 300, (2, 5))
        got = model(ids)
        runs = {len(view.copies) for view in ring.views.values()}
    assert runs == {1, 2}  # the spanning blocks in two copies, the others in one
    assert len(offsets) > 0 and set(offsets) == {0}
    with zstream.load(path, offload="none", device="cpu", dtype=torch.float32, progress=False) as resident:
        assert torch.equal(got, resident(ids))
    sharded = {}
    for f in set(index.values()):
        with safe_open(str(path / f), "pt") as sf:
            sharded.update({n: sf.get_tensor(n) for n in index if index[n] == f})
    names = model.facts.block_names[spanning[0]]
    assert all(torch.equal(handed[spanning[0]][local], sharded[name]) for local, name in names.items())


def test_weights_converted_out_of_a_slot_are_not_kept(tmp_path):
    """fp16 bytes, float32 compute: a block's weights are copies, made at every acquire; keeping them would hold a
    converted copy of every block in every slot, past the device budget the ring was sized for."""
    path = zstream.make_checkpoint(CONFIG, tmp_path / "m", torch.float16, progress=False)
    with zstream.load(path, offload="cpu", device="cpu", dtype=torch.float32, max_resident_blocks=0,
                      progress=False) as model:
        (ring,) = model.blocks.rings()
        ids = torch.randint(3, 300, (2, 5))
        model(ids)
        model(ids)
        assert ring.views and all(view.weights is None for view in ring.views.values())


def test_a_single_streamed_block_gets_a_single_slot(checkpoint):
    path, _, _ = checkpoint
    with zstream.load(path, offload="cpu", device="cpu", max_resident_blocks=NUM_BLOCKS - 1, prefetch=2,
                      progress=False) as model:
        (ring,) = model.blocks.rings()
        assert model.plan.streamed_blocks == [NUM_BLOCKS - 1]
        assert ring.slots == 1 and len(ring.buffers) == 1  # a second slot would only hold the next pass's copy


def test_trace_is_perfetto_json_with_a_copy_and_a_compute_per_streamed_block(tmp_path):
    """On the CPU too: one copy and one compute event for every streamed block of the traced passes (the disk reads
    too, for nvme), on their own tracks; copies run on the copy stream while blocks compute."""
    config = {**zstream.PRESETS[PRESET], "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 8}  # 13 MB blocks: copies take long enough to see
    path = zstream.make_checkpoint(config, tmp_path / "m", torch.float32, progress=False)
    with zstream.load(path, offload="nvme", device="cpu", progress=False) as model:
        ids = torch.randint(3, 300, (1, 4))
        t0_us = time.monotonic_ns() / 1e3  # the trace's clock: every traced read starts after this
        model(ids)
        model.trace_start()
        for _ in range(2):
            model(ids)
        doc = model.trace_stop(tmp_path / "trace.json")
        t1_us = time.monotonic_ns() / 1e3
        assert json.loads((tmp_path / "trace.json").read_text()) == doc
        with pytest.raises(zstream.ModelError, match="no trace"):
            model.trace_stop(tmp_path / "again.json")
    assert doc["displayTimeUnit"] == "ms"
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(meta) + len(events) == len(doc["traceEvents"])  # nothing but track names and complete events
    # The Chrome / Perfetto trace-event format: a process, a thread per track named by a thread_name record
    assert all(set(e) == {"ph", "pid", "tid", "name", "args"} and e["name"] == "thread_name" and e["pid"] == 1
               and set(e["args"]) == {"name"} for e in meta)
    assert sorted(e["tid"] for e in meta) == [1, 2, 3, 4]
    assert all(set(e) == {"ph", "pid", "tid", "name", "ts", "dur", "args"} and e["pid"] == 1
               and set(e["args"]) == {"global_index"} for e in events)
    names = {e["args"]["name"]: e["tid"] for e in meta}
    tid = {kind: names[n] for kind, n in (("disk", "disk -> pinned host (io_uring)"),
                                            ("copy", "host -> device copy (copy stream)"),
                                            ("compute", "block compute (compute stream)"),
                                            ("cpu", "python: acquire, launch, release"))}
    by = {k: [e for e in events if e["tid"] == t] for k, t in tid.items()}
    assert [e["name"] for e in by["compute"]] == [f"block {i}" for i in range(6)] * 2
    assert len(by["cpu"]) == 12
    computed = {e["args"]["global_index"] for e in by["compute"]}
    copied = {e["args"]["global_index"]: e for e in by["copy"]}
    assert len(by["copy"]) == len(copied) and len(by["disk"]) == len(by["copy"])  # one of each per block
    for e in events:
        assert e["dur"] >= 0 and e["ts"] > 0
    overlapping = [c for c in by["copy"] for k in by["compute"]
                   if c["ts"] < k["ts"] + k["dur"] and k["ts"] < c["ts"] + c["dur"]]
    assert overlapping, "no copy ran while a block computed"
    assert len(computed) == 12
    # Times in microseconds of one clock: inside the run, compute in order, each block's compute inside the Python
    # time of its acquire..release (it starts after its acquire began); indices and names agree (block = g % 6).
    assert all(t0_us <= e["ts"] and e["ts"] + e["dur"] <= t1_us for e in events)
    for kind in ("copy", "disk", "compute", "cpu"):
        assert all(e["name"] == f"block {e['args']['global_index'] % 6}" for e in by[kind]), kind
    cpu = {e["args"]["global_index"]: e for e in by["cpu"]}
    assert sorted(cpu) == sorted(computed) == list(range(min(cpu), min(cpu) + 12))
    starts = [e["ts"] for e in sorted(by["compute"], key=lambda e: e["args"]["global_index"])]
    assert starts == sorted(starts)
    assert all(e["ts"] >= cpu[e["args"]["global_index"]]["ts"] for e in by["compute"])
