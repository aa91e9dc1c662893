"""``zstream pack``: a packed checkpoint parses as safetensors, declares its quantization, holds exactly the
numpy reference of the scheme (``oracles.packed_reference``) for every accepted linear weight and the other tensors
byte for byte, keeps each block contiguous in one shard, and refuses what it must not overwrite or re-pack."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import zstream
from zstream.api import synthetic
from zstream.errors import QuantizationError
from zstream.foundations.checkpoint import read_config
from zstream.foundations.models import family_for
from zstream.foundations.quant import METADATA_KEY, QuantConfig
from zstream.foundations.store import WeightStore
from zstream.interfaces.cli import main as cli_main

from oracles import packed_reference, same_array_bits

Layout = List[Tuple[str, str, int, int]]  # (file, tensor name, start, end) in file order


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Callable[..., Path]:
    """Random-weight source checkpoints, written once per (preset, dtype)."""
    root = tmp_path_factory.mktemp("src")
    made: Dict[Tuple[str, torch.dtype], Path] = {}

    def get(preset: str, dtype: torch.dtype = torch.float16) -> Path:
        if (preset, dtype) not in made:
            path = root / f"{preset}-{str(dtype)[6:]}"
            made[preset, dtype] = synthetic.make_checkpoint(preset, path, dtype=dtype, progress=False)
        return made[preset, dtype]

    return get


def shard_files(out: Path) -> List[Path]:
    index = out / "model.safetensors.index.json"
    if index.exists():
        return [out / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [out / "model.safetensors"]


def read_header(path: Path) -> Tuple[Dict[str, str], Layout]:
    """The raw header of a safetensors file: its __metadata__ and its tensors in data order."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert n % 8 == 0, "the header is padded so the data starts 8-byte aligned"
    meta = header.pop("__metadata__")
    layout = sorted(((path.name, k, *v["data_offsets"]) for k, v in header.items()), key=lambda e: e[2])
    return meta, layout


def expected_order(src: Path, cfg: QuantConfig) -> Tuple[List[str], Dict[str, str], List[List[str]]]:
    """What the output should hold, in file order; {packed name: source weight}; each block's output names."""
    family = family_for(read_config(src), _names(src))
    shapes = _shapes(src)
    order: List[str] = []
    packed_from: Dict[str, str] = {}
    blocks: Dict[str, int] = {n: i for i in range(family.num_blocks) for n in family.block_tensors(i).values()}
    per_block: List[List[str]] = [[] for _ in range(family.num_blocks)]
    linear = {family.block_tensors(i)[local] for i in range(family.num_blocks) for local in family.linear_weights()}
    for name in family.expected_shapes():
        if name in linear and cfg.accepts(shapes[name]):
            parts = list(cfg.packed(name, shapes[name]))
            packed_from.update(dict.fromkeys(parts, name))
        else:
            parts = [name]
        order += parts
        if name in blocks:
            per_block[blocks[name]] += parts
    order += [n for n in _names(src) if n not in family.expected_shapes()]
    return order, packed_from, per_block


def _names(src: Path) -> List[str]:
    with WeightStore.open(src, pin=False) as store:
        return store.names()


def _shapes(src: Path) -> Dict[str, Tuple[int, ...]]:
    with WeightStore.open(src, pin=False) as store:
        return {n: store.info(n).shape for n in store.names()}


