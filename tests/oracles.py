"""Independent reference implementations the tests check the product against.

Written from the documented scheme (``docs`` and the docstring of ``zstream.foundations.quant.scheme``), with numpy
only: nothing here imports zstream, so a bug in the product cannot also be a bug in its oracle.

Group-wise quantization of a (out, in) weight, groups of ``gs`` consecutive inputs per row, float32 arithmetic with
round half to even, fp16 scale (and zero):

    asymmetric:  zero = fp16(min),  scale = fp16((max - zero) / (2**bits - 1)),
                 q = clip(round((w - zero) / scale), 0, 2**bits - 1),  w' = q * scale + zero
    symmetric:   scale = fp16(max|w| / (2**(bits-1) - 1)),  q = clip(round(w / scale), -(2**(bits-1) - 1), ...),
                 stored as q + 2**(bits-1);  w' = (q - 2**(bits-1)) * scale

(a zero scale divides by 1 instead). The packed layout: ``NAME.qcodes`` uint8, int4 codes two a byte with the even
column in the low nibble; ``NAME.qscale`` and (asymmetric only) ``NAME.qzero`` fp16 (out, in / gs).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

PACKED_SUFFIXES = (".qcodes", ".qscale", ".qzero")


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def numpy_dequantize(codes: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray], bits: int,
                     gs: int) -> np.ndarray:
    """float32 (out, in) weight of unpacked uint8 ``codes`` (out, in) and fp16 (or float32) ``scale``/``zero``
    (out, in / gs); ``zero`` None means symmetric."""
    out_f, in_f = codes.shape
    q = codes.astype(np.float32).reshape(out_f, in_f // gs, gs)
    s = scale.astype(np.float32)[..., None]
    w = (q - np.float32(2 ** (bits - 1))) * s if zero is None else q * s + zero.astype(np.float32)[..., None]
    return w.reshape(out_f, in_f)


def numpy_reference(w: np.ndarray, bits: int, gs: int, symmetric: bool):
    """The scheme written again with numpy (float32, round half to even): (codes, scale, zero, dequantized).

    ``codes`` are unpacked uint8 (out, in); ``scale`` and ``zero`` float32 holding fp16 values (``zero`` None when
    symmetric); the dequantized weight float32 (out, in)."""
    out_f, in_f = w.shape
    g = w.astype(np.float32).reshape(out_f, in_f // gs, gs)
    qmax = np.float32(2**bits - 1)
    if symmetric:
        half = np.float32(2 ** (bits - 1))
        scale = _f16(np.abs(g).max(axis=-1) / (half - 1))
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.round(g / safe[..., None]), -(half - 1), half - 1) + half
        zero = None
    else:
        zero = _f16(g.min(axis=-1))
        scale = _f16((g.max(axis=-1) - zero) / qmax)
        safe = np.where(scale == 0, np.float32(1), scale)
        q = np.clip(np.round((g - zero[..., None]) / safe[..., None]), 0, qmax)
    codes = q.reshape(out_f, in_f).astype(np.uint8)
    return codes, scale, zero, numpy_dequantize(codes, scale, zero, bits, gs)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """int4 codes (out, in) -> bytes (out, in / 2): the even column in the low nibble, the odd one in the high."""
    return (codes[:, 0::2] & 0x0F) | ((codes[:, 1::2] & 0x0F) << 4)


def unpack_codes(codes: np.ndarray, bits: int, shape: Tuple[int, int]) -> np.ndarray:
    """Stored uint8 codes -> one code a weight (out, in)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(shape)
    return codes


def unpack(qt) -> np.ndarray:
    """The unpacked (out, in) codes of a QuantizedTensor-like object (``codes``, ``bits``, ``shape``)."""
    return unpack_codes(qt.codes.cpu().numpy(), qt.bits, tuple(qt.shape))


def dequantize_packed(qt) -> np.ndarray:
    """float32 (out, in) weight a QuantizedTensor-like object stands for (its packed bytes read by numpy)."""
    zero = None if qt.zero is None else qt.zero.cpu().numpy()
    return numpy_dequantize(unpack(qt), qt.scale.cpu().numpy(), zero, qt.bits, qt.group_size)


def packed_reference(name: str, w: np.ndarray, bits: int, gs: int, symmetric: bool) -> Dict[str, np.ndarray]:
    """{tensor name: numpy array} of weight ``name`` in the packed layout, as a packed checkpoint must hold it."""
    codes, scale, zero, _ = numpy_reference(w, bits, gs, symmetric)
    out = {name + PACKED_SUFFIXES[0]: pack_nibbles(codes) if bits == 4 else codes,
           name + PACKED_SUFFIXES[1]: scale.astype(np.float16)}
    if zero is not None:
        out[name + PACKED_SUFFIXES[2]] = zero.astype(np.float16)
    return out


def same_array_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and raw bytes (tells -0.0 from 0.0)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
