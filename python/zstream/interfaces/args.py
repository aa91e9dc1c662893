"""The ``zstream`` command's argument types and shared settings: one home for what every subcommand parses."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, List, Optional

from ..errors import ZStreamError

OFFLOAD_CHOICES = ("auto", "none", "cpu", "nvme", "ats")
DTYPE_CHOICES = ("auto", "fp16", "float16", "bf16", "bfloat16", "fp32", "float32")


def cache_dir() -> Path:
    """Where the demo and ``bench`` keep the checkpoints they write (``$ZSTREAM_CACHE``, else ~/.cache/zstream)."""
    base = os.environ.get("ZSTREAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zstream")
    return Path(base)


def size(text: str) -> str:
    """An argparse type: a size zstream can read ("16GiB", "2GB", bytes), kept as text for ``load``."""
    from ..foundations.units import parse_bytes

    try:
        parse_bytes(text)
    except ZStreamError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return text


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def comma_list(item: Callable[[str], Any], choices: Optional[tuple] = None) -> Callable[[str], List[Any]]:
    """An argparse type: a comma-separated list of ``item``s (each one of ``choices``, if given)."""

    def parse(text: str) -> List[Any]:
        out = []
        for part in text.split(","):
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(choices)}")
            out.append(item(part))
        return out

    return parse