def source_tensors(src: Path) -> Dict[str, torch.Tensor]:
    out = {}
    for file in shard_files(src):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def verify(src: Path, out: Path, cfg: QuantConfig) -> Layout:
    """Every property of a packed checkpoint that a reader relies on; returns its layout in file order."""
    files = shard_files(out)
    layout: Layout = []
    got: Dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:  # parses: offsets tile the data, dtypes and shapes agree
            assert f.metadata() == {"format": "pt", **cfg.to_metadata()}
            assert QuantConfig.from_metadata(f.metadata()) == cfg
            got.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        meta, entries = read_header(file)
        assert meta == {"format": "pt", **cfg.to_metadata()}
        end = 0
        for _, name, start, stop in entries:  # contiguous, no gaps, every tensor aligned to its dtype
            assert start == end
            assert start % got[name].element_size() == 0, name
            end = stop
        assert file.stat().st_size == 8 + struct.unpack("<Q", file.read_bytes()[:8])[0] + end
        layout += entries
    with WeightStore.open(out, pin=False) as store:
        assert QuantConfig.from_metadata(store.metadata()) == cfg
        assert len(store) == len(layout)

    order, packed_from, per_block = expected_order(src, cfg)
    assert [name for _, name, _, _ in layout] == order
    position = {name: i for i, (_, name, _, _) in enumerate(layout)}
    file_of = {name: file for file, name, _, _ in layout}
    for names in per_block:  # contiguous, and in one shard
        spots = sorted(position[n] for n in names)
        assert spots == list(range(spots[0], spots[0] + len(names)))
        assert len({file_of[n] for n in names}) == 1

    srcs = source_tensors(src)
    quantized: Dict[str, Dict[str, np.ndarray]] = {}
    for name, t in got.items():
        if name in packed_from:
            weight = packed_from[name]
            if weight not in quantized:  # the scheme written again in numpy, on the source weight as float32
                quantized[weight] = packed_reference(weight, srcs[weight].float().numpy(), cfg.bits,
                                                     cfg.group_size, cfg.symmetric)
            assert set(quantized[weight]) == {n for n, w in packed_from.items() if w == weight}, weight
            assert same_array_bits(t.numpy(), quantized[weight][name]), f"{name} differs from the numpy reference"
            assert (t.dtype, tuple(t.shape)) == cfg.packed(weight, tuple(srcs[weight].shape))[name]
        else:
            assert t.dtype == srcs[name].dtype and t.shape == srcs[name].shape, name
            assert raw(t) == raw(srcs[name]), f"{name} is not byte-identical"
    assert not set(packed_from.values()) & set(got), "a packed weight also kept its original"
    return layout


# ---- the packed checkpoint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("preset", "dtype", "group_size"), [
    ("tiny-bloom", torch.float16, 32),   # hidden 96: group 64 would skip most weights (tested below)
    ("tiny-opt", torch.float16, 64),
    ("tiny-llama", torch.float16, 64),
    ("tiny-llama-tied", torch.bfloat16, 64),  # tied head, attention and MLP biases, bf16 copied as is
])
def test_pack_matches_the_numpy_reference_and_copies_the_rest(source, tmp_path, preset, dtype, group_size, bits,
                                                              symmetric):
    src = source(preset, dtype)
    out = zstream.pack(src, tmp_path / "out", quantize=f"int{bits}", group_size=group_size, symmetric=symmetric,
                       device="cpu", progress=False)
    assert out == tmp_path / "out"
    verify(src, out, QuantConfig(bits, group_size, symmetric))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary directory was left behind"


def test_weights_the_group_size_does_not_divide_stay_unquantized_with_a_note(source, tmp_path):
    src = source("tiny-bloom")  # hidden 96: only dense_4h_to_h (input 384) takes group 64
    with pytest.warns(RuntimeWarning) as notes:
        out = zstream.pack(src, tmp_path / "out", quantize="int4", device="cpu", progress=False)
    # qkv, dense, dense_h_to_4h: one note each, not one per block
    assert sorted(str(n.message).split()[2] for n in notes) == [
        "mlp.dense_h_to_4h.weight", "self_attention.dense.weight", "self_attention.query_key_value.weight"]
    assert all("stays unquantized: group size 64 does not divide" in str(n.message) for n in notes)
    assert {n.filename for n in notes} == {__file__}  # at the caller's line, not inside zstream
    verify(src, out, QuantConfig(4, 64))
    with WeightStore.open(out, pin=False) as store:
        assert "transformer.h.0.self_attention.query_key_value.weight" in store
        assert "transformer.h.0.mlp.dense_4h_to_h.weight.qcodes" in store


def test_sharded_output_splits_only_between_blocks(source, tmp_path):
    src = source("tiny-llama")
    cfg = QuantConfig(8, 64)
    out = zstream.pack(src, tmp_path / "out", quantize="int8", shard_size="30KB", device="cpu", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = shard_files(out)
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                       for i in range(1, len(files) + 1)]
    layout = verify(src, out, cfg)  # also: every block in one shard
    assert index["weight_map"] == {name: file for file, name, _, _ in layout}
    assert index["metadata"]["total_size"] == sum(stop - start for _, _, start, stop in layout)
    _, _, per_block = expected_order(src, cfg)
    unit = {n: f"block {i}" for i, names in enumerate(per_block) for n in names}
    first = min(i for i, (_, n, _, _) in enumerate(layout) if n in unit)
    for i, (_, name, _, _) in enumerate(layout):
        unit.setdefault(name, "before" if i < first else "after")
    for file in files:  # no shard over the limit unless it holds a single unit (a block, or the outer tensors)
        size = sum(stop - start for f, _, start, stop in layout if f == file.name)
        assert size <= 30_000 or len({unit[n] for f, n, _, _ in layout if f == file.name}) == 1


