"""The model families against transformers: logits and greedy generation of tiny random checkpoints of
every supported architecture, written by transformers' save_pretrained and by zstream.synthetic."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch

from zstream.api.synthetic import PRESETS, checkpoint_plan, make_checkpoint
from zstream.errors import ModelError
from zstream.foundations.models import FAMILIES, family_for, ops, supported_architectures
from zstream.streaming.cache import KVCache

from resident import ResidentModel, checkpoint_files
from tiny_models import (
    TINY,
    WRITERS,
    edit_config,
    padded_batch,
    reference_logits,
    reference_model,
    save_with_transformers,
    write_checkpoint,
)

pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module", params=[(n, w) for n in TINY for w in WRITERS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def checkpoint(request, tmp_path_factory):
    name, writer = request.param
    path = write_checkpoint(name, writer, tmp_path_factory.mktemp(f"{name}-{writer}"))
    return name, path, reference_model(path), ResidentModel(path)


def test_logits_match_transformers_with_left_padding(checkpoint):
    _, _, ref, model = checkpoint
    ids, mask = padded_batch()
    want = reference_logits(ref, ids, mask)
    got = model(ids, mask)
    assert got.shape == want.shape
    real = mask.bool()  # padding positions are garbage in both: compare real tokens only
    assert (got - want).abs()[real].max().item() <= TOL
    # and a batch without padding (the no-mask fast path)
    full = torch.ones_like(ids)
    assert (model(ids, full) - reference_logits(ref, ids, full)).abs().max().item() <= TOL


def stored_shapes(path: Path) -> dict:
    """{tensor name: shape} of a checkpoint on disk, read from its safetensors headers (by safetensors)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(set(checkpoint_files(path).values())):
        with safe_open(file, framework="pt") as f:
            out.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def transformers_shapes(tmp_path_factory):
    """{tensor name: shape} of what transformers' own save_pretrained stores for a preset's config: worked out by
    transformers (its modules, its tied-weight rule), not by zstream. Written once per preset."""
    made: dict = {}

    def get(name: str) -> dict:
        if name not in made:
            made[name] = stored_shapes(save_with_transformers(PRESETS[name], tmp_path_factory.mktemp(f"hf-{name}")))
        return made[name]

    return get


def test_checkpoint_tables_are_the_ones_transformers_saves(checkpoint, transformers_shapes):
    # The table the family expects, the one the synthetic writer plans and what either writer stored on disk are
    # each what transformers' save_pretrained stores for the same config: names and shapes, nothing left over,
    # nothing missing (a tied head is not stored).
    name, path, _, model = checkpoint
    want = transformers_shapes(name)
    assert stored_shapes(path) == want
    assert {n: tuple(s) for n, s in model.family.expected_shapes().items()} == want
    plan = checkpoint_plan(name)
    assert len(plan) == len(want) and {n: tuple(s) for n, s, _ in plan} == want
    assert {dt for _, _, dt in plan} == {torch.float16}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_expected_shapes_worked_out_by_hand(name):
    # hidden 64, vocab 320, 2 blocks, intermediate 128, untied head; tiny-llama: 4 heads of 64 / 4 = 16 and 2 kv
    # heads, so k/v are 2 * 16 = 32 wide; tiny-mistral: an explicit head_dim 24, so q is 4 * 24 = 96 wide, k/v
    # 2 * 24 = 48, and o maps 96 back to 64
    q, kv = (64, 32) if name == "tiny-llama" else (96, 48)
    block = {"self_attn.q_proj.weight": (q, 64), "self_attn.k_proj.weight": (kv, 64),
             "self_attn.v_proj.weight": (kv, 64), "self_attn.o_proj.weight": (64, q),
             "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64), "mlp.down_proj.weight": (64, 128),
             "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,)}
    want = {"model.embed_tokens.weight": (320, 64), "model.norm.weight": (64,), "lm_head.weight": (320, 64)}
    want.update({f"model.layers.{i}.{local}": shape for i in range(2) for local, shape in block.items()})
    assert {n: tuple(s) for n, s in family_for(PRESETS[name]).expected_shapes().items()} == want
    assert {n: tuple(s) for n, s, _ in checkpoint_plan(name)} == want


def test_gqa_without_enable_gqa_gives_the_same_logits(checkpoint, monkeypatch):
    # torch < 2.5 has no SDPA enable_gqa: the fallback repeats the kv heads instead
    _, _, _, model = checkpoint
    ids, mask = padded_batch(lengths=(9, 5))
    want = model(ids, mask)
    monkeypatch.setattr(ops, "_SDPA_HAS_GQA", False)
    assert (model(ids, mask) - want).abs()[mask.bool()].max().item() <= 1e-5


def test_greedy_generate_matches_transformers(checkpoint):
    _, _, ref, model = checkpoint
    ids, mask = padded_batch(lengths=(12, 7))
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=24, attention_mask=mask)
    assert got.shape == (2, 12 + 24)
    assert torch.equal(got, want)


