"""In-memory synthetic checkpoints (``make_checkpoint(..., in_memory=True)``, ``zstream make-checkpoint --in-memory``):
a directory with only a config and a tokenizer, whose weights ``load`` makes in host memory as it reads them. Checked
against the checkpoint ``make_checkpoint`` writes to disk with the same seed, read through the native store: the same
tensors, logits and tokens bit for bit, streamed or resident, on one rank and on two."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import pytest
import torch

import zstream
from zstream.api.synthetic import SyntheticStore, is_in_memory
from zstream.foundations import checkpoint
from zstream.interfaces.cli import main

from tiny_models import padded_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("inmem")
    disk = zstream.make_checkpoint("tiny-llama", root / "disk", torch.float16, seed=3, progress=False)
    memory = zstream.make_checkpoint("tiny-llama", root / "memory", torch.float16, seed=3, progress=False,
                                     in_memory=True)
    return disk, memory


def test_the_directory_holds_no_weights_and_says_so(pair: tuple) -> None:
    disk, memory = pair
    assert not list(Path(memory).glob("*.safetensors")) and (Path(memory) / "tokenizer.json").exists()
    assert is_in_memory(checkpoint.read_config(memory)) and not is_in_memory(checkpoint.read_config(disk))


def test_its_tensors_are_the_written_checkpoints(pair: tuple) -> None:
    disk, memory = pair
    store = zstream.WeightStore.open(disk, pin=False)
    made = SyntheticStore(checkpoint.read_config(memory), memory, pin=False)
    assert made.names() == store.names()
    names = made.names()
    want = store.read(names)
    got = made.read(names)
    for name in names:
        assert made.info(name)[1:4] == store.info(name)[1:4]  # dtype, shape, bytes
        assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    store.close()


def test_the_batch_planner_plans_it_as_the_written_one(pair: tuple) -> None:
    """plan_batch reads only headers: an in-memory checkpoint has none on disk, and plans as its written twin does
    (same compute model and link given, so the two plans can differ only by what they read of the checkpoint)."""
    disk, memory = pair
    compute = zstream.plan_batch(disk, gpu_memory="300MiB", prompt=6, gen=3, max_batch=4,
                                 link_gbps=10.0).compute  # calibrated once, on the written checkpoint
    plans = [zstream.plan_batch(ck, gpu_memory="300MiB", prompt=6, gen=3, max_batch=4, link_gbps=10.0,
                                compute=compute) for ck in (disk, memory)]
    assert plans[0].to_dict() == plans[1].to_dict() and plans[1].best is not None


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("kw", [{"offload": "none"}, {"offload": "cpu", "max_resident_blocks": 0}])
def test_a_model_made_in_memory_computes_what_the_written_one_does(pair: tuple, kw: dict) -> None:
    disk, memory = pair
    ids, mask = padded_batch(vocab=250, lengths=(7, 4))
    opts = {"device": "cpu", "dtype": torch.float32, "progress": False, **kw}
    with zstream.load(disk, **opts) as written, zstream.load(memory, **opts) as made:
        assert torch.equal(made(ids, mask), written(ids, mask))
        assert torch.equal(made.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                           written.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
        assert made.plan.streamed_bytes == written.plan.streamed_bytes


def test_streaming_from_disk_is_refused(pair: tuple) -> None:
    _, memory = pair
    with pytest.raises(zstream.UsageError, match="makes its random weights in host memory at load"):
        zstream.load(memory, offload="nvme", device="cpu", progress=False)


def _logits(path: Path, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    with zstream.load(path, device="cpu", dtype=torch.float32, progress=False) as model:
        return model(ids, mask)


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_two_ranks_make_their_pieces_as_the_written_checkpoint_gives_them(pair: tuple) -> None:
    disk, memory = pair
    ids, mask = padded_batch(vocab=250, lengths=(7, 4))
    made: List[Any] = zstream.launch(_logits, 2, memory, ids, mask)
    written: List[Any] = zstream.launch(_logits, 2, disk, ids, mask)
    for rank in range(2):
        assert torch.equal(made[rank], written[rank])


def test_the_command_writes_one(tmp_path: Path) -> None:
    assert main(["make-checkpoint", "tiny-opt", str(tmp_path / "m"), "--in-memory"]) == 0
    assert is_in_memory(checkpoint.read_config(tmp_path / "m"))


def test_a_slice_keeps_the_width_and_cuts_the_depth(tmp_path: Path) -> None:
    """``--blocks 4`` of bloom-176b: 4 blocks of the real width, in memory (the slice a 4-GPU run is rehearsed on)."""
    assert main(["make-checkpoint", "bloom-176b", str(tmp_path / "s"), "--in-memory", "--blocks", "4"]) == 0
    config = checkpoint.read_config(tmp_path / "s")
    assert config["n_layer"] == 4 and config["hidden_size"] == 14336 and config["n_head"] == 112
    store = SyntheticStore(config, tmp_path / "s", pin=False)
    assert store.info("transformer.h.3.self_attention.query_key_value.weight").shape == (3 * 14336, 14336)
    assert "transformer.h.4.self_attention.query_key_value.weight" not in store
    with pytest.raises(zstream.ModelError, match="blocks must be"):
        zstream.make_checkpoint("tiny-opt", tmp_path / "x", blocks=0)
