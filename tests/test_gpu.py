"""GPU checks: pinning through torch's CUDA runtime, the device ring, fp16 parity. Skipped without CUDA; run on
the GPU machine with ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import zstream
from zstream.api import synthetic

from resident import ResidentModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_arenas_are_pinned_through_the_loaded_runtime(tmp_ckpt):
    ref = {"x": torch.randn(1 << 20), "y": torch.arange(7)}
    save_file(ref, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, pin=True)
    assert store.pinned
    got = store.read(["x", "y"])
    assert got["x"].is_pinned() and torch.equal(got["x"], ref["x"])
    flat = store.read_flat(["x"])
    dev = flat.buffer.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(flat.view(dev)["x"].cpu(), ref["x"])
    with store.fetch(["x"]) as t:
        assert t.wait()["x"].is_pinned()


def test_mapped_arena_reads_from_a_kernel(tmp_ckpt):
    """A mapped arena exported as a CUDA DLPack tensor: kernels read host memory in place (the ats mode)."""
    ref = torch.randn(4096, 512, dtype=torch.float16)
    save_file({"w": ref}, tmp_ckpt / "m.safetensors")
    store = zstream.WeightStore.open(tmp_ckpt, pin=True, mapped=True)
    capsule, offsets, err, _ = store._core.read_flat(["w"], device_type=zstream._core.KDL_CUDA, device_id=0)
    assert err is None
    flat = torch.from_dlpack(capsule)
    assert flat.is_cuda
    w = flat[offsets[0]:offsets[0] + ref.numel() * 2].view(torch.float16).view(ref.shape)
    x = torch.randn(3, 4096, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(x @ w, x @ ref.cuda(), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_streaming_matches_resident_in_fp16(tmp_path, preset):
    path = synthetic.make_checkpoint(preset, tmp_path / preset, dtype=torch.float16, progress=False)
    ref = ResidentModel(path, dtype=torch.float16, device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 250, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    real = mask.bool().cuda()
    want = ref(ids, mask).float()
    baseline = zstream.load(path, offload="none", device="cuda", progress=False)
    # fp16, and different attention kernels (zstream keeps cuDNN attention out): rounding-level differences.
    torch.testing.assert_close(baseline(ids, mask).float()[real], want[real], rtol=1e-2, atol=1e-2)
    want_tokens = baseline.generate(ids, max_new_tokens=24, attention_mask=mask)
    for offload, kw in [("cpu", {"max_resident_blocks": 0}), ("cpu", {"max_resident_blocks": 1}),
                        ("nvme", {"max_resident_blocks": 0}), ("nvme", {"max_resident_blocks": 0, "prefetch": 1})]:
        model = zstream.load(path, offload=offload, device="cuda", progress=False, **kw)
        assert model.plan.streamed_blocks
        got = model(ids, mask).float()
        # Same kernels on the same aligned bytes as the resident baseline: identical results.
        torch.testing.assert_close(got[real], baseline(ids, mask).float()[real], rtol=0, atol=0,
                                   msg=f"{offload} {kw}")
        for _ in range(2):  # twice: the ring carries over between passes and calls
            assert torch.equal(model.generate(ids, max_new_tokens=24, attention_mask=mask), want_tokens), (offload, kw)
        model.close()


def test_fp16_parity_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float16, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
    ids = torch.randint(0, 250, (2, 33))
    model = zstream.load(path, offload="cpu", device="cuda", max_resident_blocks=0, progress=False)
    with torch.no_grad():
        want = hf(ids.cuda()).logits.float()
    got = model(ids).float()
    err = (got - want).abs().max().item()
    assert err < 2e-2, err


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-llama"])
def test_ats_reads_weights_in_place(tmp_path, preset):
    """offload='ats' on a GPU without ATS: mapped pinned memory read by the kernels; passes past the crossover
    copy through the ring and match the resident baseline exactly."""
    path = synthetic.make_checkpoint(preset, tmp_path / preset, dtype=torch.float16, progress=False)
    baseline = zstream.load(path, offload="none", device="cuda", progress=False)
    ids = torch.randint(0, 250, (2, 13))
    want = baseline(ids).float()
    def ats(copy_from_tokens: int):
        return zstream.load(path, offload="ats", device="cuda", progress=False, prefetch=1,
                            copy_from_tokens=copy_from_tokens)

    with ats(10**9) as in_place:  # reads in place only
        assert in_place.plan.offload == "ats" and in_place.plan.link_gbps > 0
        torch.testing.assert_close(in_place(ids).float(), want, rtol=1e-2, atol=1e-2)
    with ats(1) as copying:  # the copy path only
        torch.testing.assert_close(copying(ids).float(), want, rtol=0, atol=0)
    with ats(16) as both:  # prefill copies, decode reads in place
        out = both.generate(ids, max_new_tokens=8, eos_token_id=None)
    assert out.shape == (2, 21)
    assert torch.equal(out[:, :13].cpu(), ids)


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_streaming_on_the_gpu_matches_the_cpu(tmp_path, preset, quantize):
    """Quantized on the GPU at load, streamed through the ring, dequantized by the Triton kernel: the same logits
    (fp32 compute) as the CPU path that CI tests, and a packed checkpoint streamed from disk gives the same."""
    path = synthetic.make_checkpoint(preset, tmp_path / "m", dtype=torch.float32, progress=False)
    ids = torch.randint(3, 200, (2, 9))
    kw = {"quantize": quantize, "group_size": 32, "dtype": torch.float32, "progress": False}
    cpu = zstream.load(path, offload="none", device="cpu", **kw)
    want = cpu(ids)
    gpu = zstream.load(path, offload="cpu", device="cuda", max_resident_blocks=0, **kw)
    assert gpu.plan.streamed_blocks and gpu.quant == cpu.quant
    torch.testing.assert_close(gpu(ids).cpu(), want, rtol=1e-4, atol=1e-4)
    packed = zstream.pack(path, tmp_path / "packed", quantize=quantize, group_size=32, progress=False)
    nvme = zstream.load(packed, offload="nvme", device="cuda", max_resident_blocks=0, dtype=torch.float32,
                        progress=False)
    torch.testing.assert_close(nvme(ids).cpu(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(nvme.generate(ids, max_new_tokens=8), gpu.generate(ids, max_new_tokens=8))


_TP_SCRIPT = """
import sys, torch, torch.distributed as dist, zstream
dist.init_process_group("gloo")  # NCCL refuses two ranks on one GPU; gloo moves CUDA tensors through the host
path, out, ids = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
with zstream.load(path, device="cuda:0", offload="cpu", max_resident_blocks=0, dtype="float32",
                  progress=False) as model:
    assert model.plan.ranks == 2 and model.plan.device == "cuda:0"
    logits = model(ids).cpu()
    tokens = model.generate(ids, max_new_tokens=16, do_sample=False).cpu()
    torch.save((logits, tokens, model.plan.streamed_bytes), f"{out}.{model.plan.rank}")
