"""``zstream bench`` on the CPU: every option runs and reports what it measured (no assertion on a time: the
numbers are the machine's; what is checked is that they are there, finite and consistent with each other)."""

from __future__ import annotations

import json
import math
import runpy
import sys
import time

import pytest

from zstream.interfaces.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_repeats_trace_and_json(cache, capsys):
    out = cache / "b.json"
    assert main(["bench", "tiny-llama", "--offload", "nvme", "--batch", "1,2", "--prompt", "6", "--gen", "3",
                 "--repeats", "2", "--trace", str(cache / "t.json"), "--json", str(out), "--fio", "/no/fio"]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["decode_steps_s"]) == 2 and math.isfinite(r["decode_step_s"]) and r["tokens_per_s"] > 0
        assert r["pct_of_bound"] == pytest.approx(100 * r["bound_step_s"] / r["decode_step_s"])
        assert r["streamed_blocks"] == 2 and r["resident_blocks"] == 0
    assert doc["meta"]["model"] == "tiny-llama" and "fio_gbps" in doc["meta"] and doc["meta"]["fio_gbps"] is None
    trace = json.loads((cache / "t.json").read_text())
    assert any(e.get("name") == "block 1" for e in trace["traceEvents"])
    assert "disk_gbps_odirect" in capsys.readouterr().out


def test_the_prefill_is_traced_on_its_own(cache):
    """``--trace-prefill``: the first streamed row's prefill, one compute event a streamed block (one pass); the
    decode trace, asked beside it, holds its two steps' events."""
    out = cache / "b.json"
    assert main(["bench", "tiny-llama", "--offload", "nvme", "--batch", "1,2", "--prompt", "6", "--gen", "4",
                 "--trace-prefill", str(cache / "p.json"), "--trace", str(cache / "t.json"), "--json", str(out),
                 "--fio", "/no/fio"]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["prefill_traced"] and doc["meta"]["traced"]

    def computes(path):
        return sorted(e["name"] for e in json.loads(path.read_text())["traceEvents"]
                      if e.get("ph") == "X" and e["tid"] == 3)
    assert computes(cache / "p.json") == ["block 0", "block 1"]
    assert computes(cache / "t.json") == ["block 0", "block 0", "block 1", "block 1"]


def test_a_run_cut_short_keeps_its_rows(cache, monkeypatch):
    """A device call has a time limit: the JSON holds every group measured before the run was stopped, marked
    partial, and a run that completes leaves no such mark."""
    from zstream.interfaces import bench

    out = cache / "p.json"
    real, calls = bench._bench_group, []

    def stopped_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what the time limit's signal amounts to
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_bench_group", stopped_on_the_second)
    args = ["bench", "tiny-llama", "--offload", "cpu", "--batch", "1,2", "--prompt", "4", "--gen", "2",
            "--gpu-memory", "1GiB", "--json", str(out)]
    assert main(args) == 130
    doc = json.loads(out.read_text())
    assert doc["meta"]["partial"] is True and [r["batch"] for r in doc["rows"]] == [1]
    assert doc["meta"]["model"] == "tiny-llama" and doc["meta"]["host"]  # what was run, and where, kept too
    monkeypatch.setattr(bench, "_bench_group", real)
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert "partial" not in doc["meta"] and [r["batch"] for r in doc["rows"]] == [1, 2]


def test_a_run_cut_short_keeps_the_summary_of_its_predictions(cache, monkeypatch):
    """With ``--predict``, the partial JSON also says how the rows run so far stood against their predictions: run
    26 of 2026-12-06 met its time limit one row short and left no count of its rows within 10%."""
    from zstream.interfaces import bench

    out = cache / "pp.json"
    real, calls = bench._bench_group, []

    def stopped_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_bench_group", stopped_on_the_third)
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "1,2,3", "--prompt", "4", "--gen", "2",
                 "--gpu-memory", "1GiB", "--device", "cpu", "--predict", "--json", str(out)]) == 130
    doc = json.loads(out.read_text())
    rows, summary = doc["rows"], doc["meta"]["prediction_summary"]
    assert doc["meta"]["partial"] is True and [r["batch"] for r in rows] == [1, 2]
    ratios = [r["predicted_tokens_per_s"] / r["tokens_per_s"] for r in rows]
    assert summary["rows"] == 2 and summary["within"] == sum(0.9 <= x <= 1.1 for x in ratios)
    furthest = max(range(2), key=lambda i: abs(ratios[i] - 1))
    assert summary["worst"]["batch"] == rows[furthest]["batch"]
    assert summary["worst"]["ratio"] == pytest.approx(ratios[furthest])


