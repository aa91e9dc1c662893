"""The predictive batch planner (``zstream.plan_batch``): its memory arithmetic against the loader's, its ring
schedule against hand-worked cases, its choices under synthetic compute models, and a calibration on the CPU.

No assertion on an absolute time: the calibration tests check which points are timed, that each fit is the best
non-negative fit of the timings taken, and (by recording calls) what runs inside a timed call."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import random
import statistics
import warnings

import numpy as np
import pytest
import torch

import zstream
from zstream.api.plan_batch import plan_batch
from zstream.errors import OutOfMemoryError
from zstream.foundations.models import family_for
from zstream.foundations.units import parse_bytes
from zstream.planning.batch import (
    ComputeModel,
    Linear3,
    ModelSizes,
    ThroughputModel,
    choose_batch,
    ring_schedule,
    steady_period,
)
from zstream.planning.facts import facts_from_shapes
from zstream.planning.residency import GRAPH_MIN_STEPS, choose_residency
from zstream.streaming import calibrate
from zstream.streaming.calibrate import calibrate_compute

MB = 10**6


def compute_model(num_blocks: int, block_s: float = 1e-3, per_token: float = 2e-5, per_key: float = 1e-8,
                  outer_s: float = 5e-4) -> ComputeModel:
    """A synthetic compute model: a block costs ``block_s`` plus ``per_token`` a row plus attention; prefill
    costs ``per_token`` / 10 a token (matmuls over many tokens run far nearer peak than decode's)."""
    return ComputeModel(num_blocks=num_blocks,
                        decode_block=Linear3(block_s, per_token, per_key),
                        decode_outer=Linear3(outer_s, per_token, 0.0),
                        prefill_block=Linear3(block_s, per_token / 10, per_key),
                        prefill_outer=Linear3(outer_s, 0.0, 0.0))


def toy_sizes(n: int = 10, block: int = 100 * MB, outer: int = 50 * MB, per_token: int = 100_000) -> ModelSizes:
    """``n`` equal blocks; the reserve is ``per_token`` bytes per (row x position) plus a constant."""
    return ModelSizes(block_bytes=[block] * n, device_block_bytes=[block] * n, outer_bytes=outer,
                      reserve=lambda batch, seq: batch * seq * per_token + 10 * MB, max_positions=4096)


def bloom_sizes() -> tuple[ModelSizes, object]:
    """bloom-7b1's sizes in fp16, from its config alone, as ``load`` computes them."""
    family = family_for(zstream.synthetic.PRESETS["bloom-7b1"])
    return ModelSizes.of(facts_from_shapes(family, torch.float16)), family


# ---- memory: the loader's arithmetic -----------------------------------------------------------------------------


def test_memory_reproduces_the_h100_max_batches():
    """docs/performance.md, run 12: at gpu_memory="16GiB", prompt 512, 32 new tokens, bloom-7b1 ran batch 7 at most
    without offload and 36 with. The planner's memory arithmetic is the loader's, so it finds the same limits."""
    sizes, _ = bloom_sizes()
    plan = choose_batch(sizes, compute_model(30), budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu")
    assert plan.max_batch("none") == 7
    assert plan.max_batch("cpu") == 36
    assert plan.candidate(36, 0) is not None and plan.candidate(36, 1) is None
    assert plan.candidate(37, 0) is None


def test_a_candidate_streaming_fewer_blocks_than_slots_holds_the_loaders_ring():
    """bloom-7b1 at batch 7 under 16 GiB: every block fits, and the planner also weighs streaming the last one or two
    (run 8 of 2026-12-06 chose 29/30). ``plan_load`` capped so gives the ring as many slots as blocks stream, and the
    candidate's memory is what that plan holds (it had counted three slots: 16.6 GiB, over the budget the row ran
    under at 15.5)."""
    from zstream.planning.residency import PlanOptions, Resources, plan_load

    sizes, family = bloom_sizes()
    budget = parse_bytes("16GiB")
    facts = facts_from_shapes(family, torch.float16)
    plan = choose_batch(sizes, compute_model(30), budget=budget, prompt=512, gen=32, link_gbps=55.0, stream="cpu",
                        max_batch=7)
    for resident in (27, 28, 29, 30):
        c = plan.candidate(7, resident)
        assert c is not None and c.memory_bytes <= budget
        loaded = plan_load(facts, Resources("cuda:0", device_free=budget), PlanOptions(
            offload="cpu", budget=budget, max_batch=7, max_seq_len=544, max_resident_blocks=resident), where="ckpt")
        assert loaded.ring_slots == min(3, 30 - resident)
        assert c.memory_bytes == loaded.resident_bytes + loaded.ring_bytes + loaded.kv_reserve_bytes


def test_every_candidate_fits_and_residency_is_choose_residencys():
    sizes = toy_sizes()
    budget = 700 * MB
    plan = choose_batch(sizes, compute_model(10), budget=budget, prompt=100, gen=20, link_gbps=10.0, stream="cpu")
    assert plan.table
    seq = 120
    for c in plan.table:
        assert c.memory_bytes <= budget
        resident, _ = choose_residency(sizes.device_block_bytes, sizes.outer_bytes, budget, 3,
                                       sizes.reserve(c.batch, seq), where="t")
        assert c.resident_blocks <= len(resident)
    for batch in {c.batch for c in plan.table}:
        most = max(c.resident_blocks for c in plan.table if c.batch == batch)
        assert most == sizes.max_resident(budget, batch, seq, 3)
        assert {c.resident_blocks for c in plan.table if c.batch == batch} == set(range(most + 1))
    # the first batch left out is the first that does not fit, even with every block streamed
    top = plan.max_batch()
    assert sizes.max_resident(budget, top + 1, seq, 3) is None


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    config = {**zstream.synthetic.PRESETS["tiny-bloom"], "n_layer": 6}
    return zstream.synthetic.make_checkpoint(config, tmp_path_factory.mktemp("planner") / "m", dtype=torch.float32,
                                             progress=False)


def test_chosen_configurations_load_under_the_budget(tiny_bloom):
    """Every batch's best residency, and the overall best, load with ``zstream.load`` under the same budget (the CPU
    as the device, ``gpu_memory`` as its budget) with the residency predicted, and generate; one batch more does not
    load at all."""
    probe = zstream.load(tiny_bloom, offload="nvme", device="cpu", progress=False).plan
    block = max(probe.block_bytes)
    budget = probe.outer_bytes + probe.kv_reserve_bytes + 3 * block + 4 * block  # ring of 3, about 4 blocks more
    plan = plan_batch(tiny_bloom, gpu_memory=budget, prompt=12, gen=4, offload="nvme", device="cpu",
                      link_gbps=1.0, compute=compute_model(6, per_token=1e-4))
    front = plan.frontier()
    assert plan.best is not None and len(front) > 4
    assert {c.offload for c in front} == {"none", "nvme"}  # small batches keep every block, large ones stream
    picks = [front[0], front[len(front) // 2], front[-1], plan.best, plan.candidate(front[-1].batch, 0)]
    for c in picks:
        assert c is not None
        model = zstream.load(tiny_bloom, progress=False, **plan.load_kwargs(c))
        assert model.plan.offload == c.offload
        assert len(model.plan.resident_blocks) == c.resident_blocks
        assert model.plan.kv_reserve_bytes + model.plan.resident_bytes <= budget
        out = model.generate(torch.randint(3, 200, (c.batch, 12)), max_new_tokens=4)
        assert out.shape == (c.batch, 16)
        model.close()
    top = plan.max_batch()
    with pytest.raises(OutOfMemoryError):
        zstream.load(tiny_bloom, offload="nvme", device="cpu", gpu_memory=budget, max_batch=top + 1, max_seq_len=16,
                     progress=False)
    with pytest.raises(OutOfMemoryError):
        zstream.load(tiny_bloom, offload="none", device="cpu", gpu_memory=budget,
                     max_batch=plan.max_batch("none") + 1, max_seq_len=16, progress=False)


# ---- the schedule ----------------------------------------------------------------------------------------------


def test_schedule_without_compute_is_the_transfer_bound():
    """Nothing to overlap with: a pass is the streamed bytes over the link, whatever the ring."""
    tm = ThroughputModel(compute_model(10), [100 * MB] * 10, link_gbps=10.0, ring_slots=3)
    for resident in (0, 4, 9):
        step, xfer, _ = tm.pass_s(resident, block_s=0.0, outer_s=0.0)
        assert xfer == pytest.approx((10 - resident) * 0.01)
        assert step == pytest.approx(xfer)


def test_schedule_with_an_infinite_link_is_the_compute():
    tm = ThroughputModel(compute_model(10), [100 * MB] * 10, link_gbps=1e12, ring_slots=3)
    step, _, comp = tm.pass_s(2, block_s=1e-3, outer_s=5e-4)
    assert comp == pytest.approx(10e-3 + 5e-4)
    assert step == pytest.approx(comp, rel=1e-6)


def test_a_loop_waiting_for_its_tokens_keeps_the_link_busy_across_passes():
    """Hand-worked: 6 resident blocks of 1 ms, 4 streamed of 10 ms copies, 3 slots. The first pass after a
    synchronisation (a prefill) finds blocks 6-8 landed; block 9's copy waits for block 6's compute (slot reuse), at
    7 ms, and lands at 17: the pass ends at 18. The next pass's copies of blocks 6-8 queue behind it (27, 37, 47 ms)
    while its resident blocks compute (18-24), and block 9's behind them (57): it ends at 58, 40 ms later, the
    streamed bytes over the link, and so does every pass after it."""
    tm = ThroughputModel(compute_model(10), [100 * MB] * 10, link_gbps=10.0, ring_slots=3)
    copies = [0.01] * 4
    assert ring_schedule(copies, 3, 6, 1e-3, 0.0, 3) == pytest.approx([0.018, 0.058, 0.098])
    step, xfer, comp = tm.pass_s(6, block_s=1e-3, outer_s=0.0)
    assert xfer == pytest.approx(0.04) and comp == pytest.approx(0.01)
    assert step == pytest.approx(0.040)
    assert tm.pass_s(6, block_s=1e-3, outer_s=0.0, first=True)[0] == pytest.approx(0.018)
    # every block streamed: the link never waits; the first pass copies all but the 3 that landed before it
    step, xfer, _ = tm.pass_s(0, block_s=1e-3, outer_s=0.0)
    assert step == pytest.approx(xfer) == pytest.approx(0.1)
    assert tm.pass_s(0, block_s=1e-3, outer_s=0.0, first=True)[0] == pytest.approx(0.001 + 7 * 0.01 + 0.001)


def test_the_first_pass_after_a_synchronisation_is_the_prefills():
    """The prefill is a first pass: 0.018 s, as hand-worked above, where a decode step of the same blocks takes
    0.040 s."""
    tm = ThroughputModel(compute_model(10, block_s=1e-3, per_token=0.0, per_key=0.0, outer_s=0.0), [100 * MB] * 10,
                         link_gbps=10.0, ring_slots=3)
    assert tm.prefill(1, 6, 1)[0] == pytest.approx(0.018)
    assert tm.decode_step(1, 6, 1)[0] == pytest.approx(0.040)


def test_each_copy_is_of_its_own_block():
    """Streamed copies of 1, 1 and 30 ms in 2 slots: the first pass finds blocks 0 and 1 landed, and block 2's copy,
    30 ms, starts once block 0's compute (1 ms) frees its slot: the pass ends at 1 + 30 + 1 ms."""
    assert ring_schedule([1e-3, 1e-3, 30e-3], 2, 0, 1e-3, 0.0, 1) == pytest.approx([0.032])


def test_a_link_slower_than_the_compute_by_a_little_falls_behind_over_passes():
    """3 streamed blocks in 3 slots, each copied again every pass (5 ms), behind 4 resident blocks; 2 ms a block: the
    compute takes 14 ms a pass, the link 15. From the synchronisation the passes run at the compute's pace, the
    link 1 ms further behind each pass, until its copies hold them back: then every pass takes the link's 15 ms."""
    ends = ring_schedule([5e-3] * 3, 3, 4, 2e-3, 0.0, 6)
    assert [round((b - a) * 1e3, 9) for a, b in zip([0.0, *ends], ends)] == [14, 14, 14, 15, 15, 15]
    assert steady_period([5e-3] * 3, 3, 4, 2e-3, 0.0) == pytest.approx(0.015)


def test_a_link_slower_than_the_compute_by_very_little_is_the_bound_past_the_passes_played_out():
    """5 streamed blocks in 5 slots behind 2 resident ones, 3 ms a block: 21 ms of compute a pass, 21.1 of copies.
    Block 5's copy (10 ms) is issued once its compute of the pass before is done, with 9 ms to spare, and the link
    falls 0.1 ms further behind each pass: the compute's 21 ms passes hold for 82 passes, longer than
    ``STEADY_PASSES``; then the link's 21.1 ms. The period is the link's."""
    copies = [10e-3, 0.5e-3, 0.6e-3, 5e-3, 5e-3]
    ends = ring_schedule(copies, 5, 2, 3e-3, 0.0, 90)
    passes = [round((b - a) * 1e3, 9) for a, b in zip([0.0, *ends], ends)]
    assert passes[:82] == [21.0] * 82 and passes[82:] == [21.1] * 8
    assert steady_period(copies, 5, 2, 3e-3, 0.0) == pytest.approx(0.0211)


def test_a_settled_period_is_the_long_run_mean_of_the_passes():
    """``steady_period`` stops once a pass leaves the next what it was left; its answer is the mean pass of a run of
    300 (the last 100) for random rings: 2-96 blocks, every residency, 1-5 slots, either loop."""
    rng = random.Random(3)
    for _ in range(300):
        n = rng.choice([2, 4, 10, 30, 96])
        resident = rng.randrange(n)
        block, head = rng.choice([1e-5, 1e-3, 1e-2]) * rng.random(), 1e-2 * rng.random()
        copy = rng.choice([1e-4, 7e-3, 2e-2])
        copies = [copy * rng.uniform(0.5, 1.5) for _ in range(n - resident)]
        slots, synced = rng.randint(1, 5), rng.random() < 0.3
        ends = ring_schedule(copies, slots, resident, block, head, 300, synced)
        assert steady_period(copies, slots, resident, block, head, synced) == pytest.approx(
            (ends[-1] - ends[-101]) / 100, rel=1e-9)


def test_a_loop_synchronising_the_device_idles_the_link_while_resident_blocks_compute():
    """The same ring, each step waiting for every stream (``device_sync``): the next pass's 3 copies must land
    before the step ends, so they cannot overlap its resident blocks: 7 + 4 * 10 = 47 ms a pass."""
    tm = ThroughputModel(compute_model(10), [100 * MB] * 10, link_gbps=10.0, ring_slots=3, device_sync=True)
    assert ring_schedule([0.01] * 4, 3, 6, 1e-3, 0.0, 2, device_sync=True) == pytest.approx([0.047, 0.094])
    assert tm.pass_s(6, block_s=1e-3, outer_s=0.0)[0] == pytest.approx(0.047)
    assert tm.pass_s(6, block_s=1e-3, outer_s=0.0, first=True)[0] == pytest.approx(0.047)
    step, xfer, _ = tm.pass_s(0, block_s=1e-3, outer_s=0.0)
    assert step == pytest.approx(1e-3 + xfer)


def test_one_slot_holds_every_copy_back_until_the_compute_before_it():
    """prefetch=0: block g + 1's copy waits for block g's compute. A pass ends at E; block 6's copy runs E..E+10
    while the resident blocks compute (E..E+6); then each streamed block is its copy and its compute, one after the
    other: 4 x (10 + 1) = 44 ms a pass, not the link's 40."""
    tm = ThroughputModel(compute_model(10), [100 * MB] * 10, link_gbps=10.0, ring_slots=1)
    assert tm.pass_s(6, block_s=1e-3, outer_s=0.0)[0] == pytest.approx(0.044)
    assert steady_period([0.01] * 4, 1, 6, 1e-3, 0.0) == pytest.approx(0.044)
    # a ring has no more slots than streamed blocks (``DeviceRing``): one streamed block with 3 asked for is one
    # slot, its next copy (10 ms) waiting for its compute (1 ms)
    assert ring_schedule([0.01], 3, 0, 1e-3, 0.0, 2) == pytest.approx([0.001, 0.012])


def test_a_streamed_block_hidden_behind_the_compute_ties_and_the_fewer_streamed_wins():
    """One block of 10 streamed, its 10 ms copy run while the 9 others compute 45 ms: decode steps and prefill cost
    what every block resident costs, and of the tie the plan keeps every block on the device, in ``best`` and in
    the frontier."""
    plan = choose_batch(toy_sizes(), compute_model(10, block_s=5e-3), budget=None, prompt=8, gen=8,
                        link_gbps=10.0, stream="cpu", max_batch=1)
    one_streamed, none_streamed = plan.candidate(1, 9), plan.candidate(1, 10)
    assert one_streamed is not None and none_streamed is not None
    assert one_streamed.decode_step_s == pytest.approx(none_streamed.decode_step_s, rel=1e-12)
    assert one_streamed.tokens_per_s == pytest.approx(none_streamed.tokens_per_s, rel=1e-12)
    assert plan.best is not None and plan.best.resident_blocks == 10
    assert [c.resident_blocks for c in plan.frontier()] == [10]


def test_tokens_per_s_counts_like_the_bench():
    sizes = toy_sizes()
    plan = choose_batch(sizes, compute_model(10), budget=None, prompt=64, gen=16, link_gbps=None, stream=None,
                        max_batch=8)
    for c in plan.table:
        assert c.offload == "none" and c.resident_blocks == 10
        assert c.tokens_per_s == pytest.approx(c.batch * 16 / (c.prefill_s + 15 * c.decode_step_s))
    assert plan.max_batch() == 8  # no budget: only the cap ends the batches


# ---- choices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("link", [5.0, 55.0, 400.0])
def test_more_budget_never_predicts_fewer_tokens(link):
    sizes, _ = bloom_sizes()
    compute = compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10)
    last = 0.0
    for gib in (10, 12, 14, 16, 20, 24, 32, 48):
        plan = choose_batch(sizes, compute, budget=gib * 2**30, prompt=512, gen=32, link_gbps=link, stream="cpu")
        assert plan.best is not None
        assert plan.best.tokens_per_s >= last * (1 - 1e-12)
        last = plan.best.tokens_per_s


def test_fast_links_make_offload_pay():
    """bloom-7b1 at 16 GiB with a compute model like the H100's (9 ms steps at small batches): on PCIe (55 GB/s)
    keeping every block resident at batch <= 7 wins, as the H100 search found; on a GH200-like link (400 GB/s)
    streaming some blocks for a larger batch wins."""
    sizes, _ = bloom_sizes()
    compute = compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10)
    budget = parse_bytes("16GiB")
    slow = choose_batch(sizes, compute, budget=budget, prompt=512, gen=32, link_gbps=55.0, stream="cpu")
    fast = choose_batch(sizes, compute, budget=budget, prompt=512, gen=32, link_gbps=400.0, stream="cpu")
    assert slow.best is not None and fast.best is not None
    assert slow.best.offload == "none" and slow.best.batch <= 7
    assert fast.best.offload == "cpu" and fast.best.batch > 7
    assert fast.best.tokens_per_s > slow.best.tokens_per_s
    # with the link fixed, a slower device (compute-bound sooner) tips the same way
    slow_device = compute_model(30, block_s=2.8e-3, per_token=2e-4, per_key=2e-8)
    tipped = choose_batch(sizes, slow_device, budget=budget, prompt=512, gen=32, link_gbps=55.0, stream="cpu")
    assert tipped.best is not None and tipped.best.offload == "cpu"


def test_streaming_needs_a_link():
    with pytest.raises(ValueError, match="link"):
        choose_batch(toy_sizes(), compute_model(10), budget=10**9, prompt=8, gen=8, link_gbps=None, stream="cpu")


def test_linear_fit_recovers_and_stays_non_negative():
    samples = [(x, y, 1e-3 + 2e-5 * x + 3e-8 * x * y) for x in (1, 8, 64) for y in (100, 600)]
    fit = Linear3.fit(samples)
    assert (fit.c0, fit.c1, fit.c2) == pytest.approx((1e-3, 2e-5, 3e-8), rel=1e-6)
    falling = [(1, 1, 2.0), (10, 1, 1.0), (100, 1, 1.5)]  # noise that least squares would fit with c1 < 0
    fit = Linear3.fit(falling)
    assert min(fit.c0, fit.c1, fit.c2) >= 0


# ---- calibration on the CPU ------------------------------------------------------------------------------------


def assert_best_non_negative_fit(fit: Linear3, samples: list, relative: bool = True) -> None:
    """``fit`` minimises the squared error over ``samples`` (x, y, seconds) among coefficients >= 0, relative to each
    timing or (``relative=False``) in seconds: the optimality (KKT) conditions of that convex problem, checked in
    numpy. With A = [1, x, x * y] / w (w: each timing, or one constant) and r = A c - t / w, the gradient g = A^T r
    must be 0 along every positive coefficient and >= 0 along every zero one (moving a zero coefficient up must not
    help); scaled by each column's norm, so the tolerance is relative."""
    t = np.array([t for _, _, t in samples])
    w = t if relative else np.full_like(t, t.max())
    rows = np.array([[1.0, x, x * y] for x, y, _ in samples]) / w[:, None]
    c = np.array([fit.c0, fit.c1, fit.c2])
    assert (c >= 0).all(), c
    g = rows.T @ (rows @ c - t / w) / np.linalg.norm(rows, axis=0)
    for j in range(3):
        assert g[j] >= -1e-6 and (c[j] == 0 or abs(g[j]) <= 1e-6), (j, c, g)


def test_calibration_on_the_cpu_times_the_planned_points_and_fits_them(tmp_path):
    family = family_for(zstream.synthetic.PRESETS["tiny-llama"])
    cache = tmp_path / "compute.json"
    model = calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8, cache=cache)
    # Hand-worked points for max_batch 64, prompt 32, gen 8: decode at batches 1, sqrt(64) = 8 and 64, each at half
    # the prompt (16 keys) and the longest context (32 + 8 = 40); prefill at batches 1 and 64 (64 x 32 tokens is
    # under the 32768 cap) over half the prompt and the whole prompt.
    decode = {(s["batch"], s["context"]) for s in model.samples if s["phase"] == "decode"}
    prefill = {(s["batch"], s["prompt"]) for s in model.samples if s["phase"] == "prefill"}
    assert decode == {(b, c) for b in (1, 8, 64) for c in (16, 40)}
    assert prefill == {(b, p) for b in (1, 64) for p in (16, 32)}
    timed = [s for s in model.samples if s["phase"] != "loop"]
    assert len(timed) == 10
    # the decode loop's own work, at the smallest and the largest batch
    assert sorted(s["batch"] for s in model.samples if s["phase"] == "loop") == [1, 64]
    for s in timed:  # 5 rounds (the default), and the median of 5 is the third smallest
        for kind in ("block", "outer"):
            rounds = s[f"{kind}_rounds_s"]
            assert len(rounds) == 5 and all(t > 0 for t in rounds)
            assert s[f"{kind}_s"] == sorted(rounds)[2]
    # each decode fit is the best non-negative relative fit of its samples (a clamped or absolute-error fit is not),
    # each prefill fit the best in seconds (``calibrate.prefill_fit``; a relative one is not)
    dec = [s for s in model.samples if s["phase"] == "decode"]
    pre = [s for s in model.samples if s["phase"] == "prefill"]
    assert_best_non_negative_fit(model.decode_block, [(s["batch"], s["context"], s["block_s"]) for s in dec])
    assert_best_non_negative_fit(model.decode_outer, [(s["batch"], s["context"], s["outer_s"]) for s in dec])
    assert_best_non_negative_fit(model.prefill_block,
                                 [(s["batch"] * s["prompt"], s["prompt"], s["block_s"]) for s in pre], relative=False)
    assert_best_non_negative_fit(model.prefill_outer,
                                 [(s["batch"] * s["prompt"], s["prompt"], s["outer_s"]) for s in pre], relative=False)
    # cached in the process, and in the file across processes
    assert calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8) is model
    calibrate._COMPUTE_CACHE.clear()
    again = calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8, cache=cache)
    assert again is not model and again.to_dict() == model.to_dict()


