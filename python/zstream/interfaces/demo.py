"""``zstream demo``: the main job on an embedded default. A small random-weight BLOOM is written once (and rebuilt
when the cached copy is stale or incomplete), streamed from disk with ``offload="nvme"``, and the run reports
tokens/s against the limit measured in the same run, naming what limits it."""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from typing import Optional

import torch

from .args import cache_dir


def demo(*, preset: str, device: Optional[str], batch: int, max_new_tokens: int) -> int:
    from ..api import synthetic
    from ..api.load import load
    from .bench import limit_of

    path = cache_dir() / "demo" / preset
    if not synthetic.is_current(path, preset):
        if path.exists():
            print(f"{path} is from an older zstream or incomplete: writing it again")
            shutil.rmtree(path)
        print(f"writing a random-weight {preset} checkpoint to {path} (once)")
        synthetic.make_checkpoint(preset, path, dtype=torch.float16, progress=sys.stderr.isatty())
    with load(path, offload="nvme", device=device, max_resident_blocks=0, progress=False) as model:
        print(model.plan)
        base = ["The Grace Hopper superchip", "Streaming weights from disk"]
        prompts = [base[i % len(base)] for i in range(batch)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # said below, once, in plain words
            model.generate(prompts[:1], max_new_tokens=1, progress=False)  # warm-up: kernels, allocator, page tables
            waited0, t0 = model.waited_s, time.perf_counter()
            # Sampled: greedy decoding of random weights repeats the last token (a tied head reads its own embedding)
            texts = model.generate(prompts, max_new_tokens=max_new_tokens, do_sample=True, seed=0, progress=False)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            dt, waited = time.perf_counter() - t0, model.waited_s - waited0
        print("\nrandom weights: the text below is noise; the speed is real")
        for t in texts if isinstance(texts, list) else [texts]:
            print(repr(t[:160]))
        step_s = dt / max_new_tokens  # one forward pass per new token (the first one is the prefill)
        p = model.plan
        print(f"\n{len(prompts) * max_new_tokens / dt:.2f} tokens/s, {step_s * 1e3:.1f} ms per forward pass on "
              f"{model.device}")
        if p.link_gbps:
            moved = p.streamed_bytes / step_s / 1e9
            low, high = p.link_spread or (p.link_gbps, p.link_gbps)
            spread = f" (median of several samples: {low:.2f}-{high:.2f})"
            print(f"streamed {p.streamed_bytes / 1e9:.2f} GB per pass at {moved:.2f} GB/s: "
                  f"{100 * moved / p.link_gbps:.0f}% of the {p.link} limit measured in this run, "
                  f"{p.link_gbps:.2f} GB/s{spread}")
        limit, why = limit_of(model, step_s, waited / max_new_tokens)
        print(f"limited by: {limit} ({why})")
    return 0
