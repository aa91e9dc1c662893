"""What a newcomer meets first: the README's first command (its Python equivalent, in a subprocess where the test
extras cannot be imported), the command line's answers to bad input, and ``load``'s to what transformers users
type by habit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zstream
from zstream.errors import CheckpointError, UsageError
from zstream.interfaces.cli import main

# What only the test extras bring (`pip install .[test]`): absent from the subprocess's path, as from a fresh venv.
TEST_EXTRAS = ("pytest", "_pytest", "hypothesis", "accelerate", "pytest_benchmark", "ruff")


def without_test_extras(tmp_path: Path) -> Path:
    """A directory that mirrors site-packages (links) minus the test extras and their metadata."""
    site = tmp_path / "site"
    site.mkdir()
    sources = [Path(p) for p in sys.path if p.endswith("site-packages")]
    for src in sources:
        for entry in src.iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower().replace("-", "_")
            if top in TEST_EXTRAS or entry.suffix == ".pth" or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    return site


def run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without site-packages' test extras (``-S``: only the mirrored packages, and
    the source tree when the tests run from it)."""
    site = tmp_path / "site" if (tmp_path / "site").exists() else without_test_extras(tmp_path)
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(site)]
    full = {**os.environ, "ZSTREAM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(path), **env}
    check = f"import importlib.util as u; assert not any(u.find_spec(m) for m in {TEST_EXTRAS!r})\n"
    return subprocess.run([sys.executable, "-S", "-c", check + textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=900, check=False)


def test_the_readmes_first_command_without_the_test_extras(tmp_path):
    """`zstream demo` as the README runs it (bloom-560m shapes, streamed from disk), in a fresh process that cannot
    import pytest, hypothesis or accelerate; then again, reusing the checkpoint it wrote."""
    code = "import sys, zstream.interfaces.cli as cli; sys.exit(cli.main(['demo', '--device', 'cpu']))"
    first = run_python(code, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "writing a random-weight bloom-560m checkpoint" in out
    assert "random weights: the text below is noise" in out and "tokens/s" in out and "limited by:" in out
    texts = [line for line in out.splitlines() if line.startswith("'")]
    assert len(texts) == 2 and all(len(t.strip("'")) > len("The Grace Hopper superchip") for t in texts)
    assert "inf GB/s" not in out and "nan" not in out
    again = run_python(code, tmp_path)
    assert again.returncode == 0 and "writing a random-weight" not in again.stdout


def test_a_stale_or_incomplete_demo_checkpoint_is_rebuilt(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZSTREAM_CACHE", str(tmp_path))
    stale = tmp_path / "demo" / "tiny-bloom"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps(zstream.PRESETS["tiny-bloom"]))  # an old zstream's, no tokenizer
    assert main(["demo", "--preset", "tiny-bloom", "--device", "cpu", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "older zstream or incomplete: writing it again" in out
    assert (stale / "tokenizer.json").exists()


# ---- the command line: every bad input is one line -------------------------------------------------------------

@pytest.mark.parametrize(("argv", "message"), [
    (["info", "ckpt", "--gpu-memory", "lots"], "argument --gpu-memory: cannot read 'lots' as a size"),
    (["bench", "tiny-opt", "--offload", "gpu"], "argument --offload: 'gpu' is not one of"),
    (["bench", "tiny-opt", "--batch", "1,x"], "argument --batch: not a whole number: 'x'"),
    (["generate", "ckpt", "hi", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["demo", "--batch", "0"], "argument --batch: must be at least 1, not 0"),
])
def test_bad_arguments_are_one_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) or message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_errors_from_the_library_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zstream: error: ") and "no such checkpoint directory" in err
    path = zstream.make_checkpoint("tiny-opt", tmp_path / "m", progress=False)
    assert main(["make-checkpoint", "tiny-opt", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err


def test_version_and_the_presets_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"zstream {zstream.__version__}"
    with pytest.raises(SystemExit):
        main(["make-checkpoint", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in zstream.PRESETS)


def test_generate_says_the_weights_are_random_and_streams_text(tmp_path, capfd):
    config = {**zstream.PRESETS["tiny-llama"], "vocab_size": 2048}
    path = zstream.make_checkpoint(config, tmp_path / "m", progress=False)
    assert main(["generate", str(path), "Hello", "--device", "cpu", "--max-new-tokens", "6", "--offline"]) == 0
    out, err = capfd.readouterr()
    assert "holds random weights" in err
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")
    assert main(["generate", str(path), "Hello", "--device", "cpu", "--chat", "--sample", "--seed", "1",
                 "--temperature", "0.8", "--max-new-tokens", "4"]) == 0


def test_bench_on_the_cpu_names_its_limit_and_never_prints_inf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZSTREAM_CACHE", str(tmp_path))
    assert main(["bench", "tiny-llama", "--offload", "cpu,nvme", "--batch", "2", "--prompt", "8", "--gen", "3",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "inf GB/s" not in out and "link: host memory copy" in out  # the plan names the CPU's link, measured
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["offload"] for r in rows} == {"cpu", "nvme"}
    for r in rows:
        assert r["bound_gbps"] and r["bound_gbps"] < float("inf") and r["peak_gpu_bytes"] > 0
        assert r["limit"] in ("compute", "host memory copy", "disk read (O_DIRECT)") and r["limit_why"]
    meta = json.loads((tmp_path / "b.json").read_text())["meta"]
    low, high = meta["disk_gbps_spread"]
    assert low <= meta["disk_gbps_odirect"] <= high  # a median of several reads, with its spread


# ---- load, as transformers users call it ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return zstream.make_checkpoint("tiny-opt", tmp_path_factory.mktemp("t") / "m", progress=False)


@pytest.mark.parametrize(("kw", "dtype"), [({"dtype": "fp16"}, torch.float16), ({"dtype": "bfloat16"}, torch.bfloat16),
                                           ({"torch_dtype": torch.float32}, torch.float32), ({"dtype": "auto"}, None),
                                           ({"torch_dtype": "float16", "dtype": "fp16"}, torch.float16)])
def test_dtype_strings_and_torch_dtype(tiny, kw, dtype):
    with zstream.load(tiny, device="cpu", progress=False, **kw) as model:
        assert model.dtype == (dtype or torch.float32)  # "auto" on the CPU computes in float32


@pytest.mark.parametrize(("kw", "match"), [
    ({"device_map": "auto"}, "gpu_memory='20GiB'"),
    ({"max_memory": {0: "20GiB"}}, "gpu_memory"),
    ({"load_in_4bit": True}, "quantize='int4'"),
    ({"trust_remote_code": True}, "leave it out"),
    ({"offload": "gpu"}, "offload must be one of auto, none, cpu, nvme, ats, not 'gpu'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"dtype": "fp16", "torch_dtype": "bf16"}, "disagree"),
    ({"gpu_memory": "lots"}, "gpu_memory: cannot read 'lots'"),
    ({"prefetch": 0}, "prefetch must be an integer >= 1"),
    ({"device": "tpu"}, "cannot read 'tpu' as a device"),
    ({"device": "mps"}, "zstream runs on 'cuda' or 'cpu'"),
    ({"reader": "fast"}, "reader must be one of"),
    ({"max_resident_blocks": -1}, "max_resident_blocks must be an integer >= 0"),
])
def test_bad_load_arguments_name_the_value_and_the_fix(tiny, kw, match):
    with pytest.raises(UsageError, match=match):
        zstream.load(tiny, progress=False, **{"device": "cpu", **kw})


def test_a_loaded_model_describes_itself(tiny):
    with zstream.load(tiny, offload="nvme", device="cpu", progress=False) as model:
        text = repr(model)
    assert "opt" in text and "float32" in text and "offload=nvme" in text and "random weights" in text
    assert "0/2 blocks resident, 2 streamed" in text and "parameters" in text
    assert "predicted step" in text and not text.endswith("closed>")
    assert repr(model).endswith("; closed>")


def test_a_checkpoint_given_as_its_file_takes_the_files_beside_it(tiny, tmp_path):
    """``zstream.load("dir/model.safetensors")``: the config, the tokenizer and the generation config come from the
    file's folder, as they would for the folder itself."""
    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(tiny, tmp_path / "m"))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "eos_token_id": 7}))
    (weights,) = folder.glob("*.safetensors")
    with zstream.load(weights, offload="nvme", device="cpu", progress=False) as model:
        assert model.config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
        assert model.tokenizer is not None
        assert model.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(folder)).get_vocab()
        assert (model.generation_config.max_new_tokens, model.generation_config.eos_token_id) == (3, 7)
        text = model.generate("hello", do_sample=False)
    assert isinstance(text, str)
    packed = zstream.pack(weights, tmp_path / "packed", quantize="int8", device="cpu", progress=False)
    assert (packed / "generation_config.json").read_text() == (folder / "generation_config.json").read_text()
    assert (packed / "tokenizer.json").is_file()


def test_dir_shows_the_public_api():
    names = dir(zstream)
    for name in ("load", "plan_batch", "pack", "make_checkpoint", "WeightStore", "StreamingModel", "ZStreamError",
                 "synthetic", "__version__"):
        assert name in names
    assert not [n for n in names if n in ("Any", "List", "importlib", "TYPE_CHECKING")]


def hub_snapshot(cache: Path, repo: str, source: Path) -> Path:
    """The layout huggingface_hub keeps a downloaded repo in: models--org--name/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snap


def test_a_repo_id_comes_from_the_hub_cache_without_the_network(tiny, tmp_path):
    """As from_pretrained: a repo id in the local cache loads offline; one that is not says where it looked and why it
    did not download. (HF_HUB_OFFLINE keeps every request off the network.)"""
    cache = tmp_path / "hub"
    hub_snapshot(cache, "zstream-test/tiny-opt", tiny)
    code = """
        import zstream, torch
        with zstream.load("zstream-test/tiny-opt", device="cpu", progress=False) as m:
            print("loaded", m.family.name, tuple(m(torch.tensor([[5, 6, 7]])).shape))
        try:
            zstream.load("zstream-test/missing", device="cpu", progress=False)
        except zstream.CheckpointError as e:
            print("refused:", e)
    """
    out = run_python(code, tmp_path, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded opt (1, 3, 320)" in out.stdout
    assert "refused: zstream-test/missing: not in the local Hugging Face cache, and downloading is off " \
           "(HF_HUB_OFFLINE is set)" in out.stdout


def test_download_false_never_asks_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"download=False"):
        zstream.load("zstream-test/none", download=False, device="cpu")
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        zstream.load("no/such/dir/x", device="cpu")
