"""The math the families share: attention over the KV cache, linear layers and norms over weight dicts, the
activations configs name, and the head reshapes."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ModelError
from .common import Reduce, StepContext

_SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def attention(q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> Tensor:
    """Causal multi-head attention over the cache. q: (B, nh, T, hs); k, v: (B, nkv, S, hs)."""
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                                                  enable_gqa=True)
        # older torch: expand the kv heads (a copy, but correct)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)


def linear(x: Tensor, w: Mapping[str, Tensor], name: str) -> Tensor:
    """x @ W.T + b, where the bias "<name>.bias" is optional."""
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def row_linear(x: Tensor, w: Mapping[str, Tensor], name: str, reduce: Optional[Reduce]) -> Tensor:
    """``linear`` of a row-parallel weight: each rank holds some input columns, so its product is a partial sum,
    all-reduced over the ranks before the bias is added (once). ``reduce`` None: one process, the whole weight."""
    if reduce is None:
        return linear(x, w, name)
    y = reduce(F.linear(x, w[f"{name}.weight"]))
    bias = w.get(f"{name}.bias")
    return y if bias is None else y + bias


def layer_norm(x: Tensor, w: Mapping[str, Tensor], name: str, eps: float) -> Tensor:
    """LayerNorm whose weight/bias may be absent (OPT's layer_norm_elementwise_affine=False)."""
    return F.layer_norm(x, (x.shape[-1],), w.get(f"{name}.weight"), w.get(f"{name}.bias"), eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # in float32 like transformers' LlamaRMSNorm, so fp16 activations don't overflow in the square
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str, family: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ModelError(f"{family}: unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, nh * hs) -> (B, nh, T, hs)"""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, nh, T, hs) -> (B, T, nh * hs)"""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)
