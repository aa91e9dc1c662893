"""The KV cache in host memory: ``kv_offload="host"`` brings each layer's keys and values up to the device as the
layer computes, ``"host-compute"`` runs the layer's attention on the host where they live. Checked against the
on-device cache, which is the reference: the same slots, the same logits and the same tokens bit for bit (on the CPU,
where both attend with the same arithmetic), for every family, left-padded batches, streamed and resident blocks,
greedy and sampled generation; and what the plan reserves for each."""

from __future__ import annotations

import pytest
import torch

import zstream
from zstream.errors import ModelError, UsageError
from zstream.foundations.models import StepContext
from zstream.planning.residency import HOST_KV_DEVICE_LAYERS, kv_layer_bytes, reserve_bytes
from zstream.streaming.cache import HostComputeLayerCache, HostLayerCache, KVCache, LayerCache

from tiny_models import padded_batch


def test_host_layers_return_what_device_layers_do() -> None:
    """A cache of 5 layers, 2 on the device and 3 on the host (sharing one staging buffer), fed the same steps as an
    all-device cache, layer by layer in the order a forward pass takes them: a prompt of 4, then 3 single tokens.
    Every update returns the same keys and values."""
    g = torch.Generator().manual_seed(0)
    mixed = KVCache(5, batch=2, max_len=9, num_kv_heads=3, head_dim=4, dtype=torch.float16, device_layers=2)
    whole = KVCache(5, batch=2, max_len=9, num_kv_heads=3, head_dim=4, dtype=torch.float16)
    assert [type(mixed.layer(i)) for i in range(5)] == [LayerCache] * 2 + [HostLayerCache] * 3
    assert mixed.k_host.shape == (3, 9, 2, 3, 4) and mixed.device_layers == 2
    assert mixed.host_nbytes == 2 * 3 * 9 * 2 * 3 * 4 * 2
    start = 0
    for T in (4, 1, 1, 1):
        for i in range(5):
            k = torch.randn(2, 3, T, 4, generator=g).half()
            v = torch.randn(2, 3, T, 4, generator=g).half()
            got = mixed.layer(i).update(k, v, start)
            want = whole.layer(i).update(k, v, start)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (T, i)
            assert got[0].shape == (2, 3, start + T, 4) and got[0].stride() == want[0].stride()
        start += T
    with pytest.raises(ModelError, match="overflow"):
        mixed.layer(4).update(k, v, start=9)
    assert KVCache(3, 1, 4, 1, 2, device_layers=0).device_layers == 0


@pytest.fixture
def checkpoints(family_checkpoints: dict) -> dict:
    return family_checkpoints


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("kv", ["host", "host-compute", "split"])
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_host_kv_cache_changes_no_logit_and_no_token(checkpoints: dict, name: str, kv: str) -> None:
    ids, mask = padded_batch(vocab=250, lengths=(9, 6, 3))
    kw = {"device": "cpu", "progress": False, "offload": "cpu", "max_resident_blocks": 1}  # one resident, rest streamed
    path = checkpoints[name]
    with zstream.load(path, **kw) as plain, zstream.load(path, kv_offload=kv, **kw) as host:
        cache = host.new_cache(3, 20)
        n = host.family.num_blocks
        assert cache.device_layers == 0 and cache.host_nbytes > 0 and cache.host_compute == (kv != "host")
        cpu = {"host": [], "host-compute": list(range(n)), "split": [1]}[kv]  # split: half of 2 layers, the second
        assert cache.cpu_layers == cpu and host.plan.kv_cpu_layers == len(cpu)
        assert [type(cache.layer(i)) for i in range(n)] == [
            HostComputeLayerCache if i in cpu else HostLayerCache for i in range(n)]
        assert torch.equal(host(ids, mask), plain(ids, mask))
        greedy = {"max_new_tokens": 12, "do_sample": False}
        assert torch.equal(host.generate(ids, attention_mask=mask, **greedy),
                           plain.generate(ids, attention_mask=mask, **greedy))
        sampled = {"max_new_tokens": 12, "do_sample": True, "top_k": 20, "temperature": 0.8}
        torch.manual_seed(7)
        want = plain.generate(ids, attention_mask=mask, **sampled)
        torch.manual_seed(7)
        assert torch.equal(host.generate(ids, attention_mask=mask, **sampled), want)


