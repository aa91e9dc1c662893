"""Generation: the KV cache, the decode loop, and ``generate`` through the streaming engine against transformers'
own ``generate`` on the same weights (greedy, sampling with a seed, EOS lists, left padding, penalties), text in
and out, streamers, chat templates and stop strings."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
import transformers

import zstream
from zstream.errors import ModelClosedError, ModelError, UsageError
from zstream.streaming import generate as gen
from zstream.streaming.cache import KVCache

from tiny_models import padded_batch, reference_model, save_with_transformers

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


# ---- the decode loop, on a fake model ---------------------------------------------------------


def counting_model(calls: list):
    """A fake step: the next token is always (last token + 1) mod V. Records its inputs."""

    def step(ids: torch.Tensor, mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        calls.append((ids.clone(), mask.clone()))
        cache.extend(mask)
        return torch.nn.functional.one_hot((ids[:, -1:] + 1) % V, V).float() * 10  # (B, 1, V)

    return step


def run(ids, mask=None, calls=None, **kwargs):
    config, explicit = gen.resolve_config(transformers.GenerationConfig(), None, kwargs)
    mask = torch.ones_like(ids) if mask is None else mask
    s = gen.setup(config, explicit, ids, mask, tokenizer=None)
    cache = KVCache(1, ids.shape[0], ids.shape[1] + s.max_new_tokens, 1, 4)
    steps = list(gen.decode(counting_model([] if calls is None else calls), ids, mask, cache, s))
    return torch.cat([ids] + [t[:, None] for t in steps], dim=1), cache


def test_decode_runs_max_new_tokens_and_feeds_one_token_per_step():
    calls = []
    out, cache = run(torch.tensor([[1, 2, 3], [7, 8, 9]]), calls=calls, max_new_tokens=5)
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 10, 11, 12, 13, 14]]
    assert [c[0].shape for c in calls] == [(2, 3)] + [(2, 1)] * 4  # prefill, then decode steps
    assert cache.length == 7  # the last token is never fed back


def test_decode_stops_at_eos_and_pads_finished_rows():
    ids, mask = torch.tensor([[0, 1], [0, 4]]), torch.tensor([[0, 1], [1, 1]])
    out, _ = run(ids, mask, max_new_tokens=10, eos_token_id=6, pad_token_id=0)
    # row 1 hits EOS (6) after 2 steps and is padded; row 0 reaches 6 after 5 steps and generation stops
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 4, 5, 6, 0, 0, 0]]
    out, _ = run(ids, mask, max_new_tokens=10, eos_token_id=[3, 6])  # several EOS ids; pad: the first
    assert out.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]


def test_max_length_counts_the_prompt_and_the_default_is_20_new_tokens():
    ids = torch.tensor([[1, 2, 3]])
    assert run(ids, max_length=7)[0].shape == (1, 7)
    assert run(ids)[0].shape == (1, 3 + gen.DEFAULT_MAX_NEW_TOKENS)
    with pytest.raises(UsageError, match="shorter than the prompt"):
        run(ids, max_length=2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_new_token": 5}, "unknown argument"), ({"num_beams": 4}, "beam search"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"), ({"guidance_scale": 2.0}, "guidance"),
])
def test_refusals_name_the_argument(kwargs, match):
    with pytest.raises(UsageError, match=match):
        run(torch.tensor([[1, 2]]), max_new_tokens=2, **kwargs)


# ---- through the engine, against transformers -----------------------------------------------------------------

MODES = [("none", {}), ("cpu", {"max_resident_blocks": 0}), ("nvme", {"max_resident_blocks": 0})]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt", "tiny-bloom"])
def checkpoint(request, tmp_path_factory):
    path = save_with_transformers(zstream.PRESETS[request.param], tmp_path_factory.mktemp(request.param) / "m")
    return path, reference_model(path)


@pytest.mark.parametrize(("offload", "kw"), MODES, ids=[m for m, _ in MODES])
def test_greedy_with_an_eos_list_and_left_padding_equals_transformers(checkpoint, offload, kw):
    path, ref = checkpoint
    ids, mask = padded_batch(vocab=ref.config.vocab_size, lengths=(10, 6, 8))
    with zstream.load(path, offload=offload, device="cpu", progress=False, **kw) as model:
        free = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
        eos = [int(free[0, ids.shape[1] + 3]), int(free[2, ids.shape[1] + 5])]  # tokens rows 0 and 2 produce
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=0)
    assert torch.equal(got, want)
    T = ids.shape[1]
    for row in (0, 2):  # each row stops at its EOS, then pads
        new = got[row, T:].tolist()
        first = min(new.index(e) for e in eos if e in new)
        assert set(new[first + 1:]) <= {0}


SAMPLING = [
    {"temperature": 0.7, "top_k": 20},
    {"temperature": 1.3, "top_p": 0.8},
    {"top_k": 0, "top_p": 0.9, "repetition_penalty": 1.3},
    {"temperature": 0.9, "min_p": 0.05, "no_repeat_ngram_size": 2},
    {"temperature": 0.3, "min_p": 0.9},  # often a single token above the cut: min_tokens_to_keep decides
]


@pytest.mark.parametrize("settings", SAMPLING, ids=lambda s: ",".join(s))
@pytest.mark.parametrize(("offload", "kw"), MODES[1:], ids=[m for m, _ in MODES[1:]])
def test_sampling_with_a_seed_equals_transformers(checkpoint, settings, offload, kw):
    """Same weights, same settings, same seed: the same tokens. The logits agree to float32 rounding and each step
    samples with torch.multinomial over the same processed scores, as transformers' _sample does."""
    path, ref = checkpoint
    ids, mask = padded_batch(vocab=ref.config.vocab_size, lengths=(9, 5))
    eos = [5, 7]
    with zstream.load(path, offload=offload, device="cpu", progress=False, **kw) as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, seed=11, eos_token_id=eos,
                             pad_token_id=0, **settings)
    torch.manual_seed(11)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, eos_token_id=eos,
                        pad_token_id=0, **settings)
    assert torch.equal(got, want)


