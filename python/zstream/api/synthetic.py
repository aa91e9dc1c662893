"""Random-weight Hugging Face checkpoints of real model shapes, for tests, benchmarks and demos.

    make_checkpoint("llama-2-7b", "ckpt/")        # 13.5 GB of fp16 noise, laid out like save_pretrained
    make_checkpoint("tiny-llama", "tiny/")         # a few hundred KB, for tests

The directory gets ``config.json`` (loadable by transformers' AutoConfig / AutoModelForCausalLM, and marked as
random weights: ``"zstream_synthetic"``), ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json``, and a byte-level BPE ``tokenizer.json`` whose ids cover the whole vocabulary, so
text prompts work and generated ids decode to visible (if meaningless) text.

Writing streams tensor by tensor, in chunks (``foundations.writer``): bloom-176b (350 GB) never has more than one
chunk in memory. The checkpoint appears under its name only once complete.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import ModelError, warn
from ..foundations.checkpoint import SYNTHETIC_KEY
from ..foundations.models import family_for
from ..foundations.store import FlatRead, TensorInfo, WeightStore, host_buffer
from ..foundations.units import dtype_name, parse_bytes, parse_dtype, safetensors_dtype
from ..foundations.writer import Entry, header, new_checkpoint_dir, shard_names, split_shards, write_index

SYNTHETIC_VERSION = 3  # what is written: bump it when a cached checkpoint from before must be rebuilt
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
    return sum(Entry(*e).nbytes for e in checkpoint_plan(name_or_config, dtype))


def _init_kind(name: str) -> str:
    """How to initialize a tensor, from its name: "norm" (weights ~1), "zeroish" (biases, norm biases),
    or "normal" (matrices and embeddings)."""
    if name.endswith(".bias"):
        return "zeroish"
    if "norm" in name or name.endswith("ln_f.weight"):
        return "norm"
    return "normal"


_CHUNK = 1 << 24  # elements generated at a time: 64 MB of float32


def _values(name: str, numel: int, dtype: torch.dtype, std: float, seed: int, *,
            host: bool = True) -> Iterator[torch.Tensor]:
    """A tensor's values, in chunks of at most ``_CHUNK`` elements: what the checkpoint holds. On the host, or where
    they were made when not ``host`` (a caller with a pinned arena copies them down at the link's speed; through
    pageable memory 60 GB of OPT-30B took a minute a load)."""
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
        x = x.to(dtype)
        yield x.cpu() if host else x
        done += n


def _write_tensor(f: BinaryIO, name: str, shape: Tuple[int, ...], dtype: torch.dtype, std: float, seed: int,
                  progress: Any) -> None:
    for x in _values(name, math.prod(shape), dtype, std, seed):
        f.write(x.view(torch.uint8).numpy().data)  # the buffer itself, no bytes copy
        if progress is not None:
            progress.update(x.numel() * x.element_size())


def make_checkpoint(name_or_config: ConfigLike, path: Union[str, Path], dtype: torch.dtype = torch.float16, *,
                    seed: int = 0, shard_size: Union[int, str] = "2GB", progress: bool = True,
                    tokenizer: bool = True, in_memory: bool = False, blocks: Optional[int] = None) -> Path:
    """Write a random-weight checkpoint of ``name_or_config`` (a preset, a config dict or a config.json path) to
    the new directory ``path``; returns the path. Deterministic for a given seed. Refuses a ``path`` that holds
    anything (``OutputExistsError``); an interrupted write leaves nothing behind. ``in_memory``: write only the
    config and tokenizer; ``load`` then makes the same weights in host memory as it reads them
    (``SyntheticStore``), for models larger than the disk (bloom-176b's 352 GB). ``blocks``: keep only the first
    this many blocks (real width, reduced depth: a slice of a model too large to run whole)."""
    dtype = parse_dtype(dtype, what="dtype") or torch.float16
    config = resolve_config(name_or_config)
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ModelError(f"blocks must be a number of blocks >= 1, not {blocks!r}")
        for key in ("n_layer", "num_hidden_layers"):  # BLOOM's name, and everyone else's
            if key in config:
                config[key] = min(blocks, int(config[key]))
    config["dtype"] = dtype_name(dtype)
    config.pop("torch_dtype", None)
    plan = checkpoint_plan(config, dtype)  # also validates the config (ModelError)
    std = float(config.get("initializer_range") or config.get("init_std") or 0.02)
    from transformers import __version__ as transformers_version

    config.setdefault("transformers_version", transformers_version)  # as save_pretrained writes it
    config[SYNTHETIC_KEY] = {"version": SYNTHETIC_VERSION, "seed": seed,
                             "preset": name_or_config if isinstance(name_or_config, str) else None}
    if in_memory:
        config[SYNTHETIC_KEY]["in_memory"] = True
    limit = parse_bytes(shard_size, what="shard_size")
    assert limit is not None
    shards = split_shards([[Entry(*e)] for e in plan], limit)
    total = sum(e.nbytes for shard in shards for e in shard)
    out = Path(path).expanduser()
    from tqdm.auto import tqdm

    with new_checkpoint_dir(out) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}",
                                              disable=not progress or in_memory) as bar:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file, shard in zip(shard_names(len(shards)), shards if not in_memory else []):
            with open(tmp / file, "wb") as f:
                f.write(header(shard, {"format": "pt"}))
                for e in shard:
                    _write_tensor(f, e.name, e.shape, e.dtype, std, seed, bar)
        if not in_memory:
            write_index(tmp, shards)
        if tokenizer:
            write_tokenizer(config, tmp)
    return out


def is_in_memory(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's weights are made in memory at load (``make_checkpoint(..., in_memory=True)``)."""
    marker = config.get(SYNTHETIC_KEY)
    return isinstance(marker, dict) and bool(marker.get("in_memory"))


class SyntheticStore:
    """The weights of an in-memory synthetic checkpoint, standing where a ``WeightStore`` stands for offload "none"
    and "cpu": each read makes the tensors ``make_checkpoint`` would have written (the same values for the same
    seed) in a host arena, pinned when ``pin``. A load then streams them from host memory exactly as it streams a
    checkpoint read from disk; only reading from disk, which the load does once, is left out."""

    def __init__(self, config: Mapping[str, Any], path: Union[str, Path], *, pin: bool) -> None:
        marker = config[SYNTHETIC_KEY]
        self.seed = int(marker.get("seed", 0))
        self.std = float(config.get("initializer_range") or config.get("init_std") or 0.02)
        dtype = parse_dtype(config.get("dtype") or config.get("torch_dtype")) or torch.float16
        self._infos = {name: TensorInfo(name, safetensors_dtype(dt), shape, math.prod(shape) * dt.itemsize,
                                        str(path), 0) for name, shape, dt in checkpoint_plan(dict(config), dtype)}
        self.pinned = pin

    def names(self) -> List[str]:
        return list(self._infos)

    def metadata(self) -> Dict[str, str]:
        return {}

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def files(self) -> List[str]:
        return []

    def read_flat(self, names: Iterable[str], *, reader: Optional[str] = None) -> FlatRead:
        """The tensors ``names`` made in one host arena, each 256-byte aligned, chunk by chunk in place."""
        layout: Dict[str, Tuple[int, torch.dtype, Tuple[int, ...]]] = {}
        size = 0
        for name in dict.fromkeys(names):
            info = self._infos[name]
            size = -(-size // 256) * 256
            layout[name] = (size, info.torch_dtype, info.shape)
            size += info.nbytes
        buffer = host_buffer(size, pin=self.pinned)
        for name, (offset, dtype, shape) in layout.items():
            at = offset
            for x in _values(name, math.prod(shape), dtype, self.std, self.seed, host=False):
                buffer[at:at + x.numel() * x.element_size()].copy_(x.view(torch.uint8))
                at += x.numel() * x.element_size()
        return FlatRead(buffer, layout)

    def read(self, names: Iterable[str], *, reader: Optional[str] = None) -> Dict[str, torch.Tensor]:
        return self.read_flat(names).view()

    def close(self) -> None:
        pass


def open_store(path: Union[str, Path], config: Mapping[str, Any], *, pin: bool, **reader: Any) -> WeightStore:
    """A checkpoint's store: its weights made in memory (an in-memory synthetic checkpoint), else its files opened
    with the ``WeightStore.open`` options ``reader``."""
    if is_in_memory(config):
        return SyntheticStore(config, path, pin=pin)  # type: ignore[return-value]
    return WeightStore.open(path, pin=pin, **reader)


def is_current(path: Union[str, Path], preset: str) -> bool:
    """Whether ``path`` holds a complete synthetic checkpoint of ``preset`` written by this version of the format
    (a cache of one can be reused; anything else is rebuilt)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    marker = config.get(SYNTHETIC_KEY) if isinstance(config, dict) else None
    return isinstance(marker, dict) and marker.get("version") == SYNTHETIC_VERSION and marker.get("preset") == preset


# ---- a tokenizer that covers the vocabulary --------------------------------------------------------------------

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SPACE = "\u0120"  # how byte-level BPE spells a space ("Ġ")
BOS_FIRST = ("llama", "mistral", "opt")  # families whose tokenizers put BOS before every text (BLOOM, Qwen2: none)
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def _pseudo_words() -> Iterator[Tuple[str, str]]:
    """Merges (left, right) of a byte-level BPE, each making a new token: syllables, then " " + syllable, then words
    of two, three, four syllables, so that every token decodes to pronounceable text."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    yield from ((s[0], s[1]) for s in syllables)
    words = [_SPACE + s for s in syllables]
    yield from ((_SPACE, s) for s in syllables)
    for _ in range(3):
        longer = []
        for w in words:
            for s in syllables:
                longer.append(w + s)
                yield w, s
        words = longer


def write_tokenizer(config: Mapping[str, Any], path: Union[str, Path]) -> Optional[Path]:
    """Write a byte-level BPE ``tokenizer.json`` (+ tokenizer_config.json with a chat template) whose ids cover the
    config's whole vocabulary: its special tokens at the config's ids, the 256 byte tokens, then pseudo-words made of
    syllables, so any text encodes and any id a random model generates decodes to visible text. A vocabulary too small
    for the byte tokens gets no tokenizer (a warning says so; the model then takes token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_size = int(config.get("vocab_size", 0))
    specials: Dict[str, int] = {}  # token -> id; roles sharing an id share a token (OPT: bos = eos = "</s>")
    roles: Dict[str, str] = {}     # tokenizer_config key -> token
    for key, token, role in (("eos_token_id", "</s>", "eos_token"), ("bos_token_id", "<s>", "bos_token"),
                             ("pad_token_id", "<pad>", "pad_token"), ("unk_token_id", "<unk>", "unk_token")):
        value = config.get(key)
        if not isinstance(value, int):
            continue
        same = [t for t, i in specials.items() if i == value]
        token = same[0] if same else token
        specials.setdefault(token, value)
        roles[role] = token
    free = (i for i in range(vocab_size) if i not in specials.values())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(specials) + len(alphabet) or max(specials.values(), default=0) >= vocab_size:
        warn(f"vocabulary of {vocab_size} is too small for a byte-level tokenizer: the checkpoint gets none "
             "and takes token ids only", RuntimeWarning)
        return None
    vocab: Dict[str, int] = dict(specials)
    vocab.update({ch: next(free) for ch in alphabet})
    merges: List[Tuple[str, str]] = []
    for left, right in _pseudo_words():
        if len(vocab) >= vocab_size:
            break
        merges.append((left, right))
        vocab[left + right] = next(free)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    bos = roles.get("bos_token")
    if bos is not None and config.get("model_type") in BOS_FIRST:  # as these families' own tokenizers do
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, specials[bos])]
        )
    out = Path(path)
    tok.save(str(out / "tokenizer.json"))
    tok_config: Dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
                                  "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 30}
    tok_config.update(roles)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out / "tokenizer.json"
