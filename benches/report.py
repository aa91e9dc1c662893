"""Combine one card-and-date's raw GPU results into one JSON file and draw the two figures of the docs.

    python3 benches/report.py                     # the H100 run of 2026-11-26 (the defaults below)
    python3 benches/report.py --no-plots          # the JSON only (no matplotlib needed)

Inputs, under benches/results/raw/ (``PREFIX`` = ``h100-2026-11-26``):
  * ``PREFIX-run8-bench_cpu.json``, ``PREFIX-run8-bench_budget.json``, ``PREFIX-bench_none.json`` and every
    ``PREFIX-run*-bench_*.json``: zstream rows (``{"meta": ..., "rows": [...]}``, written by ``zstream bench``);
  * ``PREFIX-run8-peers.jsonl`` and every ``PREFIX-run*-peers.jsonl``: one JSON object a line, systems
    ``gpu`` (everything on the GPU, transformers), ``deepspeed``, ``accelerate``; they give ``peak_gpu_gib``.
Rows are deduplicated by (model, system, offload, batch, gpu_memory); the highest run number wins (a file without
``-runN-`` counts as run 0). The model is part of the key because a run may bench another model with the same
settings (run9's bench_llama: llama-2-7b next to bloom-7b1). Peer lines carry no model: they ran on the checkpoint
of the main cpu bench (``gpu_session.sh peers``: bloom-7b1), whose meta names it.

Outputs:
  * ``benches/results/PREFIX.json``: a list of rows (model, system, offload, batch, gpu_memory, prompt, gen,
    prefill_s, decode_step_s, bound_step_s, tokens_per_s, peak_gpu_bytes, load_s, source, ...). ``bound_step_s``
    is the link bound of the bytes a step streams (zstream rows that stream; null elsewhere, peers included);
  * ``docs/img/decode_step_vs_batch.png``: decode step time against batch, zstream / peers / bound / all-on-GPU;
  * ``docs/img/trace_blocks.png``: six consecutive blocks from the middle of the first traced decode step of
    ``PREFIX-run8-trace_cpu.json``, per track, plus the copy stream's busy fraction over the whole trace.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
RAW = ROOT / "benches" / "results" / "raw"
PREFIX = "h100-2026-11-26"
BENCH_FILES = ["run8-bench_cpu.json", "run8-bench_budget.json", "bench_none.json"]
PEER_FILES = ["run8-peers.jsonl"]
TRACE_FILE = "run8-trace_cpu.json"
KEEP = ["model", "system", "offload", "batch", "gpu_memory", "prompt", "gen", "prefill_s", "decode_step_s",
        "bound_step_s", "pct_of_bound", "tokens_per_s", "peak_gpu_bytes", "load_s", "streamed_bytes", "streamed_blocks",
        "resident_blocks", "bound_gbps", "card", "date", "source", "run", "weights", "unquantized_bytes_per_step"]
TRACKS = {1: "disk read", 2: "host -> device copy", 3: "block compute", 4: "python CPU thread"}


def run_number(name: str) -> int:
    m = re.search(r"-run(\d+)-", name)
    return int(m.group(1)) if m else 0


def _input_files(raw: Path, prefix: str) -> Tuple[List[Path], List[Path]]:
    bench = {raw / f"{prefix}-{f}" for f in BENCH_FILES}
    # "quick" runs (gen 8, a smoke test of a final build) check a build; they do not replace the full runs' rows
    bench |= {Path(p) for p in glob.glob(str(raw / f"{prefix}-run*-bench_*.json")) if "_quick" not in p}
    peers = {raw / f"{prefix}-{f}" for f in PEER_FILES}
    peers |= {Path(p) for p in glob.glob(str(raw / f"{prefix}-run*-peers.jsonl"))}
    missing = [p.name for p in bench | peers if not p.exists()]
    if missing:
        raise SystemExit(f"missing raw result files: {', '.join(sorted(missing))}")
    return sorted(bench), sorted(peers)


def weights_of(r: Dict[str, Any]) -> str:
    """"fp16", "int8" or "int4": zstream rows say ``quantize`` ("int4, group 64, asymmetric"), the peer runner
    ``quant_bits``."""
    if r.get("quantize"):
        return str(r["quantize"]).split(",")[0]
    if r.get("quant_bits"):
        return f"int{r['quant_bits']}"
    return "fp16"


def _bench_rows(path: Path) -> List[Dict[str, Any]]:
    d = json.loads(path.read_text())
    meta = d.get("meta", {})
    out = []
    for r in d["rows"]:
        row = {k: r.get(k) for k in KEEP}
        row.update(model=_model_name(meta.get("model", "?")), card=meta.get("card"), date=meta.get("date"),
                   weights=weights_of(r))
        out.append(row)
    return out


def _peer_rows(path: Path, card: Optional[str], model: Optional[str]) -> List[Dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        row = {k: r.get(k) for k in KEEP}
        row["weights"] = weights_of(r)
        if r["system"] == "gpu":
            row["offload"] = "none"  # the runner writes its --offload default on every row; "gpu" offloads nothing
        gib = r.get("peak_gpu_gib")
        row.update(model=r.get("model", model), peak_gpu_bytes=None if gib is None else round(gib * 2**30),
                   bound_step_s=None, pct_of_bound=None, card=card, date=None)
        out.append(row)
    return out


def combine(raw: Path = RAW, prefix: str = PREFIX) -> List[Dict[str, Any]]:
    """Every row of ``prefix``'s raw files, one per (system, offload, batch, gpu_memory), highest run first."""
    bench, peers = _input_files(raw, prefix)
    rows: List[Dict[str, Any]] = []
    for p in bench:
        for r in _bench_rows(p):
            r.update(source=p.name, run=run_number(p.name))
            rows.append(r)
    _, card, _, model = _main_meta(raw, prefix)
    for p in peers:
        for r in _peer_rows(p, card, model):
            r.update(source=p.name, run=run_number(p.name))
            rows.append(r)
    best: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["system"], r["weights"], r["offload"], r["batch"], r["gpu_memory"])
        old = best.get(key)
        if old is not None and old["run"] == r["run"]:
            raise SystemExit(f"{key} appears twice in run {r['run']}: {old['source']} and {r['source']}")
        if old is None or r["run"] > old["run"]:
            best[key] = r
    order = {"zstream": 0, "gpu": 1, "deepspeed": 2, "accelerate": 3}
    return sorted(best.values(), key=lambda r: (r["model"] != model, r["model"], r["weights"] != "fp16",
                                                r["weights"], order.get(r["system"], 9), r["offload"],
                                                _budget_bytes(r["gpu_memory"]), r["batch"]))


