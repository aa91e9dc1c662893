"""``zstream bench``: prefill and decode timings against the bound measured in the same process.

For every offload mode and batch size it prints prefill time, the median decode step, tokens/s, bytes streamed
per step, the achieved GB/s, the transfer bound and the step as a % of it, peak device memory and load time.
The bound is measured here, now: pinned host-to-device copy bandwidth for offload="cpu"; an O_DIRECT sequential
read of the same checkpoint's blocks for offload="nvme" (``--fio`` adds fio on the same shard files).
``--trace`` writes a Chrome/Perfetto trace of one decode step: per block, the disk read, the copy and the
compute, each on its own track; ``--trace-prefill`` the same of the prefill. ``--tp 1,2`` runs each configuration on
1 and on 2 tensor-parallel ranks (forked by ``zstream.launch``, one GPU each); every rank measures its own link while
the others measure theirs, and the bound of a step is the slowest rank's bytes over its link.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import OutOfMemoryError, UsageError
from ..foundations.measure import (
    Rate,
    counters_since,
    flush_writeback,
    host_counters,
    measure_copy,
    measure_disk,
    measure_h2d,
    measure_memcpy,
)
from ..foundations.units import parse_dtype
from ..planning.residency import kv_layer_bytes
from .args import DTYPE_CHOICES, OFFLOAD_CHOICES, cache_dir, comma_list, positive, size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory, or a synthetic preset name (written once to the cache)")
    p.add_argument("--offload", type=comma_list(str, OFFLOAD_CHOICES[1:]), default=["cpu"],
                   help="comma list of none,cpu,nvme,ats")
    p.add_argument("--batch", type=comma_list(positive), default=[1, 16, 64], help="comma list of batch sizes")
    p.add_argument("--prompt", type=positive, default=512)
    p.add_argument("--gen", type=positive, default=32)
    p.add_argument("--gpu-memory", type=comma_list(size), default=None,
                   help="device budget(s), comma list, e.g. 8GiB,16GiB")
    p.add_argument("--max-resident-blocks", type=int, default=None,
                   help="cap resident blocks (0: stream every block; default 0 for cpu/nvme unless --gpu-memory)")
    p.add_argument("--prefetch", type=positive, default=2)
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the linear weights at load (offload none/cpu); a packed checkpoint needs none")
    p.add_argument("--group-size", type=positive, default=64, help="inputs per quantization group")
    p.add_argument("--compress", type=comma_list(str, ("none", "lossless")), default=["none"],
                   help="comma list: none, lossless (each configuration with and without, in the same run)")
    p.add_argument("--kv-offload", type=comma_list(str, ("none", "host", "host-compute", "split", "auto")),
                   default=["none"],
                   help="comma list: none, host, host-compute, split, auto (the KV cache on the device; in pinned host "
                        "memory with each layer's brought up ahead of its attention, its bytes counted in the step's "
                        "bound; in host memory with attention on the CPUs; some layers each way; or load's choice)")
    p.add_argument("--kv-cpu-layers", type=int, default=None,
                   help="with --kv-offload split: layers attended on the CPUs (default: half)")
    p.add_argument("--micro-batch", type=positive, default=None,
                   help="rows a block computes at a time (load's micro_batch): larger batches run as micro-batches")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps of an all-resident model replayed as one CUDA graph, and planned so (load's "
                        "cuda_graphs; default: wherever that applies; --no-cuda-graphs: every step eager)")
    p.add_argument("--predict", action="store_true",
                   help="beside each measured row, the batch planner's prediction for the same batch, residency and "
                        "KV placement (plan_batch on the loaded model: its link, its budget, a compute model "
                        "calibrated now)")
    p.add_argument("--copy-from-tokens", type=positive, default=None,
                   help="ats: tokens per pass from which blocks are copied instead of read in place "
                        "(default: the crossover measured at load)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    p.add_argument("--repeats", type=positive, default=1, help="repeat each configuration, report medians")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--trace", default=None, help="write a Chrome trace of one decode step here")
    p.add_argument("--trace-prefill", default=None, help="write a Chrome trace of the prefill here")
    p.add_argument("--profile", default=None,
                   help="run the first row once more under torch's profiler and write its Chrome trace here (the "
                        "prefill and each decode step marked: benches/profile_summary.py; tensor-parallel rows, whose "
                        "ranks step together, are not profiled)")
    p.add_argument("--fio", default=None, help="fio binary: also measure the shard files with fio (nvme)")
    p.add_argument("--load-test", action="store_true",
                   help="time offload=cpu loads from a cold and a warm page cache against disk and memcpy speed")
    p.add_argument("--max-batch", action="store_true",
                   help="search the largest batch that fits --gpu-memory with and without offload")
    p.add_argument("--planned", nargs="?", type=positive, const=0, default=None, metavar="MAX_BATCH",
                   help="with --gpu-memory: plan_batch chooses batch (up to MAX_BATCH, default the largest --batch), "
                        "micro-batch, residency and KV placement together; that choice is run, its prediction "
                        "beside it")
    p.add_argument("--planned-only", action="store_true",
                   help="with --planned: run only the planner's choice, not the --batch and --kv-offload rows")
    p.add_argument("--tp", type=comma_list(positive), default=[1],
                   help="comma list of tensor-parallel rank counts (e.g. 1,2): each configuration on that many GPUs")


def checkpoint_for(model: str, dtype: Optional[torch.dtype]) -> Path:
    """A checkpoint directory as given, or a synthetic preset written once to the cache (rebuilt when stale)."""
    path = Path(model)
    if path.exists():
        return path
    from ..api import synthetic

    if model not in synthetic.PRESETS:
        raise UsageError(f"{model}: neither a checkpoint directory nor a synthetic preset "
                         f"({', '.join(synthetic.PRESETS)})")
    out = cache_dir() / "synthetic" / model
    if not synthetic.is_current(out, model):
        if out.exists():
            shutil.rmtree(out)
        synthetic.make_checkpoint(model, out, dtype=dtype or torch.float16, progress=sys.stderr.isatty())
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# the profiler's marks of a profiled run (``--profile``; ``benches/profile_summary.py`` reads them)
PROFILE_PREFILL, PROFILE_STEP = "zstream.prefill", "zstream.step."


STEP_WAIT = "tokens"  # what a timed step waits for (bench rows' ``step_wait``; rows without one: the whole device)


def wait_for_tokens(tokens: Tensor) -> None:
    """Block until ``tokens`` are computed, as a generation waits for each step's (``int(unfinished.max())``): on a
    GPU, for the stream that computed them. The ring's copies for the next pass run on, as they do in a generation;
    ``torch.cuda.synchronize`` would wait for them too and time a step the engine never takes
    (``planning.batch.ThroughputModel.device_sync``)."""
    if tokens.device.type == "cuda":
        torch.cuda.current_stream(tokens.device).synchronize()


def run_one(model: Any, batch: int, prompt: int, gen: int, *, trace: Optional[str] = None,
            trace_steps: int = 2, trace_prefill: Optional[str] = None, marks: bool = False) -> Dict[str, Any]:
    """Prefill ``batch`` x ``prompt`` random tokens, then ``gen - 1`` greedy decode steps, timing each (``trace``:
    the first ``trace_steps`` decode steps traced, ``trace_prefill``: the prefill; ``marks``: the prefill and each
    step marked for a profiler, ``PROFILE_PREFILL`` and ``PROFILE_STEP``)."""
    mark = torch.profiler.record_function if marks else contextlib.nullcontext
    dev = model.device
    vocab = model.family.vocab_size
    waited0 = model.waited_s
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, min(vocab, 30000), (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    cache = model.new_cache(batch, prompt + gen)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if trace_prefill is not None:
        model.trace_start()
    _sync(dev)  # a step starts on an idle device: the previous row's copies landed
    t0 = time.perf_counter()
    with mark(PROFILE_PREFILL):
        logits = model.forward(ids, mask, cache, last_only=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        wait_for_tokens(nxt)
    prefill_s = time.perf_counter() - t0
    if trace_prefill is not None:
        model.trace_stop(trace_prefill)
    one = torch.ones(batch, 1, dtype=torch.long, device=dev)
    steps: List[float] = []
    counters = host_counters()  # what the host did beside the decode steps (stolen CPU time, compaction)
    graphed0 = model.graph_steps
    for step in range(gen - 1):
        if trace is not None and step == 0:
            model.trace_start()  # the first decode steps, back to back
        t = time.perf_counter()
        with mark(f"{PROFILE_STEP}{step}"):
            logits = model.forward(nxt, one, cache, last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            wait_for_tokens(nxt)
        steps.append(time.perf_counter() - t)
        if trace is not None and step == min(trace_steps, gen - 1) - 1:
            model.trace_stop(trace)
    decode = statistics.median(steps) if steps else float("nan")
    total = prefill_s + sum(steps)
    stats = torch.cuda.memory_stats(dev) if dev.type == "cuda" else {}
    waited = (model.waited_s - waited0) / (1 + len(steps))
    limit, why = limit_of(model, decode, waited) if steps else ("-", "no decode step")
    return {"batch": batch, "prompt": prompt, "gen": gen, "prefill_s": prefill_s, "decode_step_s": decode,
            "decode_steps_s": steps, "step_wait": STEP_WAIT, "tokens_per_s": batch * gen / total,
            "alloc_retries": stats.get("num_alloc_retries"), "device_allocs": stats.get("num_device_alloc"),
            "peak_gpu_bytes": peak_bytes(model), "peak_reserved_bytes": peak_reserved_bytes(model),
            "waited_s_per_pass": waited, "limit": limit, "limit_why": why,
            "decode_counters": counters_since(counters),
            # the plan may allow a graph (the row's ``decode_graph``) where a generation too short for one runs eagerly
            "graphed_steps": model.graph_steps - graphed0}


def disk_rate(model: Any, blocks: int = 10, rounds: int = 3) -> Rate:
    """The nvme path's disk limit: ``rounds`` O_DIRECT passes over (up to ``blocks`` of) this model's streamed blocks,
    as the engine reads them (``measure.measure_disk``)."""
    streamed = model.plan.streamed_blocks or list(range(model.family.num_blocks))
    return measure_disk(model.store, [list(model.block_tensors(i).values()) for i in streamed[:blocks]],
                        rounds=rounds)


def held_bytes(device: str) -> int:
    """Device memory torch has allocated now (0 on the CPU): set against a row's peak, what it did not allocate."""
    return torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0