def test_the_seed_decides_and_settings_reach_the_sampler(checkpoint):
    """Dropping temperature / top_k / top_p on the way to the sampler changes what is drawn."""
    path, _ = checkpoint
    ids, mask = padded_batch(lengths=(8, 5))
    with zstream.load(path, offload="cpu", device="cpu", max_resident_blocks=0, progress=False) as model:
        def draw(seed, **kw):
            return model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, seed=seed,
                                  eos_token_id=None, **kw)

        a = draw(3)
        assert torch.equal(a, draw(3))
        assert not torch.equal(a, draw(4))
        assert not torch.equal(a, draw(3, temperature=3.0))
        assert not torch.equal(a, draw(3, top_k=1))
        assert torch.equal(draw(3, top_k=1), draw(9, top_k=1))  # top_k=1 is greedy, whatever the seed
        assert torch.equal(draw(5, top_k=1), model.generate(ids, attention_mask=mask, max_new_tokens=12,
                                                            eos_token_id=None))


@pytest.fixture(scope="module")
def synthetic_llama(tmp_path_factory):
    config = {**zstream.PRESETS["tiny-llama"], "vocab_size": 4096}  # room for pseudo-words: text with spaces
    return zstream.make_checkpoint(config, tmp_path_factory.mktemp("syn") / "m", torch.float32, progress=False)


def test_text_in_text_out_and_padding_does_not_change_a_row(synthetic_llama):
    with zstream.load(synthetic_llama, offload="nvme", device="cpu", progress=False) as model:
        with pytest.warns(UserWarning, match="random weights"):
            out = model.generate(["Hello", "a longer prompt"], max_new_tokens=6, eos_token_id=None)
        single = model.generate("Hello", max_new_tokens=6, eos_token_id=None)
    assert isinstance(out, list) and out[0].startswith("Hello") and out[1].startswith("a longer prompt")
    assert single == out[0]
    assert len(single) > len("Hello")  # the new tokens decode to visible text


def test_stream_yields_the_continuation_in_pieces(synthetic_llama):
    with zstream.load(synthetic_llama, offload="cpu", device="cpu", max_resident_blocks=0, progress=False) as model:
        full = model.generate("Hello there", max_new_tokens=10, eos_token_id=None)
        pieces = list(model.stream("Hello there", max_new_tokens=10, eos_token_id=None))
        with pytest.raises(ModelError, match="one prompt"):
            next(model.stream(["a", "b"]))
    assert len(pieces) > 1
    assert "Hello there" + "".join(pieces) == full


def test_transformers_streamers(synthetic_llama):
    with zstream.load(synthetic_llama, offload="nvme", device="cpu", progress=False) as model:
        want = model.generate("Hi", max_new_tokens=8, eos_token_id=None)
        it = transformers.TextIteratorStreamer(model.tokenizer, skip_prompt=True, timeout=60)
        worker = threading.Thread(target=model.generate, args=("Hi",),
                                  kwargs={"max_new_tokens": 8, "eos_token_id": None, "streamer": it})
        worker.start()
        text = "".join(it)
        worker.join()
    assert "Hi" + text == want


