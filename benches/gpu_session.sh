#!/usr/bin/env bash
# One GPU-machine session: install the carried wheel, then run the named stages. Results go under $OUT.
#   bash benches/gpu_session.sh test bench-cpu ...      (carry .device: the wheel, fio, the peers' runner)
# Stages: test (GPU pytest), sweep (reader sweep vs fio), bench-cpu, bench-nvme, bench-budget, bench-llama,
#         peers (DeepSpeed / Accelerate / all-on-GPU on the same checkpoint).
set -uo pipefail
export PYTHONUNBUFFERED=1 ZSTREAM_CACHE=${ZSTREAM_CACHE:-/root/zcache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --upgrade --no-deps --no-index --target /tmp/zs .device/zstream-*.whl || exit 1
export PYTHONPATH=/tmp/zs
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current,driver_version --format=csv \
  | tee "$OUT/gpu.txt"
Z="python3 -m zstream.cli"
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    test) (cd tests && python3 -m pytest -q -x -p no:cacheprovider test_gpu.py test_store.py > "$OUT/pytest_gpu.log" 2>&1;
           grep -E "passed|failed|Error|assert" "$OUT/pytest_gpu.log" | tail -15) ;;
    sweep) python3 benches/reader_sweep.py --dir /root/sweep --gib 8 --fio .device/fio --json "$OUT/sweep.json" ;;
    bench-cpu) $Z bench bloom-7b1 --offload cpu --batch 1,16,64 --prompt 512 --gen 32 \
                 --json "$OUT/bench_cpu.json" --trace "$OUT/trace_cpu.json" ;;
    bench-cpu-quick) $Z bench bloom-7b1 --offload cpu --batch 1,16 --prompt 512 --gen 8 \
                 --json "$OUT/bench_cpu_quick.json" --trace "$OUT/trace_cpu.json" ;;
    bench-nvme) sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
                $Z bench bloom-7b1 --offload nvme --batch 1,16 --prompt 512 --gen 8 --fio .device/fio \
                 --json "$OUT/bench_nvme.json" --trace "$OUT/trace_nvme.json" ;;
    bench-none) $Z bench bloom-7b1 --offload none --batch 1,16,64 --prompt 512 --gen 32 --json "$OUT/bench_none.json" ;;
    bench-budget) $Z bench bloom-7b1 --offload cpu --batch 1,16 --prompt 512 --gen 16 --gpu-memory 8GiB,16GiB,32GiB \
                 --json "$OUT/bench_budget.json" ;;
    bench-llama) $Z bench llama-2-7b --offload cpu --batch 1,16,64 --prompt 512 --gen 32 --json "$OUT/bench_llama.json" ;;
    max-batch) $Z bench bloom-7b1 --offload cpu --batch 1 --prompt 512 --gen 32 --gpu-memory 16GiB --max-batch \
                 --json "$OUT/max_batch.json" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
