"""Process hygiene: loading, generating and dropping models over and over, or Ctrl-C in the middle, leaves no file
descriptors, threads or memory behind, and the process keeps working.

Counts come from /proc: ``threading`` does not see the Rust reader threads, and ``gc`` does not see file
descriptors or native memory.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import zstream
from zstream import _core

import fake_cuda

ROUNDS = 50
WARMUP = 3
RSS_SLACK = 4 << 20  # bytes of RSS growth allowed over all ROUNDS (allocator noise; a leak of a store is ~MBs)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settle() -> tuple[int, int]:
    """(fds, threads) once garbage is collected and exiting threads are gone."""
    gc.collect()
    deadline = time.monotonic() + 2.0
    last = (fds(), threads())
    while time.monotonic() < deadline:  # a joined thread leaves /proc/self/task a moment after join returns
        time.sleep(0.02)
        now = (fds(), threads())
        if now == last:
            break
        last = now
    return last


def assert_no_growth(before: tuple[int, int], what: str = "") -> None:
    """No more fds or threads than ``before`` (fewer is fine: a thread of an earlier test may have ended)."""
    after = settle()
    assert after[0] <= before[0] and after[1] <= before[1], f"(fds, threads): {before} -> {after} {what}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return zstream.synthetic.make_checkpoint("tiny-llama", tmp_path_factory.mktemp("tiny") / "m",
                                             dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    """A checkpoint large enough (~150 MB of fp16) that loading it, or a generation step, takes a good part of a
    second on the CPU: enough for a Ctrl-C to land in the middle."""
    config = {**zstream.synthetic.PRESETS["tiny-llama"], "hidden_size": 1024, "intermediate_size": 2816,
              "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8}
    return zstream.synthetic.make_checkpoint(config, tmp_path_factory.mktemp("slow") / "m", dtype=torch.float16,
                                             progress=False)


PROMPT = torch.tensor([[5, 6, 7, 8]])


def one_round(path: Path, tokens: int = 3) -> torch.Tensor:
    model = zstream.load(path, offload="nvme", device="cpu", progress=False)
    out = model.generate(PROMPT, max_new_tokens=tokens, eos_token_id=None)
    model.close()
    del model
    gc.collect()
    return out


def test_fifty_load_generate_drop_rounds_leave_nothing_behind(tiny):
    want = one_round(tiny)
    for _ in range(WARMUP - 1):  # torch's thread pools, allocator arenas, import caches
        one_round(tiny)
    fd0, th0 = settle()
    rss0 = rss()

    # While a model is open its store holds files and reader threads: the counts can see a leak.
    model = zstream.load(tiny, offload="nvme", device="cpu", progress=False)
    assert fds() > fd0 and threads() > th0
    model.close()
    del model

    for _ in range(ROUNDS):
        assert torch.equal(one_round(tiny), want)
    fd1, th1 = settle()
    grown = rss() - rss0
    assert fd1 <= fd0, f"file descriptors: {fd0} -> {fd1} over {ROUNDS} rounds"
    assert th1 <= th0, f"threads: {th0} -> {th1} over {ROUNDS} rounds"
    assert grown < RSS_SLACK, f"RSS grew {grown / 2**20:.1f} MiB over {ROUNDS} rounds ({grown / ROUNDS:.0f} B/round)"


def test_quantized_load_rounds_leave_nothing_behind(tmp_path):
    """Quantizing at load (temporary fp arenas, packed buffers) and dropping the model, round after round: files and
    threads come back and RSS shows no trend. A round's packed blocks are ~9 MB and its fp arenas ~30 MB, so a leak
    of either grows RSS by tens of MB over the rounds. The allocator alone swings RSS by up to 30 MB from round to
    round (a large buffer cached or not; 40 rounds measured here: 634-665 MiB with no trend), so the test compares
    the lows of the two halves, which a leak lifts and the swing does not."""
    config = {**zstream.synthetic.PRESETS["tiny-llama"], "hidden_size": 512, "intermediate_size": 1408,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8}
    path = zstream.synthetic.make_checkpoint(config, tmp_path / "m", dtype=torch.float16, progress=False)

    def q_round() -> torch.Tensor:
        model = zstream.load(path, offload="cpu", device="cpu", quantize="int4", progress=False)
        out = model.generate(PROMPT, max_new_tokens=2, eos_token_id=None)
        model.close()
        del model
        gc.collect()
        return out

    want = q_round()
    for _ in range(WARMUP - 1):
        q_round()
    fd0, th0 = settle()
    seen = []
    for _ in range(12):
        assert torch.equal(q_round(), want)
        seen.append(rss())
    fd1, th1 = settle()
    assert fd1 <= fd0 and th1 <= th0, f"(fds, threads): {(fd0, th0)} -> {(fd1, th1)}"
    early, late = min(seen[:6]), min(seen[6:])
    assert late - early < 8 << 20, f"RSS lows {early / 2**20:.1f} -> {late / 2**20:.1f} MiB over 12 quantized loads"


def test_dropping_a_model_without_close_frees_it(tiny):
    one_round(tiny)
    fd0, th0 = settle()
    for _ in range(5):
        model = zstream.load(tiny, offload="nvme", device="cpu", progress=False)
        model.generate(PROMPT, max_new_tokens=2, eos_token_id=None)
        del model  # no close(): the store's files and threads go with the last reference
    assert_no_growth((fd0, th0))


def _interrupt_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


class _InterruptOnceStarted(threading.Thread):
    """Sends SIGINT to this process as soon as a new native thread appears (a store opening its reader threads,
    i.e. a load under way). A fixed timer raced the load on a fast machine; this lands in it every time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.fired = False

    def run(self) -> None:
        start = threads()  # counts this thread too
        while not self.stop.is_set():
            if threads() > start:
                os.kill(os.getpid(), signal.SIGINT)
                self.fired = True
                return
            time.sleep(0.0005)