def _model_name(path: str) -> str:
    """The bench's model: a packed checkpoint (".../packed/bloom-7b1-int4") counts as its source model."""
    return re.sub(r"-int[48]$", "", Path(path).name)


def _budget_bytes(s: Optional[str]) -> float:
    """"8GiB" -> bytes, for sorting; no budget (every block streamed) first."""
    if s is None:
        return -1.0
    m = re.fullmatch(r"([0-9.]+)\s*([KMGT]?)i?B?", str(s))
    return float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_") if m else float("inf")


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"{'model':11} {'system':10} {'weights':7} {'offload':7} {'gpu_memory':10} {'batch':>5} {'step ms':>8} "
          f"{'bound ms':>8} {'tok/s':>8} {'peak GiB':>8}  source")
    for r in rows:
        bound = "" if r["bound_step_s"] is None else f"{r['bound_step_s'] * 1e3:8.1f}"
        peak = "" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**30:8.2f}"
        print(f"{r['model']:11} {r['system']:10} {r['weights']:7} {r['offload']:7} {r['gpu_memory'] or '-':10} "
              f"{r['batch']:5d} "
              f"{r['decode_step_s'] * 1e3:8.1f} {bound:>8} {r['tokens_per_s']:8.1f} {peak:>8}  {r['source']}")


# --- figures ---------------------------------------------------------------------------------------------------
def _main_meta(raw: Path, prefix: str) -> Tuple[Dict[str, Any], str, str, str]:
    """(meta, card, date, model name) of the main cpu bench, the run the peers and the trace belong to."""
    meta = json.loads((raw / f"{prefix}-{BENCH_FILES[0]}").read_text()).get("meta", {})
    return meta, meta.get("card", prefix), (meta.get("date") or "")[:10], Path(meta.get("model", "?")).name