def peak_bytes(model: Any) -> int:
    """Peak device memory allocated by torch; on the CPU, the process's peak resident memory (the device's)."""
    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated(model.device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_reserved_bytes(model: Any) -> Optional[int]:
    """Peak device memory torch's caching allocator held from the driver (allocated, cached, graphs' pools): what the
    process took from the GPU. None on the CPU."""
    return torch.cuda.max_memory_reserved(model.device) if model.device.type == "cuda" else None


def limit_of(model: Any, step_s: float, waited_s: float) -> Tuple[str, str]:
    """(what limits a decode step, why it says so). Nothing streamed: compute. On the CPU, where the host thread
    is the compute, the time it spent blocked on blocks (``waited_s`` a step) against the rest. On a GPU, the step
    against its transfer bound (streamed bytes over the link measured at load)."""
    p = model.plan
    if not p.streamed_blocks:
        return "compute", "nothing streams"
    if model.device.type == "cpu":
        share = waited_s / step_s if step_s else 0.0
        limit = p.link if share >= 0.5 else "compute"
        return limit, f"the CPU waited for blocks {100 * share:.0f}% of a step and computed the rest"
    bound = p.predicted_step_s
    if not bound:
        return "unknown", "the link was not measured"
    limit = p.link if step_s <= 1.25 * bound else "compute or overheads"
    return limit, f"the step is {step_s / bound:.2f}x its transfer bound of {bound * 1e3:.1f} ms"


def fio_gbps(fio: str, files: List[str]) -> Optional[float]:
    """fio --rw=read --bs=1M --iodepth=64 --ioengine=io_uring --direct=1 over the shard files."""
    if not shutil.which(fio) and not os.path.exists(fio):
        return None
    cmd = [fio, "--name=zstream", "--rw=read", "--bs=1M", "--iodepth=64", "--ioengine=io_uring", "--direct=1",
           "--output-format=json", "--filename=" + ":".join(files)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    job = json.loads(out.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / 1e9


def _row(system: str, offload: str, model: Any, r: Dict[str, Any], bound_gbps: Optional[float],
         kv_bytes: int = 0) -> Dict[str, Any]:
    """A result row; ``kv_bytes``: KV cache bytes that cross the link each decode step besides the weights."""
    streamed = model.plan.streamed_bytes + kv_bytes
    bound = streamed / (bound_gbps * 1e9) if bound_gbps and streamed else None
    return {"system": system, "offload": offload, **r, "streamed_bytes": streamed,
            "achieved_gbps": streamed / r["decode_step_s"] / 1e9 if streamed else 0.0,
            "bound_gbps": bound_gbps, "bound_step_s": bound,
            "pct_of_bound": 100 * bound / r["decode_step_s"] if bound else None,
            "resident_blocks": len(model.plan.resident_blocks), "streamed_blocks": len(model.plan.streamed_blocks),
            "decode_graph": model.plan.decode_graph, "load_s": model.load_s}


PREDICTION_TOLERANCE = 0.10  # the planner's aim: tokens/s within 10% of the measured (issue 17)


def prediction_summary(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """How the planner's predictions of ``rows`` stood against their measured tokens/s: how many were within
    ``PREDICTION_TOLERANCE``, and the furthest, with how steady its decode steps were (the slowest over the median:
    a row far from its prediction and unsteady was disturbed while it ran) and, for a row attended on the CPUs, how
    much longer their attention took around it than at its prediction (``host_probe_drift``). None without
    predictions."""
    judged = [r for r in rows if r.get("predicted_tokens_per_s") and r.get("tokens_per_s")]
    if not judged:
        return None

    def ratio(r: Dict[str, Any]) -> float:
        return float(r["predicted_tokens_per_s"] / r["tokens_per_s"])

    def steadiness(r: Dict[str, Any]) -> Optional[float]:
        steps = r.get("decode_steps_s") or []
        return max(steps) / statistics.median(steps) if steps and statistics.median(steps) > 0 else None
    worst = max(judged, key=lambda r: abs(ratio(r) - 1))
    within = sum(abs(ratio(r) - 1) <= PREDICTION_TOLERANCE + 1e-12 for r in judged)  # 1.10 is within 10%
    return {"rows": len(judged), "within": within,
            "tolerance": PREDICTION_TOLERANCE,
            "worst": {"kv_offload": worst.get("kv_offload", "none"), "batch": worst["batch"], "ratio": ratio(worst),
                      "slowest_step_over_median": steadiness(worst),
                      "host_probe_drift": worst.get("host_probe_drift")}}


def _print_table(rows: List[Dict[str, Any]]) -> None:
    predicted = any("predicted_tokens_per_s" in r for r in rows)
    head = (f"{'offload':8} {'kv':>12} {'tp':>2} {'batch':>5} {'prefill ms':>10} {'step ms':>8} {'tok/s':>8} "
            f"{'GB/step':>8} {'GB/s':>6} {'bound ms':>8} {'% bound':>7} {'peak GiB':>8} {'load s':>6}"
            + (f" {'pred tok/s':>10} {'pred/meas':>9}" if predicted else "") + "  limit")
    print(head)
    print("-" * len(head))
    for r in rows:
        bound = f"{r['bound_step_s'] * 1e3:8.1f}" if r.get("bound_step_s") else f"{'-':>8}"
        pct = f"{r['pct_of_bound']:6.0f}%" if r.get("pct_of_bound") else f"{'-':>7}"
        pred = ""
        if predicted:
            p = r.get("predicted_tokens_per_s")
            pred = f" {p:10.1f} {p / r['tokens_per_s']:9.3f}" if p else f" {'-':>10} {'-':>9}"
        print(f"{r['offload']:8} {r.get('kv_offload', 'none'):>12} {r.get('tp', 1):2d} {r['batch']:5d} "
              f"{r['prefill_s'] * 1e3:10.1f} {r['decode_step_s'] * 1e3:8.1f} "
              f"{r['tokens_per_s']:8.1f} {r['streamed_bytes'] / 1e9:8.2f} {r['achieved_gbps']:6.1f} {bound} {pct} "
              f"{r['peak_gpu_bytes'] / 2**30:8.2f} {r['load_s']:6.1f}{pred}  {r.get('limit', '-')}")


def drop_page_cache(files: List[str]) -> str:
    """Empty the page cache of ``files``: drop_caches where permitted, else fadvise(DONTNEED) per file."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def load_test(path: Path, device: str, dtype: Optional[torch.dtype], fio: Optional[str]) -> Dict[str, Any]:
    """offload="cpu" load speed: cold (page cache dropped) against the disk's O_DIRECT bandwidth, warm against
    memcpy. Pinning is included: every arena is registered before it is read into."""
    from ..api.load import load

    out: Dict[str, Any] = {"memcpy_gbps": measure_memcpy(1 << 30).gbps}
    for state in ("cold", "warm"):
        files = [str(p) for p in sorted(path.glob("*.safetensors"))]
        if state == "cold":
            out["cache_drop"] = drop_page_cache(files)
        else:
            for f in files:  # O_DIRECT left the page cache empty: fill it, as a second run of a notebook would
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(64 << 20):
                        pass
        model = load(path, offload="cpu", device=device, dtype=dtype, max_resident_blocks=0, progress=False)
        nbytes = model.plan.outer_bytes + sum(model.plan.block_bytes)
        out[f"{state}_load_s"] = model.load_s
        out[f"{state}_load_gbps"] = nbytes / model.load_s / 1e9
        if state == "cold":
            out["disk_gbps_odirect"] = disk_rate(model).gbps
            if fio:
                drop_page_cache(model.store.files)
                out["fio_gbps"] = fio_gbps(fio, model.store.files)
        model.close()
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    disk = max(out["disk_gbps_odirect"], out.get("fio_gbps") or 0)
    out["cold_pct_of_disk"] = 100 * out["cold_load_gbps"] / disk
    out["warm_pct_of_memcpy"] = 100 * out["warm_load_gbps"] / out["memcpy_gbps"]
    print(f"load, offload=cpu: cold {out['cold_load_gbps']:.2f} GB/s = {out['cold_pct_of_disk']:.0f}% of the disk "
          f"({disk:.2f} GB/s O_DIRECT); warm {out['warm_load_gbps']:.2f} GB/s = {out['warm_pct_of_memcpy']:.0f}% of "
          f"memcpy ({out['memcpy_gbps']:.2f} GB/s)")
    return out


def _search_max_batch(load_fn: Any, prompt: int, gen: int) -> List[Dict[str, Any]]:
    """Largest batch that runs (doubling, then bisecting), and its throughput."""
    results: List[Dict[str, Any]] = []
    lo, hi, b = 0, None, 1
    while hi is None or hi - lo > 1:
        try:
            model = load_fn(b)
            r = run_one(model, b, prompt, gen)
            results.append({"batch": b, "tokens_per_s": r["tokens_per_s"], "decode_step_s": r["decode_step_s"],
                            "resident_blocks": len(model.plan.resident_blocks)})
            model.close()
            del model
            lo = b
        except (OutOfMemoryError, torch.cuda.OutOfMemoryError):
            hi = b
        torch.cuda.empty_cache()
        b = b * 2 if hi is None else (lo + hi) // 2
        if b > 4096:
            break
    return results


def _bench_group(a: argparse.Namespace, path: Path, offload: str, budget: Optional[str], cap: Optional[int],
                 batches: List[int], device: str, dtype: Optional[torch.dtype], meta: Dict[str, Any],
                 ranks: int = 1, compress: str = "none", kv_offload: str = "none") -> List[Dict]:
    from ..api.load import load

    rows: List[Dict[str, Any]] = []
    held = held_bytes(device)  # what the process holds on the device before this load: earlier rows' leftovers
    try:
        model = load(path, offload=offload, device=device, dtype=dtype, gpu_memory=budget, prefetch=a.prefetch,
                     max_batch=max(batches), max_seq_len=a.prompt + a.gen, max_resident_blocks=cap, progress=False,
                     quantize=a.quantize, group_size=a.group_size, tensor_parallel=ranks,
                     compress=None if compress == "none" else compress, kv_offload=kv_offload,
                     micro_batch=a.micro_batch, kv_cpu_layers=a.kv_cpu_layers, cuda_graphs=a.cuda_graphs,
                     copy_from_tokens=a.copy_from_tokens if offload == "ats" else None)
    except OutOfMemoryError as e:
        print(f"\n# {offload}, budget {budget}, batch {batches}: does not fit: {e}")
        return rows
    if model.plan.rank == 0:
        print(f"\n# {offload}, budget {budget}: {model.plan}")
    bound = _link_bound(a, model, offload, meta)
    # predicted before anything runs: a run's pinned KV cache stays in torch's host cache, and the planner would
    # count its room as taken
    before = held_bytes(device)
    predictions = {b: _prediction(model, a, b, offload, meta) for b in batches} if a.predict else {}
    calibration_held = held_bytes(device) - before  # what a calibration left on the device (graphs' streams)
    probe = _host_probe(a, model)
    at_prediction = {b: probe(b) for b in batches} if probe else {}
    run_one(model, batches[0], min(a.prompt, 16), 3)  # warm-up
    for b in batches:
        probed = [probe(b)] if probe else []
        measured = _measured(a, model, b, offload, meta)
        probed += [probe(b)] if probe else []
        row = _row("zstream", offload, model, measured, bound, _kv_up_bytes(model, b, a.prompt + a.gen // 2))
        if probed:
            row.update(host_probe_s={"at_prediction": at_prediction[b], "before": probed[0], "after": probed[1]},
                       host_probe_drift=statistics.mean(probed) / at_prediction[b])
        row.update(gpu_memory=budget, tp=model.plan.ranks, rank=model.plan.rank, compress=compress,
                   kv_offload_asked=kv_offload, held_before_load_bytes=held, calibration_held_bytes=calibration_held)
        _describe_kv(row, model, bound, a.prompt + a.gen // 2, predictions.get(b, {}), meta)
        row["graph_pool_bytes"] = model.graph_pool_bytes()  # (reserved by the row's graph, outside its peak)
        rows.append(row)
        if model.plan.rank == 0:
            _print_table([row])
    model.close()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        # the KV cache's pinned host memory too: torch keeps it cached, and the next plan counts it as taken
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return rows


def _host_probe(a: argparse.Namespace, model: Any) -> Optional[Callable[[int], float]]:
    """With ``--predict``, for a model whose layers attend on the host's CPUs ("host-compute", "split"): the CPUs'
    attention at a batch's micro-batch rows and the steps' mean context (``calibrate.host_attention_s``), taken when
    the rows are predicted and around each row's run. Their ratio, the row's ``host_probe_drift``, is how much
    slower the CPUs' attention ran beside the row than when it was predicted: a record of the host's drift (items
    56-57), from point readings, while the CPUs' speed moves within a row too (item 58)."""
    from ..streaming.calibrate import host_attention_s

    if not a.predict or model.plan.kv_offload not in ("host-compute", "split"):
        return None
    fam, keys = model.family, a.prompt + a.gen // 2
    return lambda b: host_attention_s(min(b, a.micro_batch or b), fam.num_kv_heads, keys, fam.head_dim, model.dtype)


def _link_bound(a: argparse.Namespace, model: Any, offload: str, meta: Dict[str, Any]) -> Optional[float]:
    """The streamed bytes' limit in GB/s, measured now (and kept in ``meta``): the disk's O_DIRECT rate (or fio's)
    for nvme, pinned host-to-device copies (a memcpy on the CPU) for cpu; the plan's link otherwise."""
    if model.group is not None:  # the ranks measure their links at once: each with the others busy
        model.group.gather(None, "starting the link measurement")
    bound = model.plan.link_gbps
    cuda = model.device.type == "cuda"
    if offload == "nvme":
        rate = disk_rate(model)
        bound = rate.gbps
        meta["disk_gbps_odirect"], meta["disk_gbps_spread"] = rate.gbps, [rate.low, rate.high]
        if a.fio:
            drop_page_cache(model.store.files)
            meta["fio_gbps"] = fio_gbps(a.fio, model.store.files)
            bound = max(bound, meta["fio_gbps"] or 0)
    elif offload == "cpu":
        rate = measure_h2d(model.device, 1 << 30) if cuda else measure_copy(model.device)
        bound = rate.gbps
        meta["h2d_gbps" if cuda else "memcpy_gbps"] = rate.gbps
        meta["link_gbps_spread"] = [rate.low, rate.high]
    return bound


def _measured(a: argparse.Namespace, model: Any, b: int, offload: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``a.repeats`` runs of batch ``b`` (the medians of their times); the first run of the first streamed batch of
    the whole bench traced where asked (once: a trace's events cost the run time)."""
    first = offload != "none"  # (the trace records streamed blocks)
    trace = a.trace if first and not meta.get("traced") else None
    trace_prefill = a.trace_prefill if first and not meta.get("prefill_traced") else None
    reps = [run_one(model, b, a.prompt, a.gen, trace=trace if i == 0 else None,
                    trace_prefill=trace_prefill if i == 0 else None) for i in range(a.repeats)]
    meta["traced"] = meta.get("traced") or trace is not None
    meta["prefill_traced"] = meta.get("prefill_traced") or trace_prefill is not None
    if a.profile and not meta.get("profiled_row") and model.group is None:
        _profile(model, b, a.prompt, a.gen, a.profile)
        meta["profiled_row"] = {"offload": offload, "batch": b, "kv_offload": model.plan.kv_offload,
                                "resident_blocks": len(model.plan.resident_blocks),
                                "decode_graph": model.plan.decode_graph}
    if a.repeats == 1:
        return reps[0]
    return {**reps[0], **{k: statistics.median(x[k] for x in reps) for k in ("prefill_s", "decode_step_s",
                                                                          "tokens_per_s")}}


def _profile(model: Any, batch: int, prompt: int, gen: int, path: str) -> None:
    """One more run of the row, untimed, under torch's profiler (the host's ops, and on a GPU its kernels and
    copies), written to ``path`` as a Chrome trace: where a step's time goes, beside the timed runs' numbers."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if model.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_one(model, batch, prompt, gen, marks=True)
    prof.export_chrome_trace(path)


def _kv_layer(model: Any, batch: int, context: int) -> int:
    return kv_layer_bytes(model.family, batch, context, model.dtype)


def _kv_up_bytes(model: Any, batch: int, context: int) -> int:
    """The layers' caches brought up from host memory, whole, every step ("host", and the "split" layers not
    attended on the CPUs), at the decode's mean context."""
    placed = model.plan.kv_offload
    up = model.family.num_blocks - model.plan.kv_cpu_layers if placed in ("host", "split") else 0
    return up * _kv_layer(model, batch, context)


def _describe_kv(row: Dict[str, Any], model: Any, bound: Optional[float], context: int,
                 prediction: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """A row's KV placement, the caches the CPUs read, what limits it (host memory, where the link and the CPUs
    share it), its micro-batch and quantization, and its prediction."""
    placed = model.plan.kv_offload
    row["kv_offload"], row["kv_bytes_per_step"] = placed, _kv_up_bytes(model, row["batch"], context)
    # the caches the CPUs attend to are read from the host memory the link reads too (planning.batch)
    on_cpus = model.plan.kv_cpu_layers if placed in ("host-compute", "split") else 0
    row["kv_cpu_bytes_per_step"] = on_cpus * _kv_layer(model, row["batch"], context)
    row["kv_cpu_layers"] = on_cpus
    calibrated = meta.get("compute_models", {}).get(prediction.get("predicted_compute"), {})
    _host_memory_limit(row, model.plan.link, bound, relabel=model.device.type == "cuda",
                       shared_gbps=calibrated.get("shared_read_gbps"))
    row["micro_batch"] = model.plan.micro_batch
    row.update(prediction)
    row["quantize"] = model.plan.quantization
    if model.plan.unquantized_block_bytes is not None:
        row["unquantized_bytes_per_step"] = sum(model.plan.unquantized_block_bytes[i]
                                                for i in model.plan.streamed_blocks)


def _host_memory_limit(row: Dict[str, Any], link: str, bound_gbps: Optional[float], relabel: bool,
                       shared_gbps: Optional[float] = None) -> None:
    """A host KV cache's row whose step is within 1.25x of every byte it reads from host memory (the weights and
    caches the link brings up, the caches the CPUs attend) at the rate host memory serves them is limited by those
    reads, not by "compute or overheads" as the weights' transfer bound alone says (planning.batch: the two share
    host memory). That rate is the link's where only the link reads, and where the CPUs read too the calibrated rate
    of both at once (``shared_gbps``, ``ComputeModel.shared_read_gbps``: 93-111 GB/s on the H200, not the link's 55);
    without it such a row is not relabelled. ``relabel``: on a GPU (on the CPU the host thread's waits say what
    limits, ``limit_of``)."""
    read = row["streamed_bytes"] + row.get("kv_cpu_bytes_per_step", 0)
    if row.get("kv_offload", "none") == "none" or not bound_gbps or not read:
        return
    cpus_read = bool(row.get("kv_cpu_bytes_per_step"))
    rate = max(bound_gbps, shared_gbps) if cpus_read and shared_gbps else bound_gbps
    bound = read / (rate * 1e9)
    row["host_read_bytes_per_step"], row["host_read_bound_s"], row["host_read_gbps"] = read, bound, rate
    if relabel and row["decode_step_s"] <= 1.25 * bound and (shared_gbps or not cpus_read):
        row["limit"] = f"{link or 'the link'} and host memory"  # no block streams: the plan names no link
        row["limit_why"] = (f"the step is {row['decode_step_s'] / bound:.2f}x its {read / 1e9:.1f} GB of weights and "
                            f"KV cache read from host memory at {rate:.1f} GB/s")


def _prediction(model: Any, a: argparse.Namespace, batch: int, offload: str,
                meta: Dict[str, Any]) -> Dict[str, Any]:
    """The batch planner's prediction for this model's residency, KV placement (with "split", its own layers on the
    CPUs) and micro-batch at ``batch`` (calibrated on the device now, once per model and placement: the calibration
    is kept for the process, and in ``meta["compute_models"]`` under the row's ``predicted_compute``, so the
    prediction can be replayed from the JSON)."""
    from ..api.plan_batch import plan_batch

    stream = offload if offload in ("cpu", "nvme") and model.plan.streamed_blocks else "none"
    counters = host_counters()  # what the host did beside the calibration, if one runs
    try:
        plan = plan_batch(model, prompt=a.prompt, gen=a.gen, offload=stream, prefetch=a.prefetch,
                          kv_offload=model.plan.kv_offload, max_batch=batch, micro_batch=model.plan.micro_batch,
                          kv_cpu_layers=model.plan.kv_cpu_layers if model.plan.kv_offload == "split" else None,
                          cuda_graphs=a.cuda_graphs)
    except (ValueError, OutOfMemoryError) as e:
        return {"predicted_error": str(e)}
    micro = model.plan.micro_batch if model.plan.micro_batch and model.plan.micro_batch < batch else None
    c = plan.candidate(batch, len(model.plan.resident_blocks), model.plan.kv_offload, micro)
    if c is None:
        return {"predicted_error": "the planner finds this configuration does not fit"}
    meta.setdefault("compute_models", {})[plan.compute.key] = plan.compute.to_dict()
    return {"predicted_tokens_per_s": c.tokens_per_s, "predicted_decode_step_s": c.decode_step_s,
            "predicted_prefill_s": c.prefill_s, "predicted_memory_bytes": c.memory_bytes,
            "predicted_compute": plan.compute.key,
            "predicted_link_gbps": plan.link_gbps, "prediction_counters": counters_since(counters)}


PLANNED_MICRO_BATCHES = (None, 8, 16, 32, 64)  # the micro-batch sizes --planned lets the planner choose among


def _planned(a: argparse.Namespace, path: Path, budget: Optional[str], device: str, dtype: Optional[torch.dtype],
             meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The planner's own choice under ``budget`` (every KV placement and micro-batch, batches up to the largest
    asked), loaded and measured like any row, with the prediction beside it; the row is marked ``planned``."""
    from ..api.plan_batch import plan_batch

    stream = next((o for o in a.offload if o in ("cpu", "nvme")), "none")
    plan = plan_batch(path, gpu_memory=budget, prompt=a.prompt, gen=a.gen, offload=stream, device=device,
                      dtype=dtype, prefetch=a.prefetch, kv_offload="auto", micro_batch=list(PLANNED_MICRO_BATCHES),
                      max_batch=a.planned or max(a.batch), quantize=a.quantize, group_size=a.group_size,
                      cuda_graphs=a.cuda_graphs)
    print(plan.summary())
    best = plan.best
    if best is None:
        return []
    meta["planned"] = {"batch": best.batch, "resident_blocks": best.resident_blocks, "offload": best.offload,
                       "kv_offload": best.kv_offload, "micro_batch": best.micro_batch,
                       "kv_cpu_layers": best.kv_cpu_layers, "predicted_tokens_per_s": best.tokens_per_s}
    chosen = argparse.Namespace(**{**vars(a), "micro_batch": best.micro_batch, "predict": True,
                                   "kv_cpu_layers": best.kv_cpu_layers if best.kv_offload == "split" else None})
    cap = best.resident_blocks if best.offload != "none" else None
    rows = _bench_group(chosen, path, best.offload, budget, cap, [best.batch], device, dtype, meta,
                        kv_offload=best.kv_offload)
    for r in rows:
        r["planned"] = True
        if r.get("predicted_tokens_per_s") is None:  # the loaded model's own re-plan lost it (run 8: its host
            # memory, now holding the weights, no longer fitted the batch's cache): the plan's prediction stands
            meta.setdefault("compute_models", {})[plan.compute.key] = plan.compute.to_dict()
            r.update(predicted_tokens_per_s=best.tokens_per_s, predicted_decode_step_s=best.decode_step_s,
                     predicted_prefill_s=best.prefill_s, predicted_memory_bytes=best.memory_bytes,
                     predicted_compute=plan.compute.key,
                     predicted_link_gbps=plan.link_gbps, predicted_from="plan")
    return rows


def _max_batch(a: argparse.Namespace, path: Path, budget: Optional[str], device: str,
               dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """The largest batch with and without offload, searched by running it; next to it the planner's prediction
    (``plan.plan_batch``) for every batch tried, and its own best choice, measured too if the search skipped it."""
    from ..api.load import load
    from ..api.plan_batch import plan_batch
    from ..planning.batch import BatchPlan

    out: Dict[str, Any] = {}
    stream = a.offload[0]
    predicted: Optional[BatchPlan] = None
    if stream in ("none", "cpu", "nvme"):  # the planner models the ring of cpu and nvme offload, not ats
        predicted = plan_batch(path, gpu_memory=budget, prompt=a.prompt, gen=a.gen, offload=stream, device=device,
                               dtype=dtype, prefetch=a.prefetch)
        print(predicted.summary())
        out["batch_plan"] = predicted.to_dict()
        if predicted.best is not None:
            out["predicted_best_batch"] = predicted.best.batch
            out["predicted_best_resident_blocks"] = predicted.best.resident_blocks
            out["predicted_best_offload"] = predicted.best.offload
            out["predicted_tokens_per_s"] = predicted.best.tokens_per_s
    measured: Dict[tuple, float] = {}
    for offload in ("none", stream):
        def load_fn(b: int, offload: str = offload) -> Any:
            return load(path, offload=offload, device=device, dtype=dtype, gpu_memory=budget, prefetch=a.prefetch,
                        max_batch=b, max_seq_len=a.prompt + a.gen, progress=False)
        found = _search_max_batch(load_fn, a.prompt, a.gen)
        for r in found:
            measured[(r["batch"], r["resident_blocks"])] = r["tokens_per_s"]
            c = predicted.candidate(r["batch"], r["resident_blocks"]) if predicted else None
            r["predicted_tokens_per_s"] = c.tokens_per_s if c else None
            r["predicted_decode_step_s"] = c.decode_step_s if c else None
        out[f"max_batch_{offload}"] = found
        best = max(found, key=lambda r: r["tokens_per_s"]) if found else None
        print(f"max batch, offload={offload}, budget {budget}: "
              + (f"{max(r['batch'] for r in found)}; best {best['tokens_per_s']:.1f} tok/s at batch "
                 f"{best['batch']}" if best else "none fits")
              + (f"; predicted max {predicted.max_batch(offload)}" if predicted else ""))
        for r in found:
            pred = r["predicted_tokens_per_s"]
            print(f"  batch {r['batch']:4d}, {r['resident_blocks']:3d} resident: measured {r['tokens_per_s']:8.1f} "
                  f"tok/s, step {r['decode_step_s'] * 1e3:7.1f} ms; predicted "
                  + (f"{pred:8.1f} tok/s, step {r['predicted_decode_step_s'] * 1e3:7.1f} ms" if pred else "-"))
    if predicted is not None and predicted.best is not None:
        b = predicted.best
        key = (b.batch, b.resident_blocks)
        if key not in measured:  # the planner's own choice, run once like the search's batches
            try:
                model = load(path, progress=False, **predicted.load_kwargs())
                measured[key] = run_one(model, b.batch, a.prompt, a.gen)["tokens_per_s"]
                model.close()
                del model
            except (OutOfMemoryError, torch.cuda.OutOfMemoryError) as e:
                print(f"planner's choice (batch {b.batch}, {b.resident_blocks} resident) does not run: {e}")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        got = measured.get(key)
        out["predicted_best_measured_tokens_per_s"] = got
        print(f"planner's choice (batch {b.batch}, {b.resident_blocks} resident): predicted {b.tokens_per_s:.1f} "
              f"tok/s, measured " + (f"{got:.1f}" if got is not None else "-")
              + f"; best measured in the search {max(measured.values(), default=0):.1f} tok/s")
    return out


def main(a: argparse.Namespace) -> int:
    dtype = parse_dtype(a.dtype)
    path = checkpoint_for(a.model, dtype)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta: Dict[str, Any] = {"model": path.name, "device": device, "host": platform.node(),
                            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows: List[Dict[str, Any]] = []
    pending, meta["writeback_flush_s"] = flush_writeback()
    meta["writeback_pending_bytes"] = pending
    if a.planned_only and a.planned is None:
        raise UsageError("--planned-only needs --planned")
    # the tensor-parallel runs first: their ranks are forked, which a process that has used CUDA cannot do
    for ranks in sorted(set(a.tp) if not a.planned_only else (), reverse=True):
        if ranks > 1:
            from ..api.launch import launch

            per_rank = launch(_bench_all, ranks, a, path, device, dtype)
            rows += _tp_rows(per_rank)
            meta.update({f"tp{ranks}_{k}": v for k, v in per_rank[0][1].items() if k.endswith("_gbps")})
            meta[f"tp{ranks}_rank_links_gbps"] = [m.get("h2d_gbps") or m.get("memcpy_gbps") for _, m in per_rank]
    if 1 in a.tp and not a.planned_only:
        one, one_meta = _bench_all(a, path, device, dtype, meta)
        rows += one
        meta.update(one_meta)
    if device.startswith("cuda"):
        meta["card"] = torch.cuda.get_device_name()
    if a.load_test:
        meta["load_test"] = load_test(path, device, dtype, a.fio)
    if a.max_batch:
        meta.update(_max_batch(a, path, a.gpu_memory[0] if a.gpu_memory else None, device, dtype))
    if a.planned is not None:
        rows += _planned(a, path, a.gpu_memory[0] if a.gpu_memory else None, device, dtype, meta)
    print()
    _print_table(rows)
    summary = prediction_summary(rows)
    if summary is not None:
        w = summary["worst"]
        steady = f", its slowest step {w['slowest_step_over_median']:.2f}x its median" \
            if w["slowest_step_over_median"] else ""
        if w.get("host_probe_drift"):
            steady += f", the CPUs' attention {w['host_probe_drift']:.2f}x as long as when predicted"
        print(f"predicted within {summary['tolerance']:.0%} of measured: {summary['within']} of {summary['rows']} "
              f"rows; furthest {w['ratio']:.3f}x ({w['kv_offload']}, batch {w['batch']}{steady})")
    for k in ("h2d_gbps", "memcpy_gbps", "disk_gbps_odirect", "fio_gbps"):
        if meta.get(k):
            print(f"{k}: {meta[k]:.2f}")
    if a.json:
        _write_json(a.json, meta, rows)
    return 0


def _write_json(path: str, meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """The run's JSON: its meta, with the summary of the rows' predictions where they have any, and its rows."""
    summary = prediction_summary(rows)
    meta = {**meta, "prediction_summary": summary} if summary is not None else meta
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def _bench_all(a: argparse.Namespace, path: Path, device: str, dtype: Optional[torch.dtype],
               run_meta: Optional[Dict[str, Any]] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Every offload, budget and batch of the command line, on this process (one rank of ``--tp`` N, or alone).
    ``run_meta``: the run's own record (model, host, date), kept in the JSON written as it goes."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    budgets = list(a.gpu_memory) if a.gpu_memory else [None]
    rows: List[Dict[str, Any]] = []
    meta: Dict[str, Any] = {}
    for offload in a.offload:
        for budget in budgets:
            cap = a.max_resident_blocks
            if cap is None and offload in ("cpu", "nvme") and budget is None:
                cap = 0  # stream every block (embeddings, final norm and head stay resident)
            # Under a budget the KV cache competes with resident blocks: plan each batch on its own.
            groups = [[b] for b in a.batch] if budget is not None else [list(a.batch)]
            for group in groups:
                for compress, kv in itertools.product(a.compress, a.kv_offload):
                    rows += _bench_group(a, path, offload, budget, cap, group, device, dtype, meta, ranks, compress,
                                         kv)
                    if a.json and ranks == 1:  # what is measured so far survives a run cut short (a time limit)
                        _write_json(a.json, {**(run_meta or {}), **meta, "partial": True}, rows)
    return rows, meta


def _tp_rows(per_rank: List[Tuple[List[Dict[str, Any]], Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per configuration of a tensor-parallel run: rank 0's timings (the ranks step together), the bound
    of the slowest rank (its bytes over its own link), and every rank's bytes and link."""
    out = []
    for rows in zip(*(r for r, _ in per_rank)):
        row = dict(rows[0])
        bounds = [r["bound_step_s"] for r in rows if r.get("bound_step_s")]
        row["bound_step_s"] = max(bounds) if bounds else None
        row["pct_of_bound"] = 100 * row["bound_step_s"] / row["decode_step_s"] if row["bound_step_s"] else None
        row["rank_streamed_bytes"] = [r["streamed_bytes"] for r in rows]
        row["rank_bound_gbps"] = [r["bound_gbps"] for r in rows]
        row["streamed_bytes"] = sum(r["streamed_bytes"] for r in rows)
        row["achieved_gbps"] = row["streamed_bytes"] / row["decode_step_s"] / 1e9
        out.append(row)
    return out
