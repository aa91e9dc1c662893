"""zstream.synthetic: random-weight checkpoints that transformers loads, with the real tensor table."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from zstream.api import synthetic
from zstream.api.synthetic import PRESETS, checkpoint_plan, estimate_bytes, is_current, make_checkpoint
from zstream.errors import ModelError, OutputExistsError

from tiny_models import TINY, hf_config

transformers = pytest.importorskip("transformers")


def _meta_model(config: dict):
    """transformers' own model of a config, on the meta device: names and shapes without memory."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config(config))


def _read_header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _data_bytes(path: Path) -> int:
    """Bytes of tensor data in a checkpoint directory: file sizes minus the headers."""
    total = 0
    for file in path.glob("*.safetensors"):
        n, _ = _read_header(file)
        total += file.stat().st_size - 8 - n
    return total


@pytest.mark.parametrize("name", list(PRESETS))
def test_plan_matches_transformers_state_dict(name):
    # every preset, bloom-176b included: the plan is built without writing (or allocating) any data
    model = _meta_model(PRESETS[name])
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = checkpoint_plan(name)
    got = {n: shape for n, shape, _ in plan}
    assert len(got) == len(plan)  # no duplicate names
    if model.config.tie_word_embeddings:
        del want["lm_head.weight"]  # save_pretrained does not store a tied head
    assert got == want
    assert estimate_bytes(name) == 2 * sum(p.numel() for p in model.parameters())


def test_large_preset_table_without_writing():
    plan = checkpoint_plan("bloom-7b1")
    table = {n: s for n, s, _ in plan}
    assert len(plan) == 3 + 30 * 12 + 2
    assert table["transformer.word_embeddings.weight"] == (250880, 4096)
    assert table["transformer.h.29.self_attention.query_key_value.weight"] == (3 * 4096, 4096)
    assert table["transformer.h.29.mlp.dense_4h_to_h.weight"] == (4096, 4 * 4096)
    assert plan[-1][0] == "transformer.ln_f.bias"
    assert {dt for _, _, dt in plan} == {torch.float16}
    # published parameter counts
    assert estimate_bytes("bloom-7b1") == 2 * 7_069_016_064
    assert estimate_bytes("llama-2-7b", torch.bfloat16) == 2 * 6_738_415_616
    assert estimate_bytes("bloom-176b", torch.float32) == 4 * 176_247_271_424
    llama70 = {n: s for n, s, _ in checkpoint_plan("llama-2-70b")}
    assert llama70["model.layers.79.self_attn.k_proj.weight"] == (8 * 128, 8192)  # GQA: 8 kv heads