def test_a_calibrations_weights_go_when_it_returns_even_if_its_frames_are_kept(monkeypatch):
    """Frames held in a reference cycle keep the timer until a garbage collection (a process whose first import of
    transformers runs inside the calibration keeps its frames so; here a kept traceback does); its weights (2.5 GB
    of bloom-7b1 on the device) go as the calibration returns, collected or not."""
    import gc
    import sys
    import weakref

    family = family_for(zstream.synthetic.PRESETS["tiny-bloom"])
    made: list = []
    random_weights = calibrate._random_weights

    def watched(*a: object) -> dict:
        weights = random_weights(*a)
        made.extend(weakref.ref(t) for t in weights.values())
        return weights

    monkeypatch.setattr(calibrate, "_random_weights", watched)
    kept: list = []
    decode_loop_s = calibrate._decode_loop_s

    def keeping_frames(*a: object, **kw: object) -> float:
        try:
            raise RuntimeError("kept")
        except RuntimeError:
            kept.append(sys.exc_info())  # the traceback keeps this frame and every caller's
        return decode_loop_s(*a, **kw)

    monkeypatch.setattr(calibrate, "_decode_loop_s", keeping_frames)
    gc.disable()
    try:
        calibrate_compute(family, "cpu", torch.float32, max_batch=2, prompt=8, gen=2, rounds=1, seed=7)
        assert kept and made and all(r() is None for r in made)
    finally:
        kept.clear()
        gc.enable()


def test_an_interrupted_calibration_lets_its_caches_and_graphs_go(monkeypatch):
    """Ctrl-C in the middle of a calibration: the traceback (kept by a notebook as the last one) keeps its frames, but
    not the timer's weights, host caches, split caches or graphs (on the CPU the graphs run eagerly here)."""
    family = family_for(zstream.synthetic.PRESETS["tiny-bloom"])
    monkeypatch.setattr(calibrate, "times_graphs", lambda asked, device, quant: True)
    timers: list = []
    init, time_outer = calibrate._BlockTimer.__init__, calibrate._BlockTimer.time_outer
    monkeypatch.setattr(calibrate._BlockTimer, "__init__", lambda self, *a: timers.append(self) or init(self, *a))
    calls: list = []

    def interrupted(self: object, *a: int) -> float:
        calls.append(a)
        if len(calls) == 2:  # the second point: the first one's caches and graphs made
            assert timers[0].host_caches and timers[0].pair_caches and timers[0].graph_steps
            raise KeyboardInterrupt
        return time_outer(self, *a)

    monkeypatch.setattr(calibrate._BlockTimer, "time_outer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_compute(family, "cpu", torch.float32, max_batch=2, prompt=8, gen=2, rounds=1, seed=8,
                          kv_offloads=("none", "host-compute", "split"), graphs=True)
    (timer,) = timers
    assert not (timer.host_caches or timer.pair_caches or timer.graph_steps or timer.outer_w or timer.weights())


def test_micro_batches_are_calibrated_at_their_own_rows(tiny_bloom, monkeypatch):
    """A micro-batched step's blocks run at the micro-batch's rows: those batches are decode points of their own
    (runs 13-14 of 2026-12-04 read a host-compute block at 16 rows off the fit between 8 and 64, 16% apart in two
    calibrations), and a different set of them is a different calibration. ``plan_batch`` asks for the micro-batches
    it plans that are smaller than the largest batch."""
    family = family_for(zstream.synthetic.PRESETS["tiny-llama"])
    model = calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8, rounds=1,
                              batches=(16, 100, 64))
    assert {s["batch"] for s in model.samples if s["phase"] == "decode"} == {1, 8, 16, 64}
    plain = calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8, rounds=1)
    assert model.key.endswith(" at=16,64") and model.key != plain.key
    plan_batch_module = importlib.import_module("zstream.api.plan_batch")
    asked: list = []
    real = plan_batch_module.calibrate_compute
    monkeypatch.setattr(plan_batch_module, "calibrate_compute", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    zstream.plan_batch(tiny_bloom, device="cpu", gpu_memory="1GiB", prompt=8, gen=2, max_batch=6, link_gbps=1.0,
                       micro_batch=[None, 2, 4, 8])
    assert asked[0]["max_batch"] == 6 and asked[0]["batches"] == [2, 4]
    assert asked[0]["graphs"] is True  # graphed steps timed where load would replay them: by default
    zstream.plan_batch(tiny_bloom, device="cpu", gpu_memory="1GiB", prompt=8, gen=2, max_batch=6, link_gbps=1.0,
                       cuda_graphs=False)
    assert asked[1]["graphs"] is False
    graphed = calibrate_compute(family, "cpu", torch.float32, max_batch=64, prompt=32, gen=8, rounds=1, graphs=True)
    assert graphed.key == plain.key + " graphs" and graphed.decode_graph_block is None  # no CUDA: none timed


def test_the_plan_summary_reads_back_as_the_best_and_the_frontier():
    """``BatchPlan.summary``, read back: its first line names the best candidate's batch, residency, placements,
    tokens/s, budget, prompt, gen and link; each row one frontier candidate (batches 1, 2, 4, ..., the largest, the
    best and the largest all resident; or the rows asked for) with its numbers as the candidate holds them."""
    import re

    from zstream.foundations.units import fmt_bytes

    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 3.5e-7)
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", max_batch=40, kv_offloads=("host-compute",), micro_batch_sizes=(16,))
    plan.link = "pinned host-to-device"
    best = plan.best
    assert best is not None and best.micro_batch == 16
    head, columns, *rows = plan.summary().splitlines()
    got = re.fullmatch(r"predicted best: batch (\d+), (\d+)/(\d+) blocks resident \(offload=(\w+), kv_offload=([\w-]+)"
                       r", micro_batch=(\d+)\), ([\d.]+) tokens/s; budget (.+), prompt (\d+), gen (\d+), link "
                       r"([\d.]+) GB/s \((.+)\)", head)
    assert got is not None, head
    assert got.groups() == (str(best.batch), str(best.resident_blocks), "30", best.offload, best.kv_offload, "16",
                            f"{best.tokens_per_s:.1f}", "16.0 GiB", "512", "32", "55.0", "pinned host-to-device")
    assert columns.split() == ["batch", "resident", "offload", "kv", "memory", "prefill", "ms", "step", "ms", "xfer",
                               "ms", "comp", "ms", "tok/s", "limit"]
    front = {c.batch: c for c in plan.frontier()}
    shown = {b for b in front if b & (b - 1) == 0} | {max(front), best.batch, plan.max_batch("none")} & set(front)
    assert [int(r.split()[0]) for r in rows] == sorted(shown)
    for row in rows:
        batch, resident, offload, kv, memory, unit, prefill, step, xfer, comp, tps, limit = row.split()
        c = front[int(batch)]
        assert (resident, offload, kv, f"{memory} {unit}", limit) == (
            f"{c.resident_blocks}/30", c.offload, c.kv_offload, fmt_bytes(c.memory_bytes), c.limit)
        assert [float(v) for v in (prefill, step, xfer, comp, tps)] == pytest.approx(
            [c.prefill_s * 1e3, c.decode_step_s * 1e3, c.transfer_s * 1e3, c.compute_s * 1e3, c.tokens_per_s],
            abs=0.051)
    assert [int(r.split()[0]) for r in plan.summary(rows=[3, 5]).splitlines()[2:]] == [3, 5]
    # the device cache: the largest all resident (7), the largest streamed (36) and a best set apart from both
    on_gpu = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                          stream="cpu", max_batch=64)
    on_gpu.best = on_gpu.frontier()[22]
    ends = [on_gpu.best.batch, on_gpu.max_batch("none"), on_gpu.frontier()[-1].batch]
    assert len(set(ends)) == 3 and not [b for b in ends if b & (b - 1) == 0], ends
    assert [int(r.split()[0]) for r in on_gpu.summary().splitlines()[2:]] == sorted({1, 2, 4, 8, 16, 32, *ends})
    plan.tensor_parallel, plan.budget_bytes, plan.link, plan.link_gbps = 2, None, "", 40.0
    head = plan.summary().splitlines()[0]
    assert head.endswith("; budget unlimited, prompt 512, gen 32, link 40.0 GB/s; one rank of 2 (its piece, its GPU, "
                         "its link; all-reduces not counted)"), head
    plan.link_gbps = None
    assert plan.summary().splitlines()[0].endswith("gen 32, link none; one rank of 2 (its piece, its GPU, its link; "
                                                   "all-reduces not counted)")
    empty = dataclasses.replace(plan, best=None, table=[], budget_bytes=parse_bytes("1GiB"))
    assert empty.summary() == "predicted: nothing fits the budget of 1.0 GiB"


def test_a_candidate_reads_back_from_its_dict():
    """``Candidate.to_dict`` (the bench JSON's and ``BatchPlan.to_dict``'s rows) holds every field under its own
    name, and the limit."""
    from zstream.planning.batch import Candidate

    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30), 3.5e-7)
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", max_batch=24, kv_offloads=("none", "split"), micro_batch_sizes=(None, 8))
    kinds = {(c.kv_offload, c.micro_batch, c.offload) for c in plan.table}
    assert {("none", None, "none"), ("none", 8, "cpu"), ("split", 8, "cpu")} <= kinds
    for c in plan.table:
        d = c.to_dict()
        assert d.pop("limit") == c.limit
        assert Candidate(num_blocks=30, **d) == c


