"""Where a checkpoint comes from, and the files beside its weights: config, tokenizer, generation config.

    path = resolve("bigscience/bloom")        # a local directory, or a Hugging Face repo id: cache, then download
    config = read_config(path)
    tokenizer = load_tokenizer(path)           # a transformers tokenizer (chat templates included), or None

``resolve`` follows ``from_pretrained``: a repo id is looked up in the local Hugging Face cache and downloaded when
missing, unless downloading is off (``download=False``, or ``HF_HUB_OFFLINE=1`` when ``download`` is left unset).
Only configs, tokenizer files and safetensors weights are fetched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..errors import CheckpointError, UsageError

# Files besides the weights that travel with a checkpoint (copied by ``zstream pack``; config.json is rewritten).
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "chat_template.jinja", "chat_template.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# config.json key of a checkpoint zstream wrote with random weights (``zstream make-checkpoint``, the demo)
SYNTHETIC_KEY = "zstream_synthetic"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off limits, as ``from_pretrained`` decides it (``HF_HUB_OFFLINE``)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve(model: Union[str, os.PathLike], *, download: Optional[bool] = None,
            revision: Optional[str] = None) -> Path:
    """A local checkpoint directory (or .safetensors file), or a Hugging Face repo id found in the local cache or
    downloaded. ``download``: None follows ``from_pretrained`` (download unless ``HF_HUB_OFFLINE``), True or False
    decide."""
    if not isinstance(model, (str, os.PathLike)):
        raise UsageError(f"model: a checkpoint directory or a Hugging Face repo id, not {type(model).__name__}")
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = os.fspath(model)
    if not _REPO_ID.match(name):
        raise CheckpointError(f"{name}: no such checkpoint directory (and not a Hugging Face repo id like "
                              "'bigscience/bloom')")
    offline = hub_offline()
    local_only = offline if download is None else not download
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=local_only,
                                      allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # huggingface_hub raises several types for "not cached" / offline / missing repo
        if local_only:
            why = "HF_HUB_OFFLINE is set" if download is None else "download=False"
            raise CheckpointError(f"{name}: not in the local Hugging Face cache, and downloading is off ({why}); "
                                  "allow downloads, or give a local directory") from e
        raise CheckpointError(f"{name}: could not download from the Hugging Face hub: {e}") from e


def side_files_dir(path: Union[str, Path]) -> Path:
    """The directory whose config, tokenizer and generation config go with the checkpoint at ``path``: the path
    itself, or the folder of a checkpoint given as its one .safetensors file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_config(path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = Path(path)
    file = side_files_dir(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    return config


def has_tokenizer(path: Union[str, Path]) -> bool:
    folder = side_files_dir(path)
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(path: Union[str, Path]) -> Any:
    """The checkpoint's tokenizer as transformers loads it (``AutoTokenizer``: chat templates, special tokens,
    incremental decoding for streamers), or None if the checkpoint has no tokenizer files."""
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(side_files_dir(path)))
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise CheckpointError(f"{path}: its tokenizer files could not be loaded by transformers' AutoTokenizer: "
                              f"{e}") from e


def is_synthetic(config: Dict[str, Any]) -> bool:
    """Whether zstream wrote this checkpoint with random weights (its text is noise)."""
    return SYNTHETIC_KEY in config


# ---- tensor-parallel layouts (``zstream pack --tensor-parallel N``) ------------------------------------------------
# A directory with ``tensor-parallel.json`` ({"ranks": N, "version": 1}) holds one checkpoint per rank,
# ``rank{r}-of-{N}/``, with that rank's pieces of every block; each shard's header says which rank it belongs to.
TENSOR_PARALLEL_FILE = "tensor-parallel.json"
TENSOR_PARALLEL_KEY = "zstream.tensor_parallel"


def rank_dir_name(rank: int, ranks: int) -> str:
    return f"rank{rank}-of-{ranks}"


def rank_metadata(rank: int, ranks: int) -> Dict[str, str]:
    """The safetensors ``__metadata__`` entry of a rank's shards."""
    return {TENSOR_PARALLEL_KEY: json.dumps({"rank": rank, "ranks": ranks}, sort_keys=True)}


def write_tensor_parallel_marker(path: Path, ranks: int) -> None:
    (path / TENSOR_PARALLEL_FILE).write_text(json.dumps({"ranks": ranks, "version": 1}) + "\n")


def tensor_parallel_ranks(path: Union[str, Path]) -> Optional[int]:
    """How many ranks a checkpoint directory is laid out for; None for a plain checkpoint."""
    file = Path(path) / TENSOR_PARALLEL_FILE
    if not file.is_file():
        return None
    try:
        return int(json.loads(file.read_text())["ranks"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e}); write the layout again with zstream pack") from None


def rank_checkpoint(path: Path, rank: Optional[int], ranks: int) -> Path:
    """The directory rank ``rank`` of ``ranks`` (None: not launched in a group) loads from a tensor-parallel layout;
    UsageError if the launch does not have the ranks the layout was written for."""
    laid_out = tensor_parallel_ranks(path)
    assert laid_out is not None
    if rank is None or ranks != laid_out:
        started = "one process" if rank is None else f"{ranks} ranks"
        raise UsageError(f"{path} is laid out for {laid_out} tensor-parallel ranks (zstream pack --tensor-parallel "
                         f"{laid_out}) and this load runs on {started}: start {laid_out} ranks (torchrun "
                         f"--nproc-per-node {laid_out}, or zstream.launch), or load the checkpoint it was packed from")
    sub = path / rank_dir_name(rank, ranks)
    if not sub.is_dir():
        raise CheckpointError(f"{path}: laid out for {ranks} ranks but {sub.name}/ is missing")
    return sub