def test_byte_ratio_and_summary(source, tmp_path, capsys):
    src = source("tiny-llama")
    family = family_for(read_config(src), _names(src))
    shapes = _shapes(src)
    block_names = [n for i in range(family.num_blocks) for n in family.block_tensors(i).values()]
    before = sum(2 * torch.Size(shapes[n]).numel() for n in block_names)  # fp16
    for quant, low, high in (("int4", 0.27, 0.29), ("int8", 0.52, 0.54)):
        out = zstream.pack(src, tmp_path / quant, quantize=quant, device="cpu", progress=True)
        sizes = {name: stop - start for _, name, start, stop in verify(src, out, QuantConfig.parse(quant))}
        after = sum(size for name, size in sizes.items() if ".layers." in name)
        ratio = after / before
        assert low < ratio < high, (quant, ratio)
        err = capsys.readouterr().err
        assert f"({ratio:.2f}x streamed per pass)" in err
        assert "packed" in err and quant in err


def test_packed_checkpoint_streams_from_disk_like_quantizing_at_load(source, tmp_path):
    """The intended use: ``load(OUT, offload="nvme")`` streams the packed blocks as they are, and generates what
    quantizing the source while loading generates (same bits, so the same tokens)."""
    src = source("tiny-llama")
    out = zstream.pack(src, tmp_path / "out", quantize="int4", device="cpu", progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    packed = zstream.load(out, offload="nvme", device="cpu", max_resident_blocks=0, progress=False)
    at_load = zstream.load(src, offload="cpu", device="cpu", quantize="int4", progress=False)
    try:
        assert torch.equal(packed.generate(ids, max_new_tokens=6), at_load.generate(ids, max_new_tokens=6))
    finally:
        packed.close()
        at_load.close()


# ---- files besides the weights, sources, the CLI -----------------------------------------------------------------


def test_config_and_side_files(source, tmp_path):
    src = tmp_path / "src"
    synthetic.make_checkpoint("tiny-opt", src, progress=False)
    (src / "generation_config.json").write_text('{"max_new_tokens": 7}\n')
    out = zstream.pack(src, tmp_path / "out", quantize="int4", symmetric=True, device="cpu", progress=False)
    config = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    assert config.pop("zstream_quantization") == {"version": 1, "bits": 4, "group_size": 64, "symmetric": True}
    assert config == original
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_repo_id_from_the_local_hf_cache(source, tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache, with no network (local files only)."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--acme--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source("tiny-llama").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    out = zstream.pack("acme/tiny-llama", tmp_path / "out", quantize="int4", device="cpu", progress=False)
    verify(snapshot, out, QuantConfig(4))


def test_cli(source, tmp_path, capsys):
    src = source("tiny-opt")
    out = tmp_path / "out"
    argv = ["pack", str(src), str(out), "--quantize", "int8", "--group-size", "32", "--symmetric",
            "--shard-size", "40KB", "--device", "cpu"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "streamed per pass" in captured.err
    assert len(shard_files(out)) > 1
    verify(src, out, QuantConfig(8, 32, True))
    # a refusal is a clean error message and exit status 2, not a traceback
    assert cli_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zstream: error:") and "not empty" in err


def test_cli_refusal_message(source, tmp_path, capsys):
    assert cli_main(["pack", str(source("tiny-llama")), str(tmp_path / "o"), "--quantize", "int4",
                     "--group-size", "48", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zstream: error: group size 48 divides the input dimension of no linear weight")


def test_pack_is_the_function_even_after_the_cli_imported_its_module(source, tmp_path):
    """The module is ``zstream.api.pack``, so importing it never rebinds ``zstream.pack`` (the function)."""
    import zstream.api.pack
    import zstream.interfaces.cli  # noqa: F401 (imported for its side effects, if any)

    assert "pack" in zstream.__all__ and zstream.pack is zstream.api.pack.pack
    out = zstream.pack(source("tiny-opt"), tmp_path / "out", quantize="int4", device="cpu", progress=False)
    assert (out / "model.safetensors").exists()


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_refuses_an_already_packed_source(source, tmp_path):
    packed = zstream.pack(source("tiny-opt"), tmp_path / "p", quantize="int4", device="cpu", progress=False)
    with pytest.raises(QuantizationError, match="already packed"):
        zstream.pack(packed, tmp_path / "again", quantize="int8", device="cpu", progress=False)
    assert not (tmp_path / "again").exists()
    with WeightStore.open(packed, pin=False) as store:
        assert METADATA_KEY in store.metadata()


def test_packed_tensors_without_their_metadata_are_refused_not_guessed(source, tmp_path):
    """A checkpoint that holds *.qcodes tensors but whose headers do not say how they were packed (a hand-edited or
    foreign file): load and pack both refuse it, naming the missing metadata."""
    packed = zstream.pack(source("tiny-opt"), tmp_path / "p", quantize="int4", device="cpu", progress=False)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    with safe_open(packed / "model.safetensors", framework="pt") as f:
        save_file({n: f.get_tensor(n) for n in f.keys()}, stripped / "model.safetensors",  # noqa: SIM118
                  metadata={"format": "pt"})
    (stripped / "config.json").write_text((packed / "config.json").read_text())
    for call in (lambda: zstream.load(stripped, device="cpu", progress=False),
                 lambda: zstream.pack(stripped, tmp_path / "again", quantize="int8", device="cpu", progress=False)):
        with pytest.raises(QuantizationError, match=r"packed tensors \(\*\.qcodes\) but no zstream\.quantization"):
            call()


def test_refuses_an_output_that_is_not_empty(source, tmp_path):
    from zstream.errors import OutputExistsError

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        zstream.pack(source("tiny-opt"), out, quantize="int4", device="cpu", progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(zstream.ZStreamError, match="not a directory"):
        zstream.pack(source("tiny-opt"), out / "keep.txt", quantize="int4", device="cpu", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is fine: it is replaced
    zstream.pack(source("tiny-opt"), empty, quantize="int4", device="cpu", progress=False)
    assert (empty / "model.safetensors").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"quantize": "int4", "group_size": 48}, "group size 48 divides the input dimension of no linear weight"),
    ({"quantize": "int4", "group_size": 3}, "even for int4"),
    ({"quantize": "none"}, r"quantize 'int4' or 'int8'\), a losslessly compressed one \(compress='lossless'\), a "
                           r"tensor-parallel layout \(tensor_parallel > 1\), or a combination"),
    ({"quantize": "int3"}, "quantize must be"),
])
def test_refuses_bad_quantization_settings(source, tmp_path, kwargs, match):
    with pytest.raises(QuantizationError, match=match):
        zstream.pack(source("tiny-llama"), tmp_path / "out", device="cpu", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_bad_shard_size(source, tmp_path):
    with pytest.raises(zstream.ZStreamError, match="shard_size"):
        zstream.pack(source("tiny-llama"), tmp_path / "out", shard_size="lots", device="cpu", progress=False)


def test_a_failure_midway_leaves_nothing_behind(source, tmp_path, monkeypatch):
    import zstream.api.pack as module

    calls = []
    real = module._quantize

    def flaky(w: torch.Tensor, cfg: QuantConfig, device: torch.device) -> Optional[object]:
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk on fire")
        return real(w, cfg, device)

    monkeypatch.setattr(module, "_quantize", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        zstream.pack(source("tiny-llama"), tmp_path / "out", quantize="int4", shard_size="30KB", device="cpu",
                     progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- the GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_same_bytes_as_the_cpu(source, tmp_path):
    from zstream.api.pack import _quantize

    gen = torch.Generator().manual_seed(0)
    cuda = torch.device("cuda")
    for bits in (4, 8):
        for symmetric in (False, True):
            cfg = QuantConfig(bits, 64, symmetric)
            for scale in (1e-3, 0.02, 1.0, 300.0):
                for dtype in (torch.float16, torch.bfloat16, torch.float32):
                    w = (torch.randn(512, 1024, generator=gen) * scale).to(dtype)
                    want = packed_reference("w", w.float().numpy(), bits, 64, symmetric)
                    got = _quantize(w, cfg, cuda).tensors("w")
                    assert set(got) == set(want)
                    for k in want:
                        assert same_array_bits(got[k].cpu().numpy(), want[k]), (bits, symmetric, scale, dtype, k)
    src = source("tiny-llama")
    a = zstream.pack(src, tmp_path / "cpu", quantize="int4", device="cpu", progress=False)
    b = zstream.pack(src, tmp_path / "cuda", quantize="int4", device="cuda", progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