def test_plan_batch_calibrates_and_measures_on_the_cpu(tiny_bloom):
    """Nothing given: the link (the disk, for nvme on the CPU) and the compute are measured; the choice loads."""
    probe = zstream.load(tiny_bloom, offload="nvme", device="cpu", progress=False)
    budget = probe.plan.outer_bytes + probe.plan.kv_reserve_bytes + 8 * max(probe.plan.block_bytes)
    plan = zstream.plan_batch(tiny_bloom, gpu_memory=budget, prompt=8, gen=4, offload="nvme", device="cpu")
    assert plan.link_gbps and plan.link_gbps > 0 and plan.link in ("disk read (O_DIRECT)", "host memory copy")
    assert plan.best is not None and plan.best.tokens_per_s > 0
    assert "predicted best: batch" in plan.summary()
    model = zstream.load(tiny_bloom, progress=False, **plan.load_kwargs())
    assert len(model.plan.resident_blocks) == plan.best.resident_blocks
    # a loaded model plans with its own sizes, link and budget
    same = zstream.plan_batch(probe, gpu_memory=budget, prompt=8, gen=4, offload="nvme", compute=plan.compute)
    assert [c.to_dict()["memory_bytes"] for c in same.table] == [c.to_dict()["memory_bytes"] for c in plan.table]
    probe.close()
    model.close()


# ---- quantized blocks --------------------------------------------------------------------------------------------


def test_quantized_plans_match_what_load_accepts(tiny_bloom, tmp_path):
    """A packed checkpoint is planned with its packed bytes and the loader's dequantization room: every choice loads
    under the budget with the predicted residency, and the same budget keeps more packed blocks than fp blocks."""
    packed = zstream.pack(tiny_bloom, tmp_path / "p", quantize="int8", group_size=32, progress=False)
    probe = zstream.load(packed, offload="nvme", device="cpu", progress=False)
    assert probe.quant is not None
    block = max(probe.plan.block_bytes)
    budget = probe.plan.outer_bytes + probe.plan.kv_reserve_bytes + 3 * block + 3 * block
    compute = compute_model(probe.family.num_blocks, per_token=1e-4)
    plan = plan_batch(packed, gpu_memory=budget, prompt=12, gen=4, offload="nvme", device="cpu", link_gbps=1.0,
                      compute=compute)
    assert plan.quantize == {}  # packed: nothing to pass to load, the headers say it
    for c in [plan.best, *plan.frontier()[::3]]:
        assert c is not None
        model = zstream.load(packed, progress=False, **plan.load_kwargs(c))
        assert model.quant is not None and len(model.plan.resident_blocks) == c.resident_blocks
        assert model.plan.kv_reserve_bytes + model.plan.resident_bytes <= budget
        model.close()
    fp = plan_batch(tiny_bloom, gpu_memory=budget, prompt=12, gen=4, offload="nvme", device="cpu", link_gbps=1.0,
                    compute=compute)
    assert plan.candidate(1, 0) is not None
    assert max(c.resident_blocks for c in plan.table) >= max(c.resident_blocks for c in fp.table)
    probe.close()


def test_quantize_at_load_is_planned_and_loaded(tiny_bloom):
    plan = plan_batch(tiny_bloom, gpu_memory="1GiB", prompt=8, gen=4, offload="none", device="cpu",
                      quantize="int4", group_size=32, compute=compute_model(2))
    assert plan.quantize == {"quantize": "int4", "group_size": 32, "symmetric": False}
    model = zstream.load(tiny_bloom, progress=False, **plan.load_kwargs())
    assert model.quant is not None and model.quant.cfg.bits == 4
    with pytest.raises(zstream.ZStreamError, match="zstream pack"):
        plan_batch(tiny_bloom, gpu_memory="1GiB", prompt=8, gen=4, offload="nvme", device="cpu", quantize="int4",
                   group_size=32, compute=compute_model(2), link_gbps=1.0)


def test_calibration_times_the_dequantization(tiny_bloom, monkeypatch):
    """The compute model of quantized blocks is measured with their dequantization in each block call (CPU here):
    every call the calibration times that runs the block first dequantizes the packed weights, and the block
    computes on exactly what that dequantization returned. Checked by recording the calls, not by a clock."""
    from zstream.foundations.quant import BlockQuant, QuantConfig, block_quant_for

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    fam = model.family
    bq = block_quant_for(QuantConfig.parse("int4", 32), fam.block_shapes(), fam.linear_weights(), torch.float32)

    events: list = []  # ("dequantize", its output) and ("block", the weights it got), in call order
    timed: list = []   # the events of each call the calibration timed, one list a call
    real_dequantize, real_block, real_seconds = BlockQuant.dequantize, fam.block, calibrate._seconds

    def dequantize(self, w):
        out = real_dequantize(self, w)
        events.append(("dequantize", out))
        return out

    def block(w, *args):
        events.append(("block", w))
        return real_block(w, *args)

    def seconds(fn, device, min_sample_s):
        def recorded():
            start = len(events)
            result = fn()
            timed.append(events[start:])
            return result

        return real_seconds(recorded, device, min_sample_s)

    monkeypatch.setattr(BlockQuant, "dequantize", dequantize)
    monkeypatch.setattr(fam, "block", block)
    monkeypatch.setattr(calibrate, "_seconds", seconds)
    cm = calibrate_compute(fam, "cpu", torch.float32, max_batch=2, prompt=8, gen=2, rounds=1, quant=bq)
    assert "quant=int4, group 32, asymmetric" in cm.key
    assert cm.decode_block_s(1, 8) > 0 and cm.prefill_block_s(1, 8) > 0
    block_calls = [calls for calls in timed if any(kind == "block" for kind, _ in calls)]
    # decode at batches 1 and 2, prefill at 1 and 2, each at two lengths; every timing calls its block 2+ times
    timed_points = [s for s in cm.samples if s["phase"] != "loop"]
    assert len(block_calls) >= 2 * len(timed_points) and len(timed_points) == 8
    for calls in block_calls:
        assert [kind for kind, _ in calls] == ["dequantize", "block"]
        assert calls[1][1] is calls[0][1]  # the block ran on the weights just dequantized
        assert set(bq.shapes) <= set(calls[1][1])  # ... which hold every quantized weight
    assert len(events) == sum(len(calls) for calls in timed)  # nothing dequantized or run outside a timed call


def _rank_memory(path, kwargs):
    with zstream.load(path, progress=False, **kwargs) as model:
        plan = model.plan
        return plan.ranks, len(plan.resident_blocks), plan.resident_bytes + plan.kv_reserve_bytes


def test_tensor_parallel_plans_one_ranks_share(tiny_bloom):
    """Each rank holds its piece of the blocks and of the KV cache: a candidate needs less memory per rank than
    alone, and the plan's choice loads on 2 ranks within the budget with the residency it predicted."""
    compute = compute_model(6)
    one = plan_batch(tiny_bloom, gpu_memory="1GiB", prompt=8, gen=4, offload="none", device="cpu", compute=compute)
    two = plan_batch(tiny_bloom, gpu_memory="1GiB", prompt=8, gen=4, offload="none", device="cpu", compute=compute,
                     tensor_parallel=2)
    assert two.tensor_parallel == 2 and "one rank of 2" in two.summary()
    alone, rank = one.candidate(4, 6), two.candidate(4, 6)
    assert alone is not None and rank is not None
    assert alone.memory_bytes / 2 < rank.memory_bytes < alone.memory_bytes
    kwargs = two.load_kwargs(rank)
    assert kwargs["tensor_parallel"] == 2
    for ranks, resident, memory in zstream.launch(_rank_memory, 2, tiny_bloom, kwargs):
        assert (ranks, resident) == (2, 6) and memory <= two.budget_bytes
    with pytest.raises(zstream.UsageError, match="tensor_parallel must be"):
        plan_batch(tiny_bloom, tensor_parallel=0, device="cpu", compute=compute)


def test_a_tensor_parallel_plan_is_never_graphed(tiny_bloom):
    """A rank's decode step all-reduces between blocks and runs eagerly: plan_batch with tensor_parallel plans no
    graph (a calibration with graph fits, even so), warns as load does where graphs were asked for (silent where
    left to the default), and its load arguments turn them off. One process plans what it was asked, silently."""
    cm = compute_model(6, block_s=3e-4, per_token=1e-6, per_key=0.0, outer_s=8e-4)
    cm.decode_graph_block, cm.decode_graph_outer = Linear3(1e-5, 0.0, 0.0), Linear3(1e-5, 0.0, 0.0)
    kw = {"gpu_memory": "1GiB", "prompt": 8, "gen": GRAPH_MIN_STEPS + 8, "offload": "none", "device": "cpu",
          "compute": cm}
    with pytest.warns(RuntimeWarning, match="cuda_graphs has no effect under tensor parallelism"):
        two = plan_batch(tiny_bloom, tensor_parallel=2, cuda_graphs=True, **kw)
    assert not two.cuda_graphs and two.load_kwargs()["cuda_graphs"] is False
    eager = ThroughputModel(cm, [1] * 6, link_gbps=None)
    assert two.candidate(2, 6).decode_step_s == pytest.approx(eager.decode_step(2, 6, 12)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = plan_batch(tiny_bloom, cuda_graphs=True, **kw)
        assert not plan_batch(tiny_bloom, tensor_parallel=2, **kw).cuda_graphs  # the default: off, no warning
    assert one.cuda_graphs and one.candidate(2, 6).decode_step_s < two.candidate(2, 6).decode_step_s


def test_the_budget_and_link_a_plan_starts_from(tiny_bloom, monkeypatch):
    """Without ``gpu_memory``: a loaded model's own budget, else (on the CPU) the host memory available. The link: a
    loaded model's own where the plan streams the way it does, else measured now."""
    import dataclasses

    plan_batch_module = importlib.import_module("zstream.api.plan_batch")
    monkeypatch.setattr(plan_batch_module, "host_available_bytes", lambda: 5 << 30)
    kw = {"prompt": 8, "gen": 4, "max_batch": 2, "compute": compute_model(6)}
    assert plan_batch(tiny_bloom, offload="none", device="cpu", **kw).budget_bytes == 5 << 30
    with zstream.load(tiny_bloom, device="cpu", offload="nvme", gpu_memory="300MiB", max_seq_len=16,
                      progress=False) as model:
        assert plan_batch(model, offload="none", **kw).budget_bytes == 300 << 20 == model.plan.budget_bytes
        model.plan = dataclasses.replace(model.plan, link="the load's own", link_gbps=7.5)
        own = plan_batch(model, offload="nvme", **kw)
        assert (own.link, own.link_gbps) == ("the load's own", 7.5)
        measured = plan_batch(model, offload="none", kv_offload="host", **kw)  # another way: measured now
        assert measured.link != "the load's own" and measured.link_gbps > 0


# ---- the KV cache in host memory ----------------------------------------------------------------------------------


def with_host_kv(compute: ComputeModel, host_compute_per_key: float) -> ComputeModel:
    """``compute`` with the block timed for "host-compute": attention over the cache costs ``host_compute_per_key``
    a (row x key) on the CPUs."""
    dec, pre = compute.decode_block, compute.prefill_block
    compute.kv_blocks = {"host-compute": (Linear3(dec.c0, dec.c1, host_compute_per_key), pre)}
    return compute


def test_a_host_kv_cache_lifts_the_batch_limit_to_host_memory():
    """bloom-7b1 at FlexGen's 16 GiB: with the cache on the device the largest batch is 36 (the H100 search), in
    host memory the device keeps only activations (and "host" two layers in transit), so the batch grows until the
    host memory given runs out: 30 layers x 2 x 544 x 4096 x 2 bytes = 267 MB a row."""
    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30), 1e-8)
    row = 30 * 2 * 544 * 4096 * 2
    sizes.host_budget = 100 * row + row // 2
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", kv_offloads=("none", "host", "host-compute"), max_batch=400)
    assert plan.max_batch("cpu", kv="none") == 36
    assert plan.max_batch("cpu", kv="host-compute") == 100  # the host's limit
    assert 36 < plan.max_batch("cpu", kv="host") <= 100
    big = plan.candidate(100, 0, "host-compute")
    assert big is not None and big.memory_bytes <= parse_bytes("16GiB")
    assert big.memory_bytes < plan.candidate(36, 0, "none").memory_bytes  # no cache on the device
    sizes.host_budget = None
    assert choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", kv_offloads=("host-compute",), max_batch=400).max_batch() > 100


def test_a_host_cache_brought_up_shares_the_link_with_the_blocks():
    """With "host" every layer's cache crosses the link each step beside the streamed blocks: the step is at least
    all those bytes over the link, even where the blocks' timed compute (which brought the cache up alone) is less."""
    tm = ThroughputModel(compute_model(10, block_s=1e-4), [100 * MB] * 10, link_gbps=10.0, ring_slots=3)
    alone, xfer, _ = tm.pass_s(0, block_s=1e-4, outer_s=0.0)
    shared, xfer_shared, _ = tm.pass_s(0, block_s=1e-4, outer_s=0.0, shared_bytes=500 * MB)
    assert xfer == pytest.approx(0.1) and xfer_shared == pytest.approx(0.15)
    assert shared >= 0.15 > alone
    # every block resident: the cache alone on the link still bounds the step
    resident, xfer_resident, _ = tm.pass_s(10, block_s=1e-4, outer_s=0.0, shared_bytes=500 * MB)
    assert xfer_resident == pytest.approx(0.05) and resident >= 0.05 > 10 * 1e-4


def test_the_planner_picks_the_kv_placement_that_wins():
    """Fast CPUs make attention on the host pay (the device keeps every block at batches whose cache would not fit
    beside them); with slow CPUs the cache stays on the device. The chosen candidate's load arguments carry the
    placement."""
    sizes, _ = bloom_sizes()
    sizes.host_budget = 200 * 30 * 2 * 544 * 4096 * 2
    base = dict(budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0, stream="cpu",
                kv_offloads=("none", "host", "host-compute"), max_batch=200)
    fast_cpus = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 2e-10)
    plan = choose_batch(sizes, fast_cpus, **base)
    # every block resident at 25 rows: with the cache on the device only 7 rows fit beside every block
    assert plan.best is not None and plan.best.kv_offload == "host-compute"
    assert plan.best.resident_blocks == 30 and plan.best.batch > 7 == plan.max_batch("none", kv="none")
    assert plan.load_kwargs()["kv_offload"] == "host-compute" and "kv_offload=host-compute" in plan.summary()
    slow_cpus = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 1e-5)
    plan = choose_batch(sizes, slow_cpus, **base)
    assert plan.best is not None and plan.best.kv_offload == "none" and "kv_offload" not in plan.load_kwargs()
    with pytest.raises(ValueError, match="no timings with kv_offload='host-compute'"):
        choose_batch(sizes, compute_model(30), **base)


