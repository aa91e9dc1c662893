"""Model families: the math of each supported architecture, independent of where its weights live.

``family_for(config, tensor_names)`` picks the family of a Hugging Face ``config.json`` dict. A family
object holds no weights; it tells the caller which tensors to fetch and runs pure functions on them:

    fam = family_for(config, tensor_names)          # ModelError if unsupported / config incomplete
    fam.validate(infos)                              # ModelError if tensors are missing or mis-shaped

    # sizes, from the config
    fam.num_blocks, fam.hidden_size, fam.num_heads, fam.num_kv_heads, fam.head_dim,
    fam.max_positions, fam.vocab_size, fam.dtype

    # which checkpoint tensors each function needs: {local name: checkpoint name}
    fam.block_tensors(i)      # block i
    fam.outer_tensors()       # embeddings, final norm, head ("lm_head" -> the embedding if tied)
    fam.expected_shapes()     # {checkpoint name: shape} of every tensor, in checkpoint order

    # one forward pass over T new tokens (w = {local name: tensor on the compute device})
    mask, start = cache.extend(new_mask)             # KVCache: (B, S) mask of all tokens so far
    ctx = fam.context(mask, T, dtype)                # once per forward: positions, mask, ALiBi, RoPE
    h = fam.embed(w_outer, input_ids, ctx)           # (B, T) -> (B, T, C)
    for i in range(fam.num_blocks):
        h = fam.block(w_block[i], h, cache.layer(i), ctx)   # (B, T, C); writes K/V at ctx.start
    logits = fam.head(w_outer, h)                    # (B, T, vocab)

``mask`` is (B, S): 1 for real tokens, 0 for left padding, over the cached tokens and the T new ones
(S = cached + T); the new keys/values go to cache slots [S - T, S) (``ctx.start`` = S - T).
``cache.layer(i)`` is a ``zstream.streaming.cache.LayerCache`` (or a host-memory one), or anything with
``attend(q, k, v, ctx) -> (B, nh, T, hs)`` that stores k, v (B, nkv, T, hs) at slots [ctx.start, ctx.end) and
returns ``ops.attention`` of q over the keys and values of slots [0, ctx.end), wherever it computes it.

The ``StepContext`` (``models.common``) holds ``start``, ``positions`` (B, T), ``mask`` (an additive
SDPA bias (B, 1 or nh, T, S), or None for plain causal attention), ``is_causal`` and ``rope`` (cos, sin).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Type

from ...errors import ModelError
from .bloom import Bloom
from .common import Cut, Family, StepContext, mask_buffer, piece
from .llama import Llama
from .opt import OPT

FAMILIES: tuple[Type[Family], ...] = (Bloom, OPT, Llama)

# config "model_type" -> family class
_BY_MODEL_TYPE: Dict[str, Type[Family]] = {mt: fam for fam in FAMILIES for mt in fam.model_types}
_BY_ARCHITECTURE: Dict[str, Type[Family]] = {a: fam for fam in FAMILIES for a in fam.architectures}


def supported_architectures() -> list[str]:
    return [a for fam in FAMILIES for a in fam.architectures]


def family_for(config: Mapping[str, Any], tensor_names: Optional[Iterable[str]] = None) -> Family:
    """The family object for a config.json dict, given the checkpoint's tensor names (None: assume the
    names transformers' save_pretrained writes). Raises ModelError for an unsupported architecture
    (naming the supported ones), for a config whose ``model_type`` and ``architectures`` name different
    architectures, or for a config missing keys the family needs."""
    if not isinstance(config, Mapping):
        raise ModelError(f"config must be a dict (config.json), not {type(config).__name__}")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    by_type = _BY_MODEL_TYPE.get(str(model_type)) if model_type is not None else None
    by_arch = {_BY_ARCHITECTURE[a] for a in architectures if a in _BY_ARCHITECTURE}
    if (model_type is not None and by_arch and by_arch != {by_type}) or len(by_arch) > 1:
        raise ModelError(f"config.json disagrees with itself: model_type {model_type!r} but architectures "
                         f"{list(architectures)}; fix one of them (zstream will not guess which is right)")
    cls = by_type or (next(iter(by_arch)) if by_arch else None)
    if cls is None:
        what = list(architectures) or model_type or "no model_type / architectures"
        raise ModelError(f"unsupported architecture {what!r}; zstream supports "
                         f"{', '.join(supported_architectures())} "
                         f"(model_type {', '.join(sorted(_BY_MODEL_TYPE))})")
    return cls(config, tensor_names)


__all__ = ["FAMILIES", "OPT", "Bloom", "Cut", "Family", "Llama", "StepContext", "family_for", "mask_buffer", "piece",
           "supported_architectures"]
