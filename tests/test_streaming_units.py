"""Small pieces of the engine, each against hand-worked values: the streamer wrappers' delegation, the CPU seam's
events, the disk source's read intervals, and how a model describes itself."""

from __future__ import annotations

import json
import math

import torch

import zstream
from zstream.foundations.store import FlatRead
from zstream.streaming.blocks import Dequantized, Resident
from zstream.streaming.device import CpuDevice, CpuEvent
from zstream.streaming.ring import DeviceRing
from zstream.streaming.sources import HostBlocks, StoreReads
from zstream.streaming.weights import DEVICE_ALIGN, device_placement, to_device


class Recording:
    """A streamer that records what it is asked."""

    def __init__(self) -> None:
        self.calls = []

    def begin_pass(self, tokens):
        self.calls.append(("begin_pass", tokens))

    def acquire(self, block):
        self.calls.append(("acquire", block))
        return {"w": torch.full((2,), float(block))}

    def release(self, block):
        self.calls.append(("release", block))

    def reset(self):
        self.calls.append(("reset",))

    def rings(self):
        return ["ring"]

    def close(self):
        self.calls.append(("close",))


class Doubling:
    """Stands in for a BlockQuant: 'dequantizes' by doubling."""

    def dequantize(self, w):
        return {k: 2 * v for k, v in w.items()}


def test_wrappers_pass_every_call_through():
    inner = Recording()
    chain = Dequantized(Resident({1: {"w": torch.zeros(2)}}, inner), Doubling())
    chain.begin_pass(7)
    assert torch.equal(chain.acquire(0)["w"], torch.full((2,), 0.0))
    chain.release(0)
    assert torch.equal(chain.acquire(1)["w"], torch.zeros(2))  # resident: not asked of the inner streamer
    chain.release(1)
    assert torch.equal(chain.acquire(2)["w"], torch.full((2,), 4.0))  # block 2 doubled
    chain.release(2)
    chain.reset()
    assert chain.rings() == ["ring"]
    chain.close()
    assert inner.calls == [
        ("begin_pass", 7),
        ("acquire", 0),
        ("release", 0),
        ("acquire", 2),
        ("release", 2),
        ("reset",),
        ("close",),
    ]


def test_cpu_events_time_in_milliseconds():
    device = CpuDevice()
    a, b = CpuEvent(), CpuEvent()
    a.time_ns, b.time_ns = 1_000_000, 3_500_000
    assert device.elapsed_ms(a, b) == 2.5
    stream = device.new_stream()
    done = device.new_event(timing=True)
    dst, src = torch.zeros(4), torch.arange(4.0)
    device.copy(dst, src, stream)
    device.record(done, stream)
    device.wait_host(done)
    assert torch.equal(dst, src) and device.query(done) and done.time_ns > 0
    device.close()


def test_host_blocks_serve_the_order_across_passes():
    blocks = [object(), None, object()]
    source = HostBlocks(blocks, [0, 2])
    assert [source.host(g) for g in range(5)] == [blocks[0], blocks[2], blocks[0], blocks[2], blocks[0]]
    assert source.read_interval(0) is None


def test_a_read_interval_is_that_of_the_block_handed_out(tmp_path):
    path = zstream.make_checkpoint("tiny-opt", tmp_path / "m", torch.float32, progress=False)
    store = zstream.WeightStore.open(path, pin=False)
    family = zstream.models.family_for(json.loads((path / "config.json").read_text()), store.names())
    names = [family.block_tensors(i) for i in range(family.num_blocks)]
    device = CpuDevice()
    source = StoreReads(store, [0, 1], names, depth=1, device=device)
    source.host(0)
    started, finished = source.read_interval(0)
    assert 0 < started <= finished
    assert source.read_interval(1) is None  # not the one handed out
    source.reset()
    assert source.read_interval(0) is None
    store.close()
    device.close()


def test_a_model_describes_itself_exactly(tmp_path):
    path = zstream.make_checkpoint("tiny-opt", tmp_path / "m", torch.float32, progress=False)
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        params = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())  # noqa: SIM118
    with zstream.load(path, offload="nvme", device="cpu", progress=False) as model:
        model.plan.link_gbps = 0.001  # 1 MB/s: a step of a tenth of a second, whose digits show
        block = model.plan.block_bytes[0]
        assert repr(model) == (
            f"<StreamingModel opt at {path}: 2 blocks, hidden 64, {params / 1e6:.2f}M parameters, float32, random "
            f"weights; offload=nvme on cpu; 0/2 blocks resident, 2 streamed ({2 * block / 1024:.1f} KiB a pass), "
            f"predicted step {2 * block / 1e6 * 1e3:.1f} ms>"
        )
    assert repr(model) == (
        f"<StreamingModel opt at {path}: 2 blocks, hidden 64, {params / 1e6:.2f}M parameters, "
        "float32, random weights; offload=nvme on cpu; closed>"
    )


