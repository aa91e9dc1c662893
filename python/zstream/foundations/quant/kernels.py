"""Device-side dequantization of ``quant.scheme`` packed weights: one Triton kernel, bit-identical to the torch code.

The streaming engine copies a block's packed bytes into a GPU slot and must turn them back into fp16/bf16
weights before the block's matmuls, while the next block's bytes are crossing the link. The int4 bloom-7b1 block
(201M parameters) crosses an H100's link in about 2 ms, so dequantization has to be a small fraction of that:
it is a pure streaming operation (read 0.5 or 1 byte a weight plus the group's scale/zero, write 2 bytes), and
the kernel is written to run at memory bandwidth.

Kernel layout
-------------
The weight is treated as one flat array of ``out * in`` outputs. That is exact because a group never straddles
two rows (``group_size`` divides ``in``): output element ``e`` belongs to group ``e // group_size`` of the flat
``(out, in / group_size)`` scale array, and its code is byte ``e`` (int8) or the low (even ``e``) / high (odd
``e``) nibble of byte ``e // 2`` (int4). So no row/column index math is needed, any row length works, and one
1-D grid covers every shape; the ragged last tile is masked.

Each program owns ``BLOCK`` consecutive outputs (a power of two; 4096 by default):

* codes: one contiguous load of ``BLOCK`` (int8) or ``BLOCK / 2`` (int4) bytes, so each thread reads 16 bytes at
  once. int4 bytes are split into ``c & 0xF`` and ``c >> 4`` and interleaved (``tl.join`` + ``reshape``) so the
  low nibble lands on the even output column, the high one on the odd column, still in registers;
* scale/zero, when ``group_size`` is a power of two: one load of the tile's ``BLOCK / group_size`` groups (or the
  one group that holds the tile, when the group is longer than the tile), broadcast over a ``(groups, group)``
  view of the tile. Any other group size (e.g. 96) takes a per-element gather ``scale[e // group_size]``, which
  hits L1 (all of a tile's groups are a few hundred bytes);
* arithmetic: float32, exactly the operations of ``scheme.dequantize`` in the same order, ``q * scale + zero``
  (asymmetric) or ``(q - 2**(bits-1)) * scale`` (symmetric), then one round-to-nearest-even cast to the output
  dtype. The launch passes ``enable_fp_fusion=False`` so ``q * scale + zero`` stays a ``mul.rn`` and an
  ``add.rn`` (the GPU test reads the PTX), rounding where torch rounds. Contraction would in fact be harmless
  here: a code (<= 8 bits) times an fp16 scale (11 significant bits) is exact in float32, so the add is the only
  rounding either way (``test_products_are_exact_so_contraction_cannot_change_bits``; on an H100 the FMA build
  gave the same bits too). The flag keeps bit-identity from resting on that argument if the formula changes.
  Every output is bit-identical to the torch path, for float16, bfloat16 and float32;
* stores: ``BLOCK`` contiguous outputs, 16-byte vector stores.

Offsets are 64-bit at the tile base (``program_id * BLOCK``) and 32-bit inside a tile, so weights past 2**31
elements work without paying for 64-bit vector index math.

``dequantize`` runs the Triton kernel for CUDA tensors when Triton imports, and falls back to
``scheme.dequantize`` everywhere else (CPU tensors, no Triton); ``backend`` says which one a tensor gets.
A fused dequantize-and-matmul for decode was tried twice and taken out (docs/quantization.md says what was
measured and why neither stayed): a link-bound step does not get shorter from it.
``_triton_dequantize`` runs the kernel unconditionally: with ``TRITON_INTERPRET=1`` set before Triton is
imported, Triton's interpreter runs it on CPU tensors, which is how ``tests/test_kernels.py`` checks the kernel's
bits on a machine without a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import scheme
from .scheme import QuantizedTensor

try:  # Triton is optional: without it (CPU-only installs, macOS) everything runs through the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "backend", "dequantize"]

HAS_TRITON = triton is not None

# Output elements per program and warps per program. 4096 outputs over 4 warps is 32 outputs a thread: one 16-byte
# load of int4 codes (two of int8) and four 16-byte fp16 stores. Measured while tuning, with benches/dequant_bench.py
# on an H100 (torch 2.11, Triton 3.6; group 64, fp16 out; these tuning runs are not kept in benches/results, run 15's
# is: 0.31 ms for the int4 block), a bloom-7b1 block: int4 0.19 ms (2.1 TB/s of output, 2.7 TB/s
# moved: 91% of a 3.0 TB/s device-to-device copy), int8 0.23 ms; the torch code 3.2 / 2.7 ms. Every block size
# from 1024 to 16384 at 4 or 8 warps was within 3% of this one, except 1024 at 8 warps (-18%); the per-element
# scale gather (--gather) was 10-20% slower at these sizes and up to 2x slower at 8192+, hence per-group loads for
# power-of-two groups.
DEFAULT_BLOCK = 4096
DEFAULT_WARPS = 4

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def backend(t: Union[Tensor, QuantizedTensor, torch.device]) -> str:
    """``"triton"`` if ``dequantize`` would run the Triton kernel for data on ``t``'s device, else ``"torch"``.

    Tests and benches use it to know which path they are measuring, since the fallback is silent by design (a
    CPU-only install must keep working, just slower)."""
    if isinstance(t, QuantizedTensor):
        t = t.codes
    device = t.device if isinstance(t, Tensor) else torch.device(t)
    return "triton" if HAS_TRITON and device.type == "cuda" else "torch"


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16, out: Optional[Tensor] = None) -> Tensor:
    """The (out, in) weight ``qt`` stands for, in ``dtype``: bit-identical to ``scheme.dequantize``.

    On CUDA with Triton, one kernel launch on the current stream; otherwise the torch code. ``out``, if given,
    must be a contiguous (out, in) tensor of ``dtype`` on ``qt``'s device; it is filled and returned."""
    if backend(qt) == "triton":
        return _triton_dequantize(qt, dtype, out)
    w = scheme.dequantize(qt, dtype)
    if out is None:
        return w
    _check_out(qt, dtype, out)
    return out.copy_(w)


