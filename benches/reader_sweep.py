#!/usr/bin/env python3
"""Reader sweep on the real disk: zstream's readers against fio, cold cache, one file, one run.

    python3 benches/reader_sweep.py --dir /mnt/nvme/zs --gib 8 --fio .device/fio --json sweep.json

1. Writes ``DIR/sweep-<gib>g-h<hidden>.safetensors`` if missing: bloom-shaped fp16 blocks (query_key_value,
   dense, dense_h_to_4h, dense_4h_to_h, layernorms and biases; hidden 4096 = bloom-7b1, ~384 MiB a block),
   random bytes, about N GiB in all.
2. fio on the same file, whole file once: ``--rw=read --bs=1M --iodepth=64 --ioengine=io_uring --direct=1``,
   and ``--ioengine=psync --numjobs=8`` (each job an eighth of the file) for the pread pool's comparison.
3. zstream: the whole file, block by block through ``WeightStore.fetch``/``wait``/``release`` (what the
   streaming engine does: pooled, reused slots, ``--inflight`` blocks in flight), for every configuration:
   uring at queue depths x chunk sizes, pread at thread counts, mmap. Each ``--repeats`` times; the median.

Cache: uring and pread use O_DIRECT (no page cache). Before every run, fio's too, the file's cached pages are
dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` and, where permitted, ``/proc/sys/vm/drop_caches`` is
written 1; the JSON records whether that was permitted. mmap and buffered numbers are cold only because of this.

Every configuration is guarded: a failure is recorded and the sweep goes on. ``--budget-s`` caps the run: the
configurations go in priority order (defaults first, then the grid) and those that would not fit are recorded
as skipped. Needs: Python 3.9+, torch, zstream (installed), fio (``--fio``); no network, no Rust.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

GB = 1e9
GIB = 1 << 30


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def fmt_size(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def size_list(s: str) -> list[int]:
    return [parse_size(x) for x in s.split(",") if x.strip()]


# --- the checkpoint ------------------------------------------------------------------------------------------
def block_shapes(prefix: str, h: int) -> list[tuple[str, tuple[int, ...]]]:
    """bloom's per-block tensors, in its checkpoint order."""
    return [
        (f"{prefix}.input_layernorm.weight", (h,)),
        (f"{prefix}.input_layernorm.bias", (h,)),
        (f"{prefix}.self_attention.query_key_value.weight", (3 * h, h)),
        (f"{prefix}.self_attention.query_key_value.bias", (3 * h,)),
        (f"{prefix}.self_attention.dense.weight", (h, h)),
        (f"{prefix}.self_attention.dense.bias", (h,)),
        (f"{prefix}.post_attention_layernorm.weight", (h,)),
        (f"{prefix}.post_attention_layernorm.bias", (h,)),
        (f"{prefix}.mlp.dense_h_to_4h.weight", (4 * h, h)),
        (f"{prefix}.mlp.dense_h_to_4h.bias", (4 * h,)),
        (f"{prefix}.mlp.dense_4h_to_h.weight", (h, 4 * h)),
        (f"{prefix}.mlp.dense_4h_to_h.bias", (h,)),
    ]