def test_the_planners_choice_is_run_with_its_prediction(cache, capsys):
    """--planned: plan_batch picks batch, micro-batch, residency and KV placement; that choice is loaded and measured
    like any row, marked planned, with the prediction beside it (on the CPU the cache stays where it is)."""
    out = cache / "planned.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "4", "--prompt", "6", "--gen", "3",
                 "--gpu-memory", "300MiB", "--planned", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    planned = [r for r in doc["rows"] if r.get("planned")]
    assert len(planned) == 1 and len(doc["rows"]) == 2
    chosen, row = doc["meta"]["planned"], planned[0]
    assert (row["batch"], row["kv_offload"], row["resident_blocks"]) == (
        chosen["batch"], chosen["kv_offload"], chosen["resident_blocks"])
    assert 1 <= row["batch"] <= 2 and row["kv_offload"] == "none" and row["tokens_per_s"] > 0  # up to MAX_BATCH
    assert row["predicted_tokens_per_s"] == pytest.approx(chosen["predicted_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "predicted best" in printed and "predicted within 10% of measured:" in printed
    assert doc["meta"]["prediction_summary"]["rows"] == sum(1 for r in doc["rows"] if r.get("predicted_tokens_per_s"))
    for r in doc["rows"]:  # what the host did beside the decode steps and beside the prediction's calibration
        assert r["decode_counters"]["process_cpu_s"] >= 0 and "others_cpu_s" in r["decode_counters"]
        assert "steal_s" in r["prediction_counters"] if r.get("planned") else "prediction_counters" not in r
    only = cache / "planned_only.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "4", "--prompt", "6", "--gen", "3",
                 "--gpu-memory", "300MiB", "--planned", "2", "--planned-only", "--json", str(only)]) == 0
    assert [r.get("planned") for r in json.loads(only.read_text())["rows"]] == [True]  # not the batch-4 row
    assert main(["bench", "tiny-llama", "--planned-only"]) == 2
    assert "--planned-only needs --planned" in capsys.readouterr().err


def test_the_planners_choice_keeps_the_plans_prediction_when_the_loaded_model_cannot_replan_it(cache, monkeypatch):
    """Where the loaded model's own re-plan finds no prediction for the choice (run 8 of 2026-12-04: its host memory,
    holding the weights by then, no longer fitted the batch's cache), the row carries the plan's prediction, named
    as such, and the calibration behind it."""
    from zstream.interfaces import bench

    monkeypatch.setattr(bench, "_prediction", lambda *a, **k: {"predicted_error": "does not fit"})
    out = cache / "planned_fallback.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "4", "--prompt", "6", "--gen", "3",
                 "--gpu-memory", "300MiB", "--planned", "2", "--planned-only", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["predicted_from"] == "plan"
    assert row["predicted_tokens_per_s"] == pytest.approx(doc["meta"]["planned"]["predicted_tokens_per_s"])
    assert row["predicted_decode_step_s"] > 0 and row["predicted_compute"] in doc["meta"]["compute_models"]


def test_budgets_and_the_max_batch_search(cache, capsys):
    """Under a host budget on the CPU: the planner's prediction beside a search that runs each batch; every batch
    it ran has a prediction, and the planner's own choice is run too."""
    out = cache / "m.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "1", "--prompt", "4", "--gen", "2",
                 "--gpu-memory", "258MiB,260MiB", "--max-batch", "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    found = meta["max_batch_none"]
    assert found and all(r["predicted_tokens_per_s"] for r in found)
    assert meta["predicted_best_batch"] >= 1 and meta["predicted_best_measured_tokens_per_s"] > 0
    text = capsys.readouterr().out
    assert "predicted best: batch" in text and "max batch, offload=none" in text


def test_load_test_against_disk_and_memcpy(cache, capsys):
    out = cache / "l.json"
    assert main(["bench", "tiny-opt", "--offload", "cpu", "--batch", "1", "--prompt", "4", "--gen", "2",
                 "--load-test", "--json", str(out)]) == 0
    load = json.loads(out.read_text())["meta"]["load_test"]
    for key in ("cold_load_gbps", "warm_load_gbps", "disk_gbps_odirect", "memcpy_gbps"):
        assert load[key] > 0, key
    assert load["cold_pct_of_disk"] == pytest.approx(100 * load["cold_load_gbps"] / load["disk_gbps_odirect"])
    assert "load, offload=cpu: cold" in capsys.readouterr().out