"""


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-llama"])
def test_tensor_parallel_cuda_paths_under_torchrun(tmp_path, preset):
    """Two ranks started by torchrun, sharing the one GPU over gloo: the CUDA paths of a sharded load (pieces cut
    into pinned arenas, streamed through the ring, all-reduced) give one process's logits and tokens."""
    import subprocess
    import sys

    path = synthetic.make_checkpoint(preset, tmp_path / preset, dtype=torch.float32, progress=False)
    ids = torch.randint(4, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "rank.py").write_text(_TP_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "rank.py"), str(path), str(tmp_path / "out"), str(tmp_path / "ids.pt")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    with zstream.load(path, device="cuda:0", offload="cpu", max_resident_blocks=0, dtype="float32",
                      progress=False) as model:
        logits = model(ids).cpu()
        tokens = model.generate(ids, max_new_tokens=16, do_sample=False).cpu()
        whole = model.plan.streamed_bytes
    for rank in range(2):
        r_logits, r_tokens, streamed = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(r_logits, logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(r_tokens, tokens)
        assert whole / 2 <= streamed < whole * 0.6


@pytest.mark.parametrize("kv", ["host", "host-compute"])
def test_host_kv_cache_on_the_gpu(tmp_path, kv):
    """kv_offload on the GPU: the cache in pinned host memory; "host" brings each layer's up and changes no bit,
    "host-compute" attends over the prompt on the device (no bit changes) and over the cache on the CPUs (other
    arithmetic: a step's logits agree to rounding)."""
    path = synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float16, progress=False)
    ids = torch.randint(4, 250, (3, 11), generator=torch.Generator().manual_seed(0))
    kw = {"device": "cuda", "offload": "cpu", "max_resident_blocks": 0, "progress": False}
    with zstream.load(path, **kw) as plain, zstream.load(path, kv_offload=kv, **kw) as host:
        cache = host.new_cache(3, 20)
        assert (cache.k_cpu if kv == "host-compute" else cache.k_host).is_pinned() and cache.device_layers == 0
        if kv == "host":  # the layers' caches come up ahead, on their own stream
            assert torch.equal(host(ids), plain(ids))
            assert torch.equal(host.generate(ids, max_new_tokens=16, do_sample=False),
                               plain.generate(ids, max_new_tokens=16, do_sample=False))
            with zstream.load(path, kv_offload=kv, micro_batch=2, **kw) as micro:  # rows 0-1, then row 2
                tokens = micro.generate(ids, max_new_tokens=16, do_sample=False)
                for rows in (slice(0, 2), slice(2, 3)):
                    assert torch.equal(tokens[rows], plain.generate(ids[rows], max_new_tokens=16, do_sample=False))
        else:  # the prompt attends on the device (the same bits); later tokens on the CPUs (the same to rounding)
            assert torch.equal(host(ids), plain(ids))
            ones = torch.ones(3, 11, dtype=torch.long, device="cuda")  # the new tokens' attention mask
            steps, caches = [], []
            for model in (host, plain):
                caches.append(model.new_cache(3, 20))
                model.forward(ids.cuda(), ones, caches[-1])
                steps.append(model.forward(ids[:, :1].cuda(), ones[:, :1], caches[-1]))
            torch.testing.assert_close(steps[0].float(), steps[1].float(), rtol=2e-2, atol=2e-2)
            up = caches[0]._up  # the CPUs' output came up through the mapped buffer, read in place by a kernel
            assert up.mapped is not None and up.mapped.device.type == "cuda" and up.host.is_pinned()


