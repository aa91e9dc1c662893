"""Units: byte sizes (parsed and printed) and dtypes (by every name zstream reads or writes). One home for each.

    parse_bytes("16GiB") == 16 * 2**30; parse_bytes("2GB") == 2 * 10**9; parse_bytes(None) is None
    fmt_bytes(12_080_000_000) == "11.3 GiB"
    parse_dtype("bf16") is torch.bfloat16; parse_dtype("auto") is None
    torch_dtype("F16") is torch.float16; safetensors_dtype(torch.float16) == "F16"
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch

from ..errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, float, str, None], *, what: str = "size") -> Optional[int]:
    """``20 * 2**30``, ``"20GiB"``, ``"16 GB"``, ``"512MiB"`` -> bytes (KB/MB/GB are powers of ten, KiB/MiB/GiB
    powers of two, as in transformers' ``max_shard_size``); None stays None. ``what`` names the argument in the
    error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{what}: cannot read {value!r} as a size: use bytes or e.g. '20GiB', '16GB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UsageError(f"{what}: a size cannot be negative, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what}: cannot read {value!r} as a size: use bytes or e.g. '20GiB', '16GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_params(n: int) -> str:
    """A parameter count as model cards write it: ``7_069_016_064`` -> ``"7.07B"``, ``560_000`` -> ``"0.56M"``."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def fmt_bytes(n: Optional[float]) -> str:
    """``12_080_000_000`` -> ``"11.3 GiB"``; None -> ``"unlimited"``."""
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- dtypes -----------------------------------------------------------------------------------------------------

# safetensors header names -> torch dtypes (only those this torch has)
_SAFETENSORS = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
# safetensors dtypes that DLPack carries as raw bytes, viewed as the torch dtype afterwards
VIEWED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})

# what people type (and config.json "torch_dtype"/"dtype" holds) -> the floating dtypes zstream computes in
_FLOAT_NAMES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "f32": torch.float32,
}
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("F16" -> torch.float16)."""
    dt = _SAFETENSORS.get(name)
    if dt is None:
        raise TypeError(f"this torch ({torch.__version__}) has no dtype for safetensors {name}")
    return dt


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (torch.float16 -> "F16")."""
    for name, dt in _SAFETENSORS.items():
        if dt is dtype:
            return name
    raise TypeError(f"safetensors has no name for {dtype}")


def parse_dtype(value: Union[str, torch.dtype, None], *, what: str = "dtype") -> Optional[torch.dtype]:
    """A compute dtype from what transformers users type: ``torch.float16``, ``"fp16"``, ``"float16"``,
    ``"torch.bfloat16"``, ``"bf16"``, ``"float32"``...; None or ``"auto"`` -> None (the checkpoint's own)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, torch.dtype):
        if value not in COMPUTE_DTYPES:
            raise UsageError(f"{what}: zstream computes in float16, bfloat16 or float32, not {value}")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _FLOAT_NAMES:
            return _FLOAT_NAMES[key]
    raise UsageError(f"{what}: unknown dtype {value!r}: use 'auto', 'fp16'/'float16', 'bf16'/'bfloat16', "
                     f"'fp32'/'float32' or a torch dtype")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as config.json writes it)."""
    return str(dtype).removeprefix("torch.")