def test_a_budget_that_cannot_hold_the_model_is_reported_not_raised(cache, capsys):
    assert main(["bench", "tiny-opt", "--offload", "none", "--batch", "1", "--prompt", "4", "--gen", "2",
                 "--gpu-memory", "1KiB"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_python_dash_m_zstream(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["zstream", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("zstream", run_name="__main__")
    assert e.value.code == 0 and capsys.readouterr().out.startswith("zstream ")


def test_tensor_parallel_runs_beside_one_process(cache, capsys):
    """``--tp 1,2``: each configuration on 2 forked ranks and on one process; a tensor-parallel row carries every
    rank's bytes (about half of the whole's each) and link, and its bound is the slowest rank's."""
    out = cache / "tp.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--tp", "1,2", "--batch", "2", "--prompt", "6",
                 "--gen", "3", "--device", "cpu", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    two, one = doc["rows"]
    assert (two["tp"], one["tp"]) == (2, 1)
    assert len(two["rank_streamed_bytes"]) == 2 and two["streamed_bytes"] == sum(two["rank_streamed_bytes"])
    for part in two["rank_streamed_bytes"]:
        assert one["streamed_bytes"] / 2 <= part < one["streamed_bytes"] * 0.6
    bounds = [b / g / 1e9 for b, g in zip(two["rank_streamed_bytes"], two["rank_bound_gbps"])]
    assert two["bound_step_s"] == pytest.approx(max(bounds))
    assert len(doc["meta"]["tp2_rank_links_gbps"]) == 2
    assert doc["meta"]["memcpy_gbps"] > 0 and "h2d_gbps" not in doc["meta"]  # the CPU's link: a memcpy


def test_compressed_and_plain_in_one_run(cache, tmp_path):
    """``--compress none,lossless``: the same configuration plain and losslessly compressed, in one process; the
    compressed row streams fewer bytes."""
    import torch

    import zstream

    config = {**zstream.PRESETS["tiny-llama"], "hidden_size": 256, "intermediate_size": 512}
    path = zstream.make_checkpoint(config, tmp_path / "m", torch.bfloat16, progress=False)
    out = cache / "c.json"
    assert main(["bench", str(path), "--offload", "cpu", "--compress", "none,lossless", "--batch", "1",
                 "--prompt", "6", "--gen", "3", "--device", "cpu", "--max-resident-blocks", "0", "--json",
                 str(out)]) == 0
    plain, coded = json.loads(out.read_text())["rows"]
    assert (plain["compress"], coded["compress"]) == ("none", "lossless")
    assert coded["streamed_bytes"] < 0.8 * plain["streamed_bytes"]


def test_host_kv_cache_and_device_kv_cache_in_one_run(cache, tmp_path):
    """``--kv-offload none,host,host-compute``: the same configuration with the KV cache on the device and in host
    memory; the "host" row counts the cache's bytes at the decode's mean context in what crosses the link each
    step, the "host-compute" and "split" rows what the CPUs read of it."""
    import torch

    import zstream

    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    out = cache / "kv.json"
    assert main(["bench", str(path), "--offload", "cpu", "--kv-offload", "none,host,host-compute,split", "--batch", "2",
                 "--prompt", "6", "--gen", "4", "--device", "cpu", "--max-resident-blocks", "0", "--json",
                 str(out)]) == 0
    device, host, compute, split = json.loads(out.read_text())["rows"]
    assert (device["kv_offload"], host["kv_offload"], compute["kv_offload"]) == ("none", "host", "host-compute")
    assert compute["kv_bytes_per_step"] == 0  # attention where the cache lives: the cache does not cross
    with zstream.load(path, device="cpu", progress=False) as model:
        fam = model.family
    kv = fam.num_blocks * 2 * 2 * (6 + 2) * fam.num_kv_heads * fam.head_dim * 4  # k and v, batch 2, mean context 8
    assert host["kv_bytes_per_step"] == kv and device["kv_bytes_per_step"] == 0
    assert host["streamed_bytes"] == device["streamed_bytes"] + kv
    assert split["kv_bytes_per_step"] == kv // 2  # one of the two layers attended on the CPUs, one brought up
    # what the CPUs read of the caches they attend: every layer's with host-compute, the other half with split
    assert (compute["kv_cpu_bytes_per_step"], split["kv_cpu_bytes_per_step"]) == (kv, kv // 2)
    assert device["kv_cpu_bytes_per_step"] == host["kv_cpu_bytes_per_step"] == 0
    # the layers the CPUs attend, so that a row's prediction can be replayed from the JSON
    assert [r["kv_cpu_layers"] for r in (device, host, compute, split)] == [0, 0, fam.num_blocks, fam.num_blocks // 2]
    for r in (host, compute, split):  # every byte read from host memory, against the rate measured in the run
        assert r["host_read_bytes_per_step"] == r["streamed_bytes"] + r["kv_cpu_bytes_per_step"]
        assert r["host_read_bound_s"] == pytest.approx(r["host_read_bytes_per_step"] / (r["bound_gbps"] * 1e9))
    assert "host_read_bytes_per_step" not in device


def test_predictions_beside_measurements_for_each_kv_placement(cache, tmp_path):
    """``--predict``: each row carries the planner's prediction for its own batch, residency and KV placement
    (calibrated in the run, on the CPU here); ``auto`` records what load chose."""
    import torch

    import zstream

    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    out = cache / "predict.json"
    assert main(["bench", str(path), "--offload", "none", "--kv-offload", "none,host-compute,auto", "--batch", "2",
                 "--prompt", "6", "--gen", "3", "--device", "cpu", "--predict", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["kv_offload"] for r in rows] == ["none", "host-compute", "none"]  # auto on the CPU: the device
    assert [r["kv_offload_asked"] for r in rows] == ["none", "host-compute", "auto"]
    for r in rows:
        assert r["predicted_tokens_per_s"] > 0 and r["predicted_decode_step_s"] > 0 and r["predicted_prefill_s"] > 0
    # the prediction is the planner's for that row, not another's: the same batch and placement planned directly
    with zstream.load(path, device="cpu", offload="none", max_batch=2, max_seq_len=9, kv_offload="host-compute",
                      progress=False) as model:
        plan = zstream.plan_batch(model, prompt=6, gen=3, offload="none", kv_offload="host-compute", max_batch=2)
    c = plan.candidate(2, model.plan.num_blocks, "host-compute")
    assert c is not None and c.tokens_per_s == pytest.approx(rows[1]["predicted_tokens_per_s"], rel=1e-9)
    # and its memory the loader's: every weight resident (no ring) and the reserve, set beside the row's peak
    assert rows[1]["predicted_memory_bytes"] == model.plan.resident_bytes + model.plan.kv_reserve_bytes
    assert all(r["decode_graph"] is False and r["held_before_load_bytes"] == r["calibration_held_bytes"] == 0
               and r["graph_pool_bytes"] is None and r["peak_reserved_bytes"] is None
               for r in rows)  # (no CUDA: nothing held on a device, no graph, no allocator)
    # the calibration behind each prediction is in the JSON, so the prediction replays from it
    from zstream.planning.batch import ComputeModel, ThroughputModel

    models = json.loads(out.read_text())["meta"]["compute_models"]
    replayed = ComputeModel.from_dict(models[rows[1]["predicted_compute"]])
    tm = ThroughputModel(replayed, plan.table[0].num_blocks * [0], rows[1]["predicted_link_gbps"])
    assert tm.decode_step(2, model.plan.num_blocks, 6 + 3 / 2, "host-compute")[0] == pytest.approx(
        rows[1]["predicted_decode_step_s"], rel=1e-9)


def test_micro_batches_are_benched_and_predicted(cache, tmp_path):
    """``--micro-batch 2`` at batch 3: the model runs two micro-batches a block, the row says so, and the planner's
    prediction is of the same split."""
    import torch

    import zstream

    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    out = cache / "micro.json"
    assert main(["bench", str(path), "--offload", "none", "--batch", "3,2", "--prompt", "6", "--gen", "3",
                 "--device", "cpu", "--micro-batch", "2", "--predict", "--json", str(out)]) == 0
    row, whole = json.loads(out.read_text())["rows"]
    assert row["micro_batch"] == 2 and row["predicted_tokens_per_s"] > 0
    # a batch no larger than the micro-batch runs whole, and is predicted so (the H200's batch-8 and -16 rows had none)
    assert whole["batch"] == 2 and whole["predicted_tokens_per_s"] > 0 and "predicted_error" not in whole


def test_a_split_rows_prediction_is_of_its_own_layers_on_the_cpus(cache, tmp_path, monkeypatch):
    """A "split" model attends ``kv_cpu_layers`` layers on the CPUs (load's default: half); its row's prediction
    plans those layers (``choose_batch`` honours them: test_batch_planner), not a count of the planner's own; with
    every block resident the layers brought up still cross the link, which the planner measures for them."""
    import torch

    import zstream
    from zstream.api import plan_batch as planning

    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    real = planning.plan_batch
    monkeypatch.setattr(planning, "plan_batch", spy)
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    out = cache / "split.json"
    assert main(["bench", str(path), "--offload", "none", "--kv-offload", "split", "--batch", "2", "--prompt", "6",
                 "--gen", "3", "--device", "cpu", "--predict", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert [a["kv_cpu_layers"] for a in asked] == [1] and asked[0]["kv_offload"] == "split"
    assert "predicted_error" not in row and row["predicted_decode_step_s"] > 0
    with zstream.load(path, device="cpu", offload="none", max_batch=2, max_seq_len=9, kv_offload="split",
                      progress=False) as model:
        assert model.plan.kv_cpu_layers == 1
        plan = real(model, prompt=6, gen=3, offload="none", kv_offload="split", max_batch=2, kv_cpu_layers=1)
    assert plan.link == "host memory copy" and plan.link_gbps > 0


def test_a_host_cache_row_limited_by_host_memory_says_so():
    """Run 9's OPT-30B split row at batch 80 (H200, 2026-12-03): 65.2 GB over the link and 47.2 GB read by the CPUs
    in 2.086 s. Against host memory read at 55.18 GB/s both ways (what was assumed then) it was within 1.25x of its
    bound and said host memory limited it; the probe has since measured 93-111 GB/s for the two at once, and against
    a calibrated 101.8 its bound is 1.10 s and the step 1.89x that: "compute or overheads" stays. Without a calibrated
    rate a row the CPUs read for is not relabelled; a "host" row (only the link reads) is, at the link's rate; a step
    1.5x over its bound keeps its label, and so does any row on the CPU."""
    from zstream.interfaces.bench import _host_memory_limit

    row = {"kv_offload": "split", "streamed_bytes": 65_170_000_000, "kv_cpu_bytes_per_step": 47_200_000_000,
           "decode_step_s": 2.086, "limit": "compute or overheads"}
    fast = dict(row, decode_step_s=1.2)
    _host_memory_limit(fast, "pinned host-to-device", 55.18, relabel=True, shared_gbps=101.8)
    assert fast["limit"] == "pinned host-to-device and host memory" and fast["host_read_gbps"] == 101.8
    assert fast["host_read_bound_s"] == pytest.approx(112.37 / 101.8, rel=1e-3)
    assert "112.4 GB" in fast["limit_why"] and "101.8 GB/s" in fast["limit_why"]
    calibrated = dict(row)
    _host_memory_limit(calibrated, "pinned host-to-device", 55.18, relabel=True, shared_gbps=101.8)
    assert calibrated["limit"] == "compute or overheads"
    assert calibrated["decode_step_s"] / calibrated["host_read_bound_s"] == pytest.approx(1.89, abs=0.01)
    starved = dict(row)  # a probe slower than the link alone never makes host memory slower than the link
    _host_memory_limit(starved, "pinned host-to-device", 55.18, relabel=True, shared_gbps=40.0)
    assert starved["host_read_gbps"] == 55.18
    uncalibrated = dict(row)
    _host_memory_limit(uncalibrated, "pinned host-to-device", 55.18, relabel=True)
    assert uncalibrated["limit"] == "compute or overheads"
    assert uncalibrated["host_read_bound_s"] == pytest.approx(112.37 / 55.18, rel=1e-3)
    slow = dict(fast, decode_step_s=1.5 * fast["host_read_bound_s"], limit="compute or overheads")
    _host_memory_limit(slow, "pinned host-to-device", 55.18, relabel=True, shared_gbps=101.8)
    cpu = dict(fast, limit="compute")
    _host_memory_limit(cpu, "host memory copy", 55.18, relabel=False, shared_gbps=101.8)
    assert slow["limit"] == "compute or overheads" and cpu["limit"] == "compute"
    # every block resident, the caches brought up (none read by the CPUs): no link named, the link's rate
    resident = dict(row, kv_offload="host", kv_cpu_bytes_per_step=0, streamed_bytes=100_000_000_000,
                    decode_step_s=2.0, limit="compute or overheads")
    _host_memory_limit(resident, "", 55.18, relabel=True, shared_gbps=101.8)
    assert resident["limit"] == "the link and host memory" and resident["host_read_gbps"] == 55.18


def test_dirty_pages_are_written_out_before_anything_is_measured(cache, monkeypatch):
    """A checkpoint just written is still being flushed for minutes, and the flusher slows what runs beside it (run
    16 of 2026-12-04): bench syncs first, and records what was pending."""
    import zstream.foundations.measure as measure
    import zstream.interfaces.bench as bench

    events = []
    monkeypatch.setattr(measure.os, "sync", lambda: events.append("sync"))
    real_run_one = bench.run_one
    monkeypatch.setattr(bench, "run_one", lambda *a, **k: (events.append("run"), real_run_one(*a, **k))[1])
    out = cache / "w.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "1", "--prompt", "6", "--gen", "2",
                 "--device", "cpu", "--json", str(out)]) == 0
    assert events[0] == "sync" and "run" in events
    meta = json.loads(out.read_text())["meta"]
    assert meta["writeback_pending_bytes"] >= 0 and meta["writeback_flush_s"] >= 0


def test_meminfo_fields_are_summed_in_bytes(tmp_path):
    from zstream.foundations.measure import meminfo_bytes

    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nDirty:             12 kB\nWriteback:          3 kB\nDirtyX: 7 kB\n")
    assert meminfo_bytes("Dirty", "Writeback", path=str(f)) == 15 * 1024
    assert meminfo_bytes("Dirty", path=str(tmp_path / "missing")) == 0


def test_host_counters_are_read_and_differenced(tmp_path):
    """The CPUs' busy (user, nice, system, irq, softirq) and stolen ticks of /proc/stat's first line, /proc/vmstat's
    compaction and huge-page counters, this process's CPU time; differenced key by key, with the rest of the host's
    CPU seconds the busy ones less this process's."""
    import os

    from zstream.foundations.measure import counters_since, host_counters

    hz = os.sysconf("SC_CLK_TCK")
    stat, vmstat = tmp_path / "stat", tmp_path / "vmstat"

    def write(user: int, steal: int, stalls: int) -> None:
        stat.write_text(f"cpu  {user} 0 {hz} 900 7 {hz} 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
        vmstat.write_text(f"nr_free_pages 5\ncompact_stall {stalls}\nthp_fault_alloc 3\npgmajfault 1\n"
                          f"numa_hint_faults {7 * stalls}\nnuma_pages_migrated {stalls}\n")
    write(10 * hz, hz, 2)
    before = host_counters(str(stat), str(vmstat))
    assert before["cpus_busy_s"] == 12 and before["steal_s"] == 1 and before["compact_stall"] == 2
    assert "nr_free_pages" not in before and "idle" not in before
    write(16 * hz, 4 * hz, 5)
    after = host_counters(str(stat), str(vmstat))
    after["process_cpu_s"] = before["process_cpu_s"] + 2.0
    after["unix_s"] = before["unix_s"] + 7.5
    delta = counters_since(before, after)
    assert (delta["from_unix_s"], delta["to_unix_s"], delta["unix_s"]) == (before["unix_s"], after["unix_s"], 7.5)
    assert abs(before["unix_s"] - time.time()) < 60  # (a wall clock, not a monotonic one)
    assert (delta["cpus_busy_s"], delta["steal_s"], delta["compact_stall"]) == (6, 3, 3)
    assert delta["others_cpu_s"] == pytest.approx(4.0) and delta["thp_fault_alloc"] == 0
    # pages NUMA balancing moved under the CPUs meanwhile
    assert (delta["numa_hint_faults"], delta["numa_pages_migrated"]) == (21, 3)
    assert host_counters(str(tmp_path / "none"), str(tmp_path / "none")).keys() >= {"process_cpu_s"}
    assert "steal_s" not in host_counters(str(tmp_path / "none"), str(vmstat))


def test_a_row_attended_on_the_cpus_gauges_them_at_its_prediction_and_around_its_run(cache, tmp_path, monkeypatch,
                                                                                      capsys):
    """``--predict`` with "host-compute" and "split" rows: the CPUs' attention is gauged at each row's micro-batch
    rows, kv heads, head size, dtype and mean context, once when the rows are predicted and again before and after
    each row's run; the row's drift is the run's mean over the prediction's. A row with its cache on the device is
    not gauged. The worst row's drift is printed beside it."""
    import torch

    import zstream
    from zstream.streaming import calibrate

    asked, times = [], iter([2.0, 1.0, 3.0, 4.0, 5.0, 6.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0])
    monkeypatch.setattr(calibrate, "host_attention_s", lambda *shape: asked.append(shape) or next(times))
    path = zstream.make_checkpoint("tiny-llama", tmp_path / "m", torch.float32, progress=False)
    out = cache / "probe.json"
    assert main(["bench", str(path), "--offload", "none", "--kv-offload", "none,host-compute,split", "--batch",
                 "3,2", "--prompt", "6", "--gen", "4", "--device", "cpu", "--micro-batch", "2", "--predict",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    none3, none2, hc3, hc2, split3, split2 = doc["rows"]
    assert "host_probe_s" not in none3 and "host_probe_drift" not in none2
    # per model: both batches at their prediction, then before and after each row's run
    assert hc3["host_probe_s"] == {"at_prediction": 2.0, "before": 3.0, "after": 4.0}
    assert hc3["host_probe_drift"] == pytest.approx(3.5 / 2.0)
    assert hc2["host_probe_s"] == {"at_prediction": 1.0, "before": 5.0, "after": 6.0}
    assert split3["host_probe_drift"] == pytest.approx(11.5 / 9.0)
    assert split2["host_probe_drift"] == pytest.approx(13.5 / 10.0)
    family = zstream.load(path, device="cpu", offload="none", progress=False).family
    # (rows of a micro-batch, kv heads, the steps' mean context, head size, the model's dtype)
    shape = (family.num_kv_heads, 6 + 4 // 2, family.head_dim, torch.float32)
    assert asked[:4] == [(2, *shape), (2, *shape), (2, *shape), (2, *shape)]
    assert len(asked) == 12
    w = doc["meta"]["prediction_summary"]["worst"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("predicted within"))
    drift = w["host_probe_drift"]  # (None where the furthest row, which the CPU's timings pick, has its cache on it)
    assert ("the CPUs' attention" in line) == (drift is not None)
    assert drift is None or f"the CPUs' attention {drift:.2f}x as long as when predicted" in line


def test_the_host_attention_gauge_times_the_shapes_it_is_given(monkeypatch):
    """``calibrate.host_attention_s`` runs the attention of ``rows`` one-token queries over ``keys`` keys on the CPU,
    in the dtype given, and returns the median of its samples (``_seconds``, each of the calls it sizes)."""
    import torch

    from zstream.streaming import calibrate

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.device.type))
        return real(q, k, v)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    samples = iter([0.05, 0.02, 0.03, 0.01, 0.09])  # (their mean 0.04)
    monkeypatch.setattr(calibrate, "_seconds", lambda fn, device, min_sample_s: (fn(), next(samples))[1])
    s = calibrate.host_attention_s(3, 2, 40, 8, torch.bfloat16, repeats=5, min_sample_s=0.01)
    assert s == pytest.approx(0.03)  # the median sample
    assert set(seen) == {((3, 2, 1, 8), (3, 2, 40, 8), (3, 2, 40, 8), torch.bfloat16, "cpu")} and len(seen) == 5


def test_the_predictions_are_summed_up_against_the_measured():
    """Three predicted rows at 1.05x, 0.85x and 1.10x of their measured tokens/s: two within 10% (1.10 counts),
    the furthest the 0.85x row, whose slowest step (30 ms) is 3x its median (10 ms); rows without a prediction are
    left out, and a run without any has no summary."""
    from zstream.interfaces.bench import prediction_summary

    rows = [{"kv_offload": "host", "batch": 8, "tokens_per_s": 100.0, "predicted_tokens_per_s": 105.0,
             "decode_steps_s": [0.01, 0.01, 0.011]},
            {"kv_offload": "split", "batch": 16, "tokens_per_s": 200.0, "predicted_tokens_per_s": 170.0,
             "decode_steps_s": [0.01, 0.03, 0.01, 0.009]},
            {"batch": 4, "tokens_per_s": 50.0, "predicted_tokens_per_s": 55.0, "decode_steps_s": []},
            {"kv_offload": "host", "batch": 64, "tokens_per_s": 80.0}]
    s = prediction_summary(rows)
    assert (s["rows"], s["within"], s["tolerance"]) == (3, 2, 0.10)
    assert s["worst"] == {"kv_offload": "split", "batch": 16, "ratio": pytest.approx(0.85),
                          "slowest_step_over_median": pytest.approx(3.0), "host_probe_drift": None}
    rows[1]["host_probe_drift"] = 0.8  # its CPUs 20% faster around it than when it was predicted
    assert prediction_summary(rows)["worst"]["host_probe_drift"] == 0.8
    assert prediction_summary(rows[3:]) is None


def test_repeats_take_the_medians_and_the_trace_goes_to_the_first_streamed_row(cache, monkeypatch):
    """``--repeats 3``: a row's prefill, step and tokens/s are the medians of its three runs (here made 1, 2, 3 and
    so on in call order); ``--trace``: the first run of the first offload that streams, never an all-resident
    ("none") group's, and once."""
    from zstream.interfaces import bench

    real, calls = bench.run_one, []

    def numbered(model, b, prompt, gen, trace=None, trace_steps=2, trace_prefill=None):  # type: ignore[no-untyped-def]
        r = real(model, b, prompt, gen, trace=trace, trace_prefill=trace_prefill)
        if gen == 3:  # the group's warm-up
            return r
        calls.append((model.plan.offload, trace))
        n = float(len(calls))
        return {**r, "prefill_s": n, "decode_step_s": 10 * n, "tokens_per_s": 100 * n}

    monkeypatch.setattr(bench, "run_one", numbered)
    out, trace = cache / "b.json", str(cache / "t.json")
    assert main(["bench", "tiny-llama", "--offload", "none,nvme", "--batch", "1", "--prompt", "6", "--gen", "4",
                 "--repeats", "3", "--trace", trace, "--json", str(out), "--fio", "/no/fio"]) == 0
    assert calls == [("none", None)] * 3 + [("nvme", trace)] + [("nvme", None)] * 2
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prefill_s"], r["decode_step_s"], r["tokens_per_s"]) for r in rows] == [(2, 20, 200), (5, 50, 500)]


def test_a_timed_step_waits_for_its_tokens_not_for_the_rings_copies(cache, monkeypatch):
    """Each timed pass (the prefill, then every decode step) ends waiting for that pass's tokens, as a generation
    does; the whole device is synchronised only before the prefill, so the ring's copies for the next pass run on
    between steps as they do in a generation (``ThroughputModel.device_sync``)."""
    from zstream.interfaces import bench

    events: list = []
    monkeypatch.setattr(bench, "wait_for_tokens", lambda t: events.append(("tokens", tuple(t.shape))))
    monkeypatch.setattr(bench, "_sync", lambda dev: events.append(("device",)))
    out = cache / "b.json"
    assert main(["bench", "tiny-llama", "--offload", "cpu", "--batch", "2", "--prompt", "6", "--gen", "4",
                 "--json", str(out), "--fio", "/no/fio"]) == 0
    def run(gen: int) -> list:  # the prefill and gen - 1 decode steps
        return [("device",)] + [("tokens", (2, 1))] * gen

    assert events == run(3) + run(4)  # the group's warm-up (gen 3), then the row
    assert json.loads(out.read_text())["rows"][0]["step_wait"] == "tokens"


def test_waiting_for_tokens_on_a_gpu_waits_for_their_stream_alone(monkeypatch):
    """On a GPU the wait is the current stream's (the compute stream's), never ``torch.cuda.synchronize``."""
    import torch

    from zstream.interfaces import bench

    waited: list = []

    class Stream:
        def synchronize(self) -> None:
            waited.append("stream")

    class Tokens:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: waited.append(device) or Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("the whole device waited for"))
    bench.wait_for_tokens(Tokens())  # type: ignore[arg-type]
    assert waited == [torch.device("cuda", 0), "stream"]
    bench.wait_for_tokens(torch.zeros(2, 1))  # on the CPU: nothing to wait for
    assert waited == [torch.device("cuda", 0), "stream"]


def test_bench_leaves_cuda_graphs_to_loads_default_unless_told() -> None:
    """``zstream bench`` passes None (load's default: graphed where it applies) unless --cuda-graphs or
    --no-cuda-graphs says otherwise."""
    import argparse

    from zstream.interfaces.bench import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["tiny-llama"]).cuda_graphs is None
    assert p.parse_args(["tiny-llama", "--cuda-graphs"]).cuda_graphs is True
    assert p.parse_args(["tiny-llama", "--no-cuda-graphs"]).cuda_graphs is False
