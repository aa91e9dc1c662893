"""Llama and its close relatives Mistral and Qwen2: RMSNorm, rotary positions, grouped-query attention,
SwiGLU MLP.

Matches transformers' ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``:
- RoPE with ``rope_theta`` and the scaling types default, linear, dynamic (NTK), llama3 and yarn, read from
  ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older configs);
- GQA (``num_key_value_heads < num_attention_heads``), an explicit ``head_dim``;
- tied or untied embeddings; attention biases (Llama's ``attention_bias``: q, k, v, o; Qwen2: q, k, v);
- Mistral's sliding-window attention when every layer uses the same window.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ModelError
from .common import Family, Shape, StepContext, check_divisible, find_prefix, read_sizes
from .ops import activation, linear, merge_heads, rms_norm, row_linear, split_heads

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: Mapping[str, Any], family: str) -> Dict[str, Any]:
    """The RoPE settings as one flat dict with "rope_type" and "rope_theta", from either config style."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ModelError(f"{family}: per-layer-type RoPE parameters are not supported")
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(config.get("rope_theta", 10000.0))
    if params["rope_type"] not in ROPE_TYPES:
        raise ModelError(f"{family}: unsupported rope type {params['rope_type']!r} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if params["rope_type"] in ("linear", "dynamic", "llama3") and "factor" not in params:
        raise ModelError(f"{family}: rope type {params['rope_type']!r} needs a 'factor'")
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ModelError(f"{family}: partial_rotary_factor {factor} is not supported")
    return params


def rope_inv_freq(params: Mapping[str, Any], dim: int, max_positions: int,
                  seq_len: Optional[int] = None) -> Tuple[Tensor, float]:
    """(dim/2,) float32 inverse frequencies and the attention factor that scales cos/sin.

    ``seq_len`` (the longest sequence of this forward pass) matters only for "dynamic"."""
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim/2,)
    if kind == "dynamic":
        # NTK-aware: grow the base once the sequence outgrows the trained context
        factor = float(params["factor"])
        seq_len = max(seq_len or 0, max_positions)
        base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, params)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(base, dim, params, max_positions)
    return inv_freq, attention_factor


