"""The weight store: every reader returns exactly safetensors' bytes; tickets, lifetimes and pinning behave."""

from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import zstream
import zstream.foundations.store
from zstream import _core
from zstream.errors import ReadError, ReadTimeoutError
from zstream.foundations.store import FlatRead, host_buffer

import fake_cuda

READERS = ["uring", "pread", "mmap", "auto"]

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, dtype and shape checked)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_matches_safetensors(store: zstream.WeightStore, files: list[Path], reader: str) -> None:
    got = store.read(store.names(), reader=reader)
    seen = 0
    for f in files:
        with safe_open(f, "pt") as ref:
            for k in ref.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert same_bytes(got[k], ref.get_tensor(k)), f"{reader}: {k} differs"
                seen += 1
    assert seen == len(store)


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple) | st.sampled_from([(4097,), (3, 1000)])
tensors = st.dictionaries(st.from_regex(r"[a-z]{1,6}(\.[0-9]{1,2})?", fullmatch=True),
                          st.tuples(st.sampled_from(DTYPES), shapes), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=tensors, shards=st.integers(1, 3), with_index=st.booleans(), seed=st.integers(0, 2**31))
def test_every_reader_matches_safetensors(tmp_path_factory, spec, shards, with_index, seed):
    d = tmp_path_factory.mktemp("ckpt")
    gen = torch.Generator().manual_seed(seed)
    names = sorted(spec)
    files, weight_map = [], {}
    for s in range(shards):
        part = {n: random_tensor(*spec[n], gen) for n in names[s::shards]}
        if not part:
            continue
        f = d / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, f, metadata={"format": "pt"})
        files.append(f)
        weight_map.update(dict.fromkeys(part, f.name))
    if with_index:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    store = zstream.WeightStore.open(d)
    assert sorted(store.names()) == names
    for r in READERS:
        assert_matches_safetensors(store, files, r)


def test_info_and_index(tmp_ckpt):
    save_file({"w": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(4)}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt / "m.safetensors")
    info = store.info("w")
    assert (info.name, info.dtype, info.shape, info.nbytes) == ("w", "F16", (3, 4), 24)
    assert info.file.endswith("m.safetensors")
    with open(info.file, "rb") as f:  # the offset is absolute in the file
        f.seek(info.offset)
        assert f.read(24) == bytes(24)
    assert len(store) == 2 and "w" in store and "nope" not in store
    with pytest.raises(KeyError, match="nope"):
        store.info("nope")
    with pytest.raises(KeyError, match="nope"):
        store.read(["nope"])
    with pytest.raises(ValueError, match="unknown reader"):
        store.read(["w"], reader="floppy")


