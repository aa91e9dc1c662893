"""Lossless coding: bit-exactness, not closeness. Arbitrary 16-bit patterns and real-shaped weights round-trip
through the native coder and the Triton decoder (in Triton's interpreter, on the CPU); the code's size sits at the
exponents' entropy, computed independently with numpy; models loaded with compress="lossless" give the logits and
tokens of the uncompressed model, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zstream
from zstream import QuantizationError, UsageError
from zstream.foundations.lossless import codec, encode, kernels
from zstream.foundations.lossless.codec import decode_host

from tiny_models import padded_batch

ROOT = Path(__file__).resolve().parent.parent


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _special(t: torch.Tensor) -> torch.Tensor:
    """NaNs, infinities, signed zeros, subnormals and the largest values, at the front of ``t``."""
    specials = {torch.bfloat16: [0x7FC1, 0xFF80, 0x7F80, 0x8000, 0x0000, 0x0001, 0x807F, 0x7F7F, 0x00FF],
                torch.float16: [0x7E01, 0xFC00, 0x7C00, 0x8000, 0x0000, 0x0001, 0x83FF, 0x7BFF, 0x03FF]}[t.dtype]
    out = t.clone()
    _bits(out).view(-1)[: len(specials)] = torch.tensor(specials, dtype=torch.int32).to(torch.int16)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3000), st.sampled_from([torch.bfloat16, torch.float16]))
def test_any_bit_patterns_round_trip(words: list, dtype: torch.dtype) -> None:
    t = torch.tensor(words, dtype=torch.int32).to(torch.int16).view(dtype)
    assert torch.equal(_bits(decode_host(encode(t))), _bits(t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian", "student-t"])
def test_real_shaped_weights_round_trip_at_their_entropy(dtype: torch.dtype, dist: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 4096, generator=g) if dist == "gaussian" else \
        torch.distributions.StudentT(3.0).sample((1024, 4096))
    w = _special((0.02 * w).to(dtype))
    c = encode(w)
    assert c.shape == (1024, 4096) and c.lanes == w.numel() // codec.ELEMENTS_PER_LANE
    assert torch.equal(_bits(decode_host(c)), _bits(w))
    # the independent bound: 8 raw bits + the entropy of the symbol (bits 14..7) per element, from numpy
    sym = (w.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF
    p = np.bincount(sym.ravel(), minlength=256) / sym.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    bound = (8 + entropy) / 16
    ratio = c.nbytes / (w.numel() * 2)
    assert bound <= ratio < bound + 0.015  # Huffman's integer lengths, the offsets and the table
    if dtype == torch.bfloat16:
        assert ratio <= (0.675 if dist == "gaussian" else 0.69)  # DFloat11's 0.675 / 0.690 on such tensors


def test_headers_of_other_code_versions_are_refused_by_name() -> None:
    """A checkpoint packed by another version of the code (format 1 had a 4096-entry table and one element a lane a
    step, format 2 lanes of 512 elements) must not be decoded as this one: its header is refused, naming what it
    holds and the fix."""
    assert codec.from_metadata(codec.to_metadata(torch.bfloat16), "m") == torch.bfloat16
    assert codec.from_metadata({}, "m") is None
    for version in (1, 2):  # 2: lanes of 512 elements with word offsets
        old = {codec.METADATA_KEY: f'{{"codec": "huffman-exponent", "dtype": "bfloat16", "version": {version}}}'}
        with pytest.raises(zstream.CheckpointError, match=r"m: compressed as .*re-run zstream pack"):
            codec.from_metadata(old, "m")
    # parts whose offsets do not fit the lanes of their element count (format 2 had lanes + 1 word offsets)
    c = encode(torch.zeros(4096, dtype=torch.bfloat16))
    assert c.lanes == 32 and c.offsets.numel() == 1 + 16
    with pytest.raises(zstream.CheckpointError, match="4096 elements has 33 offset words; 32 lanes take 17"):
        codec.CodedTensor(c.words, torch.zeros(33, dtype=torch.int32), c.raw, c.table, c.dtype)
    with pytest.raises(zstream.CheckpointError, match="unreadable"):
        codec.from_metadata({codec.METADATA_KEY: "{"}, "m")


def test_refuses_other_dtypes_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="bfloat16 or float16"):
        encode(torch.zeros(8, dtype=torch.float32))
    with pytest.raises(UsageError, match="compress must be 'lossless'"):
        zstream.load(tmp_path, compress="zip")
    with pytest.raises(UsageError, match="give one of them"):
        zstream.load(tmp_path, compress="lossless", quantize="int4")


# ---- the Triton decoder, in Triton's interpreter -------------------------------------------------------------------
def interpreter_worker() -> int:
    """In a subprocess with TRITON_INTERPRET=1: the kernel's output against the original bits."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.HAS_TRITON
    failures = []
    g = torch.Generator().manual_seed(1)
    for shape, dtype in [((1,), torch.bfloat16), ((37,), torch.float16), ((30, 70), torch.bfloat16),
                         ((2, 1024), torch.float16), ((1, 2051), torch.bfloat16)]:
        w = _special((0.02 * torch.randn(*shape, generator=g)).to(dtype)) if len(shape) > 1 or shape[0] > 9 else \
            (0.02 * torch.randn(*shape, generator=g)).to(dtype)
        for block in (1, 64):  # ~16 elements a lane: the interpreter runs one step per run of a lane
            got = kernels.triton_decode(encode(w, lanes=max(1, w.numel() // 16)), block=block)
            if not torch.equal(_bits(got), _bits(w)):
                failures.append(f"{shape} {dtype} block {block}")
    # many codes 12 bits long (the table's limit) met at every refill level: 16 common symbols 256x as frequent as
    # 240 rare ones, whose codes come out 12 bits long (5.5% of the elements)
    weights = torch.tensor([256.0] * 16 + [1.0] * 240, dtype=torch.float64)
    sym = torch.multinomial(weights, 65536, replacement=True, generator=g).to(torch.int32)
    low = torch.randint(0, 256, (65536,), generator=g, dtype=torch.int32)
    w = (((low & 0x80) << 8) | (sym << 7) | (low & 0x7F)).to(torch.int16).view(torch.bfloat16)
    c = encode(w, lanes=4096)
    if int(c.table[12]) - int(c.table[11]) < 200:  # codes of 12 bits: one 12-bit window each, below table[12]
        failures.append("the case has too few 12-bit codes")
    if not torch.equal(_bits(kernels.triton_decode(c, block=64)), _bits(w)):
        failures.append("12-bit codes")
    out = torch.empty(30, 70, dtype=torch.bfloat16)
    w = (0.02 * torch.randn(30, 70, generator=g)).to(torch.bfloat16)
    if kernels.triton_decode(encode(w, lanes=100), out) is not out or not torch.equal(_bits(out), _bits(w)):
        failures.append("out= was not filled in place")
    # several tensors in one launch, as a block's weights are decoded: whole steps even and odd in number, runs cut
    # short at the end, more lanes than a program holds, and an output that is not 8-byte aligned
    ws = [(0.02 * torch.randn(n, generator=g)).to(torch.float16) for n in (4 * 7 * 2, 4 * 7 * 3, 4 * 7 * 3 + 5, 301)]
    coded = [encode(x, lanes=7) for x in ws[:3]] + [encode(ws[3], lanes=75)]
    outs = [torch.empty_like(x) for x in ws[:3]] + [torch.empty(ws[3].numel() + 1, dtype=torch.float16)[1:]]
    kernels.decode_many(coded, outs, kernel=True, block=16)
    failures += [f"decode_many: tensor {i}" for i, (x, o) in enumerate(zip(ws, outs))
                 if not torch.equal(_bits(o), _bits(x))]
    print("\n".join(failures) or "all bit-identical")
    return 1 if failures else 0


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="Triton is not importable")
def test_triton_decoder_is_bit_identical_in_the_interpreter() -> None:
    here = str(Path(zstream.__file__).resolve().parent.parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([here, str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ---- models --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bf16 Llama-family checkpoints (what the code is for) and fp16 BLOOM/OPT (fewer bits to win)."""
    root = tmp_path_factory.mktemp("lossless")
    wide = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}  # weights of 64K elements
    specs = {"tiny-llama": (wide, torch.bfloat16), "tiny-mistral": ({**wide, "head_dim": 64}, torch.bfloat16),
             "tiny-qwen2": (wide, torch.bfloat16), "tiny-bloom": ({"hidden_size": 256, "n_head": 4}, torch.float16),
             "tiny-opt": ({"hidden_size": 256, "ffn_dim": 1024, "word_embed_proj_dim": 256}, torch.float16)}
    return {name: zstream.make_checkpoint({**zstream.PRESETS[name], **extra}, root / name, dtype, progress=False)
            for name, (extra, dtype) in specs.items()}


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-bloom", "tiny-opt"])
@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_compressed_models_are_bit_identical(checkpoints: dict, name: str, offload: str) -> None:
    path = checkpoints[name]
    ids, mask = padded_batch(vocab=300, lengths=(9, 6, 3))
    kw = {"device": "cpu", "offload": offload, "progress": False, "dtype": "auto"}
    if offload == "cpu":
        kw["max_resident_blocks"] = 0
    with zstream.load(path, **kw) as plain, zstream.load(path, compress="lossless", **kw) as coded:
        assert coded.quant is not None and coded.plan.quantization.startswith("lossless")
        assert torch.equal(coded(ids, mask), plain(ids, mask))
        want = plain.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
        assert torch.equal(coded.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False), want)
        # a block's coded weights decode to the checkpoint's bits, as the store reads them
        names = coded.family.block_tensors(0)
        ref = coded.store.read([names[local] for local in coded.quant.shapes])
        coded.blocks.begin_pass(1)
        w = coded.blocks.acquire(0)
        for local in coded.quant.shapes:  # (decoded, then widened exactly to the compute dtype)
            assert w[local].dtype == coded.dtype
            assert torch.equal(w[local], ref[names[local]].to(coded.dtype)), local
        del w
        coded.blocks.release(0)
        coded.blocks.reset()
        if offload == "cpu":
            before = sum(coded.plan.unquantized_block_bytes)
            assert coded.plan.streamed_bytes < before and "compressed lossless" in coded.plan.summary()


def test_compress_needs_16_bit_weights_and_memory(tmp_path: Path) -> None:
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "f32", torch.float32, progress=False)
    with pytest.raises(QuantizationError, match="bfloat16 or float16"):
        zstream.load(path, device="cpu", compress="lossless", progress=False)
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "b16", torch.bfloat16, progress=False)
    with pytest.raises(QuantizationError, match="no linear weight has the 16384 elements"):  # 64 x 128 at most
        zstream.load(path, device="cpu", compress="lossless", progress=False)
    config = {**zstream.PRESETS["tiny-llama"], "hidden_size": 256, "intermediate_size": 512}
    path = zstream.make_checkpoint(config, tmp_path / "wide", torch.bfloat16, progress=False)
    with pytest.raises(QuantizationError, match="compress='lossless' codes blocks while loading"):
        zstream.load(path, device="cpu", compress="lossless", offload="nvme", progress=False)


if __name__ == "__main__":
    sys.exit(interpreter_worker())


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_a_packed_compressed_checkpoint_streams_from_disk_bit_for_bit(checkpoints: dict, tmp_path: Path) -> None:
    """``zstream pack --compress lossless``: the coded parts on disk, streamed as they are with offload="nvme"
    (and cpu); logits and tokens those of the original checkpoint; fewer bytes a pass."""
    from zstream.interfaces.cli import main

    src = checkpoints["tiny-llama"]
    out = tmp_path / "coded"
    assert main(["pack", str(src), str(out), "--compress", "lossless", "--quiet"]) == 0
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    kw = {"device": "cpu", "offload": "nvme", "progress": False, "dtype": "auto"}
    with zstream.load(src, **kw) as plain, zstream.load(out, **kw) as coded:
        assert coded.facts.packed and coded.quant is not None
        assert coded.plan.streamed_bytes < 0.8 * plain.plan.streamed_bytes
        assert torch.equal(coded(ids), plain(ids))
        assert torch.equal(coded.generate(ids, max_new_tokens=20, do_sample=False),
                           plain.generate(ids, max_new_tokens=20, do_sample=False))
    with pytest.raises(QuantizationError, match="is compressed"):
        zstream.load(out, device="cpu", compress="lossless", progress=False)
    with pytest.raises(UsageError, match="give quantize=None"):
        zstream.pack(src, tmp_path / "both", quantize="int4", compress="lossless", progress=False)


def _tp_compressed(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with zstream.load(path, device="cpu", offload="cpu", max_resident_blocks=0, compress="lossless", dtype="auto",
                      progress=False) as model:
        return model(ids)


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_tensor_parallel_ranks_code_their_pieces(checkpoints: dict) -> None:
    path = checkpoints["tiny-llama"]
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    with zstream.load(path, device="cpu", offload="cpu", max_resident_blocks=0, dtype="auto",
                      progress=False) as plain:
        want = plain(ids)
    for got in zstream.launch(_tp_compressed, 2, path, ids):
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-6
