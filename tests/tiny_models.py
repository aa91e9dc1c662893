"""Tiny random checkpoints for the model tests, written two ways: by transformers' own save_pretrained
and by zstream.synthetic.make_checkpoint. Both are read back by transformers as the reference."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from zstream.api.synthetic import PRESETS, make_checkpoint

TINY = [name for name in PRESETS if name.startswith("tiny-")]
WRITERS = ["transformers", "synthetic"]


def hf_config(config: Dict[str, Any]) -> Any:
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def save_with_transformers(config: Dict[str, Any], path: Path, seed: int = 0) -> Path:
    """Build the transformers model of ``config`` with random weights and save_pretrained it (float32).

    transformers initializes norms to 1 and biases to 0; perturb every parameter so a swapped or
    ignored weight changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)
    std = float(config.get("initializer_range") or config.get("init_std") or 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = (p.dim() == 1 and "norm" in name) or "ln_f" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(path, **kwargs)
    return path


def with_blocks(name: str, blocks: int) -> Dict[str, Any]:
    """Preset ``name`` with ``blocks`` blocks (BLOOM calls them n_layer, the others num_hidden_layers)."""
    key = "n_layer" if "n_layer" in PRESETS[name] else "num_hidden_layers"
    return {**PRESETS[name], key: blocks}


def write_checkpoint(name: str, writer: str, path: Path, blocks: Optional[int] = None) -> Path:
    config = PRESETS[name] if blocks is None else with_blocks(name, blocks)
    if writer == "transformers":
        return save_with_transformers(config, path)
    return make_checkpoint(config, path, torch.float32, progress=False)


def reference_model(path: Path) -> Any:
    """transformers' model of a checkpoint, float32, eager attention (the plain math)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def reference_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' logits of a (possibly left-padded) batch. Llama-style models take position ids
    from the caller (generate derives them from the mask; a bare forward would not)."""
    kwargs = {}
    if "position_ids" in inspect.signature(model.forward).parameters and model.config.model_type != "opt":
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask, **kwargs).logits


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def padded_batch(vocab: int = 300, lengths: tuple = (20, 15, 9), seed: int = 1) -> tuple:
    """Left-padded token ids (B, T) and mask (B, T) for prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
        ids[row, : T - n] = 0  # the pad id; its value must not matter
    return ids, mask
