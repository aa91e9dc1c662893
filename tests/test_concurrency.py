"""Several models in one process, and several threads on one model.

A model's streamer is one ring of blocks in flight, in block order: two passes interleaving on it would hand one
pass the other's blocks. ``StreamingModel`` therefore serialises its passes (a per-model lock); separate models
share nothing and run side by side.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

import zstream

THREADS = 2
REPEATS = 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conc")
    return {p: zstream.synthetic.make_checkpoint(p, root / p, dtype=torch.float32, progress=False)
            for p in ("tiny-llama", "tiny-opt")}


def prompt(i: int, length: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(3, 300, (1, length), generator=g)


def run_threads(fns: list[Callable[[], object]]) -> list[object]:
    """Run ``fns`` at once (released together by a barrier); their results, or re-raise the first error."""
    barrier = threading.Barrier(len(fns))
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fns[i]()
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_two_models_in_one_process(ckpts):
    ids = {name: prompt(i) for i, name in enumerate(ckpts)}
    alone = {}
    for name, path in ckpts.items():
        model = zstream.load(path, offload="nvme", device="cpu", progress=False)
        alone[name] = model.generate(ids[name], max_new_tokens=8, eos_token_id=None)
        model.close()
    assert not torch.equal(alone["tiny-llama"], alone["tiny-opt"])

    models = {name: zstream.load(path, offload="nvme", device="cpu", progress=False) for name, path in ckpts.items()}
    try:
        for _ in range(REPEATS):  # interleaved calls from one thread
            for name, model in models.items():
                again = model.generate(ids[name], max_new_tokens=8, eos_token_id=None)
                assert torch.equal(again, alone[name]), name
        # and both models generating at the same time, one thread each
        names = list(models)
        got = run_threads([lambda n=n: models[n].generate(ids[n], max_new_tokens=8, eos_token_id=None)
                           for n in names])
        for name, out in zip(names, got):
            assert torch.equal(out, alone[name]), name
    finally:
        for model in models.values():
            model.close()


@pytest.mark.parametrize("offload", ["nvme", "none"])
def test_two_threads_generating_on_one_model(ckpts, offload):
    model = zstream.load(ckpts["tiny-llama"], offload=offload, device="cpu", progress=False)
    try:
        prompts = [prompt(i, length=4 + i) for i in range(THREADS)]
        want = [model.generate(p, max_new_tokens=12, eos_token_id=None) for p in prompts]  # sequential calls
        assert not torch.equal(want[0][:, -12:], want[1][:, -12:])  # a swapped result would show
        for _ in range(REPEATS):
            got = run_threads([lambda p=p: model.generate(p, max_new_tokens=12, eos_token_id=None)
                               for p in prompts])
            for w, g in zip(want, got):
                assert torch.equal(g, w)
        # a forward pass (``model(ids)``) from a third thread, while two generate
        logits = model(prompts[0])
        got = run_threads([lambda p=p: model.generate(p, max_new_tokens=12, eos_token_id=None) for p in prompts]
                          + [lambda: model(prompts[0])])
        for w, g in zip(want, got[:THREADS]):
            assert torch.equal(g, w)
        assert torch.equal(got[THREADS], logits)
    finally:
        model.close()


def test_close_waits_for_a_generate_in_progress(ckpts):
    model = zstream.load(ckpts["tiny-llama"], offload="nvme", device="cpu", progress=False)
    ids = prompt(7)
    want = model.generate(ids, max_new_tokens=100, eos_token_id=None)
    in_pass, go_on = threading.Event(), threading.Event()
    out: list[torch.Tensor] = []
    chain = model.blocks

    class Pausing:
        """Holds the third pass of the worker's call at block 1 until close() has been called."""

        def __init__(self) -> None:
            self.passes = 0

        def begin_pass(self, tokens: int) -> None:
            self.passes += 1
            chain.begin_pass(tokens)

        def acquire(self, block: int):
            if (self.passes, block) == (3, 1):
                in_pass.set()
                go_on.wait()
            return chain.acquire(block)

        def __getattr__(self, name: str):
            return getattr(chain, name)

    model.blocks = Pausing()
    worker = threading.Thread(target=lambda: out.append(model.generate(ids, max_new_tokens=100, eos_token_id=None)))
    worker.start()
    assert in_pass.wait(timeout=60)
    closer = threading.Thread(target=model.close)  # must wait, not pull the store and ring from under the pass
    closer.start()
    closer.join(timeout=0.5)
    assert closer.is_alive(), "close() returned while a pass was in progress"
    go_on.set()
    closer.join(timeout=60)
    worker.join(timeout=60)
    assert out and torch.equal(out[0], want)
