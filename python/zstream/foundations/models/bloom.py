"""BLOOM (BigScience): ALiBi attention biases, a LayerNorm right after the embedding, fused QKV.

Matches transformers' ``BloomForCausalLM``; the head is tied to the word embeddings.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .common import Family, Reduce, Shape, StepContext, check_divisible, find_prefix, mask_buffer, read_sizes
from .ops import layer_norm, linear, merge_heads, row_linear


def alibi_slopes(num_heads: int) -> Tensor:
    """(nh,) ALiBi slopes: a geometric sequence for the largest power of two <= nh, then every other
    slope of the next power of two for the remaining heads (as in the ALiBi paper and transformers)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base), torch.arange(1, 1 + closest, dtype=torch.float32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        odd = torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.float32)
        extra = torch.pow(torch.tensor(extra_base), odd)
        slopes = torch.cat([slopes, extra])
    return slopes


class Bloom(Family):
    name = "bloom"
    model_types = ("bloom",)
    architectures = ("BloomForCausalLM",)
    _blocks_path = "h"
    _weight_locals = ("word_embeddings",)
    _always_mask = True  # the ALiBi bias is an attention mask
    _embedding_local = "word_embeddings"
    # the fused QKV holds [q_h, k_h, v_h] head by head, so a rank's rows are its heads' q, k and v
    _splits: ClassVar[Dict[str, str]] = {
        "self_attention.query_key_value": "column", "self_attention.dense": "row",
        "mlp.dense_h_to_4h": "column", "mlp.dense_4h_to_h": "row"}
    _mlp_width = "ffn"

    def __init__(self, config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> None:
        super().__init__(config, tensor_names)
        f = self.name
        read_sizes(self, config, f, num_blocks=("n_layer", "num_hidden_layers"), hidden_size=("hidden_size", "n_embed"),
                   num_heads=("n_head", "num_attention_heads"), vocab_size="vocab_size")
        check_divisible(self.hidden_size, self.num_heads, "hidden_size must divide into n_head heads", f)
        self.num_kv_heads = self.num_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.ffn = 4 * self.hidden_size
        # ALiBi has no position table; this is the training context (BLOOM's "seq_length")
        self.max_positions = int(config.get("seq_length") or config.get("max_position_embeddings") or 2048)
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.residual_post_ln = bool(config.get("apply_residual_connection_post_layernorm", False))
        self.tied = bool(config.get("tie_word_embeddings", True))
        # save_pretrained writes "transformer.h.0...", a bare BloomModel (the hub's bigscience/bloom) "h.0..."
        self.prefix = "transformer."
        if self.tensor_names is not None:
            self.prefix = find_prefix(self.tensor_names, "word_embeddings.weight", ("transformer.", ""), f)
        self._slopes = alibi_slopes(self.num_heads)

    # ---- weight names -------------------------------------------------------------------------

    def _block_shapes(self) -> Dict[str, Shape]:
        C, A, Fd = self.hidden_size, self.num_heads * self.head_dim, self.ffn  # A = C, or a rank's heads' share
        return {
            "input_layernorm.weight": (C,),
            "input_layernorm.bias": (C,),
            "self_attention.query_key_value.weight": (3 * A, C),
            "self_attention.query_key_value.bias": (3 * A,),
            "self_attention.dense.weight": (C, A),
            "self_attention.dense.bias": (C,),
            "post_attention_layernorm.weight": (C,),
            "post_attention_layernorm.bias": (C,),
            "mlp.dense_h_to_4h.weight": (Fd, C),
            "mlp.dense_h_to_4h.bias": (Fd,),
            "mlp.dense_4h_to_h.weight": (C, Fd),
            "mlp.dense_4h_to_h.bias": (C,),
        }

    def _outer_shapes(self) -> Dict[str, Shape]:
        C = self.hidden_size
        shapes: Dict[str, Shape] = {
            "word_embeddings": (self.vocab_size, C),
            "word_embeddings_layernorm.weight": (C,),
            "word_embeddings_layernorm.bias": (C,),
            "ln_f.weight": (C,),
            "ln_f.bias": (C,),
        }
        if not self.tied:
            shapes["lm_head"] = (self.vocab_size, C)
        return shapes

    _after_blocks = ("ln_f.weight", "ln_f.bias", "lm_head")

    def shard(self, rank: int, world: int, reduce: Reduce) -> Bloom:
        part = super().shard(rank, world, reduce)
        if part is not self:  # ALiBi: the slopes of the rank's own heads
            nh = part.num_heads
            part._slopes = self._slopes[rank * nh : (rank + 1) * nh]
        return part

    # ---- per-forward context ------------------------------------------------------------------

    def context(self, attention_mask: Tensor, num_new: int, dtype: torch.dtype) -> StepContext:
        ctx = super().context(attention_mask, num_new, dtype)
        # ALiBi: bias = -slope_h * (query position - key position). transformers adds slope_h * (key
        # position) instead, which differs by a per-query constant that softmax ignores; the distance form
        # keeps the biases of nearby keys small, so fp16/bf16 round them finely.
        mask = attention_mask.long()
        key_pos = (mask.cumsum(-1) - 1) * mask  # (B, S) positions counting real tokens only
        dist = (key_pos[:, ctx.start :, None] - key_pos[:, None, :]).float()  # (B, T, S)
        slopes = self._slopes.to(attention_mask.device)
        B, T, S = dist.shape
        alibi = mask_buffer(B, self.num_heads, T, S, dtype=dtype, device=attention_mask.device, fill=None)
        torch.mul(-slopes[None, :, None, None], dist[:, None], out=alibi)  # (B, nh, T, S)
        assert ctx.mask is not None  # _always_mask: the causal / padding mask is always built
        ctx.mask = alibi.add_(ctx.mask)  # + (B, 1, T, S) mask
        return ctx

    # ---- math ---------------------------------------------------------------------------------

    def embed(self, w: Mapping[str, Tensor], input_ids: Tensor, ctx: StepContext) -> Tensor:
        x = torch.nn.functional.embedding(input_ids, w["word_embeddings"])  # (B, T, C)
        return layer_norm(x, w, "word_embeddings_layernorm", self.eps)

    def block(self, w: Mapping[str, Tensor], hidden: Tensor, cache: Any, ctx: StepContext) -> Tensor:
        B, T, _ = hidden.shape
        nh, hs = self.num_heads, self.head_dim

        ln = layer_norm(hidden, w, "input_layernorm", self.eps)
        residual = ln if self.residual_post_ln else hidden
        # BLOOM's fused QKV is laid out per head: [q_h, k_h, v_h] for each head h in turn
        qkv = linear(ln, w, "self_attention.query_key_value").view(B, T, nh, 3, hs)
        q = qkv[..., 0, :].transpose(1, 2)  # (B, nh, T, hs)
        k = qkv[..., 1, :].transpose(1, 2)
        v = qkv[..., 2, :].transpose(1, 2)
        y = merge_heads(cache.attend(q, k, v, ctx))  # stores k, v; attends over the layer's cache: (B, T, nh * hs)
        hidden = residual + row_linear(y, w, "self_attention.dense", self.reduce)

        ln = layer_norm(hidden, w, "post_attention_layernorm", self.eps)
        residual = ln if self.residual_post_ln else hidden
        # BLOOM's gelu is the tanh approximation (from Megatron-DeepSpeed)
        h = torch.nn.functional.gelu(linear(ln, w, "mlp.dense_h_to_4h"), approximate="tanh")
        return residual + row_linear(h, w, "mlp.dense_4h_to_h", self.reduce)

    def head(self, w: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        hidden = layer_norm(hidden, w, "ln_f", self.eps)
        return torch.nn.functional.linear(hidden, w["lm_head"])  # (B, T, vocab)
