"""zstream.kernels: the Triton dequantization kernel (and its torch fallback) gives the very bits of the scheme
as ``oracles`` writes it in numpy, independently of zstream.

Three layers, so the kernel is checked on a machine without a GPU too:

* the interpreter: Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before Triton is imported) runs
  the kernel itself on CPU tensors. That cannot happen in the pytest process (other tests import Triton
  normally), so ``test_interpreter_*`` run this file as a script in a subprocess, which checks a fixed grid of edge
  cases or hypothesis-drawn ones and exits non-zero, printing the case, on any differing bit;
* the fallback: on CPU tensors ``kernels.dequantize`` is the torch code (``backend`` says "torch");
* the GPU (skipped without CUDA; ``pytest -m gpu tests/test_kernels.py`` on the GPU machine): the compiled kernel
  at bloom-7b1 sizes too, and the PTX: no FMA contraction.

The expected values never come from zstream: each case carries the float32 weight the numpy reference gives
(``oracles.numpy_reference`` of the original weight, or ``oracles.numpy_dequantize`` of random packed bytes), cast
to the output dtype by torch's own round-to-nearest-even cast. So a packing bug in ``quant.quantize`` fails here
too, not only a kernel bug. Equality is on the raw bits (``view(torch.int16)``), so -0.0 vs 0.0 or a last-bit
difference fails. The packed inputs come from ``quant.quantize`` of random, all-equal, all-zero, negative-zero, tiny
and huge weights, and from random bytes (every code value, random finite fp16 scales and zeros: subnormal,
negative, near the fp16 limit, so some outputs overflow to inf), since the kernel must be right on any valid packed
tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zstream
from zstream.foundations.quant import QuantizedTensor, kernels
from zstream.foundations.quant import scheme as quant

from oracles import dequantize_packed, numpy_dequantize, numpy_reference, same_array_bits, unpack_codes

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KINDS = ("randn", "flat", "extreme", "random_bits")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Case(NamedTuple):
    qt: QuantizedTensor  # the packed weight, on the CPU
    want: np.ndarray     # float32 (out, in): what it must dequantize to, from the numpy reference


def make_case(seed: int, out_f: int, in_f: int, bits: int, gs: int, symmetric: bool, kind: str) -> Case:
    """A packed (out_f, in_f) weight on the CPU, and the float32 weight the numpy reference says it stands for.

    ``randn``: quantized Gaussian weights. ``flat``: groups that are all equal, all zero and all -0.0 (scale 0).
    ``extreme``: rows from 1e-6 (subnormal fp16 scales) to the fp16 limit. ``random_bits``: random codes and
    random finite fp16 scales/zeros, not something quantize would make but still a valid packed tensor.
    For the first three the expected weight is ``numpy_reference`` of the original weight (so it also checks
    ``quant.quantize``); for random bits, ``numpy_dequantize`` of the bytes."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random_bits":
        codes = torch.randint(0, 256, (out_f, in_f // 2 if bits == 4 else in_f), generator=g).to(torch.uint8)

        def fp16_bits() -> torch.Tensor:
            t = torch.randint(-(1 << 15), 1 << 15, (out_f, in_f // gs), generator=g).to(torch.int16)
            t = t.view(torch.float16)
            return torch.where(torch.isfinite(t), t, torch.ones_like(t))

        scale, zero = fp16_bits(), None if symmetric else fp16_bits()
        want = numpy_dequantize(unpack_codes(codes.numpy(), bits, (out_f, in_f)), scale.numpy(),
                                None if zero is None else zero.numpy(), bits, gs)
        return Case(QuantizedTensor(codes, scale, zero, (out_f, in_f), bits, gs), want)
    w = torch.randn(out_f, in_f, generator=g)
    if kind == "flat":
        w = w.reshape(out_f, in_f // gs, gs)
        w[:, 0::3] = w[:, 0::3, :1]  # all equal
        w[:, 1::3] = 0.0
        w[:, 2::3] = -0.0
        w = w.reshape(out_f, in_f)
    elif kind == "extreme":
        rows = torch.tensor([1e-6, 3e-5, 1.0, 2e3, 3e4])[torch.arange(out_f) % 5]
        w = (w * rows[:, None]).clamp(-65504, 65504)
    w = w.half().float()
    return Case(quant.quantize(w, bits, gs, symmetric), numpy_reference(w.numpy(), bits, gs, symmetric)[3])


def expected(want: np.ndarray, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """The reference float32 weight in ``dtype``: torch's round-to-nearest-even cast (inf past the fp16 range)."""
    return torch.from_numpy(want).to(dtype).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (dtype, shape and every bit: tells -0.0 from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = torch.int32 if a.element_size() == 4 else torch.int16
    return torch.equal(a.view(view), b.view(view))


def describe(got: torch.Tensor, case: Case, dtype: torch.dtype) -> Optional[str]:
    """None if ``got`` has the bits of the case's reference weight in ``dtype``, else the first difference (and
    whether the packed inputs themselves already differ from the reference, i.e. ``quant.quantize`` is wrong)."""
    want = expected(case.want, dtype, str(got.device))
    if same_bits(got, want):
        return None
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"
    view = torch.int32 if got.element_size() == 4 else torch.int16
    bad = (got.view(view) != want.view(view)).nonzero()
    r, c = bad[0].tolist()
    packed = "" if same_array_bits(dequantize_packed(case.qt), case.want) else " (the packed inputs differ too)"
    return (f"{len(bad)} of {got.numel()} differ{packed}; first at {(r, c)}: got {got[r, c].item()!r} "
            f"want {want[r, c].item()!r}")


def diff(case: Case, dtype: torch.dtype, qt: Optional[QuantizedTensor] = None, **kw: object) -> Optional[str]:
    """None if the kernel (``kernels._triton_dequantize``, ``kw`` its tiling) on ``qt`` (default: the case's, on
    the CPU) gives the reference weight bit for bit, else a description of the first difference."""
    got = kernels._triton_dequantize(case.qt if qt is None else qt, dtype, **kw)  # type: ignore[arg-type]
    return describe(got, case, dtype)


# ---- edge cases: the grid the interpreter worker and the GPU test both run ------------------------------------

# (out, in, group_size, bits): group sizes powers of two and not, one group a row, tiles inside a group, ragged
GRID = [
    (1, 2, 2, 4), (3, 12, 6, 4), (5, 40, 10, 4), (7, 48, 24, 4), (3, 192, 96, 4), (33, 64, 32, 4),
    (4, 256, 128, 4), (2, 512, 256, 4), (9, 64, 64, 4), (1, 8, 2, 4),
    (1, 1, 1, 8), (3, 9, 3, 8), (5, 25, 5, 8), (4, 48, 16, 8), (7, 128, 64, 8), (3, 192, 96, 8), (2, 512, 256, 8),
]


def grid_tilings(n: int, gs: int) -> List[tuple]:
    """(block, broadcast) tilings for a weight of n outputs: the default, one giving a few programs and a ragged
    tail, and (for groups of 64 or more) one smaller than a group; both scale paths for power-of-two groups. Few
    programs each: the interpreter runs them one at a time."""
    few = max(16, 1 << max(0, (n // 3).bit_length() - 1))
    blocks = {kernels.DEFAULT_BLOCK, few} | ({1 << ((gs // 4).bit_length() - 1)} if gs >= 64 else set())
    pow2 = gs & (gs - 1) == 0
    return [(b, bc) for b in sorted(blocks) for bc in ((True, False) if pow2 else (False,))]


def to_device(qt: QuantizedTensor, device: str) -> QuantizedTensor:
    return QuantizedTensor(qt.codes.to(device), qt.scale.to(device), None if qt.zero is None else qt.zero.to(device),
                           qt.shape, qt.bits, qt.group_size)


def run_grid(device: str = "cpu", kinds: tuple = KINDS) -> List[str]:
    """Every GRID case x bits x symmetric x kind: every output dtype at the default tiling, then every tiling (the
    output dtype rotating); the failures."""
    failures = []
    names = sorted(DTYPES)
    for i, (out_f, in_f, gs, bits) in enumerate(GRID):
        for symmetric in (False, True):
            for kind in kinds:
                case = make_case(i, out_f, in_f, bits, gs, symmetric, kind)
                qt = to_device(case.qt, device)
                runs = [(d, None, None) for d in names]
                runs += [(names[j % 3], b, bc) for j, (b, bc) in enumerate(grid_tilings(out_f * in_f, gs))]
                for dname, block, broadcast in runs:
                    d = diff(case, DTYPES[dname], qt, block=block, broadcast=broadcast)
                    if d:
                        failures.append(f"{(out_f, in_f)} g{gs} int{bits} sym={symmetric} {kind} {dname} "
                                        f"block={block} broadcast={broadcast}: {d}")
    return failures


@st.composite
def hyp_cases(draw: st.DrawFn) -> tuple:
    bits = draw(st.sampled_from([4, 8]))
    gs = draw(st.sampled_from([2, 4, 6, 8, 12, 16, 32, 64, 96, 128] + ([1, 3, 7] if bits == 8 else [])))
    out_f, groups = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    pow2 = gs & (gs - 1) == 0
    # small tiles make many programs, which the interpreter runs one by one: keep their number bounded
    blocks = [b for b in (16, 32, 128, 1024, 4096) if out_f * groups * gs // b <= 64]
    return (draw(st.integers(0, 2**31 - 1)), out_f, groups * gs, bits, gs, draw(st.booleans()),
            draw(st.sampled_from(KINDS)), draw(st.sampled_from(sorted(DTYPES))), draw(st.sampled_from(blocks)),
            draw(st.booleans()) and pow2)


def check_hypothesis(examples: int) -> None:
    @settings(max_examples=examples, deadline=None, database=None)
    @given(hyp_cases())
    def check(case: tuple) -> None:
        seed, out_f, in_f, bits, gs, symmetric, kind, dname, block, broadcast = case
        case = make_case(seed, out_f, in_f, bits, gs, symmetric, kind)
        d = diff(case, DTYPES[dname], block=block, broadcast=broadcast)
        assert d is None, d

    check()


def interpreter_worker(mode: str) -> int:
    """Run in a subprocess with TRITON_INTERPRET=1: the kernel on CPU tensors. Exit status 0 iff all bits match."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.HAS_TRITON
    if mode == "grid":
        failures = run_grid("cpu")
        # out=: filled in place and returned; an empty weight launches nothing
        case = make_case(0, 5, 64, 4, 16, False, "randn")
        buf = torch.full((5, 64), float("nan"), dtype=torch.bfloat16)
        if kernels._triton_dequantize(case.qt, torch.bfloat16, buf) is not buf or describe(buf, case, torch.bfloat16):
            failures.append("out= was not filled in place")
        empty = quant.quantize(torch.zeros(0, 64), 4, 64)
        if kernels._triton_dequantize(empty).shape != (0, 64):
            failures.append("empty weight")
        print("\n".join(failures) or f"grid: {len(GRID)} shapes, all bit-identical")
        return 1 if failures else 0
    if mode == "hypothesis":
        check_hypothesis(int(os.environ.get("ZSTREAM_KERNEL_EXAMPLES", "150")))
        print("hypothesis: all bit-identical")
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


def run_worker(mode: str) -> None:
    here = str(Path(zstream.__file__).resolve().parent.parent)  # the zstream this process imported, not the tree
    path = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__, mode], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"interpreter worker {mode} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


# ---- 1. the Triton kernel under the interpreter (CPU, no GPU needed) -------------------------------------------

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not importable")


@needs_triton
def test_interpreter_grid_bit_identical() -> None:
    run_worker("grid")


@needs_triton
def test_interpreter_hypothesis_bit_identical() -> None:
    run_worker("hypothesis")


def test_products_are_exact_so_contraction_cannot_change_bits() -> None:
    """Why FMA contraction does not matter here, though the kernel disables it anyway: a code (at most 8 bits)
    times an fp16 scale (11 significant bits) is exact in float32, so ``q * scale + zero`` has one rounding, in the
    add, whether or not it is fused. Checked against float64 on random codes and random finite fp16 scales: the
    fused result equals the numpy reference's separate float32 multiply and add, and so does the product's."""
    for bits in (4, 8):
        case = make_case(1, 64, 256, bits, 64, False, "random_bits")
        qt = case.qt
        q = qt.codes if bits == 8 else torch.stack([qt.codes & 0xF, qt.codes >> 4], -1).reshape(64, 256)
        q = q.reshape(64, 4, 64)
        exact = q.double() * qt.scale.double()[..., None]
        assert torch.equal(exact.float().double(), exact)
        fused = (exact + qt.zero.double()[..., None]).float().reshape(64, 256)  # one rounding, as an FMA does
        assert describe(fused, case, torch.float32) is None
        assert describe(kernels.dequantize(qt, torch.float32), case, torch.float32) is None


# ---- 2. the fallback on the CPU --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dname", sorted(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_falls_back_to_torch(bits: int, symmetric: bool, dname: str, kind: str) -> None:
    case = make_case(3, 6, 96, bits, 32, symmetric, kind)
    qt, dtype = case.qt, DTYPES[dname]
    assert kernels.backend(qt) == kernels.backend(qt.codes) == "torch"
    d = describe(kernels.dequantize(qt, dtype), case, dtype)
    assert d is None, d
    out = torch.empty(6, 96, dtype=dtype)
    assert kernels.dequantize(qt, dtype, out=out) is out
    d = describe(out, case, dtype)
    assert d is None, d


def test_backend_names_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.backend(torch.device("cpu")) == "torch"
    assert kernels.backend(torch.device("cuda")) == ("triton" if kernels.HAS_TRITON else "torch")
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert kernels.backend(torch.device("cuda")) == "torch"


def test_bad_arguments_are_refused() -> None:
    qt = make_case(0, 4, 64, 4, 16, False, "randn").qt
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize(qt, out=torch.empty(4, 63, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize(qt, torch.float16, out=torch.empty(4, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.dequantize(qt, out=torch.empty(64, 4, dtype=torch.float16).t())
    bad = QuantizedTensor(qt.codes[:, :-1], qt.scale, qt.zero, qt.shape, 4, 16)
    with pytest.raises(ValueError, match="codes must be"):
        kernels._triton_dequantize(bad)
    with pytest.raises(ValueError, match="dtype"):
        kernels._triton_dequantize(qt, torch.int32)
    strided = torch.empty(4, 64, dtype=torch.uint8)[:, ::2]
    with pytest.raises(AssertionError, match="contiguous"):
        kernels._triton_dequantize(QuantizedTensor(strided, qt.scale, qt.zero, qt.shape, 4, 16))


# ---- 3. the compiled kernel on a GPU ---------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
def test_gpu_grid_bit_identical() -> None:
    assert kernels.backend(torch.device("cuda")) == "triton"
    failures = run_grid("cuda")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("kind", ["randn", "random_bits"])
def test_gpu_bloom_sizes_bit_identical(bits: int, symmetric: bool, kind: str) -> None:
    """A bloom-7b1 dense_4h_to_h-shaped weight (4096, 16384): many programs, the default tiling, both dtypes; the
    kernel gives the reference's bits, and so does the torch code on the GPU."""
    case = make_case(7, 4096, 16384, bits, 64, symmetric, kind)
    dev = to_device(case.qt, "cuda")
    for dtype in (torch.float16, torch.bfloat16):
        d = describe(kernels.dequantize(dev, dtype), case, dtype)
        assert d is None, d
        d = describe(quant.dequantize(dev, dtype), case, dtype)
        assert d is None, d


@pytest.mark.gpu
@gpu
def test_gpu_runs_on_the_current_stream() -> None:
    """The launch follows torch's current stream: inputs made on a busy side stream are read after they are made
    there (a launch on another stream would race ahead of the copies and the NaN fill)."""
    case = make_case(2, 1024, 4096, 4, 64, False, "randn")
    qt = case.qt
    src = [t.cuda() for t in (qt.codes, qt.scale, qt.zero)]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms of GPU time queued ahead of the inputs
        codes, scale, zero = (t.clone() for t in src)
        out = torch.full(qt.shape, float("nan"), dtype=torch.float16, device="cuda")
        kernels.dequantize(QuantizedTensor(codes, scale, zero, qt.shape, 4, 64), out=out)
    side.synchronize()
    d = describe(out, case, torch.float16)
    assert d is None, d


@pytest.mark.gpu
@gpu
def test_gpu_kernel_has_no_fma() -> None:
    """The PTX of the asymmetric kernel multiplies and adds separately (``enable_fp_fusion=False``), as torch does.
    Compiled with fusion allowed, it contracts to FMA and, the products being exact, still gives the same bits."""
    case = make_case(4, 2048, 4096, 4, 64, False, "random_bits")
    dev = to_device(case.qt, "cuda")
    out = torch.empty(case.qt.shape, dtype=torch.float32, device="cuda")
    ptx = kernels._launch(dev, out).asm["ptx"]
    assert "fma." not in ptx and "mul.rn.f32" in ptx and "add.rn.f32" in ptx
    assert describe(out, case, torch.float32) is None
    fused = torch.empty_like(out)
    fused_ptx = kernels._launch(dev, fused, fp_fusion=True).asm["ptx"]
    assert same_bits(fused, out), "an FMA changed bits: the products are not exact after all"
    if "fma.rn.f32" not in fused_ptx:
        pytest.skip("this Triton did not contract even with fusion allowed")


if __name__ == "__main__":
    sys.exit(interpreter_worker(sys.argv[1]))
