"""Group-wise int8/int4 quantization: bit-for-bit equal to a plain numpy version of the same scheme."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zstream.errors import QuantizationError
from zstream.foundations.quant import METADATA_KEY, QuantConfig, dequantize, quantize

from oracles import numpy_reference, pack_nibbles, unpack

finite = st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=16)


@st.composite
def weights(draw):
    gs = draw(st.sampled_from([2, 4, 8, 16, 64]))
    out_f, groups = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 100.0]))
    w = draw(st.lists(finite, min_size=out_f * groups * gs, max_size=out_f * groups * gs))
    arr = np.asarray(w, dtype=np.float32).reshape(out_f, groups * gs) * np.float32(scale)
    if draw(st.booleans()):  # an all-equal group, and an all-zero one
        arr[0, :gs] = arr[0, 0]
        arr[-1, -gs:] = 0
    return arr.astype(np.float16).astype(np.float32), gs


@settings(max_examples=300, deadline=None)
@given(wg=weights(), bits=st.sampled_from([4, 8]), symmetric=st.booleans())
def test_bit_for_bit_equal_to_numpy(wg, bits, symmetric):
    w, gs = wg
    qt = quantize(torch.from_numpy(w), bits=bits, group_size=gs, symmetric=symmetric)
    codes, scale, zero, deq = numpy_reference(w, bits, gs, symmetric)
    assert np.array_equal(unpack(qt), codes)
    assert np.array_equal(qt.codes.numpy(), pack_nibbles(codes) if bits == 4 else codes)
    assert np.array_equal(qt.scale.float().numpy(), scale)
    if zero is None:
        assert qt.zero is None
    else:
        assert np.array_equal(qt.zero.float().numpy(), zero)
    got = dequantize(qt, torch.float32).numpy()
    assert np.array_equal(got, deq)
    # And it is a quantization: every value within one step of where it started, plus what fp16 rounding of the
    # zero and of the scale (times up to 2**bits - 1 steps) can add: relative 2**-11, or 2**-25 absolute for a
    # scale in fp16's subnormal range.
    step = np.repeat(scale, gs, axis=-1).reshape(w.shape)
    zero_abs = np.repeat(np.abs(zero), gs, axis=-1).reshape(w.shape) if zero is not None else 0
    slack = (zero_abs + (2**bits - 1) * step) * 2.0**-10 + (2**bits - 1) * 2.0**-24
    assert np.all(np.abs(got - w) <= step + slack + 1e-7)


def test_all_equal_groups_are_exact():
    w = torch.full((3, 64), 0.3125, dtype=torch.float16)
    for bits in (4, 8):
        qt = quantize(w, bits=bits, group_size=64)
        assert torch.equal(dequantize(qt), w)


@pytest.mark.parametrize(("bits", "floor"), [(8, 0.999), (4, 0.98)])
def test_accuracy_on_random_weights(bits, floor):
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    back = dequantize(quantize(w.half(), bits=bits, group_size=64), torch.float32)
    cos = torch.nn.functional.cosine_similarity(w.flatten(), back.flatten(), dim=0).item()
    assert cos >= floor, cos


def test_bytes_per_weight():
    w = torch.randn(256, 1024).half()
    fp16 = w.numel() * 2
    assert quantize(w, bits=4).nbytes / fp16 <= 0.29
    assert quantize(w, bits=8).nbytes / fp16 <= 0.54


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_refused(bad):
    w = torch.zeros(2, 64)
    w[1, 5] = bad
    with pytest.raises(QuantizationError, match="inf or NaN"):
        quantize(w)
    with pytest.raises(QuantizationError, match=r"^cannot quantize a tensor holding inf or NaN: its groups have no "
                                                r"finite range$"):
        quantize(w)


def test_shapes_the_group_size_does_not_divide_are_refused():
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize(torch.zeros(2, 100), group_size=64)
    with pytest.raises(QuantizationError, match=r"\(out, in\) matrix"):
        quantize(torch.zeros(64))
    with pytest.raises(QuantizationError, match="bits"):
        quantize(torch.zeros(2, 64), bits=3)


@pytest.mark.parametrize(("bits", "gs"), [(8, 1), (8, 3), (4, 2)])
def test_the_smallest_and_odd_groups_each_format_allows_equal_numpy(bits, gs):
    w = (np.arange(2 * 6 * gs, dtype=np.float32).reshape(2, 6 * gs) % 7 - 3) * np.float32(0.25)
    qt = quantize(torch.from_numpy(w), bits=bits, group_size=gs)
    assert np.array_equal(unpack(qt), numpy_reference(w, bits, gs, False)[0])
    assert QuantConfig(bits, gs).group_size == gs


@pytest.mark.parametrize(("bits", "gs", "match"), [(8, 0, "does not divide"), (8, -2, "does not divide"),
                                                   (4, 3, "must be even"), (4, 1, "must be even")])
def test_groups_no_format_allows_are_refused(bits, gs, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(torch.zeros(2, 6), bits=bits, group_size=gs)
    with pytest.raises(QuantizationError, match="group_size must be positive"):
        QuantConfig(bits, gs)


def test_a_config_names_itself_and_writes_sorted_metadata():
    assert QuantConfig(4, 32, symmetric=True).describe() == "int4, group 32, symmetric"
    assert QuantConfig(8).describe() == "int8, group 64, asymmetric"
    assert QuantConfig(4, 128, True).to_metadata() == {
        METADATA_KEY: '{"bits": 4, "group_size": 128, "symmetric": true, "version": 1}'}