def test_stop_strings_and_chat_template(synthetic_llama):
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        free = model.generate("Hello", max_new_tokens=12, eos_token_id=None)
        stop = free[len("Hello"):][2:4]  # two characters the model produces
        cut = model.generate("Hello", max_new_tokens=12, eos_token_id=None, stop_strings=stop)
        assert stop in cut and len(cut) < len(free) and free.startswith(cut)  # ends with the token that holds it
        assert stop not in cut[:-1 - len(stop) - 4]  # ... and not long after it appeared (a token is <= 5 chars)
        reply = model.generate([{"role": "user", "content": "Hello"}], max_new_tokens=5, eos_token_id=None)
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                                     add_generation_prompt=True, tokenize=False)
        assert (prompt + reply).startswith("user: Hello\nassistant:")
        ids = model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        tokens = model.generate(ids, max_new_tokens=5, eos_token_id=None)
        assert model.tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True) == reply


def test_generation_config_and_processors(synthetic_llama):
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        ids = torch.tensor([[5, 6, 7, 8]])
        cfg = transformers.GenerationConfig(max_new_tokens=6, eos_token_id=None)
        a = model.generate(ids, cfg)
        assert a.shape == (1, 10)
        banned = int(a[0, 4])

        class Ban(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                scores[:, banned] = -float("inf")
                return scores

        b = model.generate(ids, cfg, logits_processor=[Ban()])
        assert banned not in b[0, 4:].tolist()
        with pytest.raises(UsageError, match="max_new_tokens=6 by name"):
            model.generate(ids, 6)


def test_a_closed_model_says_so(synthetic_llama):
    model = zstream.load(synthetic_llama, offload="nvme", device="cpu", progress=False)
    with model as m:
        assert m is model
    assert model.closed and "closed" in repr(model)
    for call in (lambda: model.generate(torch.tensor([[1, 2]]), max_new_tokens=2),
                 lambda: model(torch.ones(1, 2).long()), lambda: next(model.stream("a"))):
        with pytest.raises(ModelClosedError, match="closed"):
            call()
    model.close()  # twice: harmless
    with pytest.raises(ModelClosedError), model:
        pass


def test_a_progress_bar_for_long_generations(synthetic_llama, capsys):
    """progress=True: a bar over the new tokens (tqdm.auto: a widget in a notebook, text here); the default shows one
    only past 2 s; progress=False never."""
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        ids = torch.tensor([[5, 6, 7]])
        model.generate(ids, max_new_tokens=5, eos_token_id=None, progress=True)
        assert "zstream generate" in capsys.readouterr().err
        model.generate(ids, max_new_tokens=5, eos_token_id=None)  # quick: under the 2 s delay
        model.generate(ids, max_new_tokens=5, eos_token_id=None, progress=False)
        assert "zstream generate" not in capsys.readouterr().err


def test_the_random_weights_warning_points_at_the_caller_once_per_model(synthetic_llama):
    import warnings

    def where(w: warnings.WarningMessage) -> str:
        # Under mutation testing mutmut's trampolines (mutmut/mutation/trampoline.py) stand between zstream's
        # frames and the caller's: the first frame outside zstream is theirs.
        return __file__ if os.path.basename(w.filename) == "trampoline.py" else w.filename

    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.generate("Hi", max_new_tokens=2)
            model.generate("Hi", max_new_tokens=2)
        assert [(w.category, where(w)) for w in seen] == [(UserWarning, __file__)]
        assert "random weights" in str(seen[0].message) and str(seen[0].message).endswith("the speed is real")
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            list(model.stream("Hi", max_new_tokens=2))
        assert [(w.category, where(w)) for w in seen] == [(UserWarning, __file__)]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.generate(torch.tensor([[5, 6]]), max_new_tokens=2)  # token ids in, ids out: nothing to say
        assert not seen


def test_text_gets_the_tokenizers_own_special_tokens_and_a_chat_does_not(synthetic_llama):
    """Text is encoded as the tokenizer encodes it (LLaMA's puts BOS first), so generating from text equals
    generating from the tokenizer's own ids; a conversation's template writes its own specials."""
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        tok = model.tokenizer
        ids = tok("Hello there", return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id
        text = model.generate("Hello there", max_new_tokens=6, eos_token_id=None)
        assert text == tok.decode(model.generate(ids, max_new_tokens=6, eos_token_id=None)[0], skip_special_tokens=True)
        chat = [{"role": "user", "content": "Hello"}]
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        plain = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        reply = model.generate(chat, max_new_tokens=4, eos_token_id=None)
        tokens = model.generate(plain, max_new_tokens=4, eos_token_id=None)
        assert reply == tok.decode(tokens[0, plain.shape[1] :], skip_special_tokens=True)


def test_what_text_needs_is_named(synthetic_llama, tmp_path):
    bare = zstream.make_checkpoint("tiny-llama", tmp_path / "bare", torch.float32, progress=False, tokenizer=False)
    with zstream.load(bare, offload="none", device="cpu", progress=False) as model:
        assert model.tokenizer is None
        with pytest.raises(ModelError, match=r"bare: text needs the checkpoint's tokenizer, and it has none"):
            model.generate("Hello")
        with pytest.raises(ModelError, match=r"bare: a conversation needs the checkpoint's tokenizer"):
            model.generate([{"role": "user", "content": "Hi"}])
        with pytest.raises(ModelError, match=r"token ids as a LongTensor \(B, T\); got a torch.float32 tensor"):
            model.generate(torch.ones(1, 3))
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in synthetic_llama.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    with (
        zstream.load(plain, offload="none", device="cpu", progress=False) as model,
        pytest.raises(ModelError, match="its tokenizer has no chat template"),
    ):
        model.generate([{"role": "user", "content": "Hi"}])


def test_stream_takes_a_generation_config_and_a_seed_and_hides_special_tokens(synthetic_llama):
    with zstream.load(synthetic_llama, offload="none", device="cpu", progress=False) as model:
        cfg = transformers.GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, eos_token_id=None)
        full = model.generate("Hello there", cfg, seed=5)
        assert "Hello there" + "".join(model.stream("Hello there", cfg, seed=5)) == full
        assert full != model.generate("Hello there", cfg, seed=6)
        eos = model.tokenizer.eos_token
        pieces = "".join(
            model.stream("Hello", max_new_tokens=4, eos_token_id=None, forced_eos_token_id=model.tokenizer.eos_token_id)
        )
        assert eos not in pieces  # the forced EOS at the end is a special token: not shown
        one = r"^stream takes one prompt or one conversation; use generate for a batch$"
        with pytest.raises(ModelError, match=one):
            next(model.stream(["a", "b"]))
        T = len(model.tokenizer("Hello there")["input_ids"])
        greedy = {"do_sample": False, "eos_token_id": None}
        assert "".join(model.stream("Hello there", max_length=T + 3, **greedy)) == \
            "".join(model.stream("Hello there", max_new_tokens=3, **greedy))
        model.tokenizer.padding_side = "right"
        model.generate(["a b c", "d"], max_new_tokens=1)  # a batch pads on the left, then puts the side back
        assert model.tokenizer.padding_side == "right"


def test_kv_cache_reset_starts_over():
    cache = KVCache(1, 2, 6, 1, 4)
    cache.extend(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    cache.reset()
    assert cache.length == 0 and cache.mask.shape == (2, 0)
    mask, start = cache.extend(torch.tensor([[1, 1], [0, 1]]))
    assert start == 0 and mask.tolist() == [[1, 1], [0, 1]]


def test_the_repetition_penalty_is_built_as_the_installed_transformers_builds_it(monkeypatch):
    """Older transformers (5.17, on the GPU machine) takes the pad lengths as an int only and its generate penalises the
    padding: zstream then does the same, instead of failing on a tensor of lengths."""
    from transformers.generation import logits_process as lp

    made = []

    class IntOnly(lp.RepetitionPenaltyLogitsProcessor):
        def __init__(self, penalty: float, prompt_ignore_length=None) -> None:
            if isinstance(prompt_ignore_length, torch.Tensor):
                raise ValueError("`prompt_ignore_length` has to be a positive integer")
            super().__init__(penalty, prompt_ignore_length)
            made.append(prompt_ignore_length)

    monkeypatch.setattr(lp, "RepetitionPenaltyLogitsProcessor", IntOnly)
    ids, mask = padded_batch(vocab=64, lengths=(5, 3))
    config = transformers.GenerationConfig(repetition_penalty=1.3, max_new_tokens=2)
    s = gen.setup(config, {"repetition_penalty"}, ids, mask, tokenizer=None)
    assert made == [None] and any(isinstance(p, IntOnly) for p in s.processors)