@pytest.mark.parametrize("preset", ["tiny-bloom", "tiny-llama", "tiny-opt"])
def test_decode_steps_replay_one_cuda_graph(tmp_path, preset):
    """Every block resident, the cache on the device: by default decode steps replay a CUDA graph recorded at the
    first one, and give the eager steps' (cuda_graphs=False) tokens (greedy, left-padded) and logits to fp16
    rounding; the graph's cache slots are the eager ones."""
    from zstream.planning.residency import GRAPH_MIN_STEPS

    from tiny_models import padded_batch

    path = synthetic.make_checkpoint(preset, tmp_path / "m", dtype=torch.float16, progress=False)
    ids, mask = padded_batch(vocab=250, lengths=(11, 7, 4))
    kw = {"device": "cuda", "offload": "none", "progress": False}
    new = GRAPH_MIN_STEPS + 8  # new tokens: enough steps for a graph
    with zstream.load(path, **kw) as graphed, zstream.load(path, cuda_graphs=False, **kw) as eager:
        assert graphed.plan.decode_graph and not eager.plan.decode_graph
        assert "CUDA graph" in graphed.plan.summary()
        tokens = graphed.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)  # (3, 11 + new)
        assert graphed._graph is not None and graphed._graph.graph is not None  # recorded, and replayed
        # each new token is the eager model's greedy choice after the tokens before it, but where its two best
        # logits are within fp16 rounding of each other (random weights: near ties; another kernel may pick either)
        full = torch.cat([mask, torch.ones(3, new, dtype=torch.long)], dim=1).to(tokens.device)
        logits = eager(tokens, full).float()[:, 10:-1]                  # (3, new, vocab): before each new token
        chosen = logits.gather(-1, tokens[:, 11:, None])[..., 0]        # (3, new)
        assert bool((logits.max(-1).values - chosen <= 2e-2).all())
        caches = [m.new_cache(3, 11 + new) for m in (graphed, eager)]
        nxt = None
        for step in range(12):
            args = (ids, mask) if step == 0 else (nxt, torch.ones(3, 1, dtype=torch.long))
            got, want = (m.forward(*args, c, last_only=True) for m, c in zip((graphed, eager), caches))
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
            nxt = want[:, -1].argmax(-1, keepdim=True)
        assert graphed._graph is not None and graphed._graph.fits(caches[0])  # these steps replayed its graph
        n = caches[1].length
        torch.testing.assert_close(caches[0].k[..., :n, :], caches[1].k[..., :n, :], rtol=1e-2, atol=1e-2)


