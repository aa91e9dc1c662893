"""Injected reader faults (EIO, short reads, EINTR, a read that never completes) in the io_uring and pread paths:
the fault reaches Python as an exception naming the file and offset, nothing hangs, no slot or ticket leaks, and
the store and the model keep working afterwards."""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import zstream
import zstream.streaming.cache
from zstream import _core
from zstream.errors import CheckpointError, ReadError, ReadTimeoutError

import fake_cuda

READERS = ["pread"] + (["uring"] if _core.uring_unavailable_reason() is None else [])


@pytest.fixture
def ckpt(tmp_ckpt):
    ref = {f"t{i}": torch.randn(300_000 + 17 * i) for i in range(4)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    return tmp_ckpt, ref


def _open(path, **kw):
    # Small chunks: a read is many I/Os, so faults land in the middle of one.
    return zstream.WeightStore.open(path, chunk_size=64 << 10, queue_depth=4, threads=2, **kw)


def _check_all(store, ref, reader):
    got = store.read(list(ref), reader=reader)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("reader", READERS)
def test_eio_names_file_and_offset_and_the_store_recovers(ckpt, reader):
    path, ref = ckpt
    store = _open(path)
    store.inject_fault("eio", after=3)
    with pytest.raises(ReadError) as e:
        store.read(list(ref), reader=reader)
    assert e.value.errno == errno.EIO
    assert e.value.filename.endswith("m.safetensors") and "m.safetensors" in str(e.value)
    assert e.value.offset is not None and e.value.offset > 0
    _check_all(store, ref, reader)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", ["short", "eintr"])
def test_short_reads_and_eintr_are_retried(ckpt, reader, kind):
    path, ref = ckpt
    store = _open(path)
    store.inject_fault(kind, after=1, count=7)
    _check_all(store, ref, reader)  # the right bytes, despite the faults
    store.inject_fault(kind, count=50)
    with store.fetch(list(ref), reader=reader) as t:
        got = t.wait(timeout=30)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("reader", READERS)
def test_a_hung_read_times_out_instead_of_hanging(ckpt, reader):
    path, ref = ckpt
    store = _open(path, io_timeout=0.3)
    store.inject_fault("hang", after=2)
    t0 = time.monotonic()
    with pytest.raises(ReadTimeoutError) as e:
        store.read(list(ref), reader=reader)
    assert time.monotonic() - t0 < 10
    assert e.value.filename.endswith("m.safetensors")
    assert "no progress" in str(e.value)
    _check_all(store, ref, reader)


@pytest.mark.parametrize("reader", READERS)
def test_failed_tickets_leak_no_slots(ckpt, reader):
    path, ref = ckpt
    store = _open(path)
    with store.fetch(list(ref), reader=reader) as t:  # one slot exists and is free again afterwards
        t.wait()
    for _ in range(5):
        store.inject_fault("eio", after=1)
        t = store.fetch(list(ref), reader=reader)
        with pytest.raises(ReadError):
            t.wait(timeout=30)
        t.release()
    # The worker lets go of a job before waking its waiter, so the released slot was back before the next fetch.
    assert store.pool_stats == (1, 1)
    with store.fetch(list(ref), reader=reader) as t:
        got = t.wait(timeout=30)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_fault_during_generate_leaves_the_model_working(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float32, progress=False)
    # The file was just written, so "auto" would copy it from the page cache: read it with pread instead.
    model = zstream.load(path, offload="nvme", device="cpu", progress=False, reader="pread")
    ids = torch.randint(3, 200, (2, 6))
    want = model.generate(ids, max_new_tokens=6, eos_token_id=None)
    model.store.inject_fault("eio", after=5)
    with pytest.raises(ReadError):
        model.generate(ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=None), want)


def test_bad_fault_names_and_timeouts_are_refused(ckpt):
    path, _ = ckpt
    store = _open(path)
    with pytest.raises(ValueError, match="unknown fault"):
        store.inject_fault("gremlins")
    with pytest.raises(ValueError, match="io_timeout"):
        zstream.WeightStore.open(path, io_timeout=0)


def test_failed_pinning_falls_back_to_pageable_memory_with_a_warning(ckpt):
    runtime = fake_cuda.install()
    runtime.fail = True  # as under a low RLIMIT_MEMLOCK
    path, ref = ckpt
    core = _core.Store.open(str(path), pin_flags=_core.HOST_REGISTER_PORTABLE)
    store = zstream.WeightStore(core, pinned=True)
    with pytest.warns(RuntimeWarning, match=r"unpinned.*cudaHostRegister.*CUDA error 2"):
        got = store.read(list(ref))
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # the data is right, only slower to copy
    with pytest.warns(RuntimeWarning, match="staging slot left unpinned"), store.fetch(list(ref)) as t:
        assert torch.equal(t.wait()["t0"], ref["t0"])
    runtime.fail = False


def test_a_file_replaced_after_open_is_refused_at_read_time(ckpt):
    path, ref = ckpt
    store = zstream.WeightStore.open(path)
    f = path / "m.safetensors"
    tmp = path / "new.tmp"
    tmp.write_bytes(f.read_bytes())
    os.replace(tmp, f)  # a re-download put a new file in its place
    for reader in ("uring", "pread", "mmap"):
        with pytest.raises(CheckpointError, match=r"m\.safetensors: was replaced after the store opened it"):
            store.read(["t0"], reader=reader)
    assert torch.equal(zstream.WeightStore.open(path).read(["t0"])["t0"], ref["t0"])


def test_device_out_of_memory_names_what_would_fit(tmp_path, monkeypatch):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    model = zstream.load(path, offload="nvme", device="cpu", progress=False)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(zstream.streaming.cache.KVCache, "for_family", oom)
    with pytest.raises(zstream.OutOfMemoryError, match=r"out of device memory for a KV cache.*smaller batch"):
        model.generate(torch.randint(3, 100, (64, 8)), max_new_tokens=4, eos_token_id=None)