def test_calibration_times_blocks_with_their_host_caches(tiny_bloom, monkeypatch):
    """The host-compute block is timed through the engine's own layer cache of that placement (recorded, not
    clocked), and its fits come from those timings alone; "host" decodes with the device block's fit (its cache
    comes up ahead of the block), and its prefill is timed through the engine's host layer (the prompt's cache goes
    down on the compute stream), at the prefill points only."""
    from zstream.streaming.cache import HostComputeLayerCache, HostLayerCache, LayerCache

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    fam = model.family
    seen: list = []
    real_block = fam.block
    monkeypatch.setattr(fam, "block", lambda w, h, cache, ctx: seen.append(type(cache)) or real_block(w, h, cache, ctx))
    taken: list = []  # each block call takes its layer's cache anew, as the engine's pass does
    real_layer = calibrate.KVCache.layer
    monkeypatch.setattr(calibrate.KVCache, "layer",
                        lambda self, *a: taken.append((self.host_compute, a[0])) or real_layer(self, *a))
    samples: list = []  # the sample length each timing asked for
    real_seconds = calibrate._seconds
    monkeypatch.setattr(calibrate, "_seconds", lambda fn, dev, s: samples.append(s) or real_seconds(fn, dev, s))
    busy_asked: list = []  # the CPUs' slow-down beside the link: asked of the host-compute timings, kept as given
    monkeypatch.setattr(calibrate, "_cpu_busy_factor",
                        lambda host, busy, rk: busy_asked.append((host, busy, rk)) or 1.25)
    cm = calibrate_compute(fam, "cpu", torch.float32, max_batch=2, prompt=8, gen=2, rounds=1,
                           kv_offloads=("none", "host", "host-compute"))
    assert cm.cpu_busy_factor == 1.25 and ComputeModel.from_dict(cm.to_dict()).cpu_busy_factor == 1.25
    (host_asked, busy_windows, rows_keys), = busy_asked
    assert rows_keys == 2 * 10 and busy_windows == []  # the largest batch x the longest context; no probe on a CPU
    assert any(s.get("kv_offload") == "host-compute" for s in host_asked)
    # the CPUs' decode blocks (batches 1 and 2, two contexts, one round) over the longer sample, the rest not
    assert samples.count(calibrate.CPU_SAMPLE_S) == 4 and calibrate.CPU_SAMPLE_S > 0.005
    assert len(samples) > 4 and set(samples) == {0.005, calibrate.CPU_SAMPLE_S}
    assert set(seen) == {LayerCache, HostLayerCache, HostComputeLayerCache} and len(taken) == len(seen)
    # a host-compute block takes its layers in turn (their caches, far smaller than 1 GiB here: every layer), so
    # that on a GPU host the CPUs read them from DRAM as the engine's layers are, not from their own cache
    assert {i for on_cpus, i in taken if on_cpus} == set(range(fam.num_blocks))
    assert "kv=host,host-compute" in cm.key and set(cm.kv_blocks) == {"host", "host-compute"}
    assert cm.decode_block_s(3, 10, "host") == cm.decode_block_s(3, 10)
    host = [s for s in cm.samples if s.get("kv_offload") == "host"]
    assert host and {s["phase"] for s in host} == {"prefill"}
    assert_best_non_negative_fit(cm.kv_blocks["host"][1], [(s["batch"] * s["tokens"], s["tokens"], s["block_s"])
                                                            for s in host], relative=False)
    assert cm.prefill_block_s(2, 8, "host") == cm.kv_blocks["host"][1](16, 8) != cm.prefill_block_s(2, 8)
    kv = [s for s in cm.samples if s.get("kv_offload") == "host-compute" and s["phase"] == "decode"]
    assert len(kv) == 4  # batches 1 and 2, two contexts
    assert cm.kv_blocks["host-compute"][0] == Linear3.fit([(s["batch"], s["keys"], s["block_s"]) for s in kv])
    assert ComputeModel.from_dict(cm.to_dict()).kv_blocks == cm.kv_blocks
    # the CPUs' read rate comes from those timings (None where, on a tiny model, the CPUs were no slower)
    device = [s for s in cm.samples if "kv_offload" not in s and s["phase"] == "decode"]
    key_bytes = fam.num_kv_heads * fam.head_dim * 2 * 4
    assert cm.host_read_gbps == calibrate._host_read_gbps(device, kv, key_bytes)
    assert ComputeModel.from_dict(cm.to_dict()).host_read_gbps == cm.host_read_gbps
    # the uplink's rate: one probe of up to 8 host layers brought up in passes, their blocks running, every
    # earlier key and value of the longest context (9 keys) of the batch's rows
    up = [s for s in cm.samples if s["phase"] == "uplink"]
    assert len(up) == 1 and up[0]["layers"] == min(fam.num_blocks, 8) and up[0]["batch"] == 2
    assert up[0]["bytes"] == up[0]["layers"] * 2 * 9 * key_bytes  # layers x rows x keys x a key's and value's bytes
    assert cm.uplink_gbps == up[0]["bytes"] / up[0]["pass_s"] / 1e9 > 0
    assert ComputeModel.from_dict(cm.to_dict()).uplink_gbps == cm.uplink_gbps


def test_micro_batches_are_planned_with_their_working_set_and_their_time():
    """A micro-batch keeps room for its own activations only, so more blocks stay resident at a large batch; its
    blocks compute one micro-batch after another (each at the compute model's time for its rows); and the plan's
    load arguments carry the size."""
    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 2e-10)
    base = dict(budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0, stream="cpu", max_batch=64,
                kv_offloads=("host-compute",))
    plan = choose_batch(sizes, compute, micro_batch_sizes=(None, 16), **base)
    whole = max((c for c in plan.table if c.batch == 64 and c.micro_batch is None), key=lambda c: c.resident_blocks)
    split = max((c for c in plan.table if c.batch == 64 and c.micro_batch == 16), key=lambda c: c.resident_blocks)
    assert split.resident_blocks > whole.resident_blocks and split.memory_bytes <= parse_bytes("16GiB")
    assert not [c for c in plan.table if c.micro_batch == 16 and c.batch <= 16]  # 16 rows or fewer: no split
    tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
    block = 4 * compute.decode_block_s(16, 528, "host-compute")
    assert split.decode_step_s == pytest.approx(tm.pass_s(split.resident_blocks, block,
                                                          compute.decode_outer_s(64, 528))[0])
    prefill_block = 4 * compute.prefill_block_s(16, 512, "host-compute")  # the prompt in micro-batches too
    assert split.prefill_s == pytest.approx(tm.pass_s(split.resident_blocks, prefill_block,
                                                      compute.prefill_outer_s(64, 512))[0])
    best = choose_batch(sizes, compute, micro_batch_sizes=(16,), **base).best
    assert best is not None and best.micro_batch == 16
    assert choose_batch(sizes, compute, micro_batch_sizes=(16,), **base).load_kwargs()["micro_batch"] == 16
    # micro-batches of 16 alone: batches of 16 or fewer are still planned, whole (bench predicts its rows so)
    only16 = choose_batch(sizes, compute, micro_batch_sizes=(16,), **base)
    small = [c for c in only16.table if c.batch <= 16]
    assert {c.batch for c in small} == set(range(1, 17)) and {c.micro_batch for c in small} == {None}
    assert only16.candidate(8, small[-1].resident_blocks, "host-compute") is not None
    assert {(c.batch, c.resident_blocks) for c in small} == {(c.batch, c.resident_blocks) for c in plan.table
                                                             if c.batch <= 16 and c.micro_batch is None}


def test_a_split_cache_balances_the_link_and_the_cpus():
    """bloom-7b1 at batch 64 under 16 GiB with CPUs that attend a layer's cache about as fast as the link brings it
    up (the H200 run: ~12 ms a layer either way): splitting the layers between them beats either alone, the split
    the planner picks is the best of every split (checked one by one), and its load arguments carry it."""
    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 3.5e-7)
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", max_batch=64, kv_offloads=("host", "host-compute", "split"))
    at64 = {kv: max((c for c in plan.table if c.batch == 64 and c.kv_offload == kv), key=lambda c: c.tokens_per_s)
            for kv in ("host", "host-compute", "split")}
    split = at64["split"]
    assert 0 < split.kv_cpu_layers < 30
    assert split.decode_step_s < 0.8 * min(at64["host"].decode_step_s, at64["host-compute"].decode_step_s)
    tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
    layer = sizes.host_kv_bytes(64, 528, "host") // 30
    every = [tm.decode_step(64, split.resident_blocks, 528, "split", (30 - f) * layer, None, f)[0] for f in range(31)]
    assert split.decode_step_s == pytest.approx(min(every))
    assert plan.load_kwargs(split)["kv_cpu_layers"] == split.kv_cpu_layers
    # CPUs slowed by the link beside them (a busy factor of 1.5) take fewer of the layers, and the count is still
    # the best of every split of the slowed model
    slowed = ThroughputModel(dataclasses.replace(compute, cpu_busy_factor=1.5), sizes.block_bytes, 55.0)
    fewer = slowed.best_split(64, split.resident_blocks, 528, layer)
    assert fewer < tm.best_split(64, split.resident_blocks, 528, layer)
    every = [slowed.decode_step(64, split.resident_blocks, 528, "split", (30 - f) * layer, None, f)[0]
             for f in range(31)]
    assert every[fewer] == pytest.approx(min(every))


def test_a_decode_pass_waits_for_its_first_host_layers_cache_unless_the_cpus_attend_first():
    """A host cache's first layer comes up as the pass begins, and the compute waits for it past the pass's outer
    work (6 ms; the decode loop's 4 ms ran before the copy began): caches of 110 MB a layer (2 ms at 55 GB/s) cost no
    wait, of 1100 MB (20 ms) 14 ms, and a "host" step is outer, loop, wait and ten 30 ms blocks (more than the link's
    200 ms). A "split" of 5 layers of 10 on the CPUs (1, 3, ...) brings layer 0 up first and waits as "host" does;
    one of 6 (0, 2, 4, 5, 7, 9) attends layer 0 on the CPUs (6 ms) while layer 1's copy runs; the device cache and
    "host-compute" bring nothing up."""
    from zstream.planning.residency import cpu_layers_of

    sizes = toy_sizes(n=10)
    base = compute_model(10, block_s=30e-3, per_token=0.0, per_key=0.0, outer_s=6e-3)
    compute = dataclasses.replace(base, decode_loop=Linear3(4e-3, 0.0, 0.0),
                                  kv_blocks={"host": (base.decode_block, base.prefill_block),
                                             "host-compute": (Linear3(6e-3, 0.0, 0.0), base.prefill_block)})
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps=55.0)
    small, big = 110 * MB, 1100 * MB
    assert tm.first_cache_wait(1, 100, "host", 10 * small) == 0.0
    assert tm.first_cache_wait(1, 100, "host", 10 * big) == pytest.approx(big / 55e9 - 6e-3)
    step = tm.decode_step(1, 10, 100, "host", 10 * big)[0]
    assert step == pytest.approx(6e-3 + 4e-3 + (big / 55e9 - 6e-3) + 10 * 30e-3)
    assert cpu_layers_of(10, 5)[0] == 1 and cpu_layers_of(10, 6)[:2] == [0, 2]
    assert tm.first_cache_wait(1, 100, "split", 5 * big, cpu_layers=5) == pytest.approx(big / 55e9 - 6e-3)
    assert tm.first_cache_wait(1, 100, "split", 4 * big, cpu_layers=6) == pytest.approx(big / 55e9 - 6e-3 - 6e-3)
    assert tm.first_cache_wait(1, 100, "split", 4 * small, cpu_layers=6) == 0.0
    # two micro-batches of a row: layer 0 on the CPUs takes 12 ms of the wait
    assert tm.first_cache_wait(2, 100, "split", 4 * big, 1, cpu_layers=6) == pytest.approx(big / 55e9 - 6e-3 - 12e-3)
    # layer 0 on the CPUs runs beside that copy: at a busy factor of 1.5 it takes 9 ms of the wait, not 6
    slowed = ThroughputModel(dataclasses.replace(compute, cpu_busy_factor=1.5), sizes.block_bytes, link_gbps=55.0)
    assert slowed.first_cache_wait(1, 100, "split", 4 * big, cpu_layers=6) == pytest.approx(big / 55e9 - 6e-3 - 9e-3)
    assert tm.first_cache_wait(1, 100, "split", 0, cpu_layers=10) == 0.0
    assert tm.first_cache_wait(1, 100, "none", 0) == 0.0 and tm.first_cache_wait(1, 100, "host-compute", 0) == 0.0
    # a model calibrated for "host" alone (as ``zstream bench --predict`` calibrates a "host" row) plans it: run 10
    # of 2026-12-04 lost every "host" row's prediction to a look-up of the CPUs' timing it does not need
    host_only = dataclasses.replace(compute, kv_blocks={"host": compute.kv_blocks["host"]})
    alone = ThroughputModel(host_only, sizes.block_bytes, link_gbps=55.0)
    assert alone.decode_step(1, 10, 100, "host", 10 * big)[0] == pytest.approx(step)


def test_the_calibration_times_a_split_pair_as_the_engine_interleaves_it(tiny_bloom, monkeypatch):
    """With "split" asked for, a pass of a layer brought up then a layer on the CPUs is timed at every decode point
    (run 12 of 2026-12-04: an up-layer between two CPU layers cost twice its device block) and every prefill point
    (runs 3-4 of 2026-12-06: a split prefill slower than a "host" and a "host-compute" one alone), and the planner
    adds what a pair takes beyond its two blocks to each pair of a split step and a split prefill."""
    from zstream.streaming.cache import HostComputeLayerCache, HostLayerCache

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    fam = model.family
    seen: list = []
    real_block = fam.block
    monkeypatch.setattr(fam, "block", lambda w, h, cache, ctx: seen.append(type(cache)) or real_block(w, h, cache, ctx))
    cm = calibrate_compute(fam, "cpu", torch.float32, max_batch=2, prompt=8, gen=2, rounds=1, kv_offloads=("split",))
    assert cm.key.endswith("kv=host,host-compute,split") and set(cm.kv_blocks) == {"host", "host-compute"}
    pairs = [s for s in cm.samples if s.get("kv_offload") == "split"]
    decode = [s for s in pairs if s["phase"] == "decode"]
    prefill = [s for s in pairs if s["phase"] == "prefill"]
    assert {(s["batch"], s["keys"]) for s in decode} == {(b, k) for b in (1, 2) for k in (4, 10)}
    assert {(s["batch"], s["tokens"], s["keys"]) for s in prefill} == {(b, t, t) for b in (1, 2) for t in (4, 8)}
    assert cm.split_pair == Linear3.fit([(s["batch"], s["keys"], s["block_s"]) for s in decode])
    assert_best_non_negative_fit(cm.split_pair_prefill, [(s["batch"] * s["tokens"], s["tokens"], s["block_s"])
                                                         for s in prefill], relative=False)
    stored = ComputeModel.from_dict(cm.to_dict())
    assert (stored.split_pair, stored.split_pair_prefill) == (cm.split_pair, cm.split_pair_prefill)
    # a pass of the tiny model's caches: two pairs, up then CPUs, in turn
    assert [HostLayerCache, HostComputeLayerCache] * 2 in [seen[i:i + 4] for i in range(len(seen) - 3)]
    assert cm.split_extra_s(2, 10) == pytest.approx(max(0.0, cm.split_pair(2, 10) - cm.decode_block_s(2, 10, "host")
                                                        - cm.decode_block_s(2, 10, "host-compute")))
    alone = cm.prefill_block_s(2, 8, "host") + cm.prefill_block_s(2, 8, "host-compute")
    assert cm.split_prefill_extra_s(2, 8) == pytest.approx(max(0.0, cm.split_pair_prefill(16, 8) - alone))
    # the planner: 3 of 10 layers on the CPUs make 3 pairs, each 5 ms longer than its blocks (micro-batches: each)
    sizes = toy_sizes(n=10)
    base = compute_model(10, block_s=1e-3, per_token=0.0, per_key=0.0, outer_s=1e-3)
    two = dataclasses.replace(base, kv_blocks={"host": (base.decode_block, base.prefill_block),
                                               "host-compute": (Linear3(4e-3, 0.0, 0.0), base.prefill_block)})
    paired = dataclasses.replace(two, split_pair=Linear3(10e-3, 0.0, 0.0))

    def step(m: ComputeModel, micro: int | None) -> float:
        return ThroughputModel(m, sizes.block_bytes, link_gbps=55.0).decode_step(4, 10, 100, "split", 7 * MB, micro,
                                                                                  3)[0]

    assert step(paired, None) - step(two, None) == pytest.approx(3 * 5e-3)
    assert step(paired, 2) - step(two, 2) == pytest.approx(2 * 3 * 5e-3)  # two micro-batches of 2 rows
    # the prefill's pairs: 7 of 10 layers on the CPUs make 3 pairs, each 2 ms + 0.1 ms a token of the batch's prompts
    # (4 x 16: 8.4 ms) against its two 1 ms blocks; the decode's pair does not enter the prefill
    prefilled = dataclasses.replace(paired, split_pair_prefill=Linear3(2e-3, 1e-4, 0.0))

    def prefill(m: ComputeModel, micro: int | None) -> float:
        return ThroughputModel(m, sizes.block_bytes, link_gbps=55.0).prefill(4, 10, 16, "split", micro, 7)[0]

    assert prefill(paired, None) == pytest.approx(prefill(two, None))
    assert prefill(prefilled, None) - prefill(two, None) == pytest.approx(3 * 6.4e-3)
    assert prefill(prefilled, 2) - prefill(two, 2) == pytest.approx(2 * 3 * 3.2e-3)  # two of 2 x 16 tokens


def test_a_host_cache_comes_up_at_the_uplinks_calibrated_rate_never_above_the_links():
    """Runs 5 and 10 of 2026-12-04: "host" steps took their bytes at 87-91% of the link's large-copy rate. With the
    uplink calibrated at 44 GB/s on a 55 GB/s link, a copy-bound "host" step (1 GB of cache a layer, every block
    resident) takes its cache at 44, its first layer's wait too, and the split's balance moves with it; an uplink
    timed faster than the link changes nothing."""
    sizes = toy_sizes(n=10)
    base = compute_model(10, block_s=1e-3, per_token=0.0, per_key=0.0, outer_s=1e-3)
    compute = dataclasses.replace(base, kv_blocks={"host": (base.decode_block, base.prefill_block),
                                                   "host-compute": (Linear3(20e-3, 0.0, 0.0), base.prefill_block)})
    layer = 1000 * MB
    at = {up: ThroughputModel(dataclasses.replace(compute, uplink_gbps=up), sizes.block_bytes, link_gbps=55.0)
          for up in (None, 44.0, 80.0)}
    steps = {up: tm.decode_step(1, 10, 100, "host", 10 * layer)[0] for up, tm in at.items()}
    assert steps[44.0] == pytest.approx(1e-3 + 10 * layer / 44e9)
    assert steps[None] == steps[80.0] == pytest.approx(1e-3 + 10 * layer / 55e9)
    assert at[44.0].first_cache_wait(1, 100, "host", 10 * layer) == pytest.approx(layer / 44e9 - 1e-3)
    # a layer on the CPUs (20 ms) against one brought up (1 + 18.2 ms at 55, 1 + 22.7 at 44): more go to the CPUs
    assert (at[None].best_split(1, 10, 100, layer), at[44.0].best_split(1, 10, 100, layer)) == (4, 6)