def test_the_plan_reserves_only_the_layers_in_transit(checkpoints: dict) -> None:
    with zstream.load(checkpoints["tiny-llama"], device="cpu", kv_offload="host", max_batch=4, max_seq_len=64,
                      progress=False) as model:
        fam, plan = model.family, model.plan
        layer = kv_layer_bytes(fam, 4, 64, model.dtype)
        assert plan.kv_offload == "host" and plan.kv_host_bytes == fam.num_blocks * layer
        assert "KV cache in pinned host memory" in plan.summary()
    whole = reserve_bytes(fam, 4, 64, model.dtype)
    host = reserve_bytes(fam, 4, 64, model.dtype, kv_offload="host")
    assert whole - host == (fam.num_blocks - min(HOST_KV_DEVICE_LAYERS, fam.num_blocks)) * layer
    assert whole - reserve_bytes(fam, 4, 64, model.dtype, kv_offload="host-compute") == fam.num_blocks * layer
    with zstream.load(checkpoints["tiny-llama"], device="cpu", kv_offload="host-compute", progress=False) as model:
        assert "attention runs on the host's CPUs" in model.plan.summary() and model.plan.kv_host_bytes > 0


def test_kv_offload_values_are_checked(checkpoints: dict) -> None:
    with pytest.raises(UsageError, match="kv_offload must be one of 'none', 'host', 'host-compute'"):
        zstream.load(checkpoints["tiny-llama"], device="cpu", kv_offload="disk", progress=False)


def test_host_compute_attends_the_prompt_where_q_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """With attention on the host, the prompt (nothing earlier in the cache) attends over its own k, v where q is,
    as the device cache does, and only sends k, v down; a later step attends over the host cache's slots."""
    import zstream.streaming.cache as cache_module

    calls = []
    monkeypatch.setattr(cache_module, "attention", lambda q, k, v, ctx: calls.append((k, v, ctx)) or q)
    cache = KVCache(1, batch=2, max_len=8, num_kv_heads=1, head_dim=4, device_layers=0, host_compute=True)
    layer = cache.layer(0)
    q, k, v = torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    ctx = StepContext(start=0, positions=torch.zeros(2, 5, dtype=torch.long), mask=None, is_causal=True)
    layer.attend(q, k, v, ctx)
    assert calls[-1][0] is k and calls[-1][1] is v and calls[-1][2] is ctx  # the prompt's own k, v, the step's ctx
    assert torch.equal(cache.k_cpu[0, :, :, :5], k) and torch.equal(cache.v_cpu[0, :, :, :5], v)
    step = StepContext(start=5, positions=torch.zeros(2, 1, dtype=torch.long), mask=torch.zeros(2, 1, 1, 6),
                       is_causal=False)
    layer.attend(q[:, :, :1], k[:, :, :1], v[:, :, :1], step)
    keys, values, used = calls[-1]
    assert keys.shape == (2, 1, 6, 4) and keys.data_ptr() == cache.k_cpu.data_ptr()  # the host cache's slots
    assert torch.equal(values[:, :, 5:], v[:, :, :1]) and used is not step  # the step's context, mask on the host