def _llama3(inv_freq: Tensor, params: Mapping[str, Any]) -> Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate smoothly in between
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, params: Mapping[str, Any], max_positions: int) -> Tuple[Tensor, float]:
    # YaRN: interpolate low frequencies, extrapolate high ones, ramp in between; scale attention
    old_len = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / old_len
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 where the frequency is kept as trained
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    _after_blocks = ("norm.weight", "lm_head")
    _splits: ClassVar[Dict[str, str]] = {
        "self_attn.q_proj": "column", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv", "self_attn.o_proj": "row",
        "mlp.gate_proj": "column", "mlp.up_proj": "column", "mlp.down_proj": "row"}
    intermediate_size: int  # the MLP's hidden units (read_sizes sets it)
    attn_bias: Tuple[str, ...]  # the attention projections that carry biases

    def __init__(self, config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> None:
        super().__init__(config, tensor_names)
        f = self.model_type = str(config.get("model_type") or self._type_from_architectures(config))
        read_sizes(self, config, f, num_blocks="num_hidden_layers", hidden_size="hidden_size",
                   num_heads="num_attention_heads", intermediate_size="intermediate_size", vocab_size="vocab_size",
                   max_positions="max_position_embeddings")
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        check_divisible(self.num_heads, self.num_kv_heads, "attention heads must group over kv heads", f)
        if config.get("head_dim"):
            self.head_dim = int(config["head_dim"])
        else:
            check_divisible(self.hidden_size, self.num_heads, "hidden_size must divide into the heads", f)
            self.head_dim = self.hidden_size // self.num_heads
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.act = activation(config.get("hidden_act", "silu"), f)
        self.tied = bool(config.get("tie_word_embeddings", False))
        # which projections carry biases: Qwen2 always has q/k/v biases; Llama's attention_bias adds all four
        if f == "qwen2":
            self.attn_bias = ("q_proj", "k_proj", "v_proj")
        elif config.get("attention_bias", False):
            self.attn_bias = ("q_proj", "k_proj", "v_proj", "o_proj")
        else:
            self.attn_bias = ()
        self.mlp_bias = bool(config.get("mlp_bias", False))
        self.sliding_window = self._sliding_window(config)
        self.rope = rope_parameters(config, f)
        self.trained_positions = self.max_positions  # what RoPE scaling is relative to
        if self.rope["rope_type"] == "dynamic":
            # dynamic NTK scaling exists to run past the trained context, by up to its factor; its
            # frequencies depend on the sequence length, so context() computes them per forward pass
            self.max_positions = int(self.max_positions * float(self.rope["factor"]))
        else:  # static frequencies, computed once
            inv_freq, factor = rope_inv_freq(self.rope, self.head_dim, self.trained_positions)
            self._inv_freq, self._attention_factor = inv_freq, factor
        # save_pretrained writes "model.layers.0..."; a bare LlamaModel "layers.0..."
        self.prefix = "model."
        if self.tensor_names is not None:
            self.prefix = find_prefix(self.tensor_names, "embed_tokens.weight", ("model.", ""), f)

    @staticmethod
    def _type_from_architectures(config: Mapping[str, Any]) -> str:
        archs = config.get("architectures") or []
        for arch, model_type in (("MistralForCausalLM", "mistral"), ("Qwen2ForCausalLM", "qwen2")):
            if arch in archs:
                return model_type
        return "llama"

    def _sliding_window(self, config: Mapping[str, Any]) -> Optional[int]:
        window = config.get("sliding_window")
        if window is None or (self.model_type == "qwen2" and not config.get("use_sliding_window", False)):
            return None
        if self.model_type == "llama":
            return None  # Llama has no sliding window, whatever the config says
        layer_types = config.get("layer_types")
        if layer_types is None and self.model_type == "qwen2":
            first = int(config.get("max_window_layers", 0))
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(self.num_blocks)]
        kinds = set(layer_types or ["sliding_attention"])
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise ModelError(f"{self.model_type}: a mix of sliding-window and full-attention layers is not "
                             "supported")
        return int(window)

    # ---- weight names -------------------------------------------------------------------------

    def _block_shapes(self) -> Dict[str, Shape]:
        C, inter, hs = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_kv_heads * hs
        out = {"q_proj": self.num_heads * hs, "k_proj": kv, "v_proj": kv}
        shapes: Dict[str, Shape] = {}
        for proj, rows in out.items():
            shapes[f"self_attn.{proj}.weight"] = (rows, C)
            if proj in self.attn_bias:
                shapes[f"self_attn.{proj}.bias"] = (rows,)
        shapes["self_attn.o_proj.weight"] = (C, self.num_heads * hs)
        if "o_proj" in self.attn_bias:
            shapes["self_attn.o_proj.bias"] = (C,)
        for proj, shape in (("gate_proj", (inter, C)), ("up_proj", (inter, C)), ("down_proj", (C, inter))):
            shapes[f"mlp.{proj}.weight"] = shape
            if self.mlp_bias:
                shapes[f"mlp.{proj}.bias"] = (shape[0],)
        shapes["input_layernorm.weight"] = (C,)
        shapes["post_attention_layernorm.weight"] = (C,)
        return shapes

    def _outer_shapes(self) -> Dict[str, Shape]:
        shapes: Dict[str, Shape] = {
            "embed_tokens": (self.vocab_size, self.hidden_size),
            "norm.weight": (self.hidden_size,),
        }
        if not self.tied:
            shapes["lm_head"] = (self.vocab_size, self.hidden_size)
        return shapes



    # ---- per-forward context ------------------------------------------------------------------

    def context(self, attention_mask: Tensor, num_new: int, dtype: torch.dtype) -> StepContext:
        ctx = super().context(attention_mask, num_new, dtype)
        if self.rope["rope_type"] == "dynamic":
            seq_len = int(ctx.positions.max()) + 1 if ctx.positions.numel() else 0
            inv_freq, scale = rope_inv_freq(self.rope, self.head_dim, self.trained_positions, seq_len)
        else:
            inv_freq, scale = self._inv_freq, self._attention_factor
        inv_freq = inv_freq.to(attention_mask.device)
        freqs = ctx.positions[..., None].float() * inv_freq  # (B, T, hs/2), float32 like transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        cos = (emb.cos() * scale).to(dtype)[:, None]  # (B, 1, T, hs)
        sin = (emb.sin() * scale).to(dtype)[:, None]
        ctx.rope = (cos, sin)
        return ctx

    # ---- math ---------------------------------------------------------------------------------

    def embed(self, w: Mapping[str, Tensor], input_ids: Tensor, ctx: StepContext) -> Tensor:
        return F.embedding(input_ids, w["embed_tokens"])  # (B, T, C)

    def block(self, w: Mapping[str, Tensor], hidden: Tensor, cache: Any, ctx: StepContext) -> Tensor:
        assert ctx.rope is not None, "use Llama.context to build the StepContext"
        cos, sin = ctx.rope

        h = rms_norm(hidden, w["input_layernorm.weight"], self.eps)
        q = split_heads(linear(h, w, "self_attn.q_proj"), self.num_heads)  # (B, nh, T, hs)
        k = split_heads(linear(h, w, "self_attn.k_proj"), self.num_kv_heads)  # (B, nkv, T, hs)
        v = split_heads(linear(h, w, "self_attn.v_proj"), self.num_kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = merge_heads(cache.attend(q, k, v, ctx))  # stores k, v; attends over the layer's cache: (B, T, nh * hs)
        hidden = hidden + row_linear(y, w, "self_attn.o_proj", self.reduce)

        h = rms_norm(hidden, w["post_attention_layernorm.weight"], self.eps)
        gate = self.act(linear(h, w, "mlp.gate_proj"))  # (B, T, I)
        return hidden + row_linear(gate * linear(h, w, "mlp.up_proj"), w, "mlp.down_proj", self.reduce)

    def head(self, w: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        hidden = rms_norm(hidden, w["norm.weight"], self.eps)
        return F.linear(hidden, w["lm_head"])  # (B, T, vocab)