@pytest.mark.parametrize("name", TINY)
def test_tiny_checkpoint_loads_in_transformers(tmp_path, name):
    path = make_checkpoint(name, tmp_path, progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.dtype == torch.float16
    cfg = model.config
    for key, value in PRESETS[name].items():
        if key in ("dtype", "torch_dtype", "architectures", "transformers_version"):
            continue
        if key in ("rope_theta",) and not hasattr(cfg, key):
            assert cfg.rope_parameters["rope_theta"] == value
            continue
        assert getattr(cfg, key) == value, key
    assert cfg.architectures == PRESETS[name]["architectures"]
    # the weights transformers loaded are the bytes we wrote
    with safe_open(path / "model.safetensors", framework="pt") as f:
        state = model.state_dict()
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(state[key], f.get_tensor(key)), key


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_estimate_bytes_equals_written_bytes(tmp_path, name, dtype):
    path = make_checkpoint(name, tmp_path, dtype, progress=False, tokenizer=False)
    assert _data_bytes(path) == estimate_bytes(name, dtype)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(["tiny-llama", "tiny-opt", "tiny-bloom", "tiny-qwen2"]),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([2, 4, 8]),
    layers=st.integers(1, 3),
    vocab=st.integers(4, 64),
    kv_div=st.sampled_from([1, 2, 4]),
)
def test_estimate_bytes_property(tmp_path_factory, family, heads, head_dim, layers, vocab, kv_div):
    config = dict(PRESETS[family])
    hidden = heads * head_dim
    config.update(hidden_size=hidden, vocab_size=vocab)
    if family == "tiny-bloom":
        config.update(n_head=heads, n_layer=layers)
    else:
        config.update(num_attention_heads=heads, num_hidden_layers=layers)
    if family == "tiny-opt":
        config.update(ffn_dim=3 * hidden, word_embed_proj_dim=hidden)
    if family in ("tiny-llama", "tiny-qwen2"):
        config.update(intermediate_size=3 * hidden, num_key_value_heads=max(1, heads // kv_div),
                      head_dim=head_dim)
        if heads % config["num_key_value_heads"]:
            config["num_key_value_heads"] = heads
    numel = sum(p.numel() for p in _meta_model(config).parameters())
    assert estimate_bytes(config, torch.float16) == 2 * numel
    path = make_checkpoint(config, tmp_path_factory.mktemp("prop"), progress=False, tokenizer=False)
    assert _data_bytes(path) == 2 * numel


def test_sharded_layout_and_determinism(tmp_path):
    one = make_checkpoint("tiny-llama", tmp_path / "one", progress=False)
    many = make_checkpoint("tiny-llama", tmp_path / "many", shard_size="40KB", progress=False)
    assert not (one / "model.safetensors.index.json").exists()
    files = sorted(p.name for p in many.glob("*.safetensors"))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == estimate_bytes("tiny-llama")
    assert list(index["weight_map"]) == [name for name, _, _ in checkpoint_plan("tiny-llama")]
    with safe_open(one / "model.safetensors", framework="pt") as ref:
        for name, file in index["weight_map"].items():
            with safe_open(many / file, framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                # each tensor's values depend on the seed and its name only, not on the sharding
                assert torch.equal(f.get_tensor(name), ref.get_tensor(name))
    for file in files:
        size = (many / file).stat().st_size - 8 - _read_header(many / file)[0]
        assert size <= 40_000 or len(_read_header(many / file)[1]) == 2  # one oversized tensor alone
    # transformers reads the sharded form too
    transformers.AutoModelForCausalLM.from_pretrained(many)


def test_header_format(tmp_path):
    path = make_checkpoint("tiny-opt", tmp_path, progress=False)
    n, header = _read_header(path / "model.safetensors")
    assert n % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    offsets = [tuple(v["data_offsets"]) for v in header.values()]
    assert offsets[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))  # contiguous, in header order
    assert offsets[-1][1] == (path / "model.safetensors").stat().st_size - 8 - n
    assert all(v["dtype"] == "F16" for v in header.values())


def test_seed_changes_values(tmp_path):
    a = make_checkpoint("tiny-opt", tmp_path / "a", seed=0, progress=False)
    b = make_checkpoint("tiny-opt", tmp_path / "b", seed=0, progress=False)
    c = make_checkpoint("tiny-opt", tmp_path / "c", seed=1, progress=False)
    bytes_a = (a / "model.safetensors").read_bytes()
    assert bytes_a == (b / "model.safetensors").read_bytes()
    assert bytes_a != (c / "model.safetensors").read_bytes()


def test_init_statistics(tmp_path):
    path = make_checkpoint("tiny-llama", tmp_path, torch.float32, progress=False)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        mat = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
    assert abs(norm.mean().item() - 1.0) < 0.05
    assert 0.02 < norm.std().item() < 0.2  # noisy, so a swapped norm weight shows in the logits
    assert abs(mat.std().item() - PRESETS["tiny-llama"]["initializer_range"]) < 0.01


def test_writing_streams_in_chunks(tmp_path, monkeypatch):
    # no tensor is ever generated whole: with a 1000-element chunk, every randn call stays below it
    sizes = []
    real_randn = torch.randn

    def spy(n, *args, **kwargs):
        sizes.append(n)
        return real_randn(n, *args, **kwargs)

    monkeypatch.setattr(synthetic, "_CHUNK", 1000)
    monkeypatch.setattr(synthetic.torch, "randn", spy)
    path = make_checkpoint("tiny-llama", tmp_path, progress=False)
    assert max(sizes) == 1000
    assert sum(sizes) == estimate_bytes("tiny-llama") // 2
    assert _data_bytes(path) == estimate_bytes("tiny-llama")


def test_fp16_forward_is_finite(tmp_path):
    from resident import ResidentModel

    path = make_checkpoint("tiny-bloom", tmp_path, torch.float16, progress=False)
    logits = ResidentModel(path, dtype=torch.float32)(torch.arange(4, 36)[None])
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not collapsed to a constant


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-bloom", "tiny-llama"])
def test_tokenizer_roundtrip(tmp_path, name):
    path = make_checkpoint(name, tmp_path, progress=False)
    config = PRESETS[name]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "Hello, wörld! 🚀 bako"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # syllables merge
    assert max(ids) < config["vocab_size"]
    assert tok.decode(ids) == text
    for role in ("eos", "bos", "pad"):
        assert getattr(tok, f"{role}_token_id") == config.get(f"{role}_token_id"), role
    assert tok.padding_side == "left"


@pytest.mark.parametrize("vocab", [320, 50272])
def test_tokenizer_covers_the_vocabulary_with_visible_text(tmp_path, vocab):
    """A random model picks any id of its vocabulary: every one must decode to something a person can see (the
    specials excepted), or generated text comes out empty. The 50272 of OPT's vocabulary: pseudo-words."""
    config = {**PRESETS["tiny-opt"], "vocab_size": vocab}
    path = make_checkpoint(config, tmp_path, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == vocab
    specials = set(tok.all_special_ids)
    words = [tok.decode([i]) for i in range(vocab) if i not in specials]
    assert len(words) == vocab - len(specials)
    assert all(w for w in words)
    if vocab > 1000:  # past the 256 bytes, every token is letters, most of them a word of its own
        tail = words[-1000:]
        assert all(w.strip().isalpha() and w.isascii() for w in tail)
        assert sum(w.startswith(" ") for w in tail) == 1000


def test_no_tokenizer_for_tiny_vocab(tmp_path):
    config = {**PRESETS["tiny-llama"], "vocab_size": 100}
    with pytest.warns(RuntimeWarning, match="too small"):
        path = make_checkpoint(config, tmp_path, progress=False)
    assert not (path / "tokenizer.json").exists()


def test_chat_template_renders(tmp_path):
    path = make_checkpoint("tiny-llama", tmp_path, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "user: hi\nassistant:"


def test_marked_random_and_current(tmp_path):
    path = make_checkpoint("tiny-opt", tmp_path / "m", progress=False)
    config = json.loads((path / "config.json").read_text())
    assert config["zstream_synthetic"]["preset"] == "tiny-opt"
    assert is_current(path, "tiny-opt")
    assert not is_current(path, "tiny-llama")
    assert not is_current(tmp_path / "missing", "tiny-opt")
    config["zstream_synthetic"]["version"] = 1  # written by an older zstream: rebuilt, not reused
    (path / "config.json").write_text(json.dumps(config))
    assert not is_current(path, "tiny-opt")


def test_resolve_config_sources(tmp_path):
    path = make_checkpoint("tiny-qwen2", tmp_path, progress=False)
    assert checkpoint_plan(path) == checkpoint_plan("tiny-qwen2")
    assert checkpoint_plan(path / "config.json") == checkpoint_plan(dict(PRESETS["tiny-qwen2"]))
    with pytest.raises(ModelError, match="tiny-llama"):  # the message lists the presets
        checkpoint_plan("no-such-model")
    with pytest.raises(ModelError, match="unsupported architecture"):
        make_checkpoint({"model_type": "gpt2"}, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing written for a bad config


def test_refuses_an_output_that_holds_something(tmp_path):
    path = make_checkpoint("tiny-opt", tmp_path / "m", progress=False)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="not empty"):
        make_checkpoint("tiny-opt", path, seed=1, progress=False)
    assert (path / "model.safetensors").read_bytes() == before  # not overwritten
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        make_checkpoint("tiny-opt", tmp_path / "file", progress=False)


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the weights, while the tokenizer is written

    monkeypatch.setattr(synthetic, "write_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint("tiny-opt", tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory
