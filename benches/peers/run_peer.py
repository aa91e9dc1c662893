"""Run a peer offload system on a Hugging Face checkpoint and print one JSON line per batch size.

Peers: accelerate (device_map offload to CPU, or to disk with --offload disk) and deepspeed
(ZeRO-Inference: ZeRO-3 with offload_param to cpu, pinned, or to nvme with --offload nvme). Runs on the GPU machine.
DeepSpeed's nvme path JIT-builds its libaio op: unpack the libaio debs from deepspeed_wheels.sh into /tmp/aio and
export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=$LIBRARY_PATH.

  python3 run_peer.py --system deepspeed --model /root/bloom7b1 --batch 1,16 --prompt 512 --gen 32
  python3 run_peer.py --system deepspeed --quant-bits 4 --model /root/bloom7b1   # ZeRO-Inference's 4-bit weights

zstream's copy of the team runner (shared/peers/run_peer.py) with --quant-bits added: DeepSpeed's
weight_quantization.quantized_initialization (group-wise, asymmetric, group 64 along the input dimension), the
configuration of the ZeRO-Inference README and of shared/ANCHORS.md's 4-bit row.
"""
import argparse
import json
import os
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--system", choices=["accelerate", "deepspeed", "gpu"], required=True)
p.add_argument("--model", required=True)
p.add_argument("--offload", choices=["cpu", "disk", "nvme"], default="cpu")
p.add_argument("--nvme-dir", default="/root/peer_nvme")
p.add_argument("--batch", default="1,16")
p.add_argument("--prompt", type=int, default=512)
p.add_argument("--gen", type=int, default=32)
p.add_argument("--gpu-mem-gib", type=float, default=3.0, help="GPU budget for accelerate's max_memory")
p.add_argument("--quant-bits", type=int, choices=[4, 8], default=None, help="deepspeed: quantized weights")
p.add_argument("--quant-group", type=int, default=64)
p.add_argument("--logits-out", default=None,
               help="save the logits of benches/quant_accuracy.py's input (seed 0, 4 x 128 tokens) here, for accuracy")
a = p.parse_args()

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402  (after argparse: --help stays fast)

t0 = time.perf_counter()
if a.system == "gpu":
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float16, device_map="cuda")
elif a.system == "accelerate":
    kw = dict(dtype=torch.float16, device_map="auto")
    if a.offload == "cpu":
        kw["max_memory"] = {0: f"{a.gpu_mem_gib}GiB", "cpu": "110GiB"}
    else:
        kw.update(max_memory={0: f"{a.gpu_mem_gib}GiB", "cpu": "1GiB"}, offload_folder="/root/peer_offload")
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
else:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # its JIT builder cannot parse "9.0a"
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig
    cfg = AutoConfig.from_pretrained(a.model)
    h = cfg.hidden_size
    off = {"device": "cpu", "pin_memory": True}
    if a.offload == "nvme":  # swap buffers must hold the largest parameter (the embedding)
        os.makedirs(a.nvme_dir, exist_ok=True)
        off = {"device": "nvme", "nvme_path": a.nvme_dir, "pin_memory": True, "buffer_count": 5,
               "buffer_size": max(cfg.vocab_size * h, 4 * h * h)}
    ds = {"fp16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
          "aio": {"block_size": 16 << 20, "queue_depth": 64, "intra_op_parallelism": 8, "single_submit": False,
                  "overlap_events": True},
          "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                                "stage3_param_persistence_threshold": h, "stage3_max_live_parameters": 2 * h * h,
                                "offload_param": off}}
    if a.quant_bits:
        ds["weight_quantization"] = {"quantized_initialization": {
            "num_bits": a.quant_bits, "group_size": a.quant_group, "group_dim": 1, "symmetric": False}}
    keep = HfDeepSpeedConfig(ds)  # must exist before the model is built so that zero.Init partitions it
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float16)
    model = deepspeed.initialize(model=model, config_params=ds)[0].module
model.eval()
load_s = time.perf_counter() - t0

if a.logits_out:  # the same tokens as benches/quant_accuracy.py: torch.randint(3, vocab, (4, 128)), seed 0
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    ids = torch.randint(3, vocab, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits.float().cpu(), a.logits_out)

for bs in [int(x) for x in a.batch.split(",")]:
    ids = torch.randint(100, 1000, (bs, a.prompt), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=a.gen, min_new_tokens=a.gen, do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    decode_step = (total - prefill) / max(a.gen - 1, 1)
    print(json.dumps({"system": a.system, "offload": a.offload, "quant_bits": a.quant_bits, "batch": bs,
                      "prompt": a.prompt, "gen": a.gen, "load_s": round(load_s, 2), "prefill_s": round(prefill, 4),
                      "decode_step_s": round(decode_step, 4),
                      "tokens_per_s": round(bs * a.gen / total, 3),
                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