def test_recording_more_decode_graphs_holds_no_more_memory(tmp_path):
    """Each decode graph is recorded on the device's one recording stream, so recording more of them (a new cache
    each) leaves the memory torch holds allocated where the first left it. On a stream a recording, each held one more
    cuBLAS workspace for the life of the process: 33 MiB a recording on the H200 (runs 3-6 of 2026-12-05)."""
    from zstream.planning.residency import GRAPH_MIN_STEPS

    path = synthetic.make_checkpoint("tiny-llama", tmp_path / "m", dtype=torch.float16, progress=False)
    ids = torch.randint(5, 250, (2, 6))
    ones = torch.ones_like(ids)
    with zstream.load(path, device="cuda", offload="none", cuda_graphs=True, progress=False) as model:
        def record() -> None:
            cache = model.new_cache(2, 6 + GRAPH_MIN_STEPS + 4)
            model.forward(ids, ones, cache, last_only=True)                       # the prompt, eagerly
            model.forward(ids[:, :1], ones[:, :1], cache, last_only=True)         # the first step records
            assert model._graph is not None and model._graph.graph is not None
            model._graph = None                                                   # the graph and its cache let go
            torch.cuda.synchronize()

        record()
        held = torch.cuda.memory_allocated()
        for _ in range(4):
            record()
        assert torch.cuda.memory_allocated() == held


def test_lossless_kernel_on_the_gpu_bit_for_bit():
    """The compiled kernel on real shapes and on the awkward ones: several tensors in one launch, runs cut short at
    the end, an output view that is not 8-byte aligned (the kernel writes int64s: it must go through a copy)."""
    from zstream.foundations.lossless import encode, kernels

    g = torch.Generator().manual_seed(0)
    cases = (((4096, 1024), torch.bfloat16), ((1000, 333), torch.bfloat16), ((77,), torch.float16),
             ((5, 4099), torch.float16))
    ws = [(0.02 * torch.randn(*shape, generator=g)).to(dtype) for shape, dtype in cases]
    coded = [encode(w) for w in ws]
    coded = [c.to("cuda") for c in coded]
    outs = [torch.empty(w.shape, dtype=w.dtype, device="cuda") for w in ws[:3]]
    outs.append(torch.empty(ws[3].numel() + 1, dtype=ws[3].dtype, device="cuda")[1:].view(ws[3].shape))
    kernels.decode_many(coded, outs)
    for w, o in zip(ws, outs):
        assert torch.equal(o.cpu().view(torch.int16), w.view(torch.int16))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bloom"])