def test_ctrl_c_during_load_leaves_the_process_usable(slow):
    want = one_round(slow, tokens=2)  # also warms torch's thread pools up
    fd0, th0 = settle()
    watcher = _InterruptOnceStarted()
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            # offload="cpu" on the CPU reads and converts every block while loading
            zstream.load(slow, offload="cpu", device="cpu", progress=False)
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.fired
    assert_no_growth((fd0, th0), "an interrupted load left files or threads behind")
    assert torch.equal(one_round(slow, tokens=2), want)
    assert_no_growth((fd0, th0))


def test_ctrl_c_during_generate_leaves_the_model_usable(slow):
    model = zstream.load(slow, offload="nvme", device="cpu", progress=False)
    want = model.generate(PROMPT, max_new_tokens=2, eos_token_id=None)
    slots = model.store.pool_stats[0]
    fd0, th0 = settle()
    timer = _interrupt_after(0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            # tens of seconds of work: the signal lands in the middle of a pass
            model.generate(PROMPT, max_new_tokens=100, eos_token_id=None)
    finally:
        timer.cancel()
        timer.join()
    # The same model runs again (the stream restarts cleanly after a pass that stopped midway) ...
    assert torch.equal(model.generate(PROMPT, max_new_tokens=2, eos_token_id=None), want)
    assert_no_growth((fd0, th0))
    assert model.store.pool_stats[0] == slots, "the interrupted pass's staging slots were not reused"
    model.close()
    del model
    # ... and so does a fresh one.
    assert torch.equal(one_round(slow, tokens=2), want)


def test_pinned_memory_returns_to_its_starting_level(tmp_path):
    """50 rounds of a pinned store (open, read, fetch, drop) register and unregister every arena: the bytes held
    registered with CUDA come back to where they started. (A stand-in runtime on CPU-only machines.)"""
    runtime = fake_cuda.install()
    path = zstream.synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float32, progress=False)
    start, start_unreg = _core.pinned_bytes(), runtime.unregistered
    for _ in range(50):
        core = _core.Store.open(str(path), pin_flags=_core.HOST_REGISTER_PORTABLE)
        store = zstream.WeightStore(core, pinned=True)
        names = store.names()
        held = store.read(names[:3])
        assert _core.pinned_bytes() > start  # the arena is registered while its tensors live
        with store.fetch(names[3:6]) as t:
            t.wait()
        del held, t
        store.close()
        del store, core
        gc.collect()
    assert _core.pinned_bytes() == start
    assert runtime.unregistered - start_unreg >= 100  # every read and fetch arena was unregistered


def test_host_buffers_are_pinned_and_given_back(tmp_path):
    """The arenas that hold weights quantized at load (``store.host_buffer``) are registered while a tensor views
    them and unregistered when the last one dies: a model's packed blocks do not stay pinned after it is gone."""
    runtime = fake_cuda.install()
    start, start_unreg = _core.pinned_bytes(), runtime.unregistered
    for _ in range(20):
        capsule, err = _core.host_buffer(3 << 20, pin=True, flags=_core.HOST_REGISTER_PORTABLE)
        assert err is None
        buf = torch.from_dlpack(capsule)
        view = buf[4096:]
        del buf
        assert _core.pinned_bytes() >= start + (3 << 20)  # the view keeps the arena (and its registration)
        view.fill_(7)
        del view, capsule
        gc.collect()
        assert _core.pinned_bytes() == start
    assert runtime.unregistered - start_unreg == 20


def test_host_buffer_without_a_runtime_stays_pageable_and_says_so():
    from zstream.foundations.store import host_buffer

    if torch.cuda.is_available():
        pytest.skip("a real CUDA runtime is present")
    with pytest.warns(RuntimeWarning, match="stays pageable"):
        buf = host_buffer(1 << 20, pin=True)
    assert buf.numel() == 1 << 20 and buf.data_ptr() % 4096 == 0
    assert host_buffer(8, pin=False).numel() == 8  # no pinning asked: no warning
