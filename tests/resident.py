"""A test helper: every weight in memory, read with safetensors' own ``safe_open`` (not the zstream store), run
through a family's embed -> blocks -> head with a KV cache. The model tests check the families' math this way,
against transformers, without the engine in between.

    model = ResidentModel("ckpt/")
    logits = model(input_ids, attention_mask)                       # (B, T, vocab)
    tokens = model.generate(input_ids, max_new_tokens=20)           # (B, T + n), greedy
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from zstream.errors import CheckpointError, ModelError
from zstream.foundations.checkpoint import read_config
from zstream.foundations.models import family_for
from zstream.streaming.cache import KVCache


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

    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy tokens (B, T + n)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(attention_mask, max_new_tokens)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        tokens, ids, mask = input_ids, input_ids, attention_mask
        for _ in range(max_new_tokens):
            nxt = self.forward(ids, mask, cache, last_only=True)[:, -1].argmax(-1)  # (B,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            ids, mask = nxt[:, None], torch.ones_like(nxt[:, None])
        return tokens

    def _check_length(self, attention_mask: Tensor, max_new_tokens: int) -> None:
        longest = int(attention_mask.sum(dim=1).max()) + max_new_tokens if attention_mask.numel() else 0
        if longest > self.family.max_positions:
            raise ModelError(f"{longest} tokens (prompt + new) exceed the {self.family.max_positions} "
                             f"positions of {self.path}")
