"""Random-weight Hugging Face checkpoints of real model shapes, for tests, benchmarks and demos.

    make_checkpoint("llama-2-7b", "ckpt/")        # 13.5 GB of fp16 noise, laid out like save_pretrained
    make_checkpoint("tiny-llama", "tiny/")         # a few hundred KB, for tests

The directory gets ``config.json`` (loadable by transformers' AutoConfig / AutoModelForCausalLM),
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json``, and a byte-level ``tokenizer.json`` so text prompts work.

Writing streams tensor by tensor, in chunks: bloom-176b (350 GB) never has more than one chunk in
memory. The safetensors format is written directly: an 8-byte little-endian header length, a JSON
header (dtype, shape, data_offsets per tensor, "__metadata__": {"format": "pt"}) padded with spaces to
a multiple of 8, then the raw tensor bytes in header order.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .errors import ModelError
from .models import family_for

ConfigLike = Union[str, Path, Mapping[str, Any]]
PlanEntry = Tuple[str, Tuple[int, ...], torch.dtype]

_BLOOM = {
    "architectures": ["BloomForCausalLM"],
    "model_type": "bloom",
    "vocab_size": 250880,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "pretraining_tp": 1,
    "slow_but_exact": False,
    "unk_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "tie_word_embeddings": True,
    "use_cache": True,
}
_OPT = {
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "activation_function": "relu",
    "do_layer_norm_before": True,
    "enable_bias": True,
    "layer_norm_elementwise_affine": True,
    "_remove_final_layer_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "layerdrop": 0.0,
    "init_std": 0.02,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "tie_word_embeddings": True,
    "use_cache": True,
}
_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "use_cache": True,
}


def _opt(hidden: int, ffn: int, layers: int, heads: int, **extra: Any) -> Dict[str, Any]:
    return {**_OPT, "hidden_size": hidden, "ffn_dim": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "word_embed_proj_dim": hidden, **extra}


# real hyperparameters from the Hugging Face hub configs, plus tiny ones for tests. The tiny ones use a
# vocabulary of 320 (the byte tokenizer needs 260) and a larger init std so logits are well separated.
PRESETS: Dict[str, Dict[str, Any]] = {
    "bloom-560m": {**_BLOOM, "hidden_size": 1024, "n_layer": 24, "n_head": 16},
    "bloom-7b1": {**_BLOOM, "hidden_size": 4096, "n_layer": 30, "n_head": 32},
    "bloom-176b": {**_BLOOM, "hidden_size": 14336, "n_layer": 70, "n_head": 112, "pretraining_tp": 4},
    "opt-125m": _opt(768, 3072, 12, 12),
    "opt-350m": _opt(1024, 4096, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 8192, 24, 32),
    "opt-30b": _opt(7168, 28672, 48, 56),
    "opt-66b": _opt(9216, 36864, 64, 72),
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    # tiny, for tests: 6 heads exercise ALiBi's non-power-of-two slopes
    "tiny-bloom": {**_BLOOM, "vocab_size": 320, "hidden_size": 96, "n_layer": 2, "n_head": 6,
                   "initializer_range": 0.1},
    "tiny-opt": _opt(64, 128, 2, 4, vocab_size=320, max_position_embeddings=64, init_std=0.1),
    # opt-350m's layout: post-LayerNorm blocks, a narrower embedding projected in and out
    "tiny-opt-350m-style": _opt(64, 128, 2, 4, vocab_size=320, max_position_embeddings=64, init_std=0.1,
                                word_embed_proj_dim=32, do_layer_norm_before=False),
    # GQA: 4 query heads share 2 kv heads
    "tiny-llama": {**_LLAMA, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 128, "initializer_range": 0.1},
    # tied embeddings, plus Llama's optional attention and MLP biases
    "tiny-llama-tied": {**_LLAMA, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "max_position_embeddings": 128, "initializer_range": 0.1,
                        "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    # q/k/v biases, a large rope_theta
    "tiny-qwen2": {**_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
                   "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2,
                   "bos_token_id": 1, "eos_token_id": 2},
    # a sliding window shorter than the test sequences, and head_dim != hidden_size / heads
    "tiny-mistral": {**_LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                     "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
                     "max_position_embeddings": 128, "sliding_window": 8, "initializer_range": 0.1},
}
for _cfg in PRESETS.values():
    _cfg.pop("rope_scaling", None)  # null in the hub configs; leave it out so any transformers reads it


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def resolve_config(name_or_config: ConfigLike) -> Dict[str, Any]:
    """A config dict from a preset name, a config dict, a config.json path, or a checkpoint directory."""
    if isinstance(name_or_config, Mapping):
        return copy.deepcopy(dict(name_or_config))
    if isinstance(name_or_config, str) and name_or_config in PRESETS:
        return copy.deepcopy(PRESETS[name_or_config])
    path = Path(name_or_config)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raise ModelError(f"{name_or_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json path")


def checkpoint_plan(name_or_config: ConfigLike, dtype: torch.dtype = torch.float16) -> List[PlanEntry]:
    """(name, shape, dtype) of every tensor a checkpoint of this config holds, in save_pretrained order.
    A tied head is not stored (the embedding serves both), as save_pretrained does."""
    family = family_for(resolve_config(name_or_config))
    return [(name, shape, dtype) for name, shape in family.expected_shapes().items()]


def estimate_bytes(name_or_config: ConfigLike, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of tensor data in a checkpoint of this config (the files add a few KB of headers)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, shape, _ in checkpoint_plan(name_or_config, dtype):
        n = 1
        for d in shape:
            n *= d
        total += n * size
    return total


def parse_size(size: Union[int, str]) -> int:
    """"2GB" -> 2_000_000_000, "512MiB" -> 536_870_912 (the units transformers' max_shard_size takes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if m.group(2) not in units:
        raise ValueError(f"cannot parse size {size!r}")
    return int(float(m.group(1)) * units[m.group(2)])


def _nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def shard_plan(plan: List[PlanEntry], shard_size: int) -> List[List[PlanEntry]]:
    """Split the tensors into shards of at most shard_size bytes, in order (like save_pretrained); a
    tensor larger than shard_size gets a shard of its own."""
    shards: List[List[PlanEntry]] = [[]]
    used = 0
    for entry in plan:
        size = _nbytes(entry[1], entry[2])
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _init_kind(name: str) -> str:
    """How to initialize a tensor, from its name: "norm" (weights ~1), "zeroish" (biases, norm biases),
    or "normal" (matrices and embeddings)."""
    if name.endswith(".bias"):
        return "zeroish"
    if "norm" in name or name.endswith("ln_f.weight"):
        return "norm"
    return "normal"


_CHUNK = 1 << 24  # elements generated at a time: 64 MB of float32


def _write_tensor(f: BinaryIO, name: str, shape: Tuple[int, ...], dtype: torch.dtype, std: float, seed: int,
                  progress: Any) -> None:
    numel = 1
    for d in shape:
        numel *= d
    # one generator per tensor, seeded by name: the values do not depend on sharding or order
    # Random numbers on the GPU where there is one: the CPU generator (one core, ~150 MB/s) made writing a 14 GB
    # checkpoint take a minute per fresh GPU machine. Values are deterministic per seed and device type.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    kind = _init_kind(name)
    done = 0
    while done < numel:
        n = min(_CHUNK, numel - done)
        x = torch.randn(n, generator=gen, device=device)
        # norm gains near 1 keep activations at unit scale; biases are small
        scale = std if kind == "normal" else std / 2
        x = 1.0 + 0.1 * x if kind == "norm" else x * scale
        f.write(x.to(dtype).cpu().view(torch.uint8).numpy())  # the buffer itself, no bytes copy
        done += n
        if progress is not None:
            progress.update(n * torch.empty((), dtype=dtype).element_size())


def _write_shard(path: Path, entries: List[PlanEntry], std: float, seed: int, progress: Any) -> None:
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            _write_tensor(f, name, shape, dtype, std, seed, progress)


def make_checkpoint(name_or_config: ConfigLike, path: Union[str, Path], dtype: torch.dtype = torch.float16, *,
                    seed: int = 0, shard_size: Union[int, str] = "2GB", progress: bool = True,
                    tokenizer: bool = True) -> Path:
    """Write a random-weight checkpoint of ``name_or_config`` (a preset, a config dict or a config.json
    path) to directory ``path``; returns the path. Deterministic for a given seed."""
    if dtype not in _SAFETENSORS_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _SAFETENSORS_NAMES))}, not {dtype}")
    config = resolve_config(name_or_config)
    config["dtype"] = _DTYPE_NAMES[dtype]
    config.pop("torch_dtype", None)
    plan = checkpoint_plan(config, dtype)  # also validates the config (ModelError)
    std = float(config.get("initializer_range") or config.get("init_std") or 0.02)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = shard_plan(plan, parse_size(shard_size))
    total = sum(_nbytes(shape, dt) for _, shape, dt in plan)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress)
    try:
        if len(shards) == 1:
            _write_shard(out / "model.safetensors", shards[0], std, seed, bar)
        else:
            weight_map = {}
            for i, entries in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(out / file, entries, std, seed, bar)
                weight_map.update({name: file for name, _, _ in entries})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    finally:
        bar.close()
    if tokenizer:
        write_tokenizer(config, out)
    return out


