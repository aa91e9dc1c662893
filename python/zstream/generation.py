"""Generation: a preallocated KV cache, sampling, the decode loop, and ``ResidentModel``.

``ResidentModel`` keeps every weight in memory and runs embed -> blocks -> head through a model
family; the streaming engine runs the same family functions with weights fetched block by block.

    model = ResidentModel("ckpt/")
    logits = model(input_ids, attention_mask)                       # (B, T, vocab)
    tokens = model.generate(input_ids, max_new_tokens=20)           # (B, T + n)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import CheckpointError, ModelError
from .models import Family, family_for


class LayerCache:
    """One layer's slice of a KVCache: keys and values, each (B, nkv, max_len, hs)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k = k
        self.v = v

    def update(self, k: Tensor, v: Tensor, start: int) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) at slots [start, start + T); return slots [0, start + T)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ModelError(f"KV cache overflow: {end} tokens, the cache holds {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer, allocated once for the batch and the longest sequence.

    k, v: (num_blocks, B, nkv, max_len, hs). ``length`` is the number of filled slots (the same for
    every row: prompts are left-padded to a common length); ``mask`` (B, length) marks real tokens.
    """

    def __init__(self, num_blocks: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> None:
        shape = (num_blocks, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @classmethod
    def for_family(cls, family: Family, batch: int, max_len: int, dtype: torch.dtype,
                   device: Union[str, torch.device] = "cpu") -> KVCache:
        return cls(family.num_blocks, batch, max_len, family.num_kv_heads, family.head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i])

    def extend(self, attention_mask: Tensor) -> Tuple[Tensor, int]:
        """Append the mask of T new tokens (B, T); return the mask of all tokens so far (B, S) and the
        start slot of the new ones. Raises ModelError if the cache is too short."""
        rows, T = attention_mask.shape
        if rows != self.batch:
            raise ModelError(f"batch of {rows} rows, the KV cache was allocated for {self.batch}")
        if self.length + T > self.max_len:
            raise ModelError(f"{self.length + T} tokens do not fit the KV cache of {self.max_len}")
        start = self.length
        self.mask = torch.cat([self.mask, attention_mask.to(self.mask.device, torch.long)], dim=1)
        self.length += T
        return self.mask, start

    def reset(self) -> None:
        self.length = 0
        self.mask = self.mask[:, :0]


# ---- sampling ---------------------------------------------------------------------------------


def sample(logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next tokens (B,) from last-position logits (B, vocab): greedy, or temperature -> top-k -> top-p
    sampling in the order transformers applies them. Unlike transformers (top_k=50 unless told), no
    top-k / top-p filter applies unless asked for."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop tokens once the mass before them reaches top_p; the most likely token always stays
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


ForwardFn = Callable[[Tensor, Tensor, KVCache], Tensor]


def generate(forward_fn: ForwardFn, input_ids: Tensor, max_new_tokens: int, *, cache: KVCache,
             attention_mask: Optional[Tensor] = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             seed: Optional[int] = None) -> Tensor:
    """The decode loop: prefill the prompt, then one token per step until ``max_new_tokens`` or every
    row has produced an EOS. Returns (B, T + n) token ids; finished rows are padded with
    ``pad_token_id`` (default: the first EOS id).

    forward_fn(input_ids (B, T), attention_mask (B, T), cache) -> logits (B, T, vocab) or (B, vocab) of
    the last position; it appends the T tokens to ``cache`` (an empty KVCache with room for
    T + max_new_tokens tokens).
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if cache.length != 0:
        raise ValueError("generate needs an empty KV cache")
    if T + max_new_tokens > cache.max_len:
        raise ModelError(f"prompt of {T} + {max_new_tokens} new tokens does not fit the KV cache of "
                         f"{cache.max_len}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)

    tokens = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    step_ids, step_mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        logits = forward_fn(step_ids, step_mask, cache)
        if logits.dim() == 3:
            logits = logits[:, -1]  # (B, vocab)
        nxt = sample(logits, do_sample, temperature, top_k, top_p, generator)  # (B,)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos:
            finished = finished | torch.isin(nxt, eos_t)
            if bool(finished.all()):
                break
        step_ids = nxt[:, None]  # (B, 1)
        step_mask = torch.ones_like(step_ids)
    return tokens


# ---- a model with every weight in memory ------------------------------------------------------


def read_config(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not JSON ({e})") from None


def checkpoint_files(path: Union[str, Path]) -> Dict[str, Path]:
    """tensor name -> the safetensors file that holds it (single file or index.json + shards)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


class ResidentModel:
    """Every weight in memory; runs a family's embed -> blocks -> head with a KV cache.

    Loads a Hugging Face safetensors checkpoint (config.json + model.safetensors or sharded files) with
    safetensors' ``safe_open``; ``dtype`` converts the weights (default: as stored).
    """

    def __init__(self, path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.config = read_config(self.path)
        files = checkpoint_files(self.path)
        self.family = family_for(self.config, files.keys())
        self.device = torch.device(device)

        wanted = set(self.family.expected_shapes())
        infos: Dict[str, Tuple[Tuple[int, ...], str]] = {}
        tensors: Dict[str, Tensor] = {}
        for file in sorted(set(files.values())):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    if name in wanted:
                        sl = f.get_slice(name)
                        infos[name] = (tuple(sl.get_shape()), sl.get_dtype())
                        tensors[name] = f.get_tensor(name)
        self.family.validate(infos)

        self.dtype = dtype or next(iter(tensors.values())).dtype
        loaded = {name: t.to(self.device, self.dtype) for name, t in tensors.items()}
        self.outer = {local: loaded[name] for local, name in self.family.outer_tensors().items()}
        self.blocks: List[Dict[str, Tensor]] = [
            {local: loaded[name] for local, name in self.family.block_tensors(i).items()}
            for i in range(self.family.num_blocks)
        ]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.for_family(self.family, batch, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """Run T new tokens (B, T) through the model, appending them to ``cache``; -> logits (B, T, vocab),
        or (B, 1, vocab) of the last position with ``last_only`` (all that generation needs)."""
        input_ids = input_ids.to(self.device)
        mask, _start = cache.extend(attention_mask.to(self.device))
        ctx = self.family.context(mask, input_ids.shape[1], self.dtype)  # once per forward pass
        hidden = self.family.embed(self.outer, input_ids, ctx)  # (B, T, C)
        for i, w in enumerate(self.blocks):
            hidden = self.family.block(w, hidden, cache.layer(i), ctx)
        if last_only:
            hidden = hidden[:, -1:]  # (B, 1, C)
        return self.family.head(self.outer, hidden)  # (B, T, vocab)

    def __call__(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Logits (B, T, vocab) of a whole sequence, with a fresh cache."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, 0)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        return self.forward(input_ids, attention_mask, cache)

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None,
                 **kwargs: Any) -> Tensor:
        """Tokens (B, T + n); keyword arguments as ``zstream.generation.generate``. ``eos_token_id``
        defaults to None (run the full max_new_tokens); pass ``self.config["eos_token_id"]`` to stop."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, max_new_tokens)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        def step(ids: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
            return self.forward(ids, mask, cache, last_only=True)

        return generate(step, input_ids.to(self.device), max_new_tokens, cache=cache,
                        attention_mask=attention_mask.to(self.device), **kwargs)

    def _check_length(self, attention_mask: Tensor, max_new_tokens: int) -> None:
        longest = int(attention_mask.sum(dim=1).max()) + max_new_tokens if attention_mask.numel() else 0
        if longest > self.family.max_positions:
            raise ModelError(f"{longest} tokens (prompt + new) exceed the {self.family.max_positions} "
                             f"positions of {self.path}")
