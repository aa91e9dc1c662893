"""Units: sizes and dtypes by every name people type; each bad value is one UsageError naming it."""

from __future__ import annotations

import pytest
import torch

from zstream.errors import UsageError
from zstream.foundations.units import fmt_bytes, fmt_params, parse_bytes, parse_dtype, safetensors_dtype, torch_dtype


@pytest.mark.parametrize(("text", "want"), [
    ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), (" 1.5 kb ", 1500), ("16 GiB", 16 * 2**30), ("7", 7),
    ("1tb", 10**12), ("3K", 3000), (123, 123), (2.5e9, 2_500_000_000), (None, None),
])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "", "GiB", -1, True, [16]])
def test_parse_bytes_refuses_naming_the_value(bad):
    with pytest.raises(UsageError, match="gpu_memory") as e:
        parse_bytes(bad, what="gpu_memory")
    assert isinstance(e.value, ValueError)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * 2**20, "1.5 GiB"),
                                         (12_080_000_000, "11.3 GiB"), (3 * 2**40, "3.0 TiB"), (None, "unlimited")])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


@pytest.mark.parametrize(("value", "want"), [
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16), ("torch.float16", torch.float16),
    ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp32", torch.float32), ("float", torch.float32),
    (torch.bfloat16, torch.bfloat16), ("auto", None), (None, None),
])
def test_parse_dtype(value, want):
    assert parse_dtype(value) is want


@pytest.mark.parametrize("bad", ["fp8", "int8", torch.int8, torch.float64, 16])
def test_parse_dtype_refuses(bad):
    with pytest.raises(UsageError, match="dtype"):
        parse_dtype(bad)


def test_safetensors_names_round_trip():
    for name in ("F16", "BF16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL"):
        assert safetensors_dtype(torch_dtype(name)) == name
    with pytest.raises(TypeError, match="F99"):
        torch_dtype("F99")


@pytest.mark.parametrize(("n", "text"), [(7_069_016_064, "7.07B"), (176_247_271_424, "176.25B"),
                                         (100_000_000, "0.10B"), (99_999_999, "100.00M"), (560_000, "0.56M"),
                                         (94_000, "0.09M")])
def test_fmt_params(n, text):
    assert fmt_params(n) == text
