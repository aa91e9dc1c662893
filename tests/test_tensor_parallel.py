"""Tensor parallelism on the CPU (gloo), as CI runs it: every family sharded over 2 and 3 ranks gives the logits of
one process (fp32, within 1e-5) and the same greedy tokens on every rank; quantized at load and packed too; the
shards are the pieces Megatron's split says; a failing or killed rank is named, not waited for."""

from __future__ import annotations

import contextlib
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import zstream
from zstream import ModelError, ParallelError, UsageError
from zstream.api.synthetic import PRESETS
from zstream.foundations.models import family_for
from zstream.foundations.parallel import join

from tiny_models import padded_batch, reference_logits, reference_model, save_with_transformers

VOCAB = 320
NEW_TOKENS = 20


def _config(case: str, world: int) -> Dict[str, Any]:
    """Tiny configs whose heads (6) and MLP units divide by 2 and by 3; KV heads split, or replicated (qwen2)."""
    base = {"bloom": "tiny-bloom", "opt": "tiny-opt", "opt-post-ln": "tiny-opt-350m-style",
            "llama-mha": "tiny-llama-tied", "llama-gqa": "tiny-llama", "mistral": "tiny-mistral",
            "qwen2": "tiny-qwen2"}[case]
    cfg = dict(PRESETS[base])
    if case == "bloom":
        return {**cfg, "n_layer": 3}
    cfg.update(num_hidden_layers=3, hidden_size=48, num_attention_heads=6)
    if case.startswith("opt"):
        return {**cfg, "ffn_dim": 96, "word_embed_proj_dim": 32 if case == "opt-post-ln" else 48}
    kv = {"llama-mha": 6, "llama-gqa": world, "mistral": world, "qwen2": 1}[case]
    cfg.update(intermediate_size=96, num_key_value_heads=kv)
    if case == "mistral":
        cfg["head_dim"] = 8
    return cfg


# (case, load options): every block streamed through the ring, unless offload="none"; quantized at load (int4) or a
# checkpoint packed by zstream pack (int8), with groups that do not straddle ranks
RUNS: List[Tuple[str, Dict[str, Any]]] = [
    ("bloom", {"offload": "cpu", "max_resident_blocks": 0}),
    ("bloom", {"offload": "none"}),
    ("bloom", {"offload": "cpu", "max_resident_blocks": 0, "quantize": "int4", "group_size": 8}),
    ("opt", {"offload": "cpu", "max_resident_blocks": 0}),
    ("opt-post-ln", {"offload": "cpu", "max_resident_blocks": 1, "quantize": "int4", "group_size": 8}),
    ("llama-mha", {"offload": "cpu", "max_resident_blocks": 0}),
    ("llama-gqa", {"offload": "none"}),
    ("llama-gqa", {"offload": "cpu", "max_resident_blocks": 0, "quantize": "int4", "group_size": 8,
                   "symmetric": True}),
    ("mistral", {"offload": "cpu", "max_resident_blocks": 0}),
    ("qwen2", {"offload": "cpu", "max_resident_blocks": 0}),
    ("qwen2", {"offload": "cpu", "max_resident_blocks": 0, "packed": "int8"}),
]


def _serve(runs: List[Tuple[str, Path, Dict[str, Any]]], ids: torch.Tensor, mask: torch.Tensor) -> List[Any]:
    """On every rank: each run's logits, greedy and sampled tokens, and plan."""
    out = []
    for _, path, options in runs:
        with zstream.load(path, device="cpu", progress=False, **options) as model:
            logits = model(ids, mask)
            greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
            sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20,
                                     seed=1234 + model.plan.rank)  # different seeds: the ranks must follow rank 0
            out.append((logits, greedy, sampled, model.plan.ranks, model.plan.streamed_bytes, repr(model)))
    return out


