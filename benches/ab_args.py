"""What the one-process A/B scripts share (``calibration_ab.py``, ``prefill_sustained_ab.py``, ``graph_probe_ab.py``,
``copy_interference_ab.py``):
a model of a preset's shapes (or a config.json) on random weights, the batches, prompt, gen and rounds asked for, the
device, and the dtype the engine would run there (fp16 on a GPU, fp32 on the CPU)."""

from __future__ import annotations

import argparse
from typing import Any, List, Tuple

import torch

from zstream.api.synthetic import resolve_config
from zstream.foundations.models import family_for


def ab_parser(doc: str, *, batch: str, rounds: int, gen_help: str = "the cache is as long as prompt + gen, as a "
              "run's") -> argparse.ArgumentParser:
    """The arguments every A/B script takes; the script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("model", help="a preset name or a config.json")
    p.add_argument("--batch", default=batch, help="comma-separated batches")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=32, help=gen_help)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    return p


def ab_setup(a: argparse.Namespace) -> Tuple[torch.device, torch.dtype, Any, List[int]]:
    """(device, dtype, model family, batches) of parsed arguments."""
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype, family_for(resolve_config(a.model)), [int(b) for b in a.batch.split(",")]
