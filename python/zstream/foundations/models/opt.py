"""OPT (Meta): learned absolute positions (offset by 2), ReLU MLP, pre- or post-LayerNorm blocks.

Matches transformers' ``OPTForCausalLM``, including opt-350m's oddities: LayerNorm after attention /
MLP (``do_layer_norm_before: false``, so no final LayerNorm) and a 512-wide embedding projected in
and out of the 1024-wide blocks (``word_embed_proj_dim != hidden_size``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional

import torch.nn.functional as F
from torch import Tensor

from .common import Family, Shape, StepContext, check_divisible, find_prefix, read_sizes
from .ops import activation, layer_norm, linear, merge_heads, row_linear, split_heads

# OPT's position table has two extra rows at the start (a fairseq padding_idx artifact)
POSITION_OFFSET = 2


class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    architectures = ("OPTForCausalLM",)
    _weight_locals = ("embed_tokens", "embed_positions")
    _after_blocks = ("final_layer_norm.weight", "final_layer_norm.bias", "project_out.weight", "lm_head")
    _splits: ClassVar[Dict[str, str]] = {
        "self_attn.q_proj": "column", "self_attn.k_proj": "column", "self_attn.v_proj": "column",
        "self_attn.out_proj": "row", "fc1": "column", "fc2": "row"}
    _mlp_width = "ffn_dim"
    ffn_dim: int  # the MLP's hidden units (read_sizes sets it)

    def __init__(self, config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> None:
        super().__init__(config, tensor_names)
        f = self.name
        read_sizes(self, config, f, num_blocks="num_hidden_layers", hidden_size="hidden_size",
                   num_heads="num_attention_heads", ffn_dim="ffn_dim", vocab_size="vocab_size",
                   max_positions="max_position_embeddings")
        check_divisible(self.hidden_size, self.num_heads, "hidden_size must divide into the heads", f)
        self.num_kv_heads = self.num_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.embed_dim = int(config.get("word_embed_proj_dim") or self.hidden_size)
        self.pre_ln = bool(config.get("do_layer_norm_before", True))
        self.final_ln = self.pre_ln and not config.get("_remove_final_layer_norm", False)
        self.ln_affine = bool(config.get("layer_norm_elementwise_affine", True))
        self.bias = bool(config.get("enable_bias", True))
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.act = activation(config.get("activation_function", "relu"), f)
        # save_pretrained writes "model.decoder.*"; an OPTModel saved bare (facebook/opt-*) "decoder.*"
        self.prefix = "model.decoder."
        if self.tensor_names is not None:
            candidates = ("model.decoder.", "decoder.")
            self.prefix = find_prefix(self.tensor_names, "embed_tokens.weight", candidates, f)

    # ---- weight names -------------------------------------------------------------------------

    def _block_shapes(self) -> Dict[str, Shape]:
        C, A, Fd = self.hidden_size, self.num_heads * self.head_dim, self.ffn_dim  # A = C, or a rank's share
        shapes: Dict[str, Shape] = {}
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"self_attn.{proj}.weight"] = (C, A) if proj == "out_proj" else (A, C)
            if self.bias:
                shapes[f"self_attn.{proj}.bias"] = (C,) if proj == "out_proj" else (A,)
        if self.ln_affine:
            shapes["self_attn_layer_norm.weight"] = (C,)
            shapes["self_attn_layer_norm.bias"] = (C,)
        shapes["fc1.weight"] = (Fd, C)
        if self.bias:
            shapes["fc1.bias"] = (Fd,)
        shapes["fc2.weight"] = (C, Fd)
        if self.bias:
            shapes["fc2.bias"] = (C,)
        if self.ln_affine:
            shapes["final_layer_norm.weight"] = (C,)
            shapes["final_layer_norm.bias"] = (C,)
        return shapes

    def _outer_shapes(self) -> Dict[str, Shape]:
        C, P = self.hidden_size, self.embed_dim
        shapes: Dict[str, Shape] = {
            "embed_tokens": (self.vocab_size, P),
            "embed_positions": (self.max_positions + POSITION_OFFSET, C),
        }
        if P != C:
            shapes["project_in.weight"] = (C, P)
            shapes["project_out.weight"] = (P, C)
        if self.final_ln and self.ln_affine:
            shapes["final_layer_norm.weight"] = (C,)
            shapes["final_layer_norm.bias"] = (C,)
        if not self.tied:
            shapes["lm_head"] = (self.vocab_size, P)
        return shapes



    # ---- math ---------------------------------------------------------------------------------

    def embed(self, w: Mapping[str, Tensor], input_ids: Tensor, ctx: StepContext) -> Tensor:
        x = F.embedding(input_ids, w["embed_tokens"])  # (B, T, P)
        if "project_in.weight" in w:
            x = F.linear(x, w["project_in.weight"])  # (B, T, C)
        return x + F.embedding(ctx.positions + POSITION_OFFSET, w["embed_positions"])

    def block(self, w: Mapping[str, Tensor], hidden: Tensor, cache: Any, ctx: StepContext) -> Tensor:
        eps = 1e-5  # OPT uses nn.LayerNorm's default
        nh = self.num_heads

        h = layer_norm(hidden, w, "self_attn_layer_norm", eps) if self.pre_ln else hidden
        q = split_heads(linear(h, w, "self_attn.q_proj"), nh)  # (B, nh, T, hs)
        k = split_heads(linear(h, w, "self_attn.k_proj"), nh)
        v = split_heads(linear(h, w, "self_attn.v_proj"), nh)
        y = merge_heads(cache.attend(q, k, v, ctx))  # stores k, v; attends over the layer's cache: (B, T, nh * hs)
        hidden = hidden + row_linear(y, w, "self_attn.out_proj", self.reduce)
        if not self.pre_ln:  # opt-350m: LayerNorm after the residual add
            hidden = layer_norm(hidden, w, "self_attn_layer_norm", eps)

        h = layer_norm(hidden, w, "final_layer_norm", eps) if self.pre_ln else hidden
        hidden = hidden + row_linear(self.act(linear(h, w, "fc1")), w, "fc2", self.reduce)
        if not self.pre_ln:
            hidden = layer_norm(hidden, w, "final_layer_norm", eps)
        return hidden

    def head(self, w: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        if self.final_ln:
            hidden = layer_norm(hidden, w, "final_layer_norm", 1e-5)
        if "project_out.weight" in w:
            hidden = F.linear(hidden, w["project_out.weight"])  # (B, T, P)
        return F.linear(hidden, w["lm_head"])  # (B, T, vocab)