def test_incremental_decode_equals_full_forward(checkpoint):
    # prefill in two chunks (the second one starts mid-cache, with padding) then single tokens
    _, _, _, model = checkpoint
    ids, mask = padded_batch(lengths=(18, 11))
    full = model(ids, mask)
    cache = model.new_cache(2, ids.shape[1])
    pieces = [model.forward(ids[:, :10], mask[:, :10], cache),
              model.forward(ids[:, 10:15], mask[:, 10:15], cache)]
    pieces += [model.forward(ids[:, t : t + 1], mask[:, t : t + 1], cache) for t in range(15, ids.shape[1])]
    stepped = torch.cat(pieces, dim=1)
    assert cache.length == ids.shape[1]
    assert (stepped - full).abs()[mask.bool()].max().item() <= TOL


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(tmp_path, rope):
    # max_position_embeddings 16 and 28-token sequences: dynamic NTK scaling actually kicks in
    config = {**PRESETS["tiny-llama"], "max_position_embeddings": 16, "rope_scaling": dict(rope)}
    config["rope_theta"] = 500.0  # low base: long wavelengths fall inside llama3's and yarn's ramps
    path = save_with_transformers(config, tmp_path)
    ref, model = reference_model(path), ResidentModel(path)
    ids, mask = padded_batch(lengths=(12, 8) if rope["rope_type"] != "dynamic" else (24, 19))
    assert (model(ids, mask) - reference_logits(ref, ids, mask)).abs()[mask.bool()].max().item() <= TOL
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4 if rope["rope_type"] != "dynamic" else 8,
                        min_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=want.shape[1] - ids.shape[1], attention_mask=mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("tiny-bloom", {"apply_residual_connection_post_layernorm": True}),
        ("tiny-bloom", {"n_head": 8, "hidden_size": 64}),  # power-of-two heads
        ("tiny-opt", {"enable_bias": False}),
        ("tiny-opt", {"layer_norm_elementwise_affine": False}),
        ("tiny-opt", {"_remove_final_layer_norm": True}),
        ("tiny-opt", {"tie_word_embeddings": False}),
        ("tiny-bloom", {"tie_word_embeddings": False}),
        ("tiny-llama", {"num_key_value_heads": 1}),  # multi-query attention
        ("tiny-llama", {"hidden_act": "gelu_pytorch_tanh"}),
        ("tiny-qwen2", {"tie_word_embeddings": True}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_config_variants_match_transformers(tmp_path, name, changes):
    path = save_with_transformers({**PRESETS[name], **changes}, tmp_path)
    ref, model = reference_model(path), ResidentModel(path)
    ids, mask = padded_batch(lengths=(12, 7))
    assert (model(ids, mask) - reference_logits(ref, ids, mask)).abs()[mask.bool()].max().item() <= TOL


def test_padding_queries_never_see_an_empty_row():
    # a left-padding query has no real key before it; it attends to itself so no backend divides by 0
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    for name in ("tiny-bloom", "tiny-opt", "tiny-mistral"):
        ctx = family_for(PRESETS[name]).context(mask, 5, torch.float32)
        assert ctx.mask is not None
        assert torch.isfinite(ctx.mask).any(dim=-1).all(), name


def test_rope_variants_differ_from_default():
    # guard against a scaling type that silently falls back to plain RoPE
    from zstream.foundations.models.llama import rope_inv_freq

    base = {"rope_theta": 500.0, "rope_type": "default"}
    plain, _ = rope_inv_freq(base, 16, 16)
    for rope in ({"rope_type": "linear", "factor": 4.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}):
        scaled, _ = rope_inv_freq({**base, **rope}, 16, 16)
        assert not torch.allclose(scaled, plain), rope
    dyn = {**base, "rope_type": "dynamic", "factor": 2.0}
    assert torch.equal(rope_inv_freq(dyn, 16, 16, seq_len=16)[0], plain)
    assert not torch.allclose(rope_inv_freq(dyn, 16, 16, seq_len=24)[0], plain)


@pytest.mark.parametrize(("name", "prefix"), [("tiny-bloom", "transformer."), ("tiny-opt", "model."),
                                              ("tiny-llama", "model.")])
def test_unprefixed_hub_names(tmp_path, name, prefix):
    # bigscience/bloom and facebook/opt-* on the hub were saved from the bare model: "h.0...", "decoder..."
    full = make_checkpoint(name, tmp_path / "full", torch.float32, progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((full / "config.json").read_text())
    tensors = safetensors_torch.load_file(full / "model.safetensors")
    renamed = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    safetensors_torch.save_file(renamed, bare / "model.safetensors", metadata={"format": "pt"})

    fam = family_for(json.loads((bare / "config.json").read_text()), renamed.keys())
    assert all(n in renamed for n in fam.block_tensors(0).values())
    ids, mask = padded_batch(lengths=(10, 6))
    assert torch.equal(ResidentModel(bare)(ids, mask), ResidentModel(full)(ids, mask))


def test_family_interface_names():
    bloom = family_for(PRESETS["tiny-bloom"])
    assert bloom.block_tensors(1)["self_attention.query_key_value.weight"] == (
        "transformer.h.1.self_attention.query_key_value.weight")
    outer = bloom.outer_tensors()
    assert outer["lm_head"] == outer["word_embeddings"] == "transformer.word_embeddings.weight"
    llama = family_for(PRESETS["tiny-llama"])
    assert llama.outer_tensors()["lm_head"] == "lm_head.weight"
    assert (llama.num_blocks, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (2, 4, 2, 16)
    assert family_for(PRESETS["tiny-mistral"]).head_dim == 24
    assert family_for(PRESETS["tiny-mistral"]).sliding_window == 8
    assert family_for(PRESETS["tiny-qwen2"]).sliding_window is None
    opt = family_for(PRESETS["tiny-opt-350m-style"])
    assert opt.outer_tensors()["project_in.weight"] == "model.decoder.project_in.weight"
    assert "final_layer_norm.weight" not in opt.outer_tensors()  # post-LN OPT has no final LayerNorm
    with pytest.raises(IndexError):
        llama.block_tensors(2)


def test_context_is_shared_and_holds_alibi_and_rope():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    bloom = family_for(PRESETS["tiny-bloom"])
    ctx = bloom.context(mask, 5, torch.float32)
    assert ctx.mask is not None
    assert ctx.mask.shape == (2, 6, 5, 5)  # ALiBi: one bias per head
    assert ctx.positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    llama = family_for(PRESETS["tiny-llama"])
    ctx = llama.context(torch.ones(2, 7, dtype=torch.long), 1, torch.float32)  # a decode step
    assert ctx.mask is None
    assert not ctx.is_causal
    assert ctx.start == 6
    assert ctx.rope is not None
    assert ctx.rope[0].shape == (2, 1, 1, 16)


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-llama", "tiny-opt"])
@pytest.mark.parametrize(("keys", "new"), [(13, 1), (13, 13), (16, 1)])
def test_a_masks_rows_start_eight_elements_apart_whatever_the_keys(preset, keys, new):
    """SDPA's memory-efficient kernel pads a copy of any mask whose rows do not start 16 bytes apart, at every call:
    the context's mask is a view of rows rounded up to MASK_ALIGN, its values those of the plain computation."""
    from zstream.foundations.models.common import MASK_ALIGN

    family = family_for(PRESETS[preset])
    mask = torch.ones(2, keys, dtype=torch.long)
    mask[0, :3] = 0  # left padding: every family builds a mask
    ctx = family.context(mask, new, torch.float16)
    assert ctx.mask is not None and ctx.mask.shape[-2:] == (new, keys)
    assert ctx.mask.stride(-1) == 1 and all(st % MASK_ALIGN == 0 for st in ctx.mask.stride()[:-1])
    plain = ctx.mask.contiguous()
    q = torch.randn(2, family.num_heads, new, 8, dtype=torch.float32)
    k, v = torch.randn(2, 2, family.num_heads, keys, 8).unbind(0)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask.float())
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plain.float())
    assert torch.equal(got, want)


def test_alibi_bias_is_relative_so_low_precision_keeps_it_fine():
    # at position 1500, slope * position is ~750 for the first head, which bf16 rounds in steps of 4;
    # the distance form keeps the nearest keys' biases exact
    from zstream.foundations.models.bloom import alibi_slopes

    bloom = family_for(PRESETS["tiny-bloom"])
    slopes = alibi_slopes(6)
    ctx = bloom.context(torch.ones(1, 1501, dtype=torch.long), 1, torch.bfloat16)
    assert ctx.mask is not None
    assert ctx.mask.shape == (1, 6, 1, 1501)
    assert torch.equal(ctx.mask[0, :, 0, -1], torch.zeros(6, dtype=torch.bfloat16))  # the token itself
    want = -(slopes * 3).to(torch.bfloat16)  # three tokens back
    assert torch.equal(ctx.mask[0, :, 0, -4], want)
    # and a softmax-equivalent of transformers' bias (per-query constant shift) in float32
    ctx32 = bloom.context(torch.ones(1, 40, dtype=torch.long), 40, torch.float32)
    assert ctx32.mask is not None
    hf = slopes[:, None, None] * torch.arange(40.0)  # (nh, 1, S): slope * key position
    shift = ctx32.mask[0] - hf  # (nh, T, S): constant along the allowed keys of each query row
    causal = torch.ones(40, 40).tril().bool()
    high = torch.where(causal, shift, -torch.inf).amax(-1)  # (nh, T)
    low = torch.where(causal, shift, torch.inf).amin(-1)
    assert (high - low).abs().max() < 1e-4


# ---- bad input --------------------------------------------------------------------------------


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ModelError) as err:
        family_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64})
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for arch in supported_architectures():
        assert arch in message
    assert {"BloomForCausalLM", "OPTForCausalLM", "LlamaForCausalLM"} <= set(supported_architectures())


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("key", ["hidden_size", "vocab_size"])
def test_missing_config_key(name, key):
    config = dict(PRESETS[name])
    del config[key]
    with pytest.raises(ModelError, match=key):
        family_for(config)


