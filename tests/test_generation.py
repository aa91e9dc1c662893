"""zstream.generation: the KV cache, sampling, the decode loop with EOS / padding, ResidentModel.generate."""

from __future__ import annotations

import pytest
import torch

from zstream.errors import ModelError
from zstream.generation import KVCache, ResidentModel, generate, sample
from zstream.synthetic import make_checkpoint

from tiny_models import padded_batch, reference_model

V = 16


def test_kv_cache_layers_are_views_of_one_allocation():
    cache = KVCache(num_blocks=3, batch=2, max_len=10, num_kv_heads=4, head_dim=8, dtype=torch.float16)
    assert cache.k.shape == (3, 2, 4, 10, 8)
    assert cache.nbytes == 2 * 3 * 2 * 4 * 10 * 8 * 2
    layer = cache.layer(1)
    k = torch.randn(2, 4, 3, 8, dtype=torch.float16)
    v = torch.randn(2, 4, 3, 8, dtype=torch.float16)
    keys, values = layer.update(k, v, start=2)
    assert keys.shape == (2, 4, 5, 8)
    assert torch.equal(cache.k[1, :, :, 2:5], k)
    assert torch.equal(cache.v[1, :, :, 2:5], v)
    assert torch.equal(keys[:, :, 2:], k)
    assert torch.equal(values[:, :, 2:], v)
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    with pytest.raises(ModelError, match="overflow"):
        layer.update(k, v, start=8)


def test_kv_cache_tracks_the_mask():
    cache = KVCache(1, 2, 6, 1, 4)
    mask, start = cache.extend(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert start == 0
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    mask, start = cache.extend(torch.ones(2, 1, dtype=torch.long))
    assert (start, cache.length) == (3, 4)
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ModelError, match="fit"):
        cache.extend(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ModelError, match="batch"):
        cache.extend(torch.ones(3, 1, dtype=torch.long))
    cache.reset()
    assert cache.length == 0


# ---- sampling ---------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, V)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, True, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample(logits, True, top_p=1e-6, generator=g), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(1)
    freq = torch.bincount(sample(logits, True, generator=g), minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    # temperature 2 flattens it: p ** (1/2), renormalized
    flat = probs.sqrt() / probs.sqrt().sum()
    freq = torch.bincount(sample(logits, True, temperature=2.0, generator=g), minlength=4).float() / 20000
    assert torch.allclose(freq, flat, atol=0.015)
    # top_k 2: only the two most likely, renormalized
    freq = torch.bincount(sample(logits, True, top_k=2, generator=g), minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0]), atol=0.015)
    # top_p 0.7: 0.5 + 0.3 reach it, so the last two are cut
    freq = torch.bincount(sample(logits, True, top_p=0.7, generator=g), minlength=4).float() / 20000
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.tensor([0.625, 0.375]), atol=0.015)


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(4, V)
    a = sample(logits, True, generator=torch.Generator().manual_seed(7))
    b = sample(logits, True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, True, temperature=0.0)


# ---- the decode loop, on a fake model ---------------------------------------------------------


def counting_model(calls: list):
    """A fake forward_fn: the next token is always (last token + 1) mod V. Records its inputs."""

    def forward(ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        calls.append((ids.clone(), mask.clone()))
        cache.extend(mask)
        return torch.nn.functional.one_hot((ids + 1) % V, V).float() * 10  # (B, T, V)

    return forward


def test_generate_runs_max_new_tokens_and_feeds_one_token_per_step():
    calls = []
    ids = torch.tensor([[1, 2, 3], [7, 8, 9]])
    cache = KVCache(1, 2, 8, 1, 4)
    out = generate(counting_model(calls), ids, 5, cache=cache)
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 11, 12, 13, 14]]
    assert [c[0].shape for c in calls] == [(2, 3)] + [(2, 1)] * 4  # prefill, then decode steps
    assert cache.length == 7  # the last token is never fed back


def test_generate_stops_at_eos_and_pads_finished_rows():
    ids = torch.tensor([[0, 1], [0, 4]])
    mask = torch.tensor([[0, 1], [1, 1]])
    out = generate(counting_model([]), ids, 10, cache=KVCache(1, 2, 12, 1, 4), attention_mask=mask,
                   eos_token_id=6, pad_token_id=0)
    # row 1 hits EOS (6) after 2 steps and is padded; row 0 reaches 6 after 5 steps and generation stops
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 4, 5, 6, 0, 0, 0]]
    # several EOS ids; pad defaults to the first
    out = generate(counting_model([]), ids, 10, cache=KVCache(1, 2, 12, 1, 4), eos_token_id=[3, 6])
    assert out.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]


def test_generate_checks_the_cache():
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ModelError, match="KV cache"):
        generate(counting_model([]), ids, 5, cache=KVCache(1, 1, 8, 1, 4))
    cache = KVCache(1, 1, 16, 1, 4)
    cache.extend(torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        generate(counting_model([]), ids, 5, cache=cache)


# ---- on a real (tiny) model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = make_checkpoint("tiny-llama", tmp_path_factory.mktemp("llama"), torch.float32, progress=False)
    return path, ResidentModel(path)


def test_greedy_with_eos_matches_transformers(tiny_llama):
    path, model = tiny_llama
    ref = reference_model(path)
    ids, mask = padded_batch(lengths=(10, 6))
    free = model.generate(ids, 12, attention_mask=mask)
    eos = int(free[0, ids.shape[1] + 3])  # a token row 0 produces at its 4th step
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)
    got = model.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert got.shape[1] <= free.shape[1]


def test_sampled_generate_is_seeded(tiny_llama):
    _, model = tiny_llama
    ids, mask = padded_batch(lengths=(8, 5))
    kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}
    a = model.generate(ids, 10, attention_mask=mask, seed=3, **kwargs)
    b = model.generate(ids, 10, attention_mask=mask, seed=3, **kwargs)
    c = model.generate(ids, 10, attention_mask=mask, seed=4, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, : ids.shape[1]], ids)


def test_padding_does_not_change_a_row(tiny_llama):
    # the same prompt alone and left-padded in a batch gives the same greedy continuation
    _, model = tiny_llama
    ids, mask = padded_batch(lengths=(14, 6))
    batch = model.generate(ids, 10, attention_mask=mask)
    alone = model.generate(ids[1:, -6:], 10)
    assert torch.equal(batch[1, -16:], alone[0])
