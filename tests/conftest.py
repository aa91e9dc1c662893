"""Shared fixtures: checkpoints written on the spot (no weights can be downloaded here)."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest


def write_raw_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    """Write a safetensors file from a raw header dict; `header_len` overrides the length prefix (for corrupt
    files)."""
    js = json.dumps(header).encode()
    n = len(js) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + js + data)
    return path


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Path:
    """A directory on the real disk (not tmpfs), so O_DIRECT paths are exercised where the filesystem allows."""
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


@pytest.fixture
def ctrl_c() -> object:
    """Ctrl-C raises KeyboardInterrupt in this test, as in an interactive Python: a shell that starts pytest in the
    background (``cmd &`` without job control) sets SIGINT to be ignored, and Python keeps an inherited ignore."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


FAMILIES = ("tiny-bloom", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-qwen2")


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One float32 random-weight checkpoint of every family, written once a session: {preset name: path}."""
    import torch

    import zstream

    root = tmp_path_factory.mktemp("families")
    return {name: zstream.make_checkpoint(name, root / name, torch.float32, progress=False) for name in FAMILIES}