@pytest.fixture(scope="module")
def batch() -> Tuple[torch.Tensor, torch.Tensor]:
    return padded_batch(vocab=VOCAB, lengths=(9, 6, 4))


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def runs(request: Any, tmp_path_factory: Any, batch: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, Any]:
    """One launch per rank count, every run in it; and one process's answers to compare with."""
    world = request.param
    root = tmp_path_factory.mktemp(f"tp{world}")
    plans = []
    for case, options in RUNS:
        path = root / case
        if not path.exists():
            save_with_transformers(_config(case, world), path)
        options = dict(options)
        bits = options.pop("packed", None)
        if bits:
            packed = root / f"{case}-{bits}"
            if not packed.exists():
                zstream.pack(path, packed, quantize=bits, group_size=8, progress=False)
            path = packed
        plans.append((case, path, options))
    ids, mask = batch
    alone = [_serve([(case, path, {**options, "tensor_parallel": 1})], ids, mask)[0] for case, path, options in plans]
    return {"world": world, "plans": plans, "alone": alone, "ranks": zstream.launch(_serve, world, plans, ids, mask)}


@pytest.mark.parametrize("k", range(len(RUNS)), ids=[f"{c}-{'-'.join(f'{v}' for v in o.values())}" for c, o in RUNS])
def test_ranks_agree_with_one_process(runs: Dict[str, Any], k: int) -> None:
    logits, greedy, _, ranks, streamed, _ = runs["alone"][k]
    assert ranks == 1
    for rank, results in enumerate(runs["ranks"]):
        r_logits, r_greedy, r_sampled, r_ranks, r_streamed, text = results[k]
        assert r_ranks == runs["world"]
        assert f"rank {rank} of {runs['world']}" in text
        err = (r_logits - logits).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: logits differ from one process's by {err}"
        assert torch.equal(r_greedy, greedy), f"rank {rank}: greedy tokens differ from one process's"
        assert torch.equal(r_sampled, runs["ranks"][0][k][2]), f"rank {rank} sampled other tokens than rank 0"
        if runs["plans"][k][2].get("max_resident_blocks") == 0:  # each rank streams its piece: about 1/N the bytes
            # (norms and row biases are whole on each rank; so are KV heads replicated over more ranks than heads)
            tight = 1.1 if runs["plans"][k][0] != "qwen2" else 1.6
            assert streamed / runs["world"] <= r_streamed < streamed / runs["world"] * tight


def test_sharded_logits_match_transformers(runs: Dict[str, Any], batch: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """The independent reference: transformers on the same weights (the first run: bloom, streamed)."""
    ids, mask = batch
    want = reference_logits(reference_model(runs["plans"][0][1]), ids, mask)
    got = runs["ranks"][1][0][0]
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)


# ---- the pieces --------------------------------------------------------------------------------------------------
def _block(fam: Any) -> Dict[str, torch.Tensor]:
    """Block 0 with distinct values everywhere (each element its index)."""
    return {name: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
            for name, shape in ((fam.block_tensors(0)[local], s) for local, s in fam.block_shapes().items())}


@pytest.mark.parametrize(("case", "world"), [("llama-gqa", 2), ("mistral", 3), ("bloom", 3), ("opt", 2)])
def test_pieces_put_back_together_are_the_block(case: str, world: int) -> None:
    """Column pieces stacked by rows, row pieces side by side by columns, give back the whole weight; norms and
    row-parallel biases are whole on every rank."""
    fam = family_for(_config(case, world))
    whole = _block(fam)
    names = fam.block_tensors(0)
    pieces = [fam.shard(r, world, reduce=lambda t: t).shard_block(whole, names) for r in range(world)]
    splits = type(fam)._splits
    for local, name in names.items():
        module = local.rsplit(".", 1)[0]
        kind = splits.get(module)
        if kind == "column" or (kind == "kv" and local.endswith("weight")):
            assert torch.equal(torch.cat([p[name] for p in pieces], 0), whole[name]), local
        elif kind == "row" and local.endswith("weight"):
            assert torch.equal(torch.cat([p[name] for p in pieces], 1), whole[name]), local
        else:
            assert all(torch.equal(p[name], whole[name]) for p in pieces), local