def test_missing_layer_count_key_names_it():
    config = dict(PRESETS["tiny-bloom"])
    del config["n_layer"]
    with pytest.raises(ModelError, match="n_layer"):
        family_for(config)


def test_every_family_is_registered():
    assert {f.name for f in FAMILIES} == {"bloom", "opt", "llama"}
    # which family serves each tiny preset, and the model type it reports, by hand
    family_of = {"tiny-bloom": ("bloom", "bloom"), "tiny-opt": ("opt", "opt"), "tiny-opt-350m-style": ("opt", "opt"),
                 "tiny-llama": ("llama", "llama"), "tiny-llama-tied": ("llama", "llama"),
                 "tiny-qwen2": ("llama", "qwen2"), "tiny-mistral": ("llama", "mistral")}
    assert set(family_of) == set(TINY)
    for name, (family, model_type) in family_of.items():
        fam = family_for(PRESETS[name])
        assert fam.name == family and model_type in fam.model_types, name
        assert getattr(fam, "model_type", model_type) == model_type, name  # the llama family keeps which one


def _drop_tensor(path: Path, victim: str) -> None:
    file = checkpoint_files(path)[victim]
    tensors = safetensors_torch.load_file(file)
    del tensors[victim]
    safetensors_torch.save_file(tensors, file, metadata={"format": "pt"})