def _stored_computes(run: str, kv: str = "split") -> list[ComputeModel]:
    """The compute models calibrated with ``kv`` in a stored H200 bench run (``benches/results/raw``)."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "benches" / "results" / "raw" / f"h200-2026-12-04-{run}.json")
                     .read_text())
    return [ComputeModel.from_dict(m) for k, m in doc["meta"]["compute_models"].items() if kv in k]


@pytest.mark.parametrize("run", ["run16-bench_kv_all", "run21-bench_kv_all"])
def test_the_split_count_is_the_best_of_every_count(run):
    """On the H200's calibrations of bloom-7b1, the count ``best_split`` picks is the shortest of every count from 0
    to 30, by the decode step and by a whole generation (prefill and 31 steps). Each layer interleaved with the
    other kind adds a pair's extra, up to half the layers, so the time falls and rises twice: run 21's calibration
    at batch 64 (micro-batches of 16, 24 resident) is best at 8 layers on the CPUs, 290 ms a step, where the
    planner's search around the balance of link and CPUs picked 11 (345 ms); one of run 16's at batch 48 (12
    resident, 100 keys) at 9, where a walk down from the balance over every count ends at 30 (its second low)."""
    sizes, _ = bloom_sizes()
    models = _stored_computes(run)
    assert len(models) == 3  # the split's calibrations for its rows at batches 8, 16 and 64
    for compute, batch, micro, resident, context in itertools.product(models, (8, 48, 64), (None, 16), (0, 12, 24, 30),
                                                                      (100, 528)):
        tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
        if micro is not None and micro >= batch:
            continue
        layer = sizes.kv_layer_bytes(batch, context)
        step = [tm.decode_step(batch, resident, context, "split", (30 - c) * layer, micro, c, c * layer)[0]
                for c in range(31)]
        whole = [tm.prefill(batch, resident, 512, "split", micro, c)[0] + 31 * step[c] for c in range(31)]
        assert step[tm.best_split(batch, resident, context, layer, micro)] == min(step), (batch, micro, resident)
        assert whole[tm.best_split(batch, resident, context, layer, micro, 512, 32)] == min(whole)


def test_the_split_search_starts_near_the_balance(monkeypatch):
    """The search for the split's count costs fewer evaluations of the step than the counts: it starts where the link
    and the CPUs balance. On the H200's calibrations of runs 16 and 21 it takes 12.7 steps a search (every count:
    31); a start off the balance costs more (the result is the same, which the test above checks)."""
    sizes, _ = bloom_sizes()
    steps = [0]
    real = ThroughputModel.decode_step

    def counted(self, *args, **kwargs):
        steps[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ThroughputModel, "decode_step", counted)
    searches = 0
    for compute, batch, micro, resident, context in itertools.product(
            _stored_computes("run16-bench_kv_all") + _stored_computes("run21-bench_kv_all"), (8, 16, 32, 64, 128),
            (None, 16), (0, 12, 24, 30), (100, 528, 2000)):
        if micro is None or micro < batch:
            tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
            tm.best_split(batch, resident, context, sizes.kv_layer_bytes(batch, context), micro, 512, 32)
            searches += 1
    assert steps[0] / searches < 13.5, steps[0] / searches


def test_the_planners_split_candidates_take_the_count_with_the_most_tokens_per_s():
    """``choose_batch``'s split candidates (run 21's calibration at batch 64, under 16 GiB) carry the count of
    layers on the CPUs whose generation (prefill and 31 steps) gives the most tokens/s of every count."""
    sizes, _ = bloom_sizes()
    compute = _stored_computes("run21-bench_kv_all")[-1]
    plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0,
                        stream="cpu", max_batch=64, kv_offloads=("split",), micro_batch_sizes=(16,))
    tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
    at64 = [c for c in plan.table if c.batch == 64]
    assert len(at64) > 5
    for cand in at64:
        layer = sizes.kv_layer_bytes(64, 528)
        every = [64 * 32 / (tm.prefill(64, cand.resident_blocks, 512, "split", 16, c)[0]
                            + 31 * tm.decode_step(64, cand.resident_blocks, 528, "split", (30 - c) * layer, 16, c,
                                                  c * layer)[0]) for c in range(31)]
        assert cand.tokens_per_s == pytest.approx(max(every)), cand.resident_blocks


def test_a_pass_adds_its_lead_and_the_given_overhead_and_streams_only_over_a_link():
    """A streamed pass (5 of 10 blocks resident, 30 ms blocks, 100 MB copies of 2 ms at 50 GB/s: compute-bound) is
    later by the compute stream's wait for its first cache (``lead_s``) and by ``step_overhead_s``, which every
    candidate's prefill and step carry; with no link, a pass that streams is refused."""
    sizes = toy_sizes(n=10)
    compute = compute_model(10, block_s=30e-3, per_token=0.0, per_key=0.0, outer_s=6e-3)
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps=50.0)
    assert tm.pass_s(5, 30e-3, 6e-3, lead_s=14e-3)[0] - tm.pass_s(5, 30e-3, 6e-3)[0] == pytest.approx(14e-3)
    late = ThroughputModel(compute, sizes.block_bytes, link_gbps=50.0, step_overhead_s=5e-3)
    assert late.pass_s(5, 30e-3, 6e-3)[0] - tm.pass_s(5, 30e-3, 6e-3)[0] == pytest.approx(5e-3)
    assert late.pass_s(10, 30e-3, 6e-3)[0] - tm.pass_s(10, 30e-3, 6e-3)[0] == pytest.approx(5e-3)
    kw = dict(budget=None, prompt=16, gen=4, link_gbps=50.0, max_batch=2)
    plain, slow = (choose_batch(sizes, compute, step_overhead_s=o, **kw) for o in (0.0, 5e-3))
    for a, b in zip(plain.table, slow.table):
        assert (b.decode_step_s - a.decode_step_s, b.prefill_s - a.prefill_s) == pytest.approx((5e-3, 5e-3))
    with pytest.raises(ValueError, match="no link bandwidth"):
        ThroughputModel(compute, sizes.block_bytes, link_gbps=None).pass_s(5, 30e-3, 6e-3)


def test_descend_walks_past_short_bumps_to_the_lowest_count():
    from zstream.planning.batch import descend

    costs = [9, 8, 7, 7.5, 6, 5, 6, 7, 4, 9]  # from 1: a bump of one count at 3, a rise of two (6, 7) before 4
    seen: dict = {}
    assert descend(costs.__getitem__, 1, 0, 9, seen, look=3) == 8
    assert descend(costs.__getitem__, 1, 0, 9, {}, look=2) == 5  # the rise of two hides 4
    assert descend(costs.__getitem__, 9, 0, 9, {}, look=3) == 8  # and from above
    assert descend(costs.__getitem__, 1, 0, 6, {}, look=3) == 5  # within its bounds
    assert seen[8] == 4 and set(seen) <= set(range(10))
    flat = [5, 4, 4, 4, 6, 7]  # a tie stays where it was reached
    assert descend(flat.__getitem__, 0, 0, 5, {}) == 1 and descend(flat.__getitem__, 5, 0, 5, {}) == 3


def test_split_layers_are_spread_evenly():
    from zstream.planning.residency import cpu_layers_of

    assert cpu_layers_of(30, 15) == list(range(1, 30, 2))
    assert cpu_layers_of(30, 10) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert cpu_layers_of(30, 30) == list(range(30)) and cpu_layers_of(30, 0) == []
    assert cpu_layers_of(4, 9) == [0, 1, 2, 3]


def test_a_split_of_given_layers_is_planned_as_given():
    """``kv_cpu_layers`` fixes a split's layers on the CPUs (a loaded model's own): every split candidate has that
    count, clamped to the blocks, and is timed with it, whatever ``best_split`` would pick."""
    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30, block_s=2.8e-4, per_token=2e-6, per_key=2e-10), 3.5e-7)
    base = dict(budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=55.0, stream="cpu", max_batch=64,
                kv_offloads=("split",))
    free = max((c for c in choose_batch(sizes, compute, **base).table if c.batch == 64), key=lambda c: c.tokens_per_s)
    fixed = choose_batch(sizes, compute, kv_cpu_layers=3, **base)
    assert free.kv_cpu_layers != 3 and {c.kv_cpu_layers for c in fixed.table} == {3}
    c = fixed.candidate(64, free.resident_blocks, "split")
    assert c is not None
    tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
    layer = sizes.host_kv_bytes(64, 528, "host") // 30
    assert c.decode_step_s == pytest.approx(tm.decode_step(64, c.resident_blocks, 528, "split", 27 * layer, None, 3)[0])
    assert {c.kv_cpu_layers for c in choose_batch(sizes, compute, kv_cpu_layers=99, **base).table} == {30}


def test_the_cpus_read_rate_is_the_cache_over_the_time_it_adds():
    """The CPUs' read rate of a host cache: a layer's keys and values at the largest batch and context timed, over
    what the host-compute block takes beyond the device block there; none without host-compute timings, or when
    the host block is no slower."""
    from zstream.streaming.calibrate import _host_read_gbps

    device = [{"phase": "decode", "batch": b, "context": c, "block_s": 1e-3} for b in (1, 64) for c in (256, 544)]
    host = [{"kv_offload": "host-compute", "phase": "decode", "batch": b, "keys": c, "block_s": t}
            for b, c, t in ((1, 256, 2e-3), (1, 544, 3e-3), (64, 256, 9e-3), (64, 544, 21e-3))]
    key_bytes = 56 * 128 * 2 * 2  # OPT-30B: 56 heads x 128, k and v, fp16
    assert _host_read_gbps(device, host, key_bytes) == pytest.approx(64 * 544 * key_bytes / 20e-3 / 1e9)
    assert _host_read_gbps(device, [], key_bytes) is None
    slow_device = [dict(d, block_s=30e-3) for d in device]
    assert _host_read_gbps(slow_device, host, key_bytes) is None


def test_caches_read_by_the_cpus_share_host_memory_with_the_link():
    """With ``host_read_gbps`` known, a pass whose CPUs attend host caches takes at least every byte read from host
    memory (streamed, brought up, attended) at the faster of the link and the CPUs' rate; without CPU reads, or
    without the rate, the step is as before."""
    sizes = toy_sizes(n=10)  # 100 MB blocks
    compute = compute_model(10, block_s=1e-4, per_token=0.0, per_key=0.0, outer_s=0.0)
    plain = ThroughputModel(compute, sizes.block_bytes, link_gbps=50.0)
    shared = ThroughputModel(dataclasses.replace(compute, host_read_gbps=40.0), sizes.block_bytes, link_gbps=50.0)
    assert shared.host_gbps == 50.0 and plain.host_gbps is None
    cpu = 2 * 10**9
    # 4 blocks streamed (0.4 GB), 0.5 GB of caches up, 2 GB attended on the CPUs: 2.9 GB at 50 GB/s
    assert shared.pass_s(6, 1e-4, 0.0, shared_bytes=5 * 10**8, cpu_bytes=cpu)[0] == pytest.approx(2.9 / 50)
    assert plain.pass_s(6, 1e-4, 0.0, shared_bytes=5 * 10**8, cpu_bytes=cpu)[0] == pytest.approx(0.9 / 50)
    assert shared.pass_s(6, 1e-4, 0.0, shared_bytes=5 * 10**8)[0] == pytest.approx(0.9 / 50)
    assert shared.pass_s(10, 1e-4, 0.0, cpu_bytes=cpu)[0] == pytest.approx(2.0 / 50)  # every block resident
    faster_cpus = ThroughputModel(dataclasses.replace(compute, host_read_gbps=80.0), sizes.block_bytes, 50.0)
    assert faster_cpus.pass_s(10, 1e-4, 0.0, cpu_bytes=cpu)[0] == pytest.approx(2.0 / 80)


def test_host_memory_read_by_both_at_once_sets_the_floor():
    """A calibrated shared rate (the link and the CPUs reading host memory at once: 62 GB/s where either alone reads
    55) is the floor's rate; one slower than either alone (a probe that starved one of them) never makes the floor
    slower than the faster alone; it survives the calibration's JSON."""
    sizes = toy_sizes(n=10)  # 100 MB blocks
    compute = compute_model(10, block_s=1e-4, per_token=0.0, per_key=0.0, outer_s=0.0)
    both = dataclasses.replace(compute, host_read_gbps=53.0, shared_read_gbps=62.0)
    tm = ThroughputModel(both, sizes.block_bytes, link_gbps=55.0)
    assert tm.host_gbps == 62.0
    # 4 blocks streamed (0.4 GB), 0.5 GB of caches up, 2 GB attended on the CPUs: 2.9 GB at 62 GB/s
    assert tm.pass_s(6, 1e-4, 0.0, shared_bytes=5 * 10**8, cpu_bytes=2 * 10**9)[0] == pytest.approx(2.9 / 62)
    starved = ThroughputModel(dataclasses.replace(both, shared_read_gbps=40.0), sizes.block_bytes, link_gbps=55.0)
    assert starved.host_gbps == 55.0
    assert ComputeModel.from_dict(both.to_dict()).shared_read_gbps == 62.0
    assert ComputeModel.from_dict({k: v for k, v in both.to_dict().items() if k != "shared_read_gbps"}) \
        .shared_read_gbps is None


def test_bytes_landed_in_a_window_are_read_off_the_copies_ends():
    """The shared-read probe's link bytes: copies of 100 bytes ending at 1, 2, 4 and 5 s (the third ran at half
    the rate) moved 50 + 75 bytes between 1.5 and 3.5 s: each copy's bytes spread from the previous end to its
    own, none before the first began (0) or after the last ended."""
    from zstream.streaming.calibrate import landed_bytes

    ends = [1.0, 2.0, 4.0, 5.0]
    assert landed_bytes(ends, 100, 1.5, 3.5) == pytest.approx(50 + 75)
    assert landed_bytes(ends, 100, 0.0, 5.0) == pytest.approx(400)
    assert landed_bytes(ends, 100, 0.0, 9.0) == pytest.approx(400)
    assert landed_bytes(ends, 100, 4.5, 4.5) == 0
    assert landed_bytes(ends, 100, 0.5, 1.0) == pytest.approx(50)


def test_a_shared_probe_window_counts_only_if_the_copies_ran_through_it():
    """A window of the shared probe is kept only where the link was busy for 90% of it: copies (100 bytes each) ending
    at 1, 2, 3 and 4 s, a window from 1 to 5 s on the GPU's clock (4 s on the host's) is busy 3/4 of it (the copies
    ended first: dropped); from 1 to 4 s it is kept, and its rates are the link's landed bytes
    and the CPUs' over the window; a window opened before the copies began counts from their start; a window with no
    CPU call in it is no sample of both."""
    from zstream.streaming.calibrate import shared_sample

    ends = [1.0, 2.0, 3.0, 4.0]
    late = shared_sample(ends, 100, 1.0, 5.0, 4.0, 800, 50.0)
    assert not late["link_busy"] and late["link_busy_share"] == pytest.approx(0.75)
    kept = shared_sample(ends, 100, 1.0, 4.0, 3.0, 600, 50.0)
    assert kept["link_busy"] and kept["link_busy_share"] == pytest.approx(1.0)
    assert kept["link_gbps"] == pytest.approx(300 / 3.0 / 1e9)
    assert kept["cpu_gbps"] == pytest.approx(600 / 3.0 / 1e9)
    assert kept["gbps"] == pytest.approx(900 / 3.0 / 1e9) and kept["link_alone_gbps"] == pytest.approx(50e-9)
    early = shared_sample(ends, 100, -1.0, 3.5, 4.5, 600, 50.0)
    assert early["link_busy_share"] == pytest.approx(3.5 / 4.5) and not early["link_busy"]
    assert shared_sample(ends, 100, 0.9, 3.9, 3.0, 600, 50.0)["link_busy"]  # closed before the last copy ended
    assert not shared_sample(ends, 100, 1.0, 4.0, 3.0, 0, 50.0)["link_busy"]


def _h200_opt30b_compute() -> ComputeModel:
    """The compute model of OPT-30B on the H200, fitted as ``calibrate_compute`` fits it to the samples it timed
    there (run 10; decode only: the replay times decode steps, so prefill takes the decode fits unused)."""
    import json
    from pathlib import Path

    from zstream.streaming.calibrate import _host_read_gbps

    raw = Path(__file__).parents[1] / "benches" / "results" / "raw" / "h200-2026-12-03-run10-calibration.jsonl"
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.startswith('{"')]
    device = [r for r in rows if r.get("phase") == "decode" and "kv_offload" not in r]
    host = [r for r in rows if r.get("kv_offload") == "host-compute" and r["phase"] == "decode"]
    block = Linear3.fit([(s["batch"], s["context"], s["block_s"]) for s in device])
    outer = Linear3.fit([(s["batch"], s["context"], s["outer_s"]) for s in device])
    on_cpus = Linear3.fit([(s["batch"], s["keys"], s["block_s"]) for s in host])
    return ComputeModel(num_blocks=48, decode_block=block, decode_outer=outer, prefill_block=block,
                        prefill_outer=outer, kv_blocks={"host-compute": (on_cpus, on_cpus)},
                        host_read_gbps=_host_read_gbps(device, host, 56 * 128 * 2 * 2))


