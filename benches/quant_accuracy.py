"""Accuracy of quantized weights at real shapes: logits against the fp32 reference (transformers, same checkpoint), as
cosine similarity and top-1 agreement over every position.

    python benches/quant_accuracy.py bloom-7b1 llama-2-7b --json out.json      (GPU machine; presets or directories)
    python benches/quant_accuracy.py bloom-7b1 --peer-logits ds_int4.pt --peer-name deepspeed-int4

Rows, per model:
  zstream fp16 / int8 / int4 / int4-sym   zstream.load(..., quantize=...), fp16 compute: what users run
  control: dequantized int8 / int4        the fp32 reference with each block linear weight replaced by
                                          dequantize(quantize(w)): the same numbers through transformers
  control: noise like int8 / int4         the fp32 reference with Gaussian noise of the same RMS as that weight's
                                          quantization error: how much any error of that size costs this model
When the "quantized" and "noise" rows agree, the loss is the model's sensitivity to that much weight error (random
deep networks amplify it), not a defect of the scheme. A preset is written once as a random-weight checkpoint
(zstream.synthetic, the initializer scale of the real model). Issue 7 asks for cosine >= 0.999 (int8) and >= 0.98
(int4). ``--peer-logits`` scores logits a peer saved for the same tokens (benches/peers/run_peer.py --logits-out).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import zstream
from zstream.foundations.quant import dequantize, quantize
from zstream.interfaces.bench import checkpoint_for

BATCH, TOKENS = 4, 128  # run_peer.py --logits-out uses the same tokens
ZSTREAM = [("zstream fp16", None, False), ("zstream int8", "int8", False), ("zstream int4", "int4", False),
           ("zstream int4-sym", "int4", True)]


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))


def compare(got: torch.Tensor, want: torch.Tensor) -> Dict[str, float]:
    g, w = got.double().flatten(0, 1), want.double().flatten(0, 1)  # (N, vocab)
    return {"cosine": torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0).item(),
            "cosine_min_position": torch.nn.functional.cosine_similarity(g, w, dim=-1).min().item(),
            "top1": (g.argmax(-1) == w.argmax(-1)).double().mean().item()}


def block_linear_weights(model: Any) -> List[torch.nn.Parameter]:
    """The transformers model's block linear weights: what zstream quantizes (2-D, inside the layer stack)."""
    return [p for n, p in model.named_parameters() if p.dim() == 2 and (".h." in n or ".layers." in n)]


def reference_rows(name: str, path: Path, ids: torch.Tensor, group_size: int) -> tuple[torch.Tensor, List[Dict]]:
    """fp32 reference logits, and the control rows (dequantized weights, equal-RMS noise) on the same model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cuda")
    weights = block_linear_weights(model)
    originals = [w.detach().clone() for w in weights]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids.cuda()).logits.float().cpu()  # (B, T, vocab)

    want = logits()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for bits in (8, 4):
        def dequantized(w: torch.Tensor, bits: int = bits) -> torch.Tensor:
            return dequantize(quantize(w, bits, group_size), torch.float32)

        def noise(w: torch.Tensor, bits: int = bits) -> torch.Tensor:
            rms = (dequantized(w) - w).pow(2).mean().sqrt()
            return w + torch.randn(w.shape, generator=gen, device=w.device) * rms

        for label, fn in ((f"control: dequantized int{bits}", dequantized), (f"control: noise like int{bits}", noise)):
            perturb: Callable[[torch.Tensor], torch.Tensor] = fn
            with torch.no_grad():
                for w, orig in zip(weights, originals):
                    w.copy_(perturb(orig))
            rows.append({"model": name, "weights": label, "group_size": group_size, **compare(logits(), want)})
            print(json.dumps(rows[-1]), flush=True)
        with torch.no_grad():
            for w, orig in zip(weights, originals):
                w.copy_(orig)
    originals.clear()  # the model itself goes with this frame
    return want, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--peer-logits", default=None, help="logits a peer saved (one model): scored against the reference")
    p.add_argument("--peer-name", default="peer")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows: List[Dict[str, Any]] = []
    for name in a.models:
        path = checkpoint_for(name, torch.float16)
        ids = tokens(json.loads((path / "config.json").read_text())["vocab_size"])
        want, control = reference_rows(name, path, ids, a.group_size)
        gc.collect()
        torch.cuda.empty_cache()
        rows += control
        if a.peer_logits and Path(a.peer_logits).exists():
            rows.append({"model": name, "weights": a.peer_name, "group_size": a.group_size,
                         **compare(torch.load(a.peer_logits), want)})
            print(json.dumps(rows[-1]), flush=True)
        for label, quant, symmetric in ZSTREAM:
            model = zstream.load(path, offload="none", quantize=quant, group_size=a.group_size, symmetric=symmetric,
                                 progress=False)
            rows.append({"model": name, "weights": label, "group_size": a.group_size if quant else None,
                         **compare(model(ids.cuda()).float().cpu(), want)})
            print(json.dumps(rows[-1]), flush=True)
            model.close()
            del model
            gc.collect()
            torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