# ---- a byte-level tokenizer -------------------------------------------------------------------


def write_tokenizer(config: Mapping[str, Any], path: Union[str, Path]) -> Optional[Path]:
    """Write a byte-level ``tokenizer.json`` (+ tokenizer_config.json) whose special tokens sit at the
    config's ids and whose 256 byte tokens follow, so any text encodes and decodes losslessly.
    Skipped (returns None) if the vocabulary is too small or the tokenizers package is missing."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        return None
    # special tokens at the config's ids; roles sharing an id share a token (OPT: bos = eos = "</s>")
    specials: Dict[str, int] = {}  # token -> id
    roles: Dict[str, str] = {}  # tokenizer_config key -> token
    for key, token, role in (("eos_token_id", "</s>", "eos_token"), ("bos_token_id", "<s>", "bos_token"),
                             ("pad_token_id", "<pad>", "pad_token"), ("unk_token_id", "<unk>", "unk_token")):
        value = config.get(key)
        if not isinstance(value, int):
            continue
        same = [t for t, i in specials.items() if i == value]
        if same:
            token = same[0]
        else:
            specials[token] = value
        roles[role] = token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab: Dict[str, int] = dict(specials)
    next_id = 0
    for ch in sorted(alphabet):
        while next_id in specials.values():
            next_id += 1
        vocab[ch] = next_id
        next_id += 1
    if max(vocab.values()) >= int(config.get("vocab_size", 0)):
        return None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    out = Path(path)
    tok.save(str(out / "tokenizer.json"))
    tok_config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left"}
    tok_config.update(roles)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out / "tokenizer.json"