def layout(gib: float, hidden: int) -> tuple[list[tuple[str, tuple[int, ...]]], list[list[str]]]:
    """Tensors (name, shape; fp16) and the read groups: an embedding-like head, then whole blocks, then ln_f."""
    block_bytes = sum(2 * _numel(s) for _, s in block_shapes("x", hidden))
    target = int(gib * GIB)
    emb_rows = max(1, min(250880, target // 20 // (2 * hidden)))  # ~5% of the file, capped at bloom's vocab
    n_blocks = max(1, (target - 2 * emb_rows * hidden) // block_bytes)
    head = [("word_embeddings.weight", (emb_rows, hidden)), ("word_embeddings_layernorm.weight", (hidden,)),
            ("word_embeddings_layernorm.bias", (hidden,))]
    tensors = list(head)
    groups = [[n for n, _ in head]]
    for b in range(n_blocks):
        shapes = block_shapes(f"h.{b}", hidden)
        tensors += shapes
        groups.append([n for n, _ in shapes])
    tail = [("ln_f.weight", (hidden,)), ("ln_f.bias", (hidden,))]
    tensors += tail
    groups.append([n for n, _ in tail])
    return tensors, groups


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """A valid safetensors file (F16), written directly: random bytes from one reused pool, fsynced."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    pool = os.urandom(64 << 20)
    tmp = path.with_suffix(".tmp")
    t0 = time.perf_counter()
    with open(tmp, "wb", buffering=0) as f:
        f.write(len(js).to_bytes(8, "little") + js)
        left, i = off, 0
        view = memoryview(pool)
        while left:
            start = (i * 4099 * 4096) % (len(pool) // 2)  # a different window of the pool each time
            n = min(left, len(pool) // 2)
            f.write(view[start:start + n])
            left -= n
            i += 1
        os.fsync(f.fileno())
    tmp.rename(path)
    dt = time.perf_counter() - t0
    print(f"wrote {path} ({(8 + len(js) + off) / GIB:.2f} GiB) in {dt:.1f} s ({off / dt / GB:.2f} GB/s)", flush=True)


# --- the page cache ------------------------------------------------------------------------------------------
def drop_caches(path: Path, try_global: bool) -> dict[str, Any]:
    """Drop the file's cached pages (fadvise), and all clean caches if /proc/sys/vm/drop_caches is writable."""
    out: dict[str, Any] = {}
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            out["fadvise"] = True
        finally:
            os.close(fd)
    except OSError as e:
        out["fadvise"] = f"failed: {e}"
    if try_global:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            out["drop_caches"] = True
        except OSError as e:
            out["drop_caches"] = f"not permitted: {e.strerror or e}"
    return out


# --- fio -----------------------------------------------------------------------------------------------------
# name -> (ioengine, numjobs, extra fio options). Each reads the whole file once, 1 MiB blocks, O_DIRECT.
FIO_RUNS = {
    "io_uring_qd64": ("io_uring", 1, []),                     # (a): the reference for every zstream row
    "psync_x8": ("psync", 8, []),                             # (c): for the pread pool (iodepth is moot for psync)
    "io_uring_qd64_fixedbufs": ("io_uring", 1, ["--fixedbufs"]),  # registered buffers, as zstream's pooled slots
}


def resolve_fio(fio: str) -> tuple[str, str]:
    """(binary, version): ``fio``, else ``<fio>-static`` beside it when ``fio`` does not run here (a glibc too
    old for a dynamically linked build)."""
    errors = []
    for cand in (fio, fio + "-static"):
        try:
            p = subprocess.run([cand, "--version"], capture_output=True, text=True, timeout=30, check=False)
        except OSError as e:
            errors.append(f"{cand}: {e}")
            continue
        if p.returncode == 0:
            return cand, p.stdout.strip()
        errors.append(f"{cand}: exit {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


def run_fio(fio: str, path: Path, size: int, engine: str, numjobs: int, extra: list[str], runtime_s: int,
            try_global: bool) -> dict[str, Any]:
    per_job = size // numjobs // (1 << 20) * (1 << 20)
    cmd = [fio, f"--name=seq-{engine}", f"--filename={path}", "--readonly", "--rw=read", "--bs=1M",
           "--iodepth=64", f"--ioengine={engine}", "--direct=1", f"--numjobs={numjobs}", f"--size={per_job}",
           f"--runtime={runtime_s}", "--group_reporting", "--output-format=json", *extra]
    if numjobs > 1:
        cmd.append(f"--offset_increment={per_job}")  # job i reads the i-th slice: the file once in all
    res: dict[str, Any] = {"cmd": " ".join(cmd), "engine": engine, "numjobs": numjobs}
    res["cache"] = drop_caches(path, try_global)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime_s + 60, check=False)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    if p.returncode != 0:
        raise RuntimeError(f"fio exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    doc = json.loads(p.stdout[p.stdout.index("{"):])  # fio may print notes before the JSON
    job = doc["jobs"][0]
    rd = job["read"]
    res.update({
        "GB/s": round(rd["bw_bytes"] / GB, 3),
        "io_bytes": rd["io_bytes"],
        "runtime_ms": rd["runtime"],
        "iops": round(rd["iops"], 1),
        "lat_mean_us": round(rd.get("clat_ns", {}).get("mean", 0) / 1e3, 1),
        "fio_version": doc.get("fio version"),
    })
    if p.stderr.strip():
        res["stderr"] = p.stderr.strip()[-400:]
    return res


# --- zstream -------------------------------------------------------------------------------------------------
def zstream_pass(store: Any, groups: list[list[str]], reader: str, inflight: int) -> tuple[float, int, int]:
    """Read every group once, ``inflight`` tickets in flight; (seconds, tensor bytes, bytes read from disk)."""
    tickets: list[Any] = []
    nbytes = read_bytes = 0
    t0 = time.perf_counter()

    def finish(ticket: Any) -> None:
        nonlocal nbytes, read_bytes
        weights = ticket.wait()
        nbytes += sum(t.nbytes for t in weights.values())
        read_bytes += ticket.read_bytes
        del weights
        ticket.release()

    for g in groups:
        tickets.append(store.fetch(g, reader=reader))
        if len(tickets) >= inflight:
            finish(tickets.pop(0))
    for t in tickets:
        finish(t)
    return time.perf_counter() - t0, nbytes, read_bytes


def run_zstream(zstream: Any, path: Path, groups: list[list[str]], cfg: dict[str, Any], repeats: int,
                inflight: int, pin: bool, try_global: bool) -> dict[str, Any]:
    reader = cfg["reader"]
    kw = {k: cfg[k] for k in ("queue_depth", "chunk_size", "threads") if cfg.get(k) is not None}
    runs: list[float] = []
    res: dict[str, Any] = {}
    with zstream.WeightStore.open(path, reader=reader, pin=pin, workers=max(1, inflight),
                                  max_slots=inflight + 1, **kw) as store:
        res["direct"] = list(store._core.direct) if hasattr(store._core, "direct") else None
        for _ in range(repeats):
            res["cache"] = drop_caches(path, try_global)
            dt, nbytes, read_bytes = zstream_pass(store, groups, reader, inflight)
            runs.append(nbytes / dt / GB)
            res["bytes"], res["read_bytes"] = nbytes, read_bytes
    res["runs_GB/s"] = [round(r, 3) for r in runs]
    res["GB/s"] = round(statistics.median(runs), 3)
    return res


def in_child(fn: Any, timeout_s: float, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` (a JSON-able dict) in a forked child, so that a crash (a signal, an abort) or a hang
    costs one configuration, not the sweep. Forking is safe here: the parent has started no threads and never
    touched CUDA (slots are unpinned unless --pin), and zstream starts its reader threads in the child."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns on fork with threads running; torch's import leaves one idle (its DataLoader forks
        # alike).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            out = json.dumps(fn(*args))
        except BaseException as e:  # report it to the parent, whatever it is
            out, code = json.dumps({"error": f"{type(e).__name__}: {e}"}), 1
        try:
            with os.fdopen(w, "w") as f:
                f.write(out)
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    with os.fdopen(r, "rb") as f:
        os.set_blocking(f.fileno(), False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([f], [], [], min(left, 1.0))
            if ready:
                b = f.read()
                if not b:
                    break
                chunks.append(b)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"error": f"timed out after {timeout_s:.0f} s (killed)"}
    if os.WIFSIGNALED(status):
        return {"error": f"child killed by signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})"}
    try:
        return json.loads(b"".join(chunks) or b"{}") or {"error": f"child exited {os.waitstatus_to_exitcode(status)}"}
    except ValueError:
        return {"error": f"child exited {os.waitstatus_to_exitcode(status)} with unreadable output"}


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Priority order: each reader's defaults first (so a cut-short sweep still compares them), then the grids."""
    out: list[dict[str, Any]] = []
    if "uring" in args.readers:
        out.append({"reader": "uring", "queue_depth": 64, "chunk_size": 1 << 20})
    if "pread" in args.readers:
        out.append({"reader": "pread", "threads": 8, "chunk_size": 1 << 20})
    if "mmap" in args.readers:
        out.append({"reader": "mmap", "threads": 8})
    if "pread" in args.readers:  # the short grid before the long one, so a budget cut takes uring corners
        out += [{"reader": "pread", "threads": t, "chunk_size": 1 << 20} for t in args.threads]
    if "uring" in args.readers:
        out += [{"reader": "uring", "queue_depth": qd, "chunk_size": c} for c in args.chunks for qd in args.qds]
    seen, uniq = set(), []
    for c in out:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    return uniq


def device_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(OSError, ValueError):
        st = os.stat(path)
        sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        info["block_device"] = sys_dev.name
        disk = sys_dev if (sys_dev / "device").exists() else sys_dev.parent
        for key, rel in (("model", "device/model"), ("scheduler", "queue/scheduler"),
                         ("max_sectors_kb", "queue/max_sectors_kb"), ("nr_requests", "queue/nr_requests")):
            with contextlib.suppress(OSError):
                info[key] = (disk / rel).read_text().strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(info.get("mount", "")):
                info.update(mount=mnt, fstype=fstype, fs_device=dev)
    return info


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path, help="directory on the disk under test")
    ap.add_argument("--gib", type=float, default=8.0, help="checkpoint size in GiB (default 8)")
    ap.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size of the blocks (4096: bloom-7b1)")
    ap.add_argument("--readers", default="uring,pread,mmap", type=lambda s: s.split(","))
    ap.add_argument("--qds", default="8,16,32,64,128", type=int_list, help="uring queue depths")
    ap.add_argument("--chunks", default="256K,1M,4M", type=size_list, help="uring chunk sizes")
    ap.add_argument("--threads", default="4,8,16", type=int_list, help="pread thread counts")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported)")
    ap.add_argument("--inflight", type=int, default=1, help="blocks in flight (2 = the engine's prefetch)")
    ap.add_argument("--pin", action="store_true", help="pin the slots with CUDA (default: pageable)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run configurations in this process (default: each in a forked child, so a crash or a "
                         "hang loses one configuration)")
    ap.add_argument("--no-fio", action="store_true", help="skip the fio runs")
    ap.add_argument("--fio-runs", default=",".join(FIO_RUNS), type=lambda s: [x for x in s.split(",") if x],
                    help=f"fio runs to do, of {', '.join(FIO_RUNS)} (default: all)")
    ap.add_argument("--fio-runtime", type=int, default=60, help="cap on each fio run, seconds")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="stop starting configurations once they would end past this many seconds (default 330)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    args.dir.mkdir(parents=True, exist_ok=True)
    tensors, groups = layout(args.gib, args.hidden)
    path = args.dir / f"sweep-{args.gib:g}g-h{args.hidden}.safetensors"
    data_bytes = sum(2 * _numel(s) for _, s in tensors)
    if not path.exists():
        write_checkpoint(path, tensors)
    size = path.stat().st_size
    try_global = True
    results: dict[str, Any] = {
        "file": str(path), "file_bytes": size, "tensor_bytes": data_bytes, "groups": len(groups),
        "hidden": args.hidden, "inflight": args.inflight, "repeats": args.repeats, "pin": args.pin,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": device_info(path),
        "fio": {}, "zstream": [],
    }
    probe = drop_caches(path, True)
    try_global = probe.get("drop_caches") is True
    results["cache_drop"] = probe
    print(f"file {path}: {size / GIB:.2f} GiB, {len(tensors)} tensors, {len(groups)} read groups; "
          f"drop_caches {'permitted' if try_global else 'not permitted (fadvise only)'}", flush=True)
    if results["machine"].get("fstype") in ("tmpfs", "ramfs", "overlay"):
        print(f"WARNING: {args.dir} is on {results['machine']['fstype']}: this measures memory or the overlay, "
              "not the disk; pass a --dir on the disk under test", flush=True)

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    # (a) and (c): fio, first, so a budget cut never loses the reference.
    fio = args.fio
    if not args.no_fio:
        try:
            fio, results["fio_version"] = resolve_fio(args.fio)
            results["fio_binary"] = fio
        except RuntimeError as e:
            results["fio_error"] = str(e)
            print(f"fio does not run: {e}", flush=True)
    for key in [] if args.no_fio or "fio_error" in results else args.fio_runs:
        try:
            engine, jobs, extra = FIO_RUNS[key]
            r = run_fio(fio, path, size, engine, jobs, extra, args.fio_runtime, try_global)
            print(f"fio {key}: {r['GB/s']:.2f} GB/s ({r['io_bytes'] / GIB:.2f} GiB in {r['runtime_ms']} ms)",
                  flush=True)
        except Exception as e:  # a sweep outlives any one failure
            r = {"error": f"{type(e).__name__}: {e}"}
            print(f"fio {key}: FAILED {r['error']}", flush=True)
        results["fio"][key] = r
        save()

    # (b) zstream
    try:
        import zstream  # late: fio runs even where zstream does not import

        results["zstream_version"] = getattr(zstream, "__version__", None)
    except Exception as e:
        results["zstream_error"] = f"{type(e).__name__}: {e}"
        print(f"zstream does not import: {results['zstream_error']}", flush=True)
        zstream = None
    pass_s: dict[str, float] = {}  # seconds of one pass, per reader, learnt as the sweep goes
    for cfg in configs(args) if zstream else []:
        entry = dict(cfg)
        elapsed = time.perf_counter() - t_start
        repeats = args.repeats
        guess = pass_s.get(cfg["reader"], max(pass_s.values(), default=0.0))
        if guess:
            fit = int((args.budget_s - elapsed) // (guess * 1.2 + 0.5))  # slack: smaller qds run slower
            if fit < 1:
                entry["skipped"] = f"budget: {elapsed:.0f} s of {args.budget_s:.0f} s spent"
                results["zstream"].append(entry)
                continue
            repeats = min(repeats, fit)
        run_args = (zstream, path, groups, cfg, repeats, args.inflight, args.pin, try_global)
        try:
            if args.no_isolate or args.pin:  # pinning initialises CUDA, which must not be forked across
                r = run_zstream(*run_args)
            else:
                # A hang is cut at 5x the expected time (3 minutes while nothing is known yet).
                r = in_child(run_zstream, 30 + 5 * repeats * guess if guess else 180, *run_args)
            entry.update(r)
            if "runs_GB/s" in r:
                worst = data_bytes / GB / min(r["runs_GB/s"])
                pass_s[cfg["reader"]] = max(pass_s.get(cfg["reader"], 0.0), worst)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        results["zstream"].append(entry)
        line = entry.get("GB/s", entry.get("error"))
        print(f"  {label(cfg):<34} {line}", flush=True)
        save()

    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_table(results)
    save()
    if args.json:
        print(f"results: {args.json}")
    return 0


def label(cfg: dict[str, Any]) -> str:
    parts = [cfg["reader"]]
    if cfg.get("queue_depth"):
        parts.append(f"qd={cfg['queue_depth']}")
    if cfg.get("chunk_size"):
        parts.append(f"chunk={fmt_size(cfg['chunk_size'])}")
    if cfg.get("threads"):
        parts.append(f"threads={cfg['threads']}")
    return " ".join(parts)


def print_table(results: dict[str, Any]) -> None:
    fio = results["fio"]
    ref = fio.get("io_uring_qd64", {}).get("GB/s")
    ref_psync = fio.get("psync_x8", {}).get("GB/s")
    rows = [("reader", "qd", "chunk", "threads", "GB/s", "% fio", "runs GB/s / note")]
    for key, r in fio.items():
        gbs = r.get("GB/s")
        engine, jobs, extra = FIO_RUNS[key]
        rows.append((f"fio {engine}{' ' + ' '.join(extra) if extra else ''}", "64" if jobs == 1 else "-", "1M",
                     str(jobs), f"{gbs:.2f}" if gbs else "-", f"{100 * gbs / ref:.0f}%" if gbs and ref else "-",
                     r.get("error", "")[:70]))
    for e in results["zstream"]:
        gbs = e.get("GB/s")
        # pread against fio's psync pool as well as against fio io_uring.
        pct = f"{100 * gbs / ref:.0f}%" if gbs and ref else "-"
        if e["reader"] == "pread" and gbs and ref_psync:
            pct += f" ({100 * gbs / ref_psync:.0f}% psync)"
        note = e.get("error") or e.get("skipped") or " ".join(f"{x:.2f}" for x in e.get("runs_GB/s", []))
        rows.append((e["reader"], str(e.get("queue_depth") or "-"),
                     fmt_size(e["chunk_size"]) if e.get("chunk_size") else "-", str(e.get("threads") or "-"),
                     f"{gbs:.2f}" if gbs else "-", pct, note[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    m = results["machine"]
    direct = next((e["direct"] for e in results["zstream"] if e.get("direct") is not None), "?")
    print(f"\n{results['file_bytes'] / GIB:.2f} GiB file on {m.get('fs_device', '?')} ({m.get('fstype', '?')}, "
          f"{m.get('model', 'model ?')}); O_DIRECT accepted: {direct}; inflight {results['inflight']}; "
          f"cache drop: {results['cache_drop']}; wall {results.get('wall_s')} s")


if __name__ == "__main__":
    sys.exit(main())