def test_lossless_blocks_decode_on_the_gpu_bit_for_bit(tmp_path, preset):
    """compress='lossless' on the GPU: blocks cross the link coded, the Triton kernel decodes them in the slot, and
    the logits and tokens are those of the uncompressed model, bit for bit (bf16 Llama, fp16 BLOOM)."""
    from zstream.foundations.lossless import kernels

    wide = {"hidden_size": 256, "intermediate_size": 512} if preset == "tiny-llama" else {"hidden_size": 192}
    dtype = torch.bfloat16 if preset == "tiny-llama" else torch.float16
    path = synthetic.make_checkpoint({**synthetic.PRESETS[preset], **wide}, tmp_path / preset, dtype=dtype,
                                     progress=False)
    ids = torch.randint(4, 250, (3, 11), generator=torch.Generator().manual_seed(0))
    kw = {"device": "cuda", "offload": "cpu", "max_resident_blocks": 0, "progress": False}
    with zstream.load(path, **kw) as plain, zstream.load(path, compress="lossless", **kw) as coded:
        assert kernels.backend(coded.device) == "triton"
        assert coded.plan.streamed_bytes < plain.plan.streamed_bytes
        assert torch.equal(coded(ids), plain(ids))
        assert torch.equal(coded.generate(ids, max_new_tokens=16, do_sample=False),
                           plain.generate(ids, max_new_tokens=16, do_sample=False))


def test_kv_shared_read_probe_times_the_link_and_the_cpus_at_once():
    """The calibration's shared-read probe on the GPU: the copies outlast its window (the link was busy throughout:
    its bytes are a rate near the link's, not a few chunks), the CPUs attended meanwhile, and the shared rate is the
    two together; a calibration with host-compute carries the median of its rounds."""
    from zstream.foundations.models import family_for
    from zstream.streaming import calibrate

    family = family_for(synthetic.PRESETS["opt-1.3b"])
    cm = calibrate.calibrate_compute(family, "cuda", torch.float16, max_batch=32, prompt=256, gen=8, rounds=3,
                                     kv_offloads=("host-compute",))
    shared = [s for s in cm.samples if s["phase"] == "shared"]
    assert len(shared) == 3 and all(s["link_busy"] for s in shared)  # the copies outlasted every window
    for s in shared:
        # both moved bytes meanwhile: the CPUs' calls did not wait for the link's queue to drain
        assert s["link_gbps"] > 0.5 * s["link_alone_gbps"] and s["cpu_gbps"] > 5
        assert s["gbps"] == pytest.approx(s["link_gbps"] + s["cpu_gbps"])
        assert s["link_gbps"] <= 1.05 * s["link_alone_gbps"]  # no more than the link moves alone
    assert cm.shared_read_gbps == sorted(s["gbps"] for s in shared)[1]


def test_the_copy_probe_times_a_pass_of_blocks_with_the_link_busy_throughout():
    """The calibration's copy probe on the GPU: a pass's blocks alone and beside queued copies, a round each, the
    copies at about the link's rate and outlasting the blocks (queued for twice their time and more); the factor is
    the medians' ratio and the model carries it."""
    from zstream.foundations.models import family_for
    from zstream.streaming import calibrate

    family = family_for(synthetic.PRESETS["opt-1.3b"])
    cm = calibrate.calibrate_compute(family, "cuda", torch.float16, max_batch=8, prompt=256, gen=8, rounds=3)
    rounds = [s for s in cm.samples if s["phase"] == "copy_busy"]
    assert len(rounds) == 3 and all(s["batch"] == 8 and s["context"] == 264 for s in rounds)
    for s in rounds:
        assert s["chunk_gbps"] > 5  # pinned: a rate of the link, not of pageable memory
        assert s["chunks"] * calibrate.COPY_PROBE_CHUNK_BYTES / (s["chunk_gbps"] * 1e9) > 1.5 * s["alone_s"]
        assert 0.5 * s["alone_s"] < s["beside_s"] < 2 * s["alone_s"]
    assert cm.copy_busy_factor == calibrate.copy_busy_factor(rounds) >= 1.0