def _check_out(qt: QuantizedTensor, dtype: torch.dtype, out: Tensor) -> None:
    if out.shape != torch.Size(qt.shape) or out.dtype != dtype or out.device != qt.codes.device:
        raise ValueError(f"out must be a {tuple(qt.shape)} {dtype} tensor on {qt.codes.device}, not "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _check(qt: QuantizedTensor, dtype: torch.dtype) -> Tuple[int, int]:
    """Validate what the kernel relies on; returns (out, in)."""
    out_f, in_f = qt.shape
    gs = qt.group_size
    if qt.bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {qt.bits}")
    if gs <= 0 or in_f % gs or (qt.bits == 4 and gs % 2):
        raise ValueError(f"group_size {gs} must divide in={in_f} (and be even for int4)")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {_OUT_DTYPES}, not {dtype}")
    codes_shape = (out_f, in_f // 2) if qt.bits == 4 else (out_f, in_f)
    groups = (out_f, in_f // gs)
    if tuple(qt.codes.shape) != codes_shape or qt.codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 {codes_shape}, not {qt.codes.dtype} {tuple(qt.codes.shape)}")
    for name, t in (("scale", qt.scale), ("zero", qt.zero)):
        if t is None:
            continue
        if tuple(t.shape) != groups or t.dtype != torch.float16:
            raise ValueError(f"{name} must be float16 {groups}, not {t.dtype} {tuple(t.shape)}")
        if t.device != qt.codes.device:
            raise ValueError(f"{name} is on {t.device}, codes on {qt.codes.device}")
    # The kernel indexes the packed tensors as flat arrays: views with strides would be read wrongly.
    assert qt.codes.is_contiguous() and qt.scale.is_contiguous(), "packed tensors must be contiguous"
    assert qt.zero is None or qt.zero.is_contiguous(), "packed tensors must be contiguous"
    return out_f, in_f


def _triton_dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float16, out: Optional[Tensor] = None, *,
                       block: Optional[int] = None, num_warps: Optional[int] = None,
                       broadcast: Optional[bool] = None) -> Tensor:
    """Run the Triton kernel whatever the device (CPU tensors only under ``TRITON_INTERPRET=1``).

    ``block`` (outputs a program, a power of two), ``num_warps`` and ``broadcast`` (per-group scale loads rather
    than a per-element gather; only for power-of-two group sizes) exist for the tests and the tuning bench."""
    out_f, in_f = _check(qt, dtype)
    if out is None:
        out = torch.empty((out_f, in_f), dtype=dtype, device=qt.codes.device)
    else:
        _check_out(qt, dtype, out)
    _launch(qt, out, block=block, num_warps=num_warps, broadcast=broadcast)
    return out


def _launch(qt: QuantizedTensor, out: Tensor, *, block: Optional[int] = None, num_warps: Optional[int] = None,
            broadcast: Optional[bool] = None, fp_fusion: bool = False) -> object:
    """Launch the kernel on checked arguments; returns Triton's compiled kernel (None when there was nothing to do)
    so the GPU tests can read its PTX. ``fp_fusion=True`` exists only for the test that shows why it is off."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not importable")
    n = out.numel()
    if n == 0:
        return None
    gs = qt.group_size
    block = DEFAULT_BLOCK if block is None else block
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, not {block}")
    pow2 = gs & (gs - 1) == 0
    broadcast = pow2 if broadcast is None else broadcast
    if broadcast and not pow2:
        raise ValueError(f"broadcast scale loads need a power-of-two group size, not {gs}")
    groups_per_block, group_in_block = (block // gs, gs) if gs <= block else (1, block)
    zero = qt.zero if qt.zero is not None else qt.scale  # a valid pointer; never read when HAS_ZERO is false
    return _dequant_kernel[(triton.cdiv(n, block),)](
        qt.codes, qt.scale, zero, out, n,
        BITS=qt.bits, GROUP_SIZE=gs, HAS_ZERO=qt.zero is not None, BLOCK=block,
        BROADCAST=broadcast, GROUPS_PER_BLOCK=groups_per_block, GROUP_IN_BLOCK=group_in_block,
        num_warps=DEFAULT_WARPS if num_warps is None else num_warps,
        enable_fp_fusion=fp_fusion,  # off: q * scale + zero rounds where torch's mul and add round
    )


if HAS_TRITON:

    @triton.jit
    def _dequant_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, n,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr,
                        BROADCAST: tl.constexpr, GROUPS_PER_BLOCK: tl.constexpr, GROUP_IN_BLOCK: tl.constexpr):
        """Outputs [pid * BLOCK, pid * BLOCK + BLOCK) of the flat (out * in) weight (see the module docstring)."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        remaining = tl.minimum(n - start, BLOCK).to(tl.int32)  # outputs this tile really has (ragged last tile)
        offs = tl.arange(0, BLOCK)
        if BITS == 4:
            b = tl.arange(0, BLOCK // 2)
            c = tl.load(codes_ptr + start // 2 + b, mask=b < remaining // 2, other=0)  # n is even for int4
            q = tl.reshape(tl.join(c & 0xF, c >> 4), (BLOCK,))  # even column <- low nibble, odd <- high
        else:
            q = tl.load(codes_ptr + start + offs, mask=offs < remaining, other=0)
        q = q.to(tl.float32)
        if not HAS_ZERO:
            q = q - (1 << (BITS - 1))  # exact in float32
        if BROADCAST:
            # GROUP_SIZE is a power of two, so tiles and groups nest: a tile holds GROUPS_PER_BLOCK whole groups,
            # or lies inside one group (GROUPS_PER_BLOCK == 1, GROUP_IN_BLOCK == BLOCK).
            g = tl.arange(0, GROUPS_PER_BLOCK)
            gmask = g * GROUP_IN_BLOCK < remaining
            g0 = start // GROUP_SIZE
            s = tl.load(scale_ptr + g0 + g, mask=gmask, other=0).to(tl.float32)
            w = tl.reshape(q, (GROUPS_PER_BLOCK, GROUP_IN_BLOCK)) * s[:, None]
            if HAS_ZERO:
                z = tl.load(zero_ptr + g0 + g, mask=gmask, other=0).to(tl.float32)
                w = w + z[:, None]
            w = tl.reshape(w, (BLOCK,))
        else:
            # Any group size: each output gathers its group's scale (a tile's groups are a few cached lines).
            g0 = start // GROUP_SIZE
            g = (start % GROUP_SIZE).to(tl.int32) + offs
            g = g // GROUP_SIZE
            mask = offs < remaining
            s = tl.load(scale_ptr + g0 + g, mask=mask, other=0).to(tl.float32)
            w = q * s
            if HAS_ZERO:
                w = w + tl.load(zero_ptr + g0 + g, mask=mask, other=0).to(tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:  # noqa: SIM108 (a compile-time branch, kept explicit)
            w = _to_bf16_rtne(w)
        else:
            w = w.to(out_ptr.dtype.element_ty)  # float16: round to nearest even (or float32: no-op)
        tl.store(out_ptr + start + offs, w, mask=offs < remaining)

    @triton.jit
    def _to_bf16_rtne(x):
        """float32 -> bfloat16, round to nearest even, by integer arithmetic on the bits.

        What the hardware cast does, and what torch does, for every finite input (overflow rounds to inf); spelled
        out because Triton's interpreter truncates in its fp32 -> bf16 cast, and the tests that check this kernel
        without a GPU run it there. It costs a few integer ops on data the kernel is bandwidth-bound on."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