def test_block_missing_a_tensor(tmp_path):
    path = make_checkpoint("tiny-llama", tmp_path, torch.float32, progress=False)
    _drop_tensor(path, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*block 1"):
        ResidentModel(path)


def test_shape_disagrees_with_config(tmp_path):
    path = make_checkpoint("tiny-opt", tmp_path, torch.float32, progress=False)
    edit_config(path, ffn_dim=96)  # the checkpoint's fc1/fc2 are 128 wide
    with pytest.raises(ModelError, match=r"fc1\.weight.*\[128, 64\].*\[96, 64\]"):
        ResidentModel(path)


def test_validate_accepts_store_style_infos_and_rejects_bad_ones(transformers_shapes):
    fam = family_for(PRESETS["tiny-qwen2"])
    # what transformers stores for this config, not the family's own table
    good = {name: (shape, "F16") for name, shape in transformers_shapes("tiny-qwen2").items()}
    assert "model.layers.0.self_attn.k_proj.bias" in good  # qwen2: q/k/v carry biases
    assert good["model.layers.1.mlp.down_proj.weight"][0] == (64, 128)
    fam.validate(good)
    bias = "model.layers.0.self_attn.k_proj.bias"
    with pytest.raises(ModelError, match=r"k_proj\.bias"):
        fam.validate({k: v for k, v in good.items() if k != bias})
    with pytest.raises(ModelError, match="non-floating"):
        fam.validate({**good, bias: (good[bias][0], "I32")})
    # the weight store's TensorInfo: a NamedTuple with .shape and a safetensors dtype string
    info = collections.namedtuple("TensorInfo", "name dtype shape nbytes file offset")
    store_infos = {n: info(n, "BF16", s, 0, "f", 0) for n, (s, _) in good.items()}
    fam.validate(store_infos)
    wrong = "model.layers.1.mlp.down_proj.weight"
    store_infos[wrong] = info(wrong, "BF16", (64, 64), 0, "f", 0)
    with pytest.raises(ModelError, match=r"down_proj\.weight.*\[64, 64\].*\[64, 128\]"):
        fam.validate(store_infos)


def test_prompt_longer_than_max_positions(tmp_path):
    path = make_checkpoint("tiny-opt", tmp_path, torch.float32, progress=False)  # 64 positions
    model = ResidentModel(path)
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly fits
    with pytest.raises(ModelError, match="64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ModelError, match="64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    # the family itself refuses too (what the streaming engine calls)
    with pytest.raises(ModelError, match="longer than"):
        model.family.context(torch.ones(1, 65, dtype=torch.long), 65, torch.float32)
    with pytest.raises(ModelError, match="longer than"):
        family_for(PRESETS["tiny-llama"]).context(torch.ones(1, 129, dtype=torch.long), 1, torch.float32)


def test_kv_cache_too_small(tmp_path):
    path = make_checkpoint("tiny-llama", tmp_path, torch.float32, progress=False)
    model = ResidentModel(path)
    cache = KVCache.for_family(model.family, batch=1, max_len=4, dtype=torch.float32)
    with pytest.raises(ModelError, match="KV cache"):
        model.forward(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), cache)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt-350m-style", "tiny-mistral"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_stays_close_to_float32(tmp_path, name, dtype):
    # masks, ALiBi and RoPE tables are built in the compute dtype: half precision must still track float32
    path = make_checkpoint(name, tmp_path, torch.float32, progress=False)
    ids, mask = padded_batch(lengths=(16, 9))
    want = ResidentModel(path)(ids, mask)
    got = ResidentModel(path, dtype=dtype)(ids, mask)
    assert got.dtype == dtype
    real = mask.bool()
    err = (got.float() - want).abs()[real].max().item()
    assert err < 0.05 * want[real].abs().max().item()
    agree = (got.float()[real].argmax(-1) == want[real].argmax(-1)).float().mean().item()
    assert agree >= 0.9  # near-ties may flip in bf16's 8-bit mantissa, not more


def test_hub_config_spellings():
    # bigscience/bloom spells hidden size / heads "n_embed" / "num_attention_heads"
    bloom = {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "n_embed": 14336,
             "num_attention_heads": 112, "n_layer": 70, "vocab_size": 250880, "torch_dtype": "bfloat16"}
    fam = family_for(bloom)
    assert (fam.hidden_size, fam.num_heads, fam.head_dim, fam.num_blocks) == (14336, 112, 128, 70)
    assert fam.dtype == torch.bfloat16
    # Llama 3.1: old-style rope_scaling with rope_type llama3, a list of EOS ids, an explicit head_dim
    llama31 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 131072, "rope_theta": 500000.0, "eos_token_id": [128001, 128009],
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    fam = family_for(llama31)
    assert fam.rope["rope_type"] == "llama3"
    assert fam.rope["rope_theta"] == 500000.0
    assert (fam.num_kv_heads, fam.head_dim, fam.max_positions) == (8, 128, 131072)
    # an architecture name alone is enough
    no_type = {k: v for k, v in llama31.items() if k != "model_type"}
    mistral = family_for({**no_type, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert mistral.model_type == "mistral"
    assert mistral.sliding_window == 4096
    assert family_for({**no_type, "architectures": ["Qwen2ForCausalLM"]}).model_type == "qwen2"
    with pytest.raises(ModelError, match="rope type 'longrope'"):
        family_for({**llama31, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


ROPES = [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0, "_seq_len": 8},
    {"rope_type": "dynamic", "factor": 2.0, "_seq_len": 40},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
    {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "beta_fast": 16.0, "beta_slow": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "attention_factor": 0.8},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 8, "truncate": False},
    # frequencies inside llama3's smoothing band (wavelengths 16 to 64), not just one at its edge
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    # a long original context puts yarn's ramp inside the dimensions, where the betas show
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.7, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.7},
    {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 8},
    {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8},  # no attention scaling below 1
    # equal betas without truncation: a zero-width ramp, which both widen by 0.001
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 4.0,
     "beta_slow": 4.0, "truncate": False},
]


@pytest.mark.parametrize("theta", [500.0, 10000.0])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("rope", ROPES, ids=lambda r: "-".join(f"{k}{v}" for k, v in r.items() if k != "rope_type"))
def test_rope_frequencies_equal_transformers(rope, head_dim, theta):
    """The inverse frequencies and attention factor of every RoPE variant, against transformers' own
    ROPE_INIT_FUNCTIONS on the same config (not only through greedy tokens, which small errors do not move)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from zstream.foundations.models.llama import rope_inv_freq, rope_parameters

    rope = dict(rope)
    seq_len = rope.pop("_seq_len", None)
    config = {**PRESETS["tiny-llama"], "num_attention_heads": 4, "hidden_size": 4 * head_dim,
              "max_position_embeddings": 16, "rope_theta": theta, "rope_scaling": rope}
    got, got_factor = rope_inv_freq(rope_parameters(config, "llama"), head_dim, 16, seq_len)
    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=16,
                     rope_parameters={**rope, "rope_theta": theta})
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu", seq_len=seq_len)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-9)


def test_yarn_without_a_factor_takes_the_ratio_of_the_context_lengths():
    """No ``factor``: max_position_embeddings / original_max_position_embeddings (16 / 8), as transformers' yarn
    computes it with factor 2."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from zstream.foundations.models.llama import rope_inv_freq

    params = {"rope_type": "yarn", "original_max_position_embeddings": 8, "rope_theta": 500.0}
    got, got_factor = rope_inv_freq(params, 16, 16)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                     rope_parameters={**params, "factor": 2.0})
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-9)


def test_opt_settings_a_config_leaves_out_take_transformers_defaults():
    """Old OPT configs on the hub omit keys that transformers fills with its OPTConfig defaults; so does zstream."""
    from transformers import OPTConfig

    defaults = OPTConfig()
    config = {k: v for k, v in PRESETS["tiny-opt"].items()
              if k not in ("layer_norm_elementwise_affine", "activation_function", "_remove_final_layer_norm")}
    fam = family_for(config)
    assert fam.ln_affine is defaults.layer_norm_elementwise_affine is True
    assert fam.final_ln is (fam.pre_ln and not defaults._remove_final_layer_norm)
    assert fam.act(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]  # relu, OPTConfig's activation_function
    assert defaults.activation_function == "relu"
    with pytest.raises(ModelError, match="hidden_size must divide into the heads"):
        family_for({**PRESETS["tiny-opt"], "num_attention_heads": 5})
