"""The streaming engine on the CPU: every offload mode against transformers, the plan, and bad input."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

import zstream
from zstream.errors import CheckpointError, ModelError, OutOfMemoryError, UsageError
from zstream.planning.residency import Plan, choose_residency

from tiny_models import TINY, reference_model, write_checkpoint

transformers = pytest.importorskip("transformers")

# (offload, load kwargs): every way a block can reach the compute. On the CPU, host memory is the device: the tiny
# models fit any budget, so streaming is forced (a cap on resident blocks, or a budget that holds one block).
MODES = [
    ("none", {}),
    ("cpu", {}),                                     # every block resident (host memory is the CPU's device)
    ("cpu", {"max_resident_blocks": 0}),             # every block streamed through the ring from host arenas
    ("cpu", {"max_resident_blocks": 1}),             # one resident, the rest streamed
    ("nvme", {}),                                    # every block streamed from disk through the ring
    ("nvme", {"prefetch": 1, "disk_prefetch": 1}),   # the shallowest pipeline
    ("nvme", {"gpu_memory": "one block", "prefetch": 1}),  # a budget that holds the outer weights, a ring, one block
    ("auto", {}),
    ("auto", {"gpu_memory": "one block", "prefetch": 1}),  # the budget decides: it streams (from disk, on the CPU)
]


def budget_for_one_block(path) -> int:
    probe = zstream.load(path, offload="nvme", device="cpu", progress=False)
    p = probe.plan
    probe.close()
    return p.outer_bytes + p.kv_reserve_bytes + 2 * max(p.block_bytes) + max(p.block_bytes) + 1000  # prefetch=1


@pytest.fixture(scope="module", params=[(n, w) for n in TINY for w in ("transformers", "synthetic")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def checkpoint(request, tmp_path_factory):
    name, writer = request.param
    path = write_checkpoint(name, writer, tmp_path_factory.mktemp(name) / "ckpt", blocks=4)  # room to stream some
    return path, reference_model(path)


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize(("offload", "kw"), MODES, ids=[f"{o}-{'-'.join(k)}" for o, k in MODES])
def test_logits_match_transformers_in_every_mode(checkpoint, offload, kw):
    path, ref = checkpoint
    ids, mask = _batch(ref.config.vocab_size)
    if kw.get("gpu_memory") == "one block":
        kw = {**kw, "gpu_memory": budget_for_one_block(path)}
    model = zstream.load(path, offload=offload, device="cpu", progress=False, **kw)
    n = model.family.num_blocks
    if offload == "nvme" and not kw:
        assert model.plan.streamed_blocks == list(range(n))
    if "gpu_memory" in kw or kw.get("max_resident_blocks") == 1:
        assert model.plan.resident_blocks == [0] and model.plan.streamed_blocks == list(range(1, n))
    if kw.get("max_resident_blocks") == 0:
        assert model.plan.streamed_blocks == list(range(n))
    assert bool(model.plan.streamed_blocks) == bool(model.blocks.rings())  # what streams goes through a ring
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    got = model(ids, mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4
    model.close()


@pytest.mark.parametrize("offload", ["none", "nvme"])
def test_greedy_generate_matches_transformers_for_20_steps(checkpoint, offload):
    path, ref = checkpoint
    ids, mask = _batch(ref.config.vocab_size, seed=1)
    model = zstream.load(path, offload=offload, device="cpu", progress=False)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=20, attention_mask=mask, eos_token_id=None)
    assert torch.equal(got, want)
    # The ring carries over between calls: a second call gives the same tokens.
    assert torch.equal(model.generate(ids, max_new_tokens=20, attention_mask=mask, eos_token_id=None), want)


def test_text_prompts_round_trip(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float32, progress=False)
    model = zstream.load(path, offload="nvme", device="cpu", progress=False)
    out = model.generate(["Hello", "a longer prompt"], max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].startswith("Hello") and out[1].startswith("a longer prompt")
    single = model.generate("Hello", max_new_tokens=4)
    assert single == out[0]  # left padding does not change a row's tokens


def test_streamed_pool_stays_bounded_over_many_passes(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    model = zstream.load(path, offload="nvme", device="cpu", prefetch=2, progress=False)
    ids = torch.randint(3, 200, (2, 5))
    ring = model.blocks.rings()[0]
    # In use at once: the reads ahead, the read being copied, the copies in flight; a pool slot comes back when
    # Python lets go of its tensors, which a slow run (coverage, mutmut) delays, so allow as many again. A leak
    # keeps a slot a block: 6 generates x 6 passes x 2 blocks = 72 here.
    bound = 2 * (ring.source.depth + 1 + ring.slots)
    for _ in range(6):
        model.generate(ids, max_new_tokens=5)
        gc.collect()  # views caught in a reference cycle hold their slot until a collection (a loaded machine's runs)
        assert model.store.pool_stats[0] <= bound  # slots are reused, not leaked


def test_plan_reports_residency_and_bytes(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-bloom", tmp_path / "m", dtype=torch.float16, progress=False)
    model = zstream.load(path, offload="nvme", device="cpu", progress=False)
    p = model.plan
    assert isinstance(p, Plan)
    assert p.resident_blocks == [] and p.streamed_blocks == list(range(p.num_blocks))
    expected = sum(model.store.info(n).nbytes for i in range(p.num_blocks)
                   for n in model.family.block_tensors(i).values())
    assert p.streamed_bytes == expected
    assert p.link_gbps and p.link_gbps > 0
    assert p.predicted_step_s == pytest.approx(expected / (p.link_gbps * 1e9))
    text = str(p)
    assert "streamed: 2 blocks" in text and "predicted step" in text


def test_budget_keeps_what_fits_resident(tmp_path):
    config = {**zstream.synthetic.PRESETS["tiny-bloom"], "n_layer": 6}
    path = zstream.synthetic.make_checkpoint(config, tmp_path / "m", dtype=torch.float32, progress=False)
    probe = zstream.load(path, offload="nvme", device="cpu", progress=False).plan
    block = max(probe.block_bytes)
    # Room for the outer weights, the KV reserve, a ring of prefetch + 1 = 2 slots, and one block more.
    budget = probe.outer_bytes + probe.kv_reserve_bytes + 2 * block + block + 100
    model = zstream.load(path, offload="nvme", device="cpu", prefetch=1, gpu_memory=budget, progress=False)
    assert model.plan.resident_blocks == [0]
    assert model.plan.streamed_blocks == [1, 2, 3, 4, 5]
    assert model.plan.streamed_bytes == 5 * block
    ids = torch.randint(3, 200, (2, 6))
    assert torch.equal(model.generate(ids, max_new_tokens=4), probe_model_tokens(path, ids))


def probe_model_tokens(path, ids):
    return zstream.load(path, offload="none", device="cpu", progress=False).generate(ids, max_new_tokens=4)


def test_choose_residency_keeps_what_fits():
    blocks = [100] * 10
    resident, streamed = choose_residency(blocks, outer_bytes=50, budget=50 + 20 + 3 * 100 + 450, ring_slots=3,
                                          reserve=20, where="x")
    assert resident == [0, 1, 2, 3] and streamed == list(range(4, 10))
    assert choose_residency(blocks, 50, 10**9, 3, 20, where="x") == (list(range(10)), [])
    with pytest.raises(OutOfMemoryError, match="gpu_memory of at least"):
        choose_residency(blocks, 50, 100, 3, 20, where="x")


def test_repo_id_not_in_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        zstream.load("bigscience/bloom-nonexistent-560m", device="cpu")


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        zstream.load("/nonexistent/dir/ckpt", device="cpu")


def test_unsupported_architecture(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"supports.*Bloom"):
        zstream.load(path, device="cpu")


def test_prompt_longer_than_positions(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    model = zstream.load(path, offload="nvme", device="cpu", progress=False)
    n = model.family.max_positions
    with pytest.raises(ModelError, match="exceed"):
        model.generate(torch.randint(3, 100, (1, n)), max_new_tokens=5)


def test_offload_none_that_cannot_fit_names_what_would(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    with pytest.raises(OutOfMemoryError, match="offload='cpu' or 'nvme'"):
        zstream.load(path, offload="none", device="cpu", gpu_memory="1KiB")


def test_bad_arguments(tmp_path):
    path = zstream.synthetic.make_checkpoint("tiny-opt", tmp_path / "m", dtype=torch.float32, progress=False)
    with pytest.raises(UsageError, match="offload must be"):
        zstream.load(path, offload="floppy", device="cpu")
    with pytest.raises(UsageError, match="prefetch"):
        zstream.load(path, prefetch=0, device="cpu")


def test_cli_info_and_demo(tmp_path, capsys, monkeypatch):
    from zstream.interfaces.cli import main

    monkeypatch.setenv("ZSTREAM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--preset", "tiny-bloom", "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "% of the" in out and "limited by:" in out and "random weights" in out
    ckpt = tmp_path / "cache" / "demo" / "tiny-bloom"
    assert os.path.exists(ckpt / "config.json")
    assert main(["info", str(ckpt), "--offload", "nvme", "--device", "cpu"]) == 0
    assert "streamed: 2 blocks" in capsys.readouterr().out