def test_a_trained_quantized_resident_model_says_so_and_no_more(tmp_path):
    """Weights saved by transformers (not random), packed to int8, all resident: the quantization is named, no
    "random weights", no predicted step (nothing streams)."""
    from tiny_models import save_with_transformers

    src = save_with_transformers(zstream.PRESETS["tiny-opt"], tmp_path / "src")
    out = zstream.pack(src, tmp_path / "q", quantize="int8", device="cpu", progress=False)
    with zstream.load(out, offload="none", device="cpu", progress=False) as model:
        text = repr(model)
    assert text.endswith(": 2 blocks, hidden 64, 0.09M parameters, float32, int8, group 64, asymmetric; "
                         "offload=none on cpu; 2/2 blocks resident, 0 streamed (0 B a pass)>")


def _flat(offsets: dict, nbytes: int) -> FlatRead:
    """A host arena of ``nbytes`` (bytes 0, 1, 2, ...) holding float32 vectors of 4 at ``offsets``."""
    buf = (torch.arange(nbytes) % 251).to(torch.uint8)
    return FlatRead(buf, {n: (off, torch.float32, (4,)) for n, off in offsets.items()})


def test_a_placement_starts_a_run_where_a_tensor_sits_off_16_bytes_from_its_run():
    """Tensors at one residue modulo 16 keep their host layout in one run; one 8 bytes off (a second shard's) starts
    a run of its own, DEVICE_ALIGN-aligned; split=False shifts the whole block once, as stored."""
    flat = _flat({"a": 8, "b": 40, "c": 4112, "d": 4144}, 8192)  # a, b from one shard; c, d 8 bytes off from them
    place = device_placement(flat)
    assert place.runs == ((8, 48, 0), (4112, 48, DEVICE_ALIGN))
    assert {n: off for n, (off, _, _) in place.layout.items()} == {"a": 0, "b": 32, "c": 256, "d": 288}
    assert place.nbytes == DEVICE_ALIGN + 48
    one = device_placement(flat, split=False)
    assert one.runs == ((8, 4152, 0),) and one.layout["c"][0] == 4104 and one.nbytes == 4152
    same = device_placement(_flat({"a": 8, "b": 40, "c": 4120}, 8192))  # every offset 8 mod 16: one run
    assert same.runs == ((8, 4128, 0),)
    assert device_placement(FlatRead(torch.empty(0, dtype=torch.uint8), {})).runs == ()
    empty = FlatRead(flat.buffer, {**flat.layout, "none": (0, torch.float32, (0,))})  # an empty tensor at 0
    assert device_placement(empty).runs == place.runs


def test_to_device_copies_each_run_and_its_tensors_read_as_on_the_host():
    flat = _flat({"a": 8, "b": 40, "c": 4112, "d": 4144}, 8192)
    moved = to_device(flat, torch.device("cpu"))
    assert moved.nbytes == DEVICE_ALIGN + 48
    host, dev = flat.view(), moved.view()
    assert all(torch.equal(host[n], dev[n]) for n in host)


def test_a_slot_too_small_for_the_runs_padding_takes_the_block_shifted_once():
    """Tensors alternating between residues make a run each, and their padding can outgrow a slot sized for the
    block as stored: the slot then takes it in one copy, as before (correct, if not aligned)."""
    flat = _flat({f"t{i}": 16 * i + 8 * (i % 2) for i in range(8)}, 256)  # every other tensor 8 bytes off
    assert device_placement(flat).nbytes > flat.nbytes + DEVICE_ALIGN
    ring = DeviceRing(CpuDevice(), [0], flat.nbytes, 1, None, [{}], torch.float32)  # type: ignore[arg-type]
    view = ring.slot_view(0, 0, flat)
    assert len(view.copies) == 1 and view.flat.layout == device_placement(flat, split=False).layout
    roomy = DeviceRing(CpuDevice(), [0], 4 * DEVICE_ALIGN * 8, 1, None, [{}], torch.float32)  # type: ignore[arg-type]
    assert len(roomy.slot_view(0, 0, flat).copies) == 8