def test_the_cpus_attention_goes_up_through_one_mapped_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPUs' attention output reaches the device as a kernel's read of a mapped host buffer (here a CPU tensor
    stands in for both views): the values arrive, the buffer is made once and reused for outputs that fit, grown
    for one that does not, and what comes up is a copy (the next output may overwrite the buffer); where no buffer
    can be mapped it copies up as before."""
    import zstream.streaming.cache as cache_module

    made = []

    def fake_mapped(nbytes: int, device: torch.device):
        made.append(nbytes)
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        return buf, buf
    monkeypatch.setattr(cache_module, "mapped_host_buffer", fake_mapped)
    up = cache_module.AttentionUp(torch.device("cpu"))
    up.unmappable = False  # as on a GPU
    first = torch.randn(2, 3, 1, 4, dtype=torch.float16)                               # (B, nh, T, hs)
    sent = up(first)
    assert torch.equal(sent, first) and sent.data_ptr() != up.mapped.data_ptr()
    second = torch.randn(2, 3, 1, 4, dtype=torch.float16)
    assert torch.equal(up(second), second) and torch.equal(sent, first) and made == [1 << 20]
    big = torch.randn(1024, 8, 1, 128)                                                 # 4 MiB: grown
    assert torch.equal(up(big), big) and made == [1 << 20, big.numel() * 4]
    monkeypatch.setattr(cache_module, "mapped_host_buffer", lambda nbytes, device: None)
    plain = cache_module.AttentionUp(torch.device("cpu"))
    plain.unmappable = False
    assert torch.equal(plain(first), first) and plain.unmappable and plain.host is None


def test_auto_places_the_cache_by_what_fits() -> None:
    """kv_offload="auto" at load: bloom-7b1 at 16 GiB keeps the cache of batch 8 on the device; batch 64's does not
    fit beside a ring of blocks (the H200 run: "needs at least 25.7 GiB"), so it goes to host memory, attended to
    on the CPUs while blocks stream and brought up when every block is resident; on the CPU it stays."""
    from zstream.foundations.units import parse_bytes
    from zstream.planning.facts import facts_from_shapes
    from zstream.planning.residency import PlanOptions, Resources, plan_load

    facts = facts_from_shapes(zstream.foundations.models.family_for(zstream.synthetic.PRESETS["bloom-7b1"]),
                              torch.float16)
    gpu = Resources(device="cuda:0", device_free=parse_bytes("140GiB"))

    def placed(batch: int, offload: str = "cpu", budget: str = "16GiB", resources: Resources = gpu) -> tuple:
        opts = PlanOptions(offload=offload, budget=parse_bytes(budget), max_batch=batch, max_seq_len=544,
                           kv_offload="auto")
        plan = plan_load(facts, resources, opts, where="m")
        return plan.kv_offload, plan.notes[0]

    assert placed(8)[0] == "none" and placed(36)[0] == "none"
    kv, note = placed(64)
    assert kv == "host-compute" and "do not fit the 16.0 GiB budget" in note
    assert placed(64, offload="none", budget="30GiB")[0] == "host"   # every block resident: the link is free
    assert placed(64, budget="32GiB")[0] == "none"                    # 25.7 GiB of cache, ring and outer weights
    assert placed(64, resources=Resources(device="cpu"), budget="16GiB")[0] == "none"


def test_host_layers_come_up_ahead_of_their_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The uplink's order: a pass starts the first two host layers' copies; each layer's attention, once queued,
    starts the copy of the layer two after it into the buffer it frees; a layer reached without a copy started
    (a pass that did not begin through ``extend``) gets one then. Recorded, on the CPU."""
    import zstream.streaming.cache as cache_module

    copies = []
    real = cache_module.Uplink._copy
    monkeypatch.setattr(cache_module.Uplink, "_copy",
                        lambda self, j, start, slot: copies.append((j, start, slot)) or real(self, j, start, slot))
    cache = KVCache(5, batch=1, max_len=8, num_kv_heads=1, head_dim=2, device_layers=1)
    cache.extend(torch.ones(1, 3))                       # the prompt: slots 0..2
    assert copies == [(0, 0, 0), (1, 0, 1)]
    cache.extend(torch.ones(1, 1))                       # a step at slot 3: host layers 0 and 1 start up
    assert copies[2:] == [(0, 3, 0), (1, 3, 1)]
    ctx = StepContext(start=3, positions=torch.zeros(1, 1, dtype=torch.long), mask=None, is_causal=False)
    q = torch.randn(1, 1, 1, 2)
    cache.layer(1).attend(q, q, q, ctx)                  # host layer 0 attends: host layer 2 starts into buffer 0
    assert copies[4:] == [(2, 3, 0)]
    cache.layer(2).attend(q, q, q, ctx)
    assert copies[5:] == [(3, 3, 1)]
    cache.layer(3).attend(q, q, q, ctx)                  # host layer 4 would be next: there are 4 host layers
    assert copies[6:] == []
    cache.layer(4).update(q, q, start=3)                 # host layer 3, started ahead: no second copy
    assert copies[6:] == []
    cache.layer(4).update(q, q, start=2)                 # another start than the pass's: copied now
    assert copies[6:] == [(3, 2, 1)]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 64])
def test_a_prompts_keys_go_down_whole_in_pieces(monkeypatch, chunk_tokens):
    """The copy down of a batch's new keys, (B, nkv, T, hs) into the host's (T, B, nkv, hs), in pieces of a few
    tokens (the device staging is bounded): every token lands, in place, whatever the piece size."""
    from zstream.streaming import cache

    dev = torch.randn(3, 2, 7, 4)
    per_token = dev[:, :, 0].numel() * dev.element_size()
    monkeypatch.setattr(cache, "DOWN_CHUNK_BYTES", chunk_tokens * per_token)
    host = torch.zeros(10, 3, 2, 4)
    cache._down(dev, host[2:9])
    assert torch.equal(host[2:9], dev.permute(2, 0, 1, 3)) and not host[:2].any() and not host[9:].any()
