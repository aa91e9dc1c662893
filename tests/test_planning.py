"""The plan step on made-up hardware: every offload mode x budget x quantization x hardware report (a PCIe GPU, a
GH200, no GPU), checked against the rules as the docs state them, worked out here by hand; the auto rule at its
edges; every refusal. Pure functions: nothing is read, nothing touches a device."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from zstream.api.synthetic import PRESETS
from zstream.errors import ModelError, OutOfMemoryError, QuantizationError, UsageError
from zstream.foundations.hardware import HardwareReport
from zstream.foundations.models import family_for
from zstream.foundations.quant import QuantConfig, block_quant_for
from zstream.planning.facts import CheckpointFacts, facts_from_shapes
from zstream.planning.offload import HOST_SLACK_BYTES, choose_offload, host_holds
from zstream.planning.residency import PlanOptions, Resources, plan_load, reserve_bytes

GiB = 1 << 30
FAMILY = family_for(PRESETS["bloom-7b1"])
FP16 = facts_from_shapes(FAMILY, torch.float16)
BLOCK = FP16.block_bytes[0]          # 403 MB: every bloom-7b1 block is the same
OUTER = FP16.outer_bytes             # 2.06 GB: the embedding (tied head) and norms


def quantized(packed: bool) -> CheckpointFacts:
    """bloom-7b1 with int4 blocks: packed on disk, or quantized at load."""
    bq = block_quant_for(QuantConfig(4, 64), FAMILY.block_shapes(), FAMILY.linear_weights(), torch.float16)
    names = [bq.names(n) for n in FP16.block_names]
    per_block = bq.nbytes(FAMILY.block_shapes(), {k: 2 for k in FAMILY.block_shapes()})
    return CheckpointFacts(FAMILY, torch.float16, torch.float16, names if packed else FP16.stored_block_names, names,
                           FP16.outer_names, [per_block] * FAMILY.num_blocks, OUTER, bq, packed, FP16.block_bytes)


QUANT = {"fp16": FP16, "int4-at-load": quantized(False), "int4-packed": quantized(True)}
PCIE = HardwareReport(gpu="H200", gpu_memory_bytes=141 * GiB, link="PCIe gen5 x16", can_map_host_memory=True,
                      host_pointer_for_registered_mem=True)
GH200 = HardwareReport(gpu="GH200", gpu_memory_bytes=96 * GiB, link="NVLink-C2C", pageable_memory_access=True,
                       uses_host_page_tables=True, can_map_host_memory=True, host_pointer_for_registered_mem=True)
HARDWARE = {
    "pcie": Resources("cuda:0", device_free=140 * GiB, host_available=120 * GiB, report=PCIE),
    "gh200": Resources("cuda:0", device_free=95 * GiB, host_available=400 * GiB, report=GH200),
    "no-gpu": Resources("cpu", device_free=None, host_available=20 * GiB),
}
# no budget (the device's free memory), enough for everything, a third of the blocks, not even the ring
BUDGETS = {"free": None, "all": 40 * GiB, "third": None, "tiny": 1 * GiB}
SEQ = 2048


def reserve(facts: CheckpointFacts) -> int:
    return reserve_bytes(FAMILY, 1, SEQ, facts.dtype, facts.quant)


def budget_of(name: str, facts: CheckpointFacts) -> int | None:
    if name == "third":  # outer + reserve + a ring of 3 + 10 blocks
        return facts.device_outer_bytes + reserve(facts) + 3 * max(facts.device_block_bytes) + \
            10 * facts.device_block_bytes[0] + 1000
    return BUDGETS[name]


def expected(offload: str, budget_name: str, quant: str, hw: str):
    """(offload, resident blocks) by the rules of docs/architecture.md, or the exception class; worked out here."""
    facts, res = QUANT[quant], HARDWARE[hw]
    n, cuda = FAMILY.num_blocks, res.device_type == "cuda"
    budget = budget_of(budget_name, facts)
    room = budget if budget is not None else (res.device_free if cuda else None)
    weights = facts.device_outer_bytes + n * facts.device_block_bytes[0]
    if offload == "auto":
        fits = weights + reserve(facts) <= (room if room is not None else res.host_available)
        if fits:
            offload = "none"
        elif res.report.ats and facts.quant is None:
            offload = "ats"
        elif cuda and res.host_available > weights * 1.1 + HOST_SLACK_BYTES:
            offload = "cpu"
        else:
            offload = "nvme"
    if facts.quantize_at_load and offload in ("nvme", "ats"):
        return QuantizationError
    if offload == "ats":
        if facts.packed:
            return QuantizationError
        return ("ats", 0) if cuda else ModelError
    if offload == "none":
        if room is not None and weights + reserve(facts) > room:
            return OutOfMemoryError
        return "none", n
    if not cuda and offload == "cpu":
        return "cpu", n  # host memory is the CPU's device memory
    if not cuda and room is None:
        return offload, 0  # nvme on the CPU streams every block
    if weights + reserve(facts) <= room:
        return offload, n
    avail = room - facts.device_outer_bytes - reserve(facts) - 3 * max(facts.device_block_bytes)
    if avail < 0:
        return OutOfMemoryError
    return offload, min(n, avail // facts.device_block_bytes[0])


CASES = list(itertools.product(["auto", "none", "cpu", "nvme", "ats"], BUDGETS, QUANT, HARDWARE))


@pytest.mark.parametrize(("offload", "budget", "quant", "hw"), CASES, ids=["-".join(c) for c in CASES])
def test_every_mode_budget_quantization_and_machine(offload, budget, quant, hw):
    facts, res = QUANT[quant], HARDWARE[hw]
    options = PlanOptions(offload=offload, budget=budget_of(budget, facts), prefetch=2, max_seq_len=SEQ)
    want = expected(offload, budget, quant, hw)
    if isinstance(want, type):
        with pytest.raises(want):
            plan_load(facts, res, options, where="ckpt")
        return
    plan = plan_load(facts, res, options, where="ckpt")
    mode, resident = want
    assert (plan.offload, len(plan.resident_blocks)) == (mode, resident)
    assert plan.resident_blocks == list(range(resident))                 # the first blocks stay
    assert plan.streamed_blocks == list(range(resident, FAMILY.num_blocks))
    assert plan.ring_slots == min(3, len(plan.streamed_blocks))
    assert plan.block_bytes == facts.block_bytes and plan.quantization == (
        None if facts.quant is None else "int4, group 64, asymmetric")
    if mode == "ats":  # read in place: nothing reserved on the device, no budget, the link by what the GPU can do
        assert (plan.device, plan.dtype, plan.outer_bytes, plan.kv_reserve_bytes, plan.budget_bytes) == (
            res.device, facts.dtype, facts.outer_bytes, 0, None)
        assert plan.link == ("ATS (pageable memory read in place)" if hw == "gh200"
                             else "mapped pinned memory read in place")
        assert [n for n in plan.notes if n.startswith("offload='auto' chose 'ats'")] == (
            [] if offload == "ats" else [plan.notes[-1]])
    if mode not in ("ats",) and plan.budget_bytes is not None and plan.streamed_blocks:
        used = plan.outer_bytes + resident * facts.device_block_bytes[0] + 3 * facts.device_block_bytes[0]
        assert used + plan.kv_reserve_bytes <= plan.budget_bytes          # what stays fits the budget


# ---- the auto rule at its edges --------------------------------------------------------------------------------


def test_none_exactly_at_the_budget_and_not_one_byte_over():
    assert choose_offload(100, 20, 120, 0, device_type="cuda")[0] == "none"
    assert choose_offload(101, 20, 120, 10**12, device_type="cuda")[0] == "cpu"


def test_cpu_only_with_host_memory_to_spare():
    w = 50 * GiB
    edge = int(w * 1.1) + HOST_SLACK_BYTES
    assert choose_offload(w, 0, 1, edge, device_type="cuda")[0] == "nvme"  # strictly more than the slack is needed
    assert choose_offload(w, 0, 1, edge + 1, device_type="cuda")[0] == "cpu"
    assert choose_offload(w, 0, 1, edge + 1, device_type="cpu")[0] == "nvme"  # the CPU's weights come from disk
    assert not host_holds(0, HOST_SLACK_BYTES) and host_holds(0, HOST_SLACK_BYTES + 1)  # strictly more, exactly


def test_ats_only_where_the_gpu_reads_host_page_tables_and_blocks_are_not_quantized():
    assert choose_offload(10, 0, 1, 100, device_type="cuda", ats=True)[0] == "ats"
    offload, note = choose_offload(10, 0, 1, 10**12, device_type="cuda", ats=True, quantized=True)
    assert (offload, note) == ("cpu", "offload='auto' chose 'cpu': weights 10 B, KV+activations 0 B, budget 1 B; "
                                      "quantized weights stream by copies, not in place (ats)")
    assert "not in place" not in choose_offload(10, 0, 1, 10**12, device_type="cuda", quantized=True)[1]
    assert choose_offload(10, 0, 1, 10**12, device_type="cuda", ats=False)[0] == "cpu"


def test_an_in_place_plan_carries_the_kv_cache_and_micro_batch_options():
    """offload="ats" with the cache split between the link and the CPUs, micro-batches of 2, batch 4 of 512: the plan
    carries them, and the host cache of every layer (K and V, 4 x 512 positions, 32 heads x 128, fp16)."""
    options = PlanOptions(offload="ats", kv_offload="split", kv_cpu_layers=5, micro_batch=2, max_batch=4,
                          max_seq_len=512)
    plan = plan_load(FP16, HARDWARE["gh200"], options, where="x")
    assert (plan.kv_offload, plan.kv_cpu_layers, plan.micro_batch) == ("split", 5, 2)
    assert plan.kv_host_bytes == 30 * 2 * 4 * 512 * 4096 * 2
    assert plan_load(FP16, HARDWARE["gh200"], PlanOptions(offload="ats", kv_offload="split"), where="x") \
        .kv_cpu_layers == 15  # half, by default


def test_quantizing_at_load_never_lands_on_disk():
    with pytest.raises(QuantizationError, match=r"x: the weights quantized \(10.0 GiB\) do not fit host memory \(1 B "
                                                r"available\).*zstream pack x OUT"):
        choose_offload(10 * GiB, 0, 1, 1, device_type="cuda", quantized=True, quantize_at_load=True, where="x")
    assert choose_offload(10 * GiB, 0, 1, 1, device_type="cuda", quantized=True)[0] == "nvme"  # packed: fine


def test_the_note_says_why():
    _, note = choose_offload(14 * GiB, 2 * GiB, 8 * GiB, 100 * GiB, device_type="cuda")
    assert note == "offload='auto' chose 'cpu': weights 14.0 GiB, KV+activations 2.0 GiB, budget 8.0 GiB"


# ---- options and refusals ----------------------------------------------------------------------------------------


def test_max_resident_blocks_caps_what_the_budget_allows():
    plan = plan_load(FP16, HARDWARE["pcie"], PlanOptions(offload="cpu", max_resident_blocks=4), where="x")
    assert plan.resident_blocks == [0, 1, 2, 3] and plan.streamed_blocks == list(range(4, 30))
    assert plan.predicted_step_s is None  # the link is measured by the builder, not here
    plan.link_gbps = 55.0
    assert plan.predicted_step_s == pytest.approx(26 * BLOCK / 55e9)


def test_the_reserve_grows_with_batch_and_sequence_up_to_the_models_positions():
    one, many, capped = (plan_load(FP16, HARDWARE["pcie"], PlanOptions(offload="cpu", max_batch=b, max_seq_len=s),
                                   where="x").kv_reserve_bytes for b, s in ((1, 512), (8, 2048), (8, 4096)))
    kv_per_token = 2 * 30 * 4096 * 2  # K and V, 30 blocks, 32 heads x 128, fp16
    assert many - one >= (8 * 2048 - 512) * kv_per_token
    assert capped == many  # bloom-7b1 has 2048 positions


def test_refusals_name_the_fix():
    with pytest.raises(UsageError, match="offload must be one of"):
        plan_load(FP16, HARDWARE["pcie"], PlanOptions(offload="gpu"), where="x")
    with pytest.raises(OutOfMemoryError, match="gpu_memory of at least"):
        plan_load(FP16, HARDWARE["pcie"], PlanOptions(offload="cpu", budget=GiB), where="x")
    with pytest.raises(OutOfMemoryError, match="use offload='cpu' or 'nvme'"):
        plan_load(FP16, HARDWARE["pcie"], PlanOptions(offload="none", budget=GiB), where="x")
    no_map = Resources("cuda:0", device_free=GiB, host_available=GiB, report=HardwareReport(gpu="old"))
    with pytest.raises(ModelError, match="old has neither"):
        plan_load(FP16, no_map, PlanOptions(offload="ats"), where="x")
    bf16 = CheckpointFacts(*[getattr(FP16, f) for f in ("family", "checkpoint_dtype")], torch.bfloat16,
                           *[getattr(FP16, f) for f in ("stored_block_names", "block_names", "outer_names",
                                                        "block_bytes", "outer_bytes")])
    with pytest.raises(ModelError, match="computes in the checkpoint's dtype"):
        plan_load(bf16, HARDWARE["gh200"], PlanOptions(offload="ats"), where="x")


def test_a_micro_batch_size_leaves_an_all_resident_plan_graphed():
    """With cuda_graphs on a GPU and every block resident, the plan allows the graph whatever the micro-batch size: a
    batch no larger runs whole and the step graphs it, as the batch planner predicts (run 5 of 2026-12-05: load's
    micro_batch=16 had kept batch 7 eager, 1.141x its graphed prediction)."""
    options = PlanOptions(offload="none", budget=None, max_seq_len=SEQ, cuda_graphs=True, micro_batch=16)
    plan = plan_load(FP16, HARDWARE["pcie"], options, where="ckpt")
    assert plan.decode_graph and plan.micro_batch == 16 and not plan.streamed_blocks
    eager = plan_load(FP16, HARDWARE["pcie"], dataclasses.replace(options, cuda_graphs=False), where="ckpt")
    assert not eager.decode_graph


def test_a_decode_graphs_memory_is_reserved_and_never_costs_a_resident_block():
    """A graphed plan reserves the graph's own memory: its pool, a decode step's working set (bloom-7b1 at batch 7:
    each row's 24 hidden-sized activations in fp16 and 8 bytes a vocabulary entry of logits, fp32 attention scores
    and weights over 544 keys of 32 heads) over the allocator's first small and large segments (2 and 20 MiB),
    and the recording stream's cuBLAS workspace, 33 MiB on the H200. The graphed batch-7 row of run 4 of 2026-12-05
    peaked at 16.49 GiB under a 16 GiB budget (item 36: mostly streams' workspaces). Where the graph does not fit
    beside every block, the plan keeps every block and decodes eagerly."""
    options = PlanOptions(offload="cpu", budget=16 * GiB, max_batch=7, max_seq_len=544, cuda_graphs=True)
    eager = plan_load(FP16, HARDWARE["pcie"], dataclasses.replace(options, cuda_graphs=False), where="ckpt")
    graphed = plan_load(FP16, HARDWARE["pcie"], options, where="ckpt")
    want = 7 * (4096 * 24 * 2 + 250880 * 8) + 2 * 7 * 32 * 544 * 4 + (2 + 20 + 33) * 2**20
    assert graphed.decode_graph and not graphed.streamed_blocks
    assert graphed.kv_reserve_bytes - eager.kv_reserve_bytes == want
    assert "CUDA graph" in graphed.summary() and "reserved" in graphed.summary()
    used = FP16.device_bytes + eager.kv_reserve_bytes
    short = plan_load(FP16, HARDWARE["pcie"], dataclasses.replace(options, budget=used + want - 1), where="ckpt")
    assert not short.decode_graph and not short.streamed_blocks and short.kv_reserve_bytes == eager.kv_reserve_bytes
    assert "run eagerly" in short.summary()
    exact = dataclasses.replace(options, budget=used + want)
    assert plan_load(FP16, HARDWARE["pcie"], exact, where="ckpt").decode_graph