@pytest.mark.parametrize("run", ["run7-bench_opt30b_host", "run8-bench_opt30b_run8", "run9-bench_opt30b_split"])
def test_the_h200_opt30b_steps_are_predicted_within_ten_percent(run):
    """Replay of the H200's OPT-30B decode steps under 16 GiB (runs 7-9: "host" at batch 64, "split" with 24 layers
    on the CPUs at 64 and 39 at 80, micro-batches of 16) through the planner's step model, with the calibration
    timed there and each run's measured link: every step within 10% of the measured. The model without the shared
    host memory predicted the splits at 1.27-1.69x their speed."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "benches" / "results" / "raw" / f"h200-2026-12-03-{run}.json")
                     .read_text())
    compute = _h200_opt30b_compute()
    sizes = ModelSizes.of(facts_from_shapes(family_for(zstream.synthetic.PRESETS["opt-30b"]), torch.float16))
    tm = ThroughputModel(compute, sizes.block_bytes, doc["meta"]["h2d_gbps"])
    for r in doc["rows"]:
        layer = sizes.kv_layer_bytes(r["batch"], 528)
        cpu = 48 - round(r["kv_bytes_per_step"] / layer)  # the layers not brought up were attended on the CPUs
        assert (r["kv_offload"], cpu) in (("host", 0), ("split", 24), ("split", 39))
        if r["kv_offload"] == "split":
            step = tm.split_step(r["batch"], r["resident_blocks"], 528, layer, r["micro_batch"], cpu)
        else:
            step = tm.decode_step(r["batch"], r["resident_blocks"], 528, "host", 48 * layer, r["micro_batch"])[0]
        assert 0.9 < step / r["decode_step_s"] < 1.1, (r["kv_offload"], r["batch"], step, r["decode_step_s"])


def test_a_host_cache_prefill_costs_its_timed_copies_down():
    """With "host" calibrated, the prefill of "host" and of a split's device layers takes the host block's timing
    (the prompt's keys and values go down on the compute stream), decode the device block's; a model calibrated
    before "host" had timings keeps the device block's."""
    sizes, _ = bloom_sizes()
    compute = with_host_kv(compute_model(30), 1e-8)
    tm = ThroughputModel(compute, sizes.block_bytes, 55.0)
    before = tm.prefill(16, 30, 512, "host")[0]
    assert before == tm.prefill(16, 30, 512, "none")[0]
    pre = compute.prefill_block
    compute.kv_blocks["host"] = (compute.decode_block, Linear3(2 * pre.c0, 2 * pre.c1, 2 * pre.c2))
    device_block = compute.prefill_block_s(16, 512)
    outer = compute.prefill_outer_s(16, 512)
    assert tm.prefill(16, 30, 512, "host")[0] == pytest.approx(30 * 2 * device_block + outer)
    cpu_block = compute.prefill_block_s(16, 512, "host-compute")
    assert tm.prefill(16, 30, 512, "split", cpu_layers=10)[0] == pytest.approx(
        10 * cpu_block + 20 * 2 * device_block + outer)
    assert tm.decode_step(16, 30, 528, "host")[0] == tm.decode_step(16, 30, 528, "none")[0]


def test_a_decode_step_costs_the_decode_loops_own_work(monkeypatch):
    """The calibration times the decode loop's work outside the pass through ``generate.decode`` itself (its
    criteria and synchronisation: on the H200, batch 7 with every block resident stepped in 11.3 ms where the blocks
    and outer work timed 9.4), at batches 1 and max_batch; the fit is of those timings, and a decode step's outer work
    carries it (a prefill's does not)."""
    family = family_for(zstream.synthetic.PRESETS["tiny-llama"])
    loops: list = []
    real = calibrate.decode
    monkeypatch.setattr(calibrate, "decode", lambda *a, **k: loops.append(a[0].__name__) or real(*a, **k))
    cm = calibrate_compute(family, "cpu", torch.float32, max_batch=4, prompt=8, gen=2, rounds=2)
    assert loops == ["forward"] * 6  # batches 1 and 4: a warm-up and two rounds each
    loop = [s for s in cm.samples if s["phase"] == "loop"]
    assert [s["batch"] for s in loop] == [1, 4] and all(s["step_s"] > 0 for s in loop)
    assert cm.decode_loop == Linear3.fit([(s["batch"], 0.0, s["step_s"]) for s in loop])
    assert cm.decode_outer_s(4, 9) == pytest.approx(cm.decode_outer(4, 9) + cm.decode_loop(4, 0.0))
    assert cm.decode_loop(4, 0.0) > 0
    tm = ThroughputModel(cm, [1] * family.num_blocks, None)
    bare = ThroughputModel(ComputeModel.from_dict({**cm.to_dict(), "decode_loop": [0.0, 0.0, 0.0]}),
                           [1] * family.num_blocks, None)
    n = family.num_blocks
    assert tm.decode_step(4, n, 9)[0] == pytest.approx(bare.decode_step(4, n, 9)[0] + cm.decode_loop(4, 0.0))
    assert tm.prefill(4, n, 8)[0] == bare.prefill(4, n, 8)[0]
    # a model stored before the loop was timed reads back without it
    old = {k: v for k, v in cm.to_dict().items() if k != "decode_loop"}
    assert ComputeModel.from_dict(old).decode_loop == Linear3(0.0, 0.0, 0.0)


def test_the_device_blocks_are_slowed_by_the_share_of_them_a_streamed_blocks_copy_lands_beside():
    """With the cache on the device, a decode pass's blocks cost ``copy_busy_factor`` times as long where the
    streamed blocks' copies run beside all of them, in proportion beside a share, and as calibrated where nothing
    streams, where the factor was not timed, and in the prefill; the factor survives the calibration's JSON, and
    one calibrated before it was timed reads as none."""
    sizes = toy_sizes(n=10)  # 100 MB blocks
    compute = dataclasses.replace(compute_model(10, block_s=1e-3, per_token=0.0, per_key=0.0, outer_s=0.0),
                                  copy_busy_factor=1.2)
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps=50.0)
    plain = ThroughputModel(dataclasses.replace(compute, copy_busy_factor=None), sizes.block_bytes, link_gbps=50.0)
    # every block resident: nothing crosses the link, the blocks as calibrated (10 ms)
    assert tm.copy_slowdown(1e-3, 10) == 1.0
    assert tm.decode_step(8, 10, 512)[0] == pytest.approx(10e-3)
    # one block streamed: 0.1 GB at 50 GB/s (2 ms) beside 10 ms of blocks, a fifth of them: 1 + 0.2 x 0.2
    assert tm.copy_slowdown(1e-3, 9) == pytest.approx(1.04)
    assert tm.decode_step(8, 9, 512)[0] == pytest.approx(10.4e-3)
    assert plain.decode_step(8, 9, 512)[0] == pytest.approx(10e-3)
    # eight streamed: 16 ms of copies beside all 10 ms of blocks (12 ms slowed): the link's 16 ms still bound it
    assert tm.copy_slowdown(1e-3, 2) == pytest.approx(1.2)
    assert tm.decode_step(8, 2, 512)[2] == pytest.approx(12e-3)
    assert tm.decode_step(8, 2, 512)[0] == pytest.approx(plain.decode_step(8, 2, 512)[0])
    # attention on the CPUs (the block's time is theirs, not the device's), and the prefill: as calibrated
    cpu = Linear3(4e-3, 0.0, 0.0)
    on_cpus = dataclasses.replace(compute, kv_blocks={"host-compute": (cpu, cpu)})
    assert ThroughputModel(on_cpus, sizes.block_bytes, link_gbps=50.0).decode_step(8, 9, 512, "host-compute")[0] == \
        pytest.approx(ThroughputModel(dataclasses.replace(on_cpus, copy_busy_factor=None), sizes.block_bytes,
                                      link_gbps=50.0).decode_step(8, 9, 512, "host-compute")[0])
    assert tm.prefill(8, 9, 64)[0] == pytest.approx(plain.prefill(8, 9, 64)[0])
    assert ComputeModel.from_dict(compute.to_dict()).copy_busy_factor == 1.2
    assert ComputeModel.from_dict({k: v for k, v in compute.to_dict().items() if k != "copy_busy_factor"}) \
        .copy_busy_factor is None


def test_the_copy_busy_factor_is_the_blocks_beside_the_copies_over_alone_never_below_one():
    """``calibrate.copy_busy_factor``: the medians' ratio of the copy probe's rounds; a pass faster beside the
    copies is noise (1); none timed (a CPU calibration), none."""
    rounds = [{"phase": "copy_busy", "alone_s": a, "beside_s": b} for a, b in [(7.3e-3, 7.7e-3), (7.2e-3, 7.6e-3),
                                                                                 (9.0e-3, 7.65e-3)]]
    assert calibrate.copy_busy_factor(rounds) == pytest.approx(7.65 / 7.3)
    assert calibrate.copy_busy_factor([{**r, "beside_s": 7.0e-3} for r in rounds]) == 1.0
    assert calibrate.copy_busy_factor([{"phase": "loop", "step_s": 1.0}]) is None


def test_the_cpus_blocks_are_slowed_by_the_share_of_them_the_link_copies_beside():
    """A host-compute block costs ``cpu_busy_factor`` times its alone time where the link copies beside all of it,
    in proportion where beside a share, and as alone with nothing crossing; a device block is never slowed. The
    factor survives the calibration's JSON, and one calibrated before it was timed reads as none."""
    sizes = toy_sizes(n=10)  # 100 MB blocks
    cpu = Linear3(4e-3, 0.0, 0.0)
    compute = dataclasses.replace(compute_model(10, block_s=1e-3, per_token=0.0, per_key=0.0, outer_s=0.0),
                                  kv_blocks={"host-compute": (cpu, cpu)}, cpu_busy_factor=1.5)
    assert compute.decode_block_s(8, 512, "host-compute") == pytest.approx(4e-3)
    assert compute.decode_block_s(8, 512, "host-compute", link_busy=1.0) == pytest.approx(6e-3)
    assert compute.decode_block_s(8, 512, "host-compute", link_busy=0.5) == pytest.approx(5e-3)
    assert compute.decode_block_s(8, 512, "host-compute", link_busy=3.0) == pytest.approx(6e-3)
    assert compute.decode_block_s(8, 512, "none", link_busy=1.0) == pytest.approx(1e-3)
    assert ComputeModel.from_dict(compute.to_dict()).cpu_busy_factor == 1.5
    assert ComputeModel.from_dict({k: v for k, v in compute.to_dict().items() if k != "cpu_busy_factor"}) \
        .cpu_busy_factor is None
    tm = ThroughputModel(compute, sizes.block_bytes, link_gbps=50.0)
    # every block resident, attention on the CPUs: nothing crosses the link, the blocks run as alone
    assert tm.link_busy_share(8, 10, 512, "host-compute", 0, None, 0) == 0.0
    assert tm.decode_step(8, 10, 512, "host-compute")[0] == pytest.approx(10 * 4e-3)
    # two blocks streamed: 0.2 GB at 50 GB/s (4 ms) beside 40 ms of the CPUs' layers, a tenth of them
    assert tm.link_busy_share(8, 8, 512, "host-compute", 0, None, 0) == pytest.approx(0.1)
    slower = Linear3(4e-3 * 1.05, 0.0, 0.0)  # the same step as the CPUs' blocks 5% slower and no factor
    scaled = dataclasses.replace(compute, kv_blocks={"host-compute": (slower, cpu)}, cpu_busy_factor=None)
    assert tm.decode_step(8, 8, 512, "host-compute")[0] == pytest.approx(
        ThroughputModel(scaled, sizes.block_bytes, link_gbps=50.0).decode_step(8, 8, 512, "host-compute")[0])
    assert tm.decode_step(8, 8, 512, "host-compute")[0] > tm.decode_step(8, 10, 512, "host-compute")[0]
    # micro-batches of 4 rows: two calls a layer, 80 ms of the CPUs' layers beside the same 4 ms
    assert tm.link_busy_share(8, 8, 512, "host-compute", 0, 4, 0) == pytest.approx(0.05)
    assert tm.decode_step(8, 8, 512, "host-compute", micro=4)[0] == pytest.approx(tm.pass_s(
        8, 2 * compute.decode_block_s(4, 512, "host-compute", link_busy=0.05), compute.decode_outer_s(8, 512))[0])
    # 5 layers on the CPUs (20 ms) beside 5 caches of 20 MB coming up (2 ms): a tenth
    assert tm.link_busy_share(8, 10, 512, "split", 10**8, None, 5) == pytest.approx(0.1)
    # a split of 5 layers on the CPUs (20 ms) beside 5 caches of 0.4 GB coming up (40 ms): busy throughout
    assert tm.link_busy_share(8, 10, 512, "split", 2 * 10**9, None, 5) == 1.0
    step = tm.decode_step(8, 10, 512, "split", 2 * 10**9, None, 5, 2 * 10**9)[0]
    alone = ThroughputModel(dataclasses.replace(compute, cpu_busy_factor=None), sizes.block_bytes, 50.0)
    assert step > alone.decode_step(8, 10, 512, "split", 2 * 10**9, None, 5, 2 * 10**9)[0]


def test_the_cpus_busy_factor_is_the_shared_probes_call_over_the_block_alone():
    """The calibration's factor: the busy windows' median call (bytes a call over the CPUs' rate) against the
    host-compute block alone at the probe's point (batch x keys), or, where the probe timed it, against the block's
    call alone just before each window; at least 1 (a faster window is noise); none without both timings."""
    from zstream.streaming.calibrate import _cpu_busy_factor

    host = [{"kv_offload": "host-compute", "phase": "decode", "batch": b, "keys": k, "block_s": t}
            for b, k, t in ((1, 544, 1e-3), (64, 544, 10e-3), (64, 256, 6e-3))]
    per_call = 10**8
    busy = [{"cpu_bytes": n * per_call, "calls": n, "cpu_gbps": n * per_call / w / 1e9}
            for n, w in ((20, 0.25), (20, 0.24), (20, 0.30))]  # calls of 12.5, 12 and 15 ms
    assert _cpu_busy_factor(host, busy, 64 * 544) == pytest.approx(12.5e-3 / 10e-3)
    fast = [dict(b, cpu_gbps=b["cpu_gbps"] * 2) for b in busy]
    assert _cpu_busy_factor(host, fast, 64 * 544) == 1.0
    assert _cpu_busy_factor(host, [], 64 * 544) is None
    assert _cpu_busy_factor(host, busy, 32 * 544) is None
    # each window against the block alone just before it (format 7): 12.5/11, 12/8 and 15/10 ms -> median 1.5
    paired = [dict(b, alone_call_s=t) for b, t in zip(busy, (11e-3, 8e-3, 10e-3))]
    assert _cpu_busy_factor(host, paired, 64 * 544) == pytest.approx(1.5)


def test_the_shared_probe_times_the_largest_host_compute_block_each_round(tiny_bloom, monkeypatch):
    """The probe of host memory read by the link and the CPUs at once (GPU only; its copies stubbed here) is given
    a host-compute decode block at the largest batch and the longest context, and the bytes of cache one call
    reads, once a round; only where "host-compute" is timed."""
    from zstream.streaming.cache import HostComputeLayerCache

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    fam = model.family
    timer = calibrate._BlockTimer(fam, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001, seed=0,
                                  quant=None)
    probed: list = []
    seen: list = []
    real_block = fam.block
    monkeypatch.setattr(fam, "block", lambda w, h, cache, ctx: seen.append((type(cache), h.shape[0])) or
                        real_block(w, h, cache, ctx))

    def probe(cpu_block, cpu_bytes, dev):
        seen.clear()
        cpu_block()
        probed.append((list(seen), cpu_bytes))
        return {"phase": "shared", "link_busy": True, "gbps": 1.0}
    monkeypatch.setattr(calibrate, "_shared_read", probe)
    with torch.inference_mode():
        shared, uplink, loop = timer.probes(["host-compute"], max_batch=3, rounds=2, shared_probe=True)
    assert len(shared) == 2 and uplink == [] and [s["batch"] for s in loop] == [1, 3]
    layer_bytes = 3 * 10 * fam.num_kv_heads * fam.head_dim * 2 * 4  # 3 rows x 10 keys x a key's and value's bytes
    assert probed == [([(HostComputeLayerCache, 3)], layer_bytes)] * 2
    assert timer.probes(["host"], max_batch=3, rounds=1, shared_probe=True)[0] == []
    assert timer.probes(["host-compute"], max_batch=3, rounds=1)[0] == []  # on a CPU, not by default