def test_adjacent_tensors_coalesce(tmp_ckpt):
    block = {f"h.0.t{i}": torch.randn(257, 31) for i in range(12)}
    save_file(block, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    read_bytes, _, extents = store.plan(block)
    assert extents == 1
    assert read_bytes >= sum(t.numel() * 4 for t in block.values())


def test_tensors_outlive_the_store(tmp_ckpt):
    ref = {"a": torch.randn(1000), "b": torch.arange(10)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    got = store.read(["a", "b"])
    ticket = store.fetch(["a"])
    streamed = ticket.wait()
    ticket.release()
    store.close()
    del store, ticket
    gc.collect()
    # Scribble over freed memory if the arena had been unmapped.
    junk = [torch.full((1000,), 7.0) for _ in range(50)]
    assert torch.equal(got["a"], ref["a"]) and torch.equal(got["b"], ref["b"])
    assert torch.equal(streamed["a"], ref["a"])
    del junk


def test_tickets_in_flight_and_slot_reuse(tmp_ckpt):
    ref = {f"b{i}": torch.randn(4096 + i) for i in range(6)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, workers=3)
    tickets = [store.fetch([f"b{i}"]) for i in range(6)]  # all in flight at once
    for i, t in enumerate(tickets):
        got = t.wait(timeout=30)
        assert torch.equal(got[f"b{i}"], ref[f"b{i}"])
        assert t.read_bytes >= ref[f"b{i}"].numel() * 4
        q, s, f = t.times
        assert 0 < q <= s <= f
        del got
        t.release()
    created, free = store.pool_stats
    assert created == free and created <= 6

    # A slot whose tensors are still alive is never handed out again.
    t1 = store.fetch(["b0"])
    held = t1.wait()["b0"]
    t1.release()
    for _ in range(5):
        t = store.fetch(["b1"])
        t.wait()
        t.release()
    assert torch.equal(held, ref["b0"])
    # Once nothing views it, the slot is reused: the pool does not grow.
    del held
    before = store.pool_stats[0]
    for _ in range(5):
        with store.fetch(["b2"]) as t:
            t.wait()
    assert store.pool_stats[0] == before


def test_bounded_pool_waits_for_release(tmp_ckpt):
    save_file({"x": torch.randn(10000)}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, max_slots=1)
    first = store.fetch(["x"])
    first.wait()
    threading.Timer(0.2, first.release).start()
    second = store.fetch(["x"])  # blocks until the timer releases the only slot
    assert first.released
    assert torch.equal(second.wait()["x"], store.read(["x"])["x"])
    second.release()


def test_released_ticket_refuses_wait(tmp_ckpt):
    save_file({"x": torch.randn(10)}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    t = store.fetch(["x"])
    t.release()
    t.release()  # idempotent
    with pytest.raises(RuntimeError, match="released"):
        t.wait()


@pytest.mark.parametrize("reader", ["uring", "pread"])
def test_ctrl_c_interrupts_a_long_read(tmp_ckpt, reader, ctrl_c):
    if reader == "uring" and _core.uring_unavailable_reason() is not None:
        pytest.skip(_core.uring_unavailable_reason())
    save_file({"big": torch.zeros(1 << 20, dtype=torch.uint8), "small": torch.arange(5)}, tmp_ckpt / "m.safetensors")
    # The read hangs after its first I/O (an injected fault) until something ends it: the signal lands mid-read,
    # whenever it comes, and nothing but the interrupt can end the read before its 60 s I/O timeout.
    store = zstream.WeightStore.open(tmp_ckpt, chunk_size=4096, threads=1)
    store._core.inject_fault("hang", after=1)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        store.read(["big"], reader=reader)
    assert time.monotonic() - t0 < 30  # the interrupt ended it, not the I/O timeout
    timer.join()
    store._core.clear_faults()
    # The store keeps working afterwards.
    assert torch.equal(store.read(["small"])["small"], torch.arange(5))


def test_pinning_without_cuda_is_a_no_op_that_says_so(tmp_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU suite covers pinning")
    save_file({"x": torch.randn(10)}, tmp_ckpt / "m.safetensors")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        store = zstream.WeightStore.open(tmp_ckpt, pin=True)
    assert not store.pinned
    assert any("pinning" in str(x.message) for x in w)
    assert not store.read(["x"])["x"].is_pinned()


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _opens_direct(path: Path) -> bool:
    """Whether this filesystem takes O_DIRECT (tmpfs does not), asked of the kernel, not of the store."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_auto_reader_resolution(tmp_ckpt):
    save_file({"x": torch.randn(100_000)}, tmp_ckpt / "m.safetensors")
    _evict(tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    uring = _core.uring_unavailable_reason() is None
    cold = "uring" if uring and _opens_direct(tmp_ckpt / "m.safetensors") else "pread"
    assert store.auto_reader == cold
    assert store.fetch(["x"]).reader == cold
    # Once the page cache holds the file, copying from memory beats reading the disk again.
    (tmp_ckpt / "m.safetensors").read_bytes()
    assert store.auto_reader == "pread-cached"
    assert torch.equal(store.read(["x"])["x"], store.read(["x"], reader="pread")["x"])


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_tmpfs_checkpoint_reads_everywhere():
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        ref = {"x": torch.randn(5000), "y": torch.randint(0, 9, (77,), dtype=torch.int8)}
        save_file(ref, Path(d) / "m.safetensors")
        store = zstream.WeightStore.open(d)
        for r in READERS:
            got = store.read(["x", "y"], reader=r)
            assert all(torch.equal(got[k], ref[k]) for k in ref), r


def test_flat_reads_view_the_same_bytes(tmp_ckpt):
    ref = {"q": torch.randn(33, 7).half(), "b": torch.randn(7), "i": torch.arange(5)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    flat = store.read_flat(["q", "b", "i", "q"])  # duplicates collapse
    assert flat.buffer.dtype == torch.uint8 and flat.aligned
    assert set(flat.layout) == {"q", "b", "i"}
    views = flat.view()
    assert all(torch.equal(views[k], ref[k]) for k in ref)
    # A copy of the flat buffer (as the GPU slot gets) yields the same tensors at the same offsets.
    copy = flat.buffer.clone()
    again = flat.view(copy)
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    # Views, not copies: each one starts in the buffer it was asked of, at its offset.
    for k, (off, _, _) in flat.layout.items():
        assert views[k].data_ptr() == flat.buffer.data_ptr() + off
        assert again[k].data_ptr() == copy.data_ptr() + off
    with store.fetch(["i", "b"]) as t:
        f2 = t.wait_flat()
        assert torch.equal(f2.view()["i"], ref["i"]) and torch.equal(f2.view()["b"], ref["b"])


# ---- the Python wrapper's own choices (foundations/store.py), each seen from outside it ----------------------------

@pytest.fixture
def cuda_here(monkeypatch):
    """This CPU machine made to look, to the store's wrapper, like one with a GPU: torch says CUDA is there, and the
    core pins through the stand-in runtime, which records the flags of every registration."""
    runtime = fake_cuda.install()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(zstream.foundations.store, "install_host_register", lambda: True)
    runtime.flags.clear()
    return runtime


def test_a_store_pins_by_default_where_there_is_a_gpu_and_maps_only_when_asked(tmp_ckpt, cuda_here):
    save_file({"x": torch.randn(1000)}, tmp_ckpt / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = zstream.WeightStore.open(tmp_ckpt)
        assert store.pinned is True
        store.read(["x"])
        zstream.WeightStore.open(tmp_ckpt, mapped=True).read(["x"])
    portable, mapped = _core.HOST_REGISTER_PORTABLE, _core.HOST_REGISTER_MAPPED
    assert cuda_here.flags == [portable, portable | mapped]


def test_a_store_opens_unpinned_and_quietly_where_there_is_no_gpu(tmp_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save_file({"x": torch.randn(10)}, tmp_ckpt / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = zstream.WeightStore.open(tmp_ckpt)
    assert store.pinned is False


def test_host_buffers_are_registered_portable_and_only_when_asked(cuda_here):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned = host_buffer(1 << 20, pin=True)
        plain = host_buffer(4096, pin=False)
    assert cuda_here.flags == [_core.HOST_REGISTER_PORTABLE]
    assert pinned.numel() == 1 << 20 and plain.numel() == 4096


def test_packed_blocks_lie_at_256_byte_boundaries_in_a_core_arena():
    tensors = {"a": torch.arange(3, dtype=torch.float16), "b": torch.randn(5), "c": torch.arange(7, dtype=torch.int8)}
    before = _core.mapped_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # host memory, no pinning asked: nothing to warn of
        flat = FlatRead.pack(tensors, "cpu")
    # a: 6 bytes at 0; b: 20 bytes at the next multiple of 256; c after b, likewise.
    assert {k: off for k, (off, _, _) in flat.layout.items()} == {"a": 0, "b": 256, "c": 512}
    assert flat.nbytes == 512 + 7
    assert _core.mapped_bytes() >= before + flat.nbytes  # the core's arena, not torch's allocator
    views = flat.view()
    assert all(torch.equal(views[k], tensors[k]) for k in tensors)
    assert views["b"].data_ptr() == flat.buffer.data_ptr() + 256


def test_blocks_packed_for_pinned_memory_say_why_they_stay_pageable_without_a_runtime():
    if torch.cuda.is_available():
        pytest.skip("a real CUDA runtime is present")
    tensors = {"w": torch.randn(4, 4)}
    with pytest.warns(RuntimeWarning, match="stays pageable: no CUDA runtime is available"):
        flat = FlatRead.pack(tensors, "pinned")
    assert torch.equal(flat.view()["w"], tensors["w"])


def test_blocks_packed_for_pinned_memory_are_pinned_and_host_blocks_are_not(cuda_here):
    tensors = {"w": torch.randn(4, 4)}
    assert torch.equal(FlatRead.pack(tensors, "pinned").view()["w"], tensors["w"])
    assert cuda_here.flags == [_core.HOST_REGISTER_PORTABLE]
    FlatRead.pack(tensors, "cpu")
    assert cuda_here.flags == [_core.HOST_REGISTER_PORTABLE]  # nothing more


@pytest.mark.parametrize("flat", [False, True])
def test_a_wait_with_a_timeout_ends_then_though_the_read_hangs(tmp_ckpt, flat):
    save_file({"x": torch.randn(100_000)}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, io_timeout=30)
    store.inject_fault("hang")
    ticket = store.fetch(["x"], reader="pread")
    t0 = time.monotonic()
    # The wait's own timeout, not the store's I/O timeout ("no progress"), which is 30 s away.
    with pytest.raises(ReadTimeoutError, match="waiting for the read"):
        ticket.wait_flat(timeout=0.2) if flat else ticket.wait(timeout=0.2)
    assert time.monotonic() - t0 < 20
    ticket.release()  # cancels the hung read


def test_dropping_an_unreleased_ticket_cancels_its_read_and_frees_the_slot(tmp_ckpt):
    save_file({"x": torch.randn(100_000)}, tmp_ckpt / "m.safetensors")
    # A hung I/O ends when cancelled, or at the I/O timeout: 30 s, past the 20 s this test waits for the slot.
    store = zstream.WeightStore.open(tmp_ckpt, io_timeout=30)
    store.inject_fault("hang")
    ticket = store.fetch(["x"], reader="pread")
    del ticket
    gc.collect()
    deadline = time.monotonic() + 20  # a cancel takes milliseconds; only a read never cancelled reaches this
    while store.pool_stats != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.pool_stats == (1, 1)


def test_flat_reads_and_fetches_use_the_reader_named(tmp_ckpt):
    ref = {"x": torch.randn(10_000)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt)
    # Every I/O of the io_uring and pread readers fails; the mmap reader asks no fault injector.
    store.inject_fault("eio", count=1_000_000)
    assert torch.equal(store.read_flat(["x"], reader="mmap").view()["x"], ref["x"])
    with store.fetch(["x"], reader="mmap") as t:
        assert t.reader == "mmap"
        assert torch.equal(t.wait(timeout=30)["x"], ref["x"])
    with pytest.raises(ReadError):
        store.read_flat(["x"], reader="pread")


def test_a_fault_injected_with_the_defaults_meets_the_very_next_io_only(tmp_ckpt):
    ref = {"x": torch.randn(100)}
    save_file(ref, tmp_ckpt / "m.safetensors")  # one small file: a read of it is one I/O
    store = zstream.WeightStore.open(tmp_ckpt)
    store.inject_fault("eio")
    with pytest.raises(ReadError):
        store.read(["x"], reader="pread")
    assert torch.equal(store.read(["x"], reader="pread")["x"], ref["x"])
