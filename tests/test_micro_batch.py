"""Micro-batches (``load(micro_batch=N)``, FlexGen's GPU batches in its zig-zag order): a batch runs through each
block N rows at a time while the block is on the device. Checked against the reference that needs no micro-batching:
the same model run on each micro-batch's rows alone gives every logit and token bit for bit (the same rows through
the same kernels); the weights still cross once a pass; and the plan keeps room for one micro-batch's activations."""

from __future__ import annotations

import pytest
import torch

import zstream
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.facts import facts_from_shapes
from zstream.planning.residency import PlanOptions, Resources, plan_load

from tiny_models import padded_batch


@pytest.fixture
def checkpoints(family_checkpoints: dict) -> dict:
    return family_checkpoints


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("kv", ["none", "host", "host-compute", "split"])
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_micro_batches_change_no_logit_and_no_token(checkpoints: dict, name: str, kv: str) -> None:
    """Five left-padded rows in micro-batches of 2 (2, 2, 1), every block streamed: the logits and 8 greedy tokens of
    each micro-batch's rows are those of the same rows run alone."""
    ids, mask = padded_batch(vocab=250, lengths=(9, 6, 3, 8, 5))
    kw = {"device": "cpu", "progress": False, "offload": "cpu", "max_resident_blocks": 0, "kv_offload": kv}
    path = checkpoints[name]
    with zstream.load(path, micro_batch=2, **kw) as micro, zstream.load(path, **kw) as alone:
        assert micro.plan.micro_batch == 2 and "2 rows at a time" in micro.plan.summary()
        logits = micro(ids, mask)
        tokens = micro.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
            assert torch.equal(logits[rows], alone(ids[rows], mask[rows])), rows
            assert torch.equal(tokens[rows], alone.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=8,
                                                            do_sample=False)), rows


def test_a_block_crosses_once_for_all_micro_batches(checkpoints: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block is acquired once a pass, and every micro-batch computes with it before it is released."""
    with zstream.load(checkpoints["tiny-llama"], device="cpu", progress=False, offload="cpu", max_resident_blocks=0,
                      micro_batch=2) as model:
        events: list = []
        blocks, fam = model.blocks, model.family
        real_acquire, real_release, real_block = blocks.acquire, blocks.release, fam.block
        monkeypatch.setattr(blocks, "acquire", lambda i: events.append(("acquire", i)) or real_acquire(i))
        monkeypatch.setattr(blocks, "release", lambda i: events.append(("release", i)) or real_release(i))
        monkeypatch.setattr(fam, "block", lambda w, h, c, ctx: events.append(("block", h.shape[0])) or
                            real_block(w, h, c, ctx))
        ids, mask = padded_batch(vocab=250, lengths=(4, 3, 2, 4, 1))
        model(ids, mask)
    per_block = [("block", 2), ("block", 2), ("block", 1)]
    want = [e for i in range(fam.num_blocks) for e in [("acquire", i), *per_block, ("release", i)]]
    assert events == want


def test_the_plan_keeps_room_for_one_micro_batch() -> None:
    """bloom-7b1 at 16 GiB, batch 64 x 544 with the cache on the host's CPUs: activations for 16 rows instead of 64
    leave room for more resident blocks (so fewer bytes stream a step)."""
    facts = facts_from_shapes(family_for(zstream.synthetic.PRESETS["bloom-7b1"]), torch.float16)
    gpu = Resources(device="cuda:0", device_free=parse_bytes("140GiB"))

    def plan(micro: object) -> object:
        return plan_load(facts, gpu, PlanOptions(offload="cpu", budget=parse_bytes("16GiB"), max_batch=64,
                                                 max_seq_len=544, kv_offload="host-compute", micro_batch=micro),
                         where="m")

    whole, micro = plan(None), plan(16)
    assert len(micro.resident_blocks) > len(whole.resident_blocks)
    assert micro.kv_reserve_bytes < whole.kv_reserve_bytes
    assert plan(64).kv_reserve_bytes == whole.kv_reserve_bytes  # a micro-batch of the whole batch changes nothing
    with pytest.raises(zstream.UsageError, match="micro_batch must be an integer >= 1"):
        zstream.load("x", micro_batch=0)


@pytest.mark.parametrize("micro", [0, 2.5, True, "16", [16, 0], (None, "8")])
def test_plan_batch_refuses_a_micro_batch_that_is_not_rows_before_reading_anything(micro) -> None:
    with pytest.raises(zstream.UsageError, match=r"micro_batch must be None, a number of rows >= 1 or a list"):
        zstream.plan_batch("no/such/checkpoint", micro_batch=micro)


def test_a_host_layer_frees_its_buffer_after_its_last_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cache brought up from host memory, a layer's buffer is shared by its micro-batches: the copy of the
    layer two after it into that buffer starts only once the batch's last rows have attended."""
    import zstream.streaming.cache as cache_module
    from zstream.foundations.models import StepContext
    from zstream.streaming.cache import KVCache

    copies = []
    real = cache_module.Uplink._copy
    monkeypatch.setattr(cache_module.Uplink, "_copy",
                        lambda self, j, start, slot: copies.append(j) or real(self, j, start, slot))
    cache = KVCache(4, batch=3, max_len=8, num_kv_heads=1, head_dim=2, device_layers=0)
    cache.extend(torch.ones(3, 2))
    cache.extend(torch.ones(3, 1))
    assert copies == [0, 1, 0, 1]
    q = torch.randn(2, 1, 1, 2)
    ctx = StepContext(start=2, positions=torch.zeros(2, 1, dtype=torch.long), mask=None, is_causal=False)
    cache.layer(0, slice(0, 2)).attend(q, q, q, ctx)
    assert copies == [0, 1, 0, 1]          # rows 2.. have not attended: layer 2 must wait for the buffer
    cache.layer(0, slice(2, 3)).attend(q[:1], q[:1], q[:1], ctx)
    assert copies == [0, 1, 0, 1, 2]


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("kv", ["host", "split"])
@pytest.mark.parametrize("coding", [{"quantize": "int4"}, {"compress": "lossless"}])
def test_coded_blocks_with_the_cache_on_the_host_in_micro_batches(checkpoints: dict, kv: str, coding: dict,
                                                                  tmp_path) -> None:
    """OPT's int4 setting (FlexGen's table has one) and lossless blocks (fp16, wide enough to code): the cache on the
    host in micro-batches of 2 gives the logits and tokens of the same coded model with its cache on the device, each
    micro-batch's rows alone."""
    ids, mask = padded_batch(vocab=250, lengths=(7, 4, 6))
    kw = {"device": "cpu", "progress": False, "offload": "cpu", "max_resident_blocks": 0, **coding}
    wide = {**zstream.PRESETS["tiny-opt"], "hidden_size": 256, "ffn_dim": 1024, "word_embed_proj_dim": 256}
    path = checkpoints["tiny-opt"] if "quantize" in coding else zstream.make_checkpoint(  # weights worth coding
        wide, tmp_path / "fp16", torch.float16, progress=False)
    with zstream.load(path, micro_batch=2, kv_offload=kv, **kw) as host, zstream.load(path, **kw) as device:
        logits = host(ids, mask)
        tokens = host.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for rows in (slice(0, 2), slice(2, 3)):
            assert torch.equal(logits[rows], device(ids[rows], mask[rows])), rows
            assert torch.equal(tokens[rows], device.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=6,
                                                             do_sample=False)), rows