def test_a_round_is_calm_by_its_slower_points_median_slow_down():
    """Per round, each of the slower half of the points' time (by their fastest round) over its fastest round, then
    their median. Two points: only the slower scores, (2, 2, 6, 2.4): 1, 1, 3, 1.2, so within 1.3 of the calmest
    rounds 0, 1 and 3. Run 21's split pairs at batch 16 and 544 keys (rounds of 21.1, 5.2, 7.8, 6.2 and 19.2 ms,
    fastest 5.2) and 256 keys (20.1, 2.7, 3.1, 4.0, 7.5: the fastest, not scored) and its host-compute block at 544
    keys (24.0, 4.0, 4.2, 4.6, 7.2): scores 5.03, 1, 1.275, 1.171 and 2.75, so rounds 1-3 at 1.3 and 1 and 3 at 1.18;
    every point scoring (formats 7-18), 6.0, 1, 1.148, 1.192 and 2.78: rounds 1-2 at 1.18. Run 25's pattern: four
    small points barely slowed in rounds 0-1 outvote two large ones slowed 1.45x when every point scores."""
    assert calibrate.calm_rounds([[1.0, 1.1, 3.0, 1.0], [2.0, 2.0, 6.0, 2.4]], tolerance=1.3) == [0, 1, 3]
    run21 = [[21.1, 5.2, 7.8, 6.2, 19.2], [20.1, 2.7, 3.1, 4.0, 7.5], [24.0, 4.0, 4.2, 4.6, 7.2]]
    assert calibrate.calm_rounds(run21, tolerance=1.3) == [1, 2, 3]
    assert calibrate.calm_rounds(run21, tolerance=1.18) == [1, 3]
    assert calibrate.calm_rounds(run21, tolerance=1.18, scored_share=1.0) == [1, 2]
    run25 = [[1.0, 1.0, 1.0, 1.0], [1.05, 1.05, 1.0, 1.0], [1.1, 1.1, 1.0, 1.0], [1.2, 1.2, 1.0, 1.0],
             [14.5, 14.4, 10.0, 10.1], [29.0, 28.8, 20.0, 20.2]]
    assert calibrate.calm_rounds(run25) == [2, 3] and calibrate.calm_rounds(run25, scored_share=1.0) == [0, 1, 2, 3]
    assert calibrate.calm_rounds([[1.0, 2.0]], tolerance=2.5) == [0, 1]
    assert calibrate.calm_rounds([[1.0, 2.0, 1.0]], tolerance=1.0) == [0, 2]  # as calm as the calmest: kept
    assert calibrate.calm_rounds([[5.0], [7.0]]) == [0] and calibrate.calm_rounds([]) == []
    assert calibrate.CALM_ROUND_TOLERANCE == 1.3 and calibrate.CALM_SCORED_SHARE == 0.5  # (items 31 and 59)