def plot_decode(rows: List[Dict[str, Any]], out: Path, raw: Path = RAW, prefix: str = PREFIX) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, card, date, model = _main_meta(raw, prefix)
    rows = [r for r in rows if r["model"] == model]  # the peers' model only

    def pick(system: str, offload: str, field: str = "decode_step_s",
             weights: str = "fp16") -> Tuple[List[int], List[float]]:
        pts = sorted((r["batch"], r[field]) for r in rows if r["system"] == system and r["offload"] == offload
                     and r["gpu_memory"] is None and r[field] is not None and r["weights"] == weights)
        return [b for b, _ in pts], [v * 1e3 for _, v in pts]

    series = [  # label, (batches, ms), style
        ("Accelerate (cpu offload)", pick("accelerate", "cpu"), dict(color="tab:red", marker="s")),
        ("DeepSpeed ZeRO-Inference (cpu offload)", pick("deepspeed", "cpu"), dict(color="tab:orange", marker="D")),
        ("zstream (cpu offload, every block streamed)", pick("zstream", "cpu"),
         dict(color="tab:blue", marker="o", linewidth=2.5)),
        ("PCIe bound of the streamed bytes (pinned H2D)", pick("zstream", "cpu", "bound_step_s"),
         dict(color="black", linestyle="--", marker="")),
        ("everything on the GPU (transformers)", pick("gpu", "none"), dict(color="tab:green", marker="^")),
        ("DeepSpeed ZeRO-Inference, 4-bit weights (cpu offload)", pick("deepspeed", "cpu", weights="int4"),
         dict(color="tab:orange", marker="D", linestyle=":")),
        ("zstream, int4 weights (cpu offload, every block streamed)", pick("zstream", "cpu", weights="int4"),
         dict(color="tab:purple", marker="o", linewidth=2.5)),
        ("PCIe bound of the int4 streamed bytes", pick("zstream", "cpu", "bound_step_s", weights="int4"),
         dict(color="gray", linestyle="--", marker="")),
    ]
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    for label, (xs, ys), style in series:
        if not xs:
            continue
        ax.plot(xs, ys, label=label, markersize=7, **{"linewidth": 1.8, "zorder": 3, **style})
        below = style.get("linestyle") == "--"  # the bound's numbers go under the line, zstream's above it
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f}" if y >= 10 else f"{y:.1f}", (x, y), textcoords="offset points",
                        xytext=(7, -12 if below else 4), fontsize=8, color=style["color"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({b for _, (xs, _), _ in series for b in xs})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlim(batches[0] / 1.5, batches[-1] * 1.8)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode step time, ms (log)")
    ys = [y for _, (_, v), _ in series for y in v]
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
             if min(ys) / 2 <= t <= max(ys) * 2]
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title(f"Decode step vs batch: {model}, prompt 512\n{card}, {date}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load_trace(path: Path) -> Tuple[Dict[int, List[Dict[str, Any]]], Dict[int, str]]:
    d = json.loads(path.read_text())
    names = {e["tid"]: e["args"]["name"] for e in d["traceEvents"] if e.get("ph") == "M"}
    tracks: Dict[int, List[Dict[str, Any]]] = {}
    for e in d["traceEvents"]:
        if e.get("ph") == "X":
            tracks.setdefault(e["tid"], []).append(e)
    for evs in tracks.values():
        evs.sort(key=lambda e: e["ts"])
    return tracks, names


def copy_busy_fraction(tracks: Dict[int, List[Dict[str, Any]]]) -> Tuple[float, float, float]:
    """(busy fraction, copy time us, span us) of the host->device copy track over the whole trace."""
    copies = tracks.get(2, [])
    busy = sum(e["dur"] for e in copies)
    span = max(e["ts"] + e["dur"] for e in copies) - min(e["ts"] for e in copies)
    return busy / span, busy, span


def plot_trace(path: Path, out: Path, nblocks: int = 6, card: str = "", date: str = "",
               block_bytes: Optional[float] = None) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks, thread_names = load_trace(path)
    frac, busy, span = copy_busy_fraction(tracks)
    copies, computes, cpu = tracks.get(2, []), tracks.get(3, []), tracks.get(4, [])
    t0 = min(e["ts"] for evs in tracks.values() for e in evs)
    # The first traced step: from the python thread's first "block 0" to its second.
    starts = [e["ts"] for e in cpu if e["name"] == "block 0"]
    step_end = starts[1] if len(starts) > 1 else float("inf")
    step = [e for e in computes if e["ts"] < step_end]
    mid = len(step) // 2 - nblocks // 2
    chosen = step[mid:mid + nblocks]
    feeds = []  # the copy that fed each chosen compute: same block, the latest to end before it starts
    for c in chosen:
        before = [e for e in copies if e["name"] == c["name"] and e["ts"] + e["dur"] <= c["ts"] + 50]
        if before:
            feeds.append((before[-1], c))
    lo = min([c["ts"] for c in chosen] + [f["ts"] for f, _ in feeds]) - 500
    hi = max(c["ts"] + c["dur"] for c in chosen) + 500
    ms = lambda t: (t - t0) / 1e3  # noqa: E731

    durs = [e["dur"] / 1e3 for e in copies]
    cdur = [e["dur"] / 1e3 for e in step]
    print(f"trace {path.name}: {len(copies)} copies, median {statistics.median(durs):.3f} ms; "
          f"compute median {statistics.median(cdur):.3f} ms/block")
    if block_bytes:
        print(f"  copy rate: {block_bytes / statistics.median(durs) / 1e6:.1f} GB/s "
              f"({block_bytes / 1e6:.1f} MB a block)")
    print(f"  copy stream busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms (first copy start to last copy end): "
          f"{frac * 100:.2f}%")
    gaps = [max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(copies, copies[1:])]
    print(f"  gaps between copies: median {statistics.median(gaps):.1f} us, max {max(gaps) / 1e3:.2f} ms")

    fig, ax = plt.subplots(figsize=(10, 3.9), dpi=110)
    rows_y = {4: 3, 3: 2, 2: 1, 1: 0}
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:orange", 4: "tab:green"}
    h = 0.6
    for tid, y in rows_y.items():
        evs = [e for e in tracks.get(tid, []) if e["ts"] < hi and e["ts"] + e["dur"] > lo]
        if evs:
            ax.broken_barh([(ms(e["ts"]), e["dur"] / 1e3) for e in evs], (y - h / 2, h),
                           facecolors=colors[tid], edgecolors="white", linewidth=0.8)
        for e in evs:
            x0, w = max(ms(e["ts"]), ms(lo)), min(ms(e["ts"] + e["dur"]), ms(hi)) - max(ms(e["ts"]), ms(lo))
            n = e["name"].split()[-1]
            if tid == 2 and w > 3:
                ax.text(x0 + w / 2, y, f"copy block {n}\n{e['dur'] / 1e3:.2f} ms", ha="center", va="center",
                        fontsize=8, color="white")
            elif tid == 3:
                ax.text(ms(e["ts"]) + e["dur"] / 2e3, y + h / 2 + 0.05, n, ha="center", va="bottom", fontsize=8)
        if not evs:
            if tid == 1:
                why = "no disk reads: offload=cpu keeps every block in pinned host memory"
            elif tid == 4 and cpu:
                first = [e for e in cpu if e["ts"] < step_end]
                done = ms(max(e["ts"] + e["dur"] for e in first)) - ms(first[0]["ts"])
                why = (f"idle here: it launched all {len(first)} blocks of the step within {done:.1f} ms "
                       f"of its start, running ahead of the GPU")
            else:
                why = "no events in this window"
            ax.text(ms(lo) + 0.3, y, why, va="center", fontsize=8.5, color="dimgray", style="italic")
    for f, c in feeds:  # the compute of block N waits for the end of copy N
        ax.annotate("", xy=(ms(c["ts"]), 2 - h / 2), xytext=(ms(f["ts"] + f["dur"]), 1 + h / 2),
                    arrowprops=dict(arrowstyle="->", color="black", lw=0.9))
    ax.set_yticks(list(rows_y.values()))
    ax.set_yticklabels([f"{TRACKS[t]}\n({thread_names.get(t, '').split('(')[-1].rstrip(')') or '-'})"
                        if "(" in thread_names.get(t, "") else TRACKS[t] for t in rows_y], fontsize=8.5)
    ax.set_ylim(-0.6, 3.6)
    ax.set_xlim(ms(lo), ms(hi))
    ax.set_xlabel("time since the start of the trace, ms")
    names = [c["name"].split()[-1] for c in chosen]
    ax.set_title(f"zstream, offload=cpu, batch 1, decode step 1: blocks {names[0]}-{names[-1]} of {len(step)} "
                 f"({card}, {date})\ncopy stream busy {frac * 100:.1f}% of the traced span "
                 f"({busy / 1e3:.1f} of {span / 1e3:.1f} ms): copies back to back, each compute waits for its "
                 "copy", fontsize=9.5)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return frac


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, default=RAW)
    p.add_argument("--prefix", default=PREFIX, help="card-date prefix of the raw files (h100-2026-11-26)")
    p.add_argument("--out", type=Path, default=None, help="combined JSON (default: benches/results/PREFIX.json)")
    p.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)

    rows = combine(a.raw, a.prefix)
    out = a.out or a.raw.parent / f"{a.prefix}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({len(rows)} rows)")
    for r in rows:
        if r["system"] == "zstream" and r["pct_of_bound"] is not None:
            print(f"  {r['model']} zstream {r['offload']} {r['gpu_memory'] or 'every block streamed'} "
                  f"batch {r['batch']}: "
                  f"{r['pct_of_bound']:.1f}% of the bound")
    if a.no_plots:
        return 0
    _, card, date, model = _main_meta(a.raw, a.prefix)
    img = a.img / "decode_step_vs_batch.png"
    plot_decode(rows, img, a.raw, a.prefix)
    print(f"wrote {img.relative_to(ROOT) if img.is_relative_to(ROOT) else img}")
    streamed = [r for r in rows if r["model"] == model and r["system"] == "zstream" and r["offload"] == "cpu"
                and r["gpu_memory"] is None]
    block_bytes = streamed[0]["streamed_bytes"] / streamed[0]["streamed_blocks"] if streamed else None
    img = a.img / "trace_blocks.png"
    plot_trace(a.raw / f"{a.prefix}-{TRACE_FILE}", img, card=card, date=date, block_bytes=block_bytes)
    print(f"wrote {img.relative_to(ROOT) if img.is_relative_to(ROOT) else img}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