def test_kv_heads_replicate_when_fewer_than_ranks() -> None:
    """qwen2 with 1 KV head over 3 ranks: every rank holds that head. 2 KV heads over 4 ranks (8 query heads, 2
    a rank): ranks 0 and 1 serve query heads 0-3, which use KV head 0; ranks 2 and 3 KV head 1."""
    fam = family_for(_config("qwen2", 3))
    whole = _block(fam)
    k = fam.block_tensors(0)["self_attn.k_proj.weight"]
    for r in range(3):
        part = fam.shard(r, 3, reduce=lambda t: t)
        assert part.num_heads == 2 and part.num_kv_heads == 1
        assert torch.equal(part.shard_block(whole, fam.block_tensors(0))[k], whole[k])
    fam = family_for({**_config("llama-gqa", 2), "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 6})
    whole = _block(fam)
    names = fam.block_tensors(0)
    heads = whole[names["self_attn.v_proj.weight"]].view(2, 6, -1)  # (nkv, hs, C)
    for r in range(4):
        part = fam.shard(r, 4, reduce=lambda t: t)
        got = part.shard_block(whole, names)[names["self_attn.v_proj.weight"]]
        assert torch.equal(got, heads[r // 2]), r


def test_bloom_ranks_take_their_heads_alibi_slopes() -> None:
    fam = family_for(_config("bloom", 3))
    parts = [fam.shard(r, 3, reduce=lambda t: t) for r in range(3)]
    assert torch.equal(torch.cat([p._slopes for p in parts]), fam._slopes)
    assert all(p._slopes.shape == (2,) for p in parts)
    # the fused QKV is [q_h, k_h, v_h] per head: rank 1's rows are heads 2 and 3, all three of q, k, v
    hs = fam.head_dim
    rows = torch.arange(3 * fam.hidden_size)
    assert torch.equal(parts[1].shard_block({"w": rows[:, None]}, {"self_attention.query_key_value.weight": "w"})["w"]
                       .flatten(), rows[2 * 3 * hs: 4 * 3 * hs])


@pytest.mark.parametrize(("case", "world", "what"), [("bloom", 4, "attention heads"), ("llama-gqa", 3, "KV heads"),
                                                      ("llama-gqa", 6, "MLP units")])
def test_models_that_do_not_divide_are_refused(case: str, world: int, what: str) -> None:
    cfg = _config(case, 2)
    if what == "MLP units":
        cfg.update(intermediate_size=100)
    with pytest.raises(ModelError, match=what):
        family_for(cfg).shard(0, world, reduce=lambda t: t)


def test_a_rank_count_the_launch_does_not_have_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"tensor_parallel=3, but this process is one of 2 ranks.*torchrun"):
        join(3, torch.device("cpu"))
    assert join(1, torch.device("cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join(None, torch.device("cpu")) is None


# ---- failures ----------------------------------------------------------------------------------------------------
def _second_block_fails(model: Any, fail: Callable[[], None]) -> None:
    """This rank's second block calls ``fail`` instead of computing."""
    block, calls = model.family.block, []

    def second_block_fails(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            fail()
        return block(*args)

    model.family.block = second_block_fails


def _fail_midway(path: Path, how: str, ids: torch.Tensor) -> str:
    """Rank 1 fails in its second block; rank 0 reports what stopped it."""
    model = zstream.load(path, device="cpu", offload="cpu", max_resident_blocks=0, progress=False,
                         parallel_timeout=5)
    if model.plan.rank == 1:

        def fail() -> None:
            if how == "raise":
                raise RuntimeError("injected fault in block 1")
            os._exit(3)

        _second_block_fails(model, fail)
    try:
        model(ids)
    except ParallelError as e:
        return f"ParallelError: {e}"
    except RuntimeError as e:
        try:
            model(ids)
        except ParallelError as again:  # the group is broken now, and says so
            return f"{e} / {again}"
    return "no error"


def _fail_and_stay(path: Path, ids: torch.Tensor, told: Path) -> Any:
    """Rank 1 raises in its second block and stays in the group. Rank 0, waiting in a collective, must hear of it
    from rank 1's report, not from rank 1 leaving or from the group's timeout (60 s); it writes ``told`` when it
    does, and rank 1 waits 20 s at most for that."""
    model = zstream.load(path, device="cpu", offload="cpu", max_resident_blocks=0, progress=False,
                         parallel_timeout=60)
    if model.plan.rank == 0:
        try:
            model(ids)
        except ParallelError as e:
            told.write_text(str(e))
            return str(e)
        return "no error"

    def fail() -> None:
        raise RuntimeError("injected fault in block 1")

    _second_block_fails(model, fail)
    with contextlib.suppress(RuntimeError):
        model(ids)
    deadline = time.monotonic() + 20  # a report is read within a poll (50 ms): only a rank never told waits this out
    while not told.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return told.exists()


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory: Any) -> Path:
    return save_with_transformers(_config("bloom", 2), tmp_path_factory.mktemp("fail") / "bloom")


def test_a_rank_that_raises_is_named_by_the_others(tiny_bloom: Path) -> None:
    ids = torch.randint(4, VOCAB, (2, 5))
    rank0, rank1 = zstream.launch(_fail_midway, 2, tiny_bloom, "raise", ids)
    assert rank0.startswith("ParallelError: rank 1 failed: RuntimeError: injected fault in block 1; rank 0 stopped")
    assert rank1.startswith("injected fault in block 1 / the tensor-parallel group is broken (rank 1 (this one)")


def test_a_rank_that_raises_and_stays_is_named_while_it_is_still_there(tiny_bloom: Path, tmp_path: Path) -> None:
    ids = torch.randint(4, VOCAB, (2, 5))
    rank0, rank1_heard_back = zstream.launch(_fail_and_stay, 2, tiny_bloom, ids, tmp_path / "told")
    # Rank 0 is in block 1's first all-reduce, which rank 1 never reaches.
    assert rank0 == "rank 1 failed: RuntimeError: injected fault in block 1; rank 0 stopped waiting in an all-reduce"
    assert rank1_heard_back is True


def test_a_rank_that_dies_ends_the_others_wait_at_the_timeout(tiny_bloom: Path) -> None:
    ids = torch.randint(4, VOCAB, (2, 5))
    with pytest.raises(ParallelError, match=r"rank 1 of 2 failed: died with exit code 3") as info:
        zstream.launch(_fail_midway, 2, tiny_bloom, "exit", ids)
    assert "ranks 0 stopped too" in str(info.value) or "rank 0" not in str(info.value)


def _load(paths: List[Path], **options: Any) -> str:
    rank = int(os.environ["RANK"])
    try:
        zstream.load(paths[rank], device="cpu", progress=False, **options)
    except zstream.ZStreamError as e:
        return f"{type(e).__name__}: {e}"
    return "loaded"


def test_ranks_that_open_different_checkpoints_are_refused(tiny_bloom: Path, tmp_path: Path) -> None:
    other = save_with_transformers({**_config("bloom", 2), "n_layer": 2}, tmp_path / "other")
    answers = zstream.launch(_load, 2, [tiny_bloom, other], offload="cpu")
    for answer in answers:
        assert answer.startswith("ParallelError: the ranks opened different checkpoints"), answer
        assert str(other) in answer and str(tiny_bloom) in answer


def test_a_rank_that_fails_to_load_is_named(tiny_bloom: Path, tmp_path: Path) -> None:
    answers = zstream.launch(_load, 2, [tiny_bloom, tmp_path / "missing"], offload="cpu")
    assert answers[1].startswith("CheckpointError") or answers[1].startswith("UsageError"), answers[1]
    assert answers[0].startswith("ParallelError: rank 1 failed:"), answers[0]


def test_nvme_needs_a_layout_for_the_ranks(tiny_bloom: Path) -> None:
    answers = zstream.launch(_load, 2, [tiny_bloom, tiny_bloom], offload="nvme")
    assert all("offload='nvme' under tensor parallelism" in a for a in answers), answers


def _raise_on(rank: int) -> int:
    if int(os.environ["RANK"]) == rank:
        raise ValueError("rank-specific trouble")
    return int(os.environ["RANK"]) * 10


def test_launch_returns_in_rank_order_and_names_a_failing_rank() -> None:
    assert zstream.launch(_raise_on, 3, 99) == [0, 10, 20]
    with pytest.raises(ParallelError, match=r"(?s)rank 2 of 3 failed: ValueError: rank-specific trouble.*Traceback"):
        zstream.launch(_raise_on, 3, 2)
    with pytest.raises(UsageError, match="nprocs"):
        zstream.launch(_raise_on, 0, 1)


# ---- a layout for the ranks (zstream pack --tensor-parallel) ------------------------------------------------------
def _serve_from(path: Path, ids: torch.Tensor, **options: Any) -> Tuple[torch.Tensor, torch.Tensor, int]:
    with zstream.load(path, device="cpu", progress=False, **options) as model:
        return model(ids), model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), model.plan.streamed_bytes


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_nvme_streams_each_ranks_piece_from_a_layout_written_for_it(tmp_path: Path, quantize: Any) -> None:
    src = save_with_transformers(_config("llama-gqa", 2), tmp_path / "src")
    out = zstream.pack(src, tmp_path / "tp2", quantize=quantize, group_size=8, tensor_parallel=2, progress=False)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rank0-of-2", "rank1-of-2"]
    ids = torch.randint(4, VOCAB, (2, 6))
    alone = _serve_from(src, ids, offload="cpu", quantize=quantize, group_size=8, max_resident_blocks=0)
    ranks = zstream.launch(_serve_from, 2, out, ids, offload="nvme", max_resident_blocks=0)
    for logits, tokens, streamed in ranks:
        assert (logits - alone[0]).abs().max().item() <= 1e-5
        assert torch.equal(tokens, alone[1])
        assert alone[2] / 2 <= streamed < alone[2] * 0.6  # its piece of every block, from its own files
    # each rank's files hold its pieces: its blocks are about half the whole's
    store = zstream.WeightStore.open(out / "rank1-of-2")
    whole = zstream.WeightStore.open(src)
    name = "model.layers.0.mlp.down_proj.weight" + (".qcodes" if quantize else "")
    half = whole.info("model.layers.0.mlp.down_proj.weight").shape[1] // 2
    assert store.info(name).shape[1] == (half // 2 if quantize else half)
    with pytest.raises(UsageError, match="laid out for 2 tensor-parallel ranks"):
        zstream.load(out, device="cpu", progress=False)
    with pytest.raises(UsageError, match="one rank's pieces"):
        zstream.load(out / "rank0-of-2", device="cpu", progress=False)
    with pytest.raises(UsageError, match="already laid out for tensor parallelism"):
        zstream.pack(out, tmp_path / "again", quantize="int8", tensor_parallel=2, progress=False)
    with pytest.raises(UsageError, match="tensor_parallel must be a number of ranks >= 1"):
        zstream.pack(src, tmp_path / "zero", quantize="int8", tensor_parallel=0, progress=False)


def _to_fp16(path: Path, but_block_norms: bool) -> None:
    """Rewrites ``path``'s checkpoint (saved in fp32) in fp16; ``but_block_norms``: the blocks' norms stay fp32."""
    from safetensors.torch import load_file, save_file

    (file,) = path.glob("*.safetensors")

    def kept(name: str) -> bool:  # (bloom's blocks are transformer.h.N)
        return but_block_norms and "layernorm" in name and ".h." in name

    save_file({k: t if kept(k) else t.half() for k, t in load_file(file).items()}, file, metadata={"format": "pt"})


@pytest.mark.parametrize(("case", "at_load", "packed"), [("bloom", None, None), ("bloom-fp32-norms", "int4", None),
                                                         ("llama-gqa", "int4", None), ("opt-post-ln", "int8", None),
                                                         ("qwen2", None, "int8")])
def test_a_ranks_planned_sizes_are_the_bytes_of_its_pieces_written_out(tmp_path: Path, case: str, at_load: Any,
                                                                       packed: Any) -> None:
    """A rank that cuts its pieces from whole blocks at load plans their sizes from the shard's shapes; the same
    pieces written out by ``zstream pack --tensor-parallel`` are files whose bytes the planner reads as stored. The
    two agree for every rank, block by block, as streamed and before quantization, with the same tensor names:
    unquantized, quantized at load and packed before sharding; the blocks' norms in another dtype than the
    embeddings are sized in their own."""
    from zstream.foundations.checkpoint import read_config
    from zstream.foundations.quant import QuantConfig
    from zstream.planning.facts import checkpoint_facts

    src = save_with_transformers(_config(case.split("-fp32")[0], 2), tmp_path / "src")
    _to_fp16(src, but_block_norms=case.endswith("fp32-norms"))
    layout = zstream.pack(src, tmp_path / "tp2", quantize=at_load or packed, group_size=8, tensor_parallel=2,
                          progress=False)
    if packed:
        src = zstream.pack(src, tmp_path / "packed", quantize=packed, group_size=8, progress=False)
    quant = QuantConfig.parse(at_load, group_size=8)
    whole = zstream.WeightStore.open(src)
    whole_family = family_for(read_config(src), whole.names())
    alone = checkpoint_facts(whole, whole_family, dtype=None, device_type="cpu", quantize=quant, where="whole")
    if at_load:  # one process quantizing at load plans the bytes zstream pack writes
        one = zstream.pack(src, tmp_path / "whole", quantize=at_load, group_size=8, progress=False)
        own = zstream.WeightStore.open(one)
        written = checkpoint_facts(own, family_for(read_config(one), own.names()), dtype=None, device_type="cpu",
                                   quantize=None, where="one")
        assert (alone.block_bytes, alone.unquantized_block_bytes) == (written.block_bytes,
                                                                      written.unquantized_block_bytes)
    for rank in range(2):
        family = whole_family.shard(rank, 2, reduce=lambda t: t)
        cut = checkpoint_facts(whole, family, dtype=None, device_type="cpu", quantize=quant, where="whole",
                               shard_at_load=True)
        own = zstream.WeightStore.open(layout / f"rank{rank}-of-2")
        written = checkpoint_facts(own, family, dtype=None, device_type="cpu", quantize=None, where="own")
        assert cut.block_bytes == written.block_bytes, rank
        assert cut.unquantized_block_bytes == written.unquantized_block_bytes, rank
        assert cut.block_names == written.block_names
        assert (cut.quant is None) == (written.quant is None) == (not (at_load or packed))
        assert cut.packed == bool(packed) and cut.quantize_at_load == bool(at_load)
        assert alone.block_bytes[0] / 2 <= cut.block_bytes[0] < alone.block_bytes[0] * 0.6  # a piece, not the block
        assert cut.stored_block_names == (cut.block_names if packed
                                          else [whole_family.block_tensors(i) for i in range(family.num_blocks)])


def _trace(path: Path, out: Path, ids: torch.Tensor) -> int:
    with zstream.load(path, device="cpu", offload="cpu", max_resident_blocks=0, progress=False) as model:
        model.trace_start()
        model(ids)
        return len(model.trace_stop(out)["traceEvents"])


def test_a_trace_has_a_process_per_rank(tiny_bloom: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "trace.json"
    counts = zstream.launch(_trace, 2, tiny_bloom, out, torch.randint(4, VOCAB, (2, 5)))
    events = json.loads(out.read_text())["traceEvents"]
    assert counts == [len(events)] * 2
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {1: "rank 0", 2: "rank 1"}
    for pid in (1, 2):  # each rank computed its 3 streamed blocks, and copied them (and the next pass's, ahead)
        def track(tid: int, pid: int = pid) -> List[str]:
            return [e["name"] for e in events if e["ph"] == "X" and e["pid"] == pid and e["tid"] == tid]

        assert track(3) == ["block 0", "block 1", "block 2"]
        assert set(track(2)) == set(track(3))


# ---- the group's waiting and failure reports, in one process (a stand-in store; no process group) --------------------
class _Store:
    """The four calls Group makes on torch.distributed's store."""

    def __init__(self) -> None:
        self.data: Dict[str, bytes] = {}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: List[str]) -> bool:
        return all(k in self.data for k in keys)


def _group(rank: int, world: int, store: _Store, timeout_s: float = 5.0) -> Any:
    from zstream.foundations.parallel import Group

    group = object.__new__(Group)  # what __init__ sets, without a process group
    group.pg, group.backend, group.timeout_s, group.waits = None, "gloo", timeout_s, True
    group.rank, group.world, group._key, group._store, group._broken = rank, world, "zstream/test/", store, None
    group._gathers = iter(range(1000))
    return group


def test_a_posted_failure_stops_the_others_waits_and_breaks_the_group() -> None:
    store = _Store()
    rank0, rank1 = _group(0, 2, store), _group(1, 2, store)
    rank1.fail(ValueError("bad weights"))
    rank1.fail(RuntimeError("a second failure is not posted"))
    rank1.fail(ParallelError("nor is a consequence"))
    with pytest.raises(ParallelError, match=r"rank 1 failed: ValueError: bad weights; rank 0 stopped waiting in x"):
        rank0._poll(lambda: False, "x")
    with pytest.raises(ParallelError, match=r"group is broken \(rank 1 failed: ValueError: bad weights"):
        rank0.gather(None, "y")
    with pytest.raises(ParallelError, match=r"group is broken \(rank 1 \(this one\) failed earlier: ValueError"):
        rank1.all_reduce(torch.zeros(1))


def test_a_wait_ends_at_the_timeout_when_nobody_reports() -> None:
    rank0 = _group(0, 2, _Store(), timeout_s=0.2)
    with pytest.raises(ParallelError, match=r"rank 0 waited 0 s in z and no rank reported a failure"):
        rank0._poll(lambda: False, "z")
    error = _group(0, 2, _Store())._peer_failure("an all-reduce", RuntimeError("Connection closed by peer\nmore"))
    assert str(error) == ("a rank left the group without reporting a failure; rank 0 stopped in an all-reduce "
                          "(RuntimeError: Connection closed by peer)")


def test_gather_returns_every_ranks_object_in_rank_order() -> None:
    store = _Store()
    ranks = [_group(r, 3, store) for r in range(3)]
    for r in (2, 1):  # the others have posted theirs
        key = f"zstream/test/gather0/{r}"
        store.set(key, pickle.dumps({"rank": r}))
    assert ranks[0].gather({"rank": 0}, "w") == [{"rank": 0}, {"rank": 1}, {"rank": 2}]


def test_a_ranks_options_turn_cuda_graphs_off_and_say_so() -> None:
    """A rank's decode step all-reduces between blocks and is never graphed (``StreamingModel._graphable``): its
    plan must neither say it replays a graph nor reserve a graph's memory, so the rank's options turn it off."""
    from zstream.api import load as load_module
    from zstream.api.options import load_options

    asked = load_options(device="cpu", offload="cpu", cuda_graphs=True)
    with pytest.warns(RuntimeWarning, match="cuda_graphs has no effect under tensor parallelism"):
        rank = load_module._rank_options(asked, "cpu", 2)
    assert asked.cuda_graphs and not rank.cuda_graphs and not rank.plan_options().cuda_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none asked (the default): off, and nothing said
        default = load_module._rank_options(load_options(device="cpu", offload="cpu"), "cpu", 2)
        assert default.offload == "cpu" and not default.plan_options().cuda_graphs