@pytest.mark.parametrize(("slow_downs", "calls", "kept"), [
    # rounds 0 and 2 disturbed: round 3 is calm, round 4 not, round 5 makes three calm rounds
    ([3.0, 1.0, 3.0, 1.2, 2.9, 1.1], 6, [1, 3, 5]),
    # never calm again: as many rounds once more, then the calm one's time
    ([1.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0], 6, [0]),
    # calm throughout: no round more
    ([1.0, 1.1, 1.2], 3, [0, 1, 2]),
])
def test_the_cpus_points_keep_their_calm_rounds_timed_again_where_disturbed(tiny_bloom, monkeypatch, slow_downs,
                                                                            calls, kept):
    """The CPUs' decode points (host-compute blocks and split pairs; 3 rounds asked) are timed again until 3 rounds
    were calm, at most 3 times more, and each keeps the median of its calm rounds; the device's points and the
    host-compute prefill are timed 3 times. A point's time is its batch x keys in microseconds, times the round's
    slow-down."""
    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    asked: dict = {}

    def scripted(self, kv, B, T, S):
        n = asked.setdefault((kv, B, T, S), [])
        n.append(1)
        return B * S * 1e-6 * (slow_downs[len(n) - 1] if T == 1 else 1.0)
    monkeypatch.setattr(calibrate._BlockTimer, "time_kv", scripted)
    monkeypatch.setattr(calibrate, "_COMPUTE_CACHE", {})  # (each case calibrates anew)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        cm = calibrate_compute(model.family, "cpu", torch.float32, max_batch=4, prompt=8, gen=2, rounds=3,
                               kv_offloads=("split",))
    # told where the calm rounds stayed fewer than asked: "5 of 6 rounds ran slower", the prediction on 1
    told = [str(w.message) for w in warned if "calibrating the CPUs' attention" in str(w.message)]
    assert told == ([] if len(kept) >= 3 else [f"zstream: calibrating the CPUs' attention, {calls - len(kept)} of "
                                               f"{calls} rounds ran slower than the calmest by more than 1.3x (the "
                                               "host's CPUs were busy with other work); the prediction of placements "
                                               f"that attend on the CPUs rests on {len(kept)} rounds"])
    on_cpus = [s for s in cm.samples if s.get("kv_offload") in ("host-compute", "split") and s["phase"] == "decode"]
    assert {s["kv_offload"] for s in on_cpus} == {"host-compute", "split"} and len(on_cpus) == 2 * 3 * 2
    median = sorted(slow_downs[i] for i in kept)[len(kept) // 2]
    for s in on_cpus:
        assert len(s["block_rounds_s"]) == calls and s["calm_rounds"] == kept
        assert s["block_s"] == pytest.approx(s["batch"] * s["keys"] * 1e-6 * median)
    assert {len(n) for (kv, _, T, _), n in asked.items() if T > 1} == {3}
    assert all(len(s["block_rounds_s"]) == 3 for s in cm.samples if "kv_offload" not in s and "block_rounds_s" in s)
    assert cm.split_pair == Linear3.fit([(s["batch"], s["keys"], s["block_s"]) for s in on_cpus
                                         if s["kv_offload"] == "split"])


def test_an_all_resident_step_is_planned_as_the_graph_it_replays():
    """Every block resident, the cache on the device, the batch in one piece: the step costs the graphed block's and
    the graphed step's timings (and the decode loop's); any other step, or cuda_graphs=False, the eager ones."""
    cm = compute_model(4, block_s=3e-4, per_token=1e-6, per_key=0.0, outer_s=8e-4)
    cm.decode_graph_block, cm.decode_graph_outer = Linear3(1e-4, 1e-7, 0.0), Linear3(2e-4, 0.0, 0.0)
    cm.decode_loop = Linear3(5e-5, 0.0, 0.0)
    tm = ThroughputModel(cm, [100 * MB] * 4, link_gbps=50.0, graphs=True)
    step = tm.decode_step(8, resident=4, context=100)[0]
    assert step == pytest.approx(4 * (1e-4 + 8e-7) + 2e-4 + 5e-5)
    eager = 4 * cm.decode_block_s(8, 100) + cm.decode_outer_s(8, 100)
    micro = 4 * 2 * cm.decode_block_s(4, 100) + cm.decode_outer_s(8, 100)  # two micro-batches a block: eager
    assert tm.decode_step(8, 4, 100, micro=4)[0] == pytest.approx(micro)
    assert tm.decode_step(8, 4, 100, micro=8)[0] == pytest.approx(step)  # one micro-batch of the whole batch
    off = ThroughputModel(cm, [100 * MB] * 4, link_gbps=50.0, graphs=False)
    assert tm.decode_step(8, 3, 100)[0] == pytest.approx(off.decode_step(8, 3, 100)[0])  # a block streams: eager
    assert tm.decode_step(8, 4, 100, "host")[0] == pytest.approx(eager)  # the cache in host memory: eager
    assert off.decode_step(8, 4, 100)[0] == pytest.approx(eager)
    again = ComputeModel.from_dict(cm.to_dict())
    assert (again.decode_graph_block, again.decode_graph_outer) == (cm.decode_graph_block, cm.decode_graph_outer)
    assert ComputeModel.from_dict(compute_model(4).to_dict()).decode_graph_block is None
    cm.decode_graph_record_block, cm.decode_graph_record_outer = Linear3(1e-3, 0.0, 0.0), Linear3(4e-3, 0.0, 0.0)
    assert cm.graph_record_s(8, 100) == pytest.approx(4 * 1e-3 + 4e-3)
    kw = {"budget": 10**10, "prompt": 16, "link_gbps": 50.0, "stream": None, "max_batch": 4}
    long = 2 * (GRAPH_MIN_STEPS // 2) + 4  # new tokens: more steps than a graph needs (an even count)
    graphed = choose_batch(toy_sizes(4), cm, gen=long, cuda_graphs=True, **kw).candidate(2, 4)
    prefill = tm.prefill(2, 4, 16)[0]
    assert graphed.decode_step_s == pytest.approx(tm.decode_step(2, 4, 16 + long // 2)[0])
    record = cm.graph_record_s(2, 16 + long // 2)
    assert 2 * long / graphed.tokens_per_s == pytest.approx(prefill + (long - 1) * graphed.decode_step_s + record)
    short = GRAPH_MIN_STEPS  # new tokens: a step fewer than that, too few
    too_few = choose_batch(toy_sizes(4), cm, gen=short, cuda_graphs=True, **kw).candidate(2, 4)
    assert too_few.decode_step_s == pytest.approx(off.decode_step(2, 4, 16 + short / 2)[0])
    assert 2 * short / too_few.tokens_per_s == pytest.approx(prefill + (short - 1) * too_few.decode_step_s)
    plan = choose_batch(toy_sizes(4), cm, gen=long, **kw)  # graphs off: planned eager, and loaded so
    assert plan.candidate(2, 4).decode_step_s == pytest.approx(off.decode_step(2, 4, 16 + long // 2)[0])
    assert plan.load_kwargs()["cuda_graphs"] is False
    assert choose_batch(toy_sizes(4), cm, gen=long, cuda_graphs=True, **kw).load_kwargs()["cuda_graphs"] is True


def test_a_graph_is_planned_where_the_loader_would_record_it_and_counted_in_memory():
    """The planner and ``plan_load`` agree on whether a graph's memory fits beside every block (bloom-7b1, batch 7,
    544 positions): a budget a byte short of it plans the step eager, and the loader decodes eagerly; with the byte,
    both graph it, and the candidate's memory is the loader's weights and reserve, the graph's included."""
    from zstream.planning.residency import PlanOptions, Resources, plan_load

    sizes, family = bloom_sizes()
    cm = compute_model(30, block_s=3e-4, per_token=1e-6, per_key=0.0, outer_s=8e-4)
    cm.decode_graph_block, cm.decode_graph_outer = Linear3(1e-4, 1e-7, 0.0), Linear3(2e-4, 0.0, 0.0)
    facts = facts_from_shapes(family, torch.float16)
    used = sizes.memory_bytes(7, 30, 544, 0)
    graph = sizes.graph_memory(7, 544)
    assert graph > 33 << 20
    for budget, graphs in ((used + graph - 1, False), (used + graph, True)):
        plan = choose_batch(sizes, cm, budget=budget, prompt=512, gen=32, link_gbps=None, stream=None, max_batch=7,
                            cuda_graphs=True)
        c = plan.candidate(7, 30)
        tm = ThroughputModel(cm, sizes.block_bytes, link_gbps=None, graphs=graphs)
        assert c.decode_step_s == pytest.approx(tm.decode_step(7, 30, 528)[0])
        assert c.memory_bytes == used + (graph if graphs else 0)
        loaded = plan_load(facts, Resources("cuda:0", device_free=budget), PlanOptions(
            offload="none", budget=budget, max_batch=7, max_seq_len=544, cuda_graphs=True), where="ckpt")
        assert loaded.decode_graph is graphs
        assert facts.device_bytes + loaded.kv_reserve_bytes == c.memory_bytes


def test_a_graphed_fit_leaves_out_samples_at_the_floor():
    """A recording's block part at the floor (its difference came out at or below zero) is left out of the fit; the
    others fit as they are. Run 4 of 2026-12-05's calibration had its first point at the floor, and the relative fit
    bent to it: 4.2e-9 x batch x context a block, 15 us at batch 7 over 528 keys, where the engine's recording of
    30 blocks took 14 ms over its step."""
    per_block = {(1, 256): 1e-6, (1, 544): 4.1e-4, (3, 256): 4.2e-4, (3, 544): 4.3e-4, (8, 256): 4.4e-4,
                 (8, 544): 4.6e-4}
    graphed = [{"batch": b, "context": c, "record_block_s": t} for (b, c), t in per_block.items()]
    fit = calibrate._graph_fit(graphed, "record_block_s")
    assert fit(7, 528) == pytest.approx(4.5e-4, rel=0.05)
    assert Linear3.fit([(b, c, t) for (b, c), t in per_block.items()])(7, 528) < 1e-4  # (with it: bent to it)
    at_floor = [{**s, "record_block_s": calibrate.GRAPH_FLOOR_S} for s in graphed]
    assert calibrate._graph_fit(at_floor, "record_block_s")(7, 528) < 1e-4  # all at the floor: fitted as they are
    assert calibrate._graph_fit([], "record_block_s") is None


@pytest.mark.parametrize("run", ["run3-bench_graph_graph", "run4-bench_kv_all"])
def test_the_h200s_graphed_rows_are_predicted_within_ten_percent_by_the_graph_fits(run):
    """Replay of the H200's graphed rows (bloom-7b1 fp16, every block resident, batch 7 under 16 GiB; runs 3-4 of
    2026-12-05) through the planner, their graph fits taken again from the calibration's stored samples as this
    build takes them: a recording less the replayed step it includes, the samples at the floor left out. Within 10%
    of the measured tokens/s (1.076 and 1.077, the recording 11-13 ms); the stored fits, bent to the first point's
    floor, said 2.5 ms for the recording and 1.111-1.115. The engine's first step took 14.4-16.2 ms over its
    median."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "benches" / "results" / "raw" / f"h200-2026-12-05-{run}.json")
                     .read_text())
    (row,) = [r for r in doc["rows"] if r["batch"] == 7 and r["resident_blocks"] == 30]
    compute = ComputeModel.from_dict(doc["meta"]["compute_models"][row["predicted_compute"]])
    graphed = [{**s, "record_block_s": s["record_block_s"] - s["block_s"],
                "record_outer_s": s["record_outer_s"] - s["outer_s"]}  # (stored before format 9: with the replay)
               for s in compute.samples if s["phase"] == "graph"]
    sizes, _ = bloom_sizes()

    def predicted() -> float:
        plan = choose_batch(sizes, compute, budget=parse_bytes("16GiB"), prompt=512, gen=32, link_gbps=None,
                            stream=None, max_batch=7, kv_offloads=("none",), cuda_graphs=True)
        return plan.candidate(7, 30, "none", None).tokens_per_s / row["tokens_per_s"]

    assert predicted() > 1.1  # the stored fits
    compute.decode_graph_record_block = calibrate._graph_fit(graphed, "record_block_s")
    compute.decode_graph_record_outer = calibrate._graph_fit(graphed, "record_outer_s")
    assert 10e-3 < compute.graph_record_s(7, 528) < 16e-3
    assert 0.9 < predicted() < 1.1


def test_the_first_graph_a_calibration_records_is_a_throwaway(tiny_bloom, monkeypatch):
    """The first point's recording would pay for what a process's first capture sets up (its difference over the
    blocks came out at the floor in run 4 of 2026-12-05): a one-block graph is recorded first, untimed, once a
    sampling."""
    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    made: list = []  # the blocks of each graph made, in order
    real = calibrate.DecodeGraph
    monkeypatch.setattr(calibrate, "DecodeGraph", lambda fam, outer, weights, *a, **k:
                        made.append(len(weights)) or real(fam, outer, weights, *a, **k))
    timer = calibrate._BlockTimer(model.family, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001,
                                  seed=0, quant=None)
    timer.graphs = True
    timer.sample([("decode", 2, 1, 10), ("decode", 3, 1, 6)], [], False, 2)
    few, many = calibrate.graph_probe_blocks(model.family.num_blocks)
    assert many == model.family.num_blocks  # the step a generation replays, timed whole
    assert made == [1, few, many, few, many]
    timer.sample([("decode", 2, 1, 10)], [], False, 1)
    assert made[5:] == [1, few, many]
    model.close()


def test_the_calibration_times_the_graphed_step_over_few_and_many_blocks(tiny_bloom):
    """A graphed decode point is timed over few and many blocks (``graph_probe_blocks``; on the CPU, the fixed-shape
    step eagerly): the block is the difference over the blocks between, the step's rest what remains; fitted beside
    the eager."""
    few, many = probe = (2, 8)
    sample = calibrate._graph_sample(4, 9, [(few * 1e-3 + 5e-4, many * 1e-3 + 5e-4), (0.004, 0.016)],
                                     (few * 3e-3 + 0.02, many * 3e-3 + 0.02), probe)
    assert sample["block_rounds_s"] == pytest.approx([1e-3, 0.012 / (many - few)])
    assert sample["outer_rounds_s"] == pytest.approx([5e-4, 0.004 - few * 0.012 / (many - few)])
    # the recording less the replayed step's parts (their medians: 1.5e-3 a block, 2.5e-4 the rest)
    assert (sample["record_block_s"], sample["record_outer_s"]) == pytest.approx((3e-3 - 1.5e-3, 0.02 - 2.5e-4))
    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    timer = calibrate._BlockTimer(model.family, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001,
                                  seed=0, quant=None)
    assert not timer.graphs  # no CUDA graphs on the CPU
    cuda = torch.device("cuda")
    assert calibrate.times_graphs(True, cuda, None)
    assert not calibrate.times_graphs(False, cuda, None) and not calibrate.times_graphs(True, cuda, object())
    assert not calibrate.times_graphs(True, torch.device("cpu"), None)
    timer.graphs = True
    samples, _ = timer.sample([("decode", 2, 1, 10), ("decode", 3, 1, 6), ("prefill", 1, 5, 5)], [], False, 2)
    graphed = [s for s in samples if s["phase"] == "graph"]
    assert [(s["batch"], s["context"]) for s in graphed] == [(2, 10), (3, 6)]
    assert all(len(s["block_rounds_s"]) == 2 and s["block_s"] > 0 and s["record_block_s"] > 0 for s in graphed)
    loop = [{"phase": "loop", "batch": 1, "step_s": 1e-4}]
    fitted = calibrate._fitted(model.family, torch.float32, "k", samples, [], [], [], loop, [], False, 1)
    assert None not in (fitted.decode_graph_block, fitted.decode_graph_outer, fitted.decode_graph_record_block,
                        fitted.decode_graph_record_outer)
    assert calibrate._fitted(model.family, torch.float32, "k", [s for s in samples if s["phase"] != "graph"], [],
                             [], [], loop, [], False, 1).decode_graph_block is None
    assert calibrate._graph_sample(1, 1, [(2e-3, 1e-3)], (1.0, 1.0), probe)["block_s"] == 1e-6  # below 0: the floor
    model.close()


def test_a_graphed_point_times_the_models_own_step_whole():
    """The graph probe's many blocks are the model's own count, and the fitted parts give back that step's median
    as timed (not the median of each part, which need not add up to it): runs 7 and 11 of 2026-12-05 extrapolated
    bloom-7b1's 30-block step from 2 and 8 blocks to 8.25 and 6.84 ms, where both ran at 7.35-7.57."""
    assert calibrate.graph_probe_blocks(30) == (2, 30)
    assert calibrate.graph_probe_blocks(2) == (1, 2) and calibrate.graph_probe_blocks(1) == (1, 2)
    rounds = [(0.003, 0.009), (0.003, 0.015), (0.005, 0.011)]  # blocks 1, 2, 1 ms; the parts' rest 1, -1, 3 ms
    sample = calibrate._graph_sample(1, 1, rounds, (0.05, 0.1), (2, 8))
    assert sample["block_s"] == pytest.approx(1e-3)
    assert sample["outer_s"] + 8 * sample["block_s"] == pytest.approx(0.011)  # the 8-block step's median
    assert statistics.median(sample["outer_rounds_s"]) == pytest.approx(1e-3)  # (what the rest was before)
    # the recording less the replayed step: its 8-block step took 0.1 s, 0.089 over the replay's 0.011
    assert sample["record_outer_s"] + 8 * sample["record_block_s"] == pytest.approx(0.1 - 0.011)


def test_graphs_are_timed_only_where_the_cache_may_stay_on_the_device(tiny_bloom):
    """A graph replays all-resident steps with the cache on the device (``residency.decode_graph_allowed``): a
    calibration for host placements alone does not time graphs (nor key them), even where load's cuda_graphs asks."""
    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    kw = dict(max_batch=2, prompt=4, gen=2, rounds=1, min_sample_s=1e-4, graphs=True)
    assert calibrate_compute(model.family, "cpu", torch.float32, kv_offloads=("none", "host"), **kw).key \
        .endswith(" graphs")
    assert not calibrate_compute(model.family, "cpu", torch.float32, kv_offloads=("host-compute",), **kw).key \
        .endswith(" graphs")
    model.close()


def test_the_models_whole_graphed_step_is_timed_sustained(tiny_bloom, monkeypatch):
    """The whole graphed step is sampled over GRAPH_SUSTAINED_S, as long as a generation's decode (sustained, the
    device's power cap lowers its clock: run 12 of 2026-12-05), the few-block graph over GRAPH_SAMPLE_S; both with a
    synchronisation after every step, as the engine's steps wait for their tokens."""
    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    timer = calibrate._BlockTimer(model.family, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001,
                                  seed=0, quant=None)
    few, many = timer.graph_probe
    asked: list = []
    real = calibrate._seconds

    def seconds(fn, dev, sample_s, each=False):  # type: ignore[no-untyped-def]
        asked.append((sample_s, each))
        return real(fn, dev, 1e-4, each)
    monkeypatch.setattr(calibrate, "_seconds", seconds)
    timer.time_graph(2, 10, few)
    timer.time_graph(2, 10, many)
    # each step synchronised, as a generation waits for its tokens (format 15)
    assert asked == [(calibrate.GRAPH_SAMPLE_S, True), (calibrate.GRAPH_SUSTAINED_S, True)]
    assert calibrate.GRAPH_SUSTAINED_S >= 0.2  # (a 32-token generation's decode of bloom-7b1 at batch 7)
    model.close()


def test_the_prefill_is_fitted_in_seconds_so_its_largest_point_comes_out_as_timed():
    """The H200's stored calibrations of run 12 of 2026-12-05 (bloom-7b1 fp16, prefill points at batch 1 and the
    row's batch over 256 and 512 tokens): a batch-1 block sits at the launch floor, about as long over 256 tokens as
    over 512, which no c0 + c1 x + c2 x y follows. Fitted in relative error (formats 13 and before), the miss went to
    the largest point too, the one a row's micro-batch runs at: 3-8% under its own timing in every calibration, and
    every row's prefill ran over its prediction. Fitted in seconds (``calibrate.prefill_fit``), within 1% of it."""
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "benches" / "results" / "raw" /
                      "h200-2026-12-05-run12-bench_kv_all.json").read_text())
    models = [ComputeModel.from_dict(m) for m in doc["meta"]["compute_models"].values()]
    assert len(models) == 12
    for cm in models:
        points = [(s["batch"] * s["prompt"], s["prompt"], s["block_s"]) for s in cm.samples
                  if s.get("phase") == "prefill" and "kv_offload" not in s]
        x, y, t = max(points)
        assert Linear3.fit(points)(x, y) < 0.98 * t  # relative: under the row's point
        assert calibrate.prefill_fit(points)(x, y) == pytest.approx(t, rel=0.01)
        assert_best_non_negative_fit(calibrate.prefill_fit(points), points, relative=False)


def test_a_sample_synchronises_after_every_call_only_where_asked(monkeypatch):
    """``_seconds``: calls back to back and one synchronisation at the end (a block in a pass); with ``each``, one
    after every call too (a graphed decode step, which the engine starts once the last step's tokens are in)."""
    events: list = []
    monkeypatch.setattr(calibrate, "sample_calls", lambda fn, dev, s: 3)
    monkeypatch.setattr(calibrate, "_sync", lambda dev: events.append("sync"))
    calibrate._seconds(lambda: events.append("call"), torch.device("cpu"), 0.1)
    assert events == ["call"] * 3 + ["sync"]
    events.clear()
    calibrate._seconds(lambda: events.append("call"), torch.device("cpu"), 0.1, each=True)
    assert events == ["call", "sync"] * 3 + ["sync"]


# ---- the eager step timed whole (formats 16-17) ------------------------------------------------------------------


def test_an_eager_points_extra_gives_back_the_whole_step_as_timed():
    """An eager point's extra is its steps' median less the block's and outer work's medians, the ones the device fits
    take, so the prediction gives back the whole step as timed; at the floor where that is at or below zero. Run 9
    of 2026-12-06 (an H100) differenced round by round instead: the rounds moved by milliseconds and their median
    put bloom-7b1's batch 7 at 0.47 ms, the medians at 1.22."""
    decode = [{"phase": "decode", "batch": B, "context": S, "block_s": b, "outer_s": o}
              for B, S, b, o in ((1, 10, 3e-4, 5e-4), (4, 10, 4e-4, 6e-4), (4, 20, 5e-4, 6e-4))]
    host = {"kv_offload": "host-compute", "phase": "decode", "batch": 4, "tokens": 1, "keys": 10, "block_s": 1.0}
    eager = [{"phase": "eager", "batch": 1, "context": 10, "step_s": 30 * 3e-4 + 5e-4 + 2e-4},
             {"phase": "eager", "batch": 4, "context": 10, "step_s": 30 * 4e-4 + 6e-4 + 5e-4},
             {"phase": "eager", "batch": 4, "context": 20, "step_s": 30 * 5e-4 + 6e-4 + 5e-4}]
    loop = {"phase": "loop", "batch": 1, "step_s": 1e-4}
    fit = calibrate.eager_extra_fit([*decode, host, *eager, loop], 30)
    assert fit is not None
    assert (fit(1, 10), fit(4, 10), fit(4, 20)) == pytest.approx((2e-4, 5e-4, 5e-4), abs=1e-9)
    assert fit(16, 10) == pytest.approx(2e-4 + 15 * 1e-4)  # (c0 + c1 x: in seconds, through the three)
    below = {"phase": "eager", "batch": 1, "context": 10, "step_s": 1e-3}  # under its parts' 9.5 ms
    assert calibrate.eager_extra_fit([*decode, below], 30) == Linear3(calibrate.GRAPH_FLOOR_S, 0.0, 0.0)
    assert calibrate.eager_extra_fit(decode, 30) is None


def test_the_calibration_times_an_eager_step_through_the_engines_block_loop(tiny_bloom, monkeypatch):
    """At each decode point (not the prefill's, even at the same batch and length), one eager step of the model's
    every block a round, each step synchronised as a generation's, through ``blocks.run_blocks``, the loop the
    engine's forward runs; timed on a GPU with plain weights only. A graphed point likewise, once a round."""
    import zstream.streaming.model as engine

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    loops: list = []
    real_loop = calibrate.run_blocks
    assert engine.run_blocks is real_loop  # the engine's own loop

    def counted(fam, blocks, hidden, layer, parts, ctxs):  # type: ignore[no-untyped-def]
        loops.append(fam.num_blocks)
        return real_loop(fam, blocks, hidden, layer, parts, ctxs)
    monkeypatch.setattr(calibrate, "run_blocks", counted)
    asked: list = []
    real = calibrate._seconds

    def seconds(fn, dev, sample_s, each=False):  # type: ignore[no-untyped-def]
        if sample_s == calibrate.EAGER_SAMPLE_S:
            asked.append(each)
        return real(fn, dev, 1e-4, each)
    monkeypatch.setattr(calibrate, "_seconds", seconds)
    timer = calibrate._BlockTimer(model.family, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001,
                                  seed=0, quant=None)
    assert not timer.eager  # (the CPU's steps are not launched ahead of a device)
    assert calibrate.times_eager_steps(torch.device("cuda"), None)
    assert not calibrate.times_eager_steps(torch.device("cuda"), object())
    timer.eager = timer.graphs = True
    # (a prefill point at a decode point's batch and length: run 9 of 2026-12-06 timed such graphed points twice a
    # round, once for the prefill's)
    samples, _ = timer.sample([("decode", 2, 1, 10), ("decode", 3, 1, 6), ("prefill", 2, 10, 10)], [], False, 2)
    eager = [s for s in samples if s["phase"] == "eager"]
    assert [(s["batch"], s["context"], len(s["step_rounds_s"])) for s in eager] == [(2, 10, 2), (3, 6, 2)]
    graphed = [s for s in samples if s["phase"] == "graph"]
    assert [(s["batch"], s["context"], len(s["block_rounds_s"])) for s in graphed] == [(2, 10, 2), (3, 6, 2)]
    assert loops and set(loops) == {model.family.num_blocks} and asked == [True] * 4
    assert all(s["step_s"] == statistics.median(s["step_rounds_s"]) for s in eager)
    loop = [{"phase": "loop", "batch": 1, "step_s": 1e-4}]
    fitted = calibrate._fitted(model.family, torch.float32, "k", samples, [], [], [], loop, [], False, 1)
    assert fitted.decode_eager_extra == calibrate.eager_extra_fit(samples, model.family.num_blocks) is not None
    assert ComputeModel.from_dict(fitted.to_dict()).decode_eager_extra == fitted.decode_eager_extra
    assert calibrate._fitted(model.family, torch.float32, "k", [s for s in samples if s["phase"] != "eager"], [],
                             [], [], loop, [], False, 1).decode_eager_extra is None
    model.close()


def test_an_eager_step_with_the_cache_on_the_device_pays_its_extra_once_a_micro_batch():
    """The eager extra goes on a decode step whose cache is on the device and that is not replayed as a graph, once
    for each micro-batch's loop over the blocks, as compute the device idles through; a host cache's blocks were
    timed with their waits, and a graphed step has its own timings. Bloom-7b1's eager batch 7 ran 0.6-1.0 ms a step
    over its prediction on both cards (H100 runs 1 and 8 of 2026-12-06, H200 run 3 of 2026-12-05)."""
    cm = compute_model(30)
    cm.kv_blocks = {"host-compute": (Linear3(2e-3, 1e-4, 0.0), Linear3(2e-3, 1e-5, 0.0)),
                    "host": (cm.decode_block, cm.prefill_block)}
    tm = ThroughputModel(cm, [100 * MB] * 30, link_gbps=50.0)
    before = {kv: tm.decode_step(8, 30, 500, kv)[0] for kv in ("none", "host", "host-compute")}
    micro = tm.decode_step(8, 30, 500, "none", micro=4)[0]
    cm.decode_eager_extra = Linear3(4e-4, 1e-5, 0.0)
    assert tm.decode_step(8, 30, 500)[0] == pytest.approx(before["none"] + 4e-4 + 8e-5)
    assert tm.decode_step(8, 30, 500, "none", micro=4)[0] == pytest.approx(micro + 2 * (4e-4 + 4e-5))
    assert tm.decode_step(8, 30, 500, "host")[0] == pytest.approx(before["host"])
    assert tm.decode_step(8, 30, 500, "host-compute")[0] == pytest.approx(before["host-compute"])
    # streamed blocks: the idling lengthens a compute-bound step (run 8's 29/30), not a link-bound one, whose copies
    # the ring queued ahead (run 9's batch 8 with 4 of 30 streamed: 30.9 ms predicted, 31.5 with the extra in the
    # pass's outer work, 29.3 measured)
    cm.decode_eager_extra = None
    fast, slow = (ThroughputModel(cm, [100 * MB] * 30, link_gbps=g) for g in (1000.0, 5.0))
    compute_bound, link_bound = fast.decode_step(8, 29, 500)[0], slow.decode_step(8, 26, 500)[0]
    assert link_bound > 2 * compute_bound
    cm.decode_eager_extra = Linear3(4e-4, 1e-5, 0.0)
    assert fast.decode_step(8, 29, 500)[0] == pytest.approx(compute_bound + 4e-4 + 8e-5)
    assert slow.decode_step(8, 26, 500)[0] == pytest.approx(link_bound)
    cm.decode_graph_block, cm.decode_graph_outer = Linear3(1e-4, 0.0, 0.0), Linear3(2e-4, 0.0, 0.0)
    graphed = ThroughputModel(cm, [100 * MB] * 30, link_gbps=50.0, graphs=True)
    assert graphed.decode_step(8, 30, 500)[0] == pytest.approx(30 * 1e-4 + 2e-4)  # (no decode loop fitted here)


def test_an_eager_probe_lets_its_cache_go_after_each_sample(tiny_bloom, monkeypatch):
    """The eager probe's cache (up to GRAPH_PROBE_CACHE_BYTES) is made for each sample and let go after it: a
    calibration's device holds one point's at a time, beside the model it plans for, not one for every point."""
    import gc
    import weakref

    model = zstream.load(tiny_bloom, offload="none", device="cpu", progress=False)
    made: weakref.WeakSet = weakref.WeakSet()
    real = calibrate.KVCache

    def tracked(*a, **k):  # type: ignore[no-untyped-def]
        cache = real(*a, **k)
        made.add(cache)
        return cache
    monkeypatch.setattr(calibrate, "KVCache", tracked)
    timer = calibrate._BlockTimer(model.family, torch.device("cpu"), torch.float32, longest=10, min_sample_s=0.001,
                                  seed=0, quant=None)
    for B, S in ((2, 10), (3, 6)):
        assert timer.time_eager(B, S) > 0
        gc.collect()
        assert len(made) == 0
    model.close()
