#!/usr/bin/env bash
# One GPU-machine session: install the carried wheel, then run the named stages. Results go under $OUT.
#   bash benches/gpu_session.sh test bench-cpu ...      (carry .device: the wheel, fio, the peers' runner)
# Stages: test (GPU pytest), sweep (reader sweep vs fio), bench-cpu, bench-nvme, bench-budget, bench-llama,
#         peers (DeepSpeed / Accelerate / all-on-GPU on the same checkpoint);
#         quantized: test-quant, dequant, accuracy, bench-int4, bench-int8, bench-int4-llama, bench-int4-nvme,
#         peers-int4 (DeepSpeed ZeRO-Inference with its 4-bit weights, same checkpoint);
#         compare: this build against the one in .device/baseline/ (bench bloom-7b1, cpu offload, fp16 and int4,
#         batch 1 and 16, runs interleaved), the step/bound ratios side by side (benches/compare_builds.py).
#         tensor parallel: test-tp (the GPU test under torchrun, and the CPU/gloo tests), fio-strided (a rank's
#         row-parallel pieces read strided with O_DIRECT, against contiguous reads: the nvme layout decision);
#         on 2+ GPUs: bench-tp, bench-tp-int4, bench-tp-llama (TP=1 and TP=N in one run), bench-tp-nvme (a layout
#         per rank, written by zstream pack --tensor-parallel), bench-tp-70b (llama-2-70b shapes, a 40 GiB budget per GPU,
#         ${BLOCKS_70B:-40} of its 80 blocks: as many as the disk holds), peers-tp (DeepSpeed ZeRO-Inference on the same
#         GPUs under torchrun), head-cost (the replicated head's time per step); bench-176b (BLOOM-176B made in host
#         memory at load: BLOCKS_176B=4 for a slice on one or two GPUs, all 70 on 4 or 8).
#         lossless: lossless (the code beside DFloat11: ratio, encode, decode GB/s; the GPU tests), lossless-sweep (the
#         decoder's tuning and lane count), bench-lossless, bench-lossless-nvme (the streamed step, plain and coded).
#         KV offload: test-kv (the GPU tests of the host KV cache), bench-kv (bloom-7b1 at 16 GiB, the KV cache on the
#         device, in host memory, and in host memory with attention on the CPU, by batch), bench-kv-predict (the same
#         with the planner's prediction beside each row), peers-flexgen and bench-opt30b (OPT-30B under 16 GiB: FlexGen
#         0.1.8 with dummy weights, and zstream on an in-memory checkpoint of the same shapes; OPT_KV, OPT_BATCHES,
#         OPT_MICRO, OPT_QUANT, OPT_PREDICT=1, OPT_PLANNED=MAX_BATCH for the planner's own choice, OPT_PLANNED_ONLY=1
#         for that alone, OPT_TRACE=1 traces the first row's decode steps, OPT_TAG names the JSON). bench-kv takes
#         KV_OFFLOADS, KV_BATCHES, KV_MICRO, KV_PREDICT=1, KV_PLANNED, KV_PLANNED_ONLY=1, KV_TRACE, KV_TAG the same way, KV_REPEATS (each row run so many times,
#         its medians reported), KV_GRAPHS=0
#         (--no-cuda-graphs: every step eager, planned so; an all-resident step replays a CUDA graph by default),
#         KV_CPU_LAYERS (the split's
#         layers on the CPUs; default half) and KV_TRACE_PREFILL=1 (the first streamed row's prefill traced:
#         benches/trace_summary.py --prefill).
#         ab-split-layout: the split's two CPU-layer layouts A/B in one process (AB_BATCHES, AB_ROUNDS);
#         calibration-ab: the calibration's host-memory probes against what they replaced (CAL_BATCHES, CAL_ROUNDS);
#         split-anatomy: a split step's CPU layers clocked, the engine's layout against all on the CPUs (ANAT_BATCHES);
#         test-graph and bench-graph: resident decode steps as one CUDA graph, tested, then timed against eager
#         (GRAPH_BATCHES, GRAPH_REPEATS, GRAPH_GEN: new tokens, 32).
#         prefill-ab: a prefill block timed as calibrated against a pass's worth back to back (PREFILL_BATCHES).
#         profile-steps: the graphed and eager all-resident rows, each profiled (benches/profile_summary.py; PROFILE_BATCH).
#         profile-streamed: the eager row with blocks streamed (offload cpu, PROFILE_BATCH, PROFILE_RESIDENT: 29 of 30
#         resident, as the planner chose), profiled the same way.
#         mask-ab: a decode step's attention with the engine's mask against a contiguous one (MASK_BATCH, MASK_ROUNDS).
#         ring-host-cost: a streamed block's cost to the thread launching a decode step (RING_ROUNDS).
#         cpu-jitter: the CPUs' decode attention call by call at 16, 15, 14 and 12 threads in turn, libgomp's default
#         and active wait (JITTER_BATCH, JITTER_ROUNDS, ...; benches/cpu_attention_jitter.py).
#         copy-ab: decode blocks alone against beside a streamed block's copy (COPYAB_BATCH, COPYAB_ROUNDS).
#         graph-ab: the calibration's graphed step against the model's layout, a warm card, steps synchronised one by
#         one and steps after a prefill (GRAPHAB_BATCHES).
set -uo pipefail
SCRATCH=${SCRATCH:-$HOME}  # the checkpoints this script writes, on the GPU machine's local disk
export PYTHONUNBUFFERED=1 ZSTREAM_CACHE=${ZSTREAM_CACHE:-$SCRATCH/zcache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --upgrade --no-deps --no-index --target /tmp/zs .device/zstream-*.whl || exit 1
export PYTHONPATH=/tmp/zs
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current,driver_version --format=csv \
  | tee "$OUT/gpu.txt"
# the card's power limits: sustained, a prefill or a graphed decode draws it to its cap and a lower clock than a
# calibration's short samples see (docs/performance.md items 39-40); leases may differ in them
nvidia-smi --query-gpu=power.limit,enforced.power.limit,power.default_limit,power.max_limit --format=csv \
  > "$OUT/gpu_power.txt" 2>&1 || true
Z="python3 -m zstream"
# the host's CPUs and memory policy: NUMA nodes, automatic NUMA balancing, transparent huge pages (what could move the
# CPUs' attention's speed between a calibration and its row; the rows' decode_counters count the migrations)
{ lscpu; echo "numa_balancing: $(cat /proc/sys/kernel/numa_balancing 2>/dev/null)";
  echo "transparent_hugepage: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"; } > "$OUT/host.txt" 2>&1
# the GPU's clocks, power and throttle reasons every 100 ms through the session (GPU_CLOCKS=0: not): whether a
# sustained pass runs at the clocks its short calibration samples saw (performance.md item 32)
if [ "${GPU_CLOCKS:-1}" != 0 ]; then
  for why in clocks_event_reasons.active clocks_throttle_reasons.active pstate; do  # (the name drivers accept)
    nvidia-smi --query-gpu=$why --format=csv > /dev/null 2>&1 && break
  done
  date +%z > "$OUT/gpu_clocks_utc_offset.txt"  # nvidia-smi stamps local time (clock_windows.py --utc-offset-h)
  # (appended: several sessions in one call log into one file; at most 10 minutes, a call's limit, if not stopped)
  timeout 600 nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$why \
    --format=csv,nounits -lms 100 >> "$OUT/gpu_clocks.csv" 2>/dev/null &
  CLOCKS_PID=$!
  trap 'kill $CLOCKS_PID 2>/dev/null' EXIT
  trap 'kill $CLOCKS_PID 2>/dev/null; exit 143' TERM INT
fi
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    test) (cd tests && python3 -m pytest -q -x -p no:cacheprovider test_gpu.py test_store.py > "$OUT/pytest_gpu.log" 2>&1;
           grep -E "passed|failed|Error|assert" "$OUT/pytest_gpu.log" | tail -15) ;;
    test-tp) (cd tests && python3 -m pytest -q -p no:cacheprovider test_tensor_parallel.py test_generation.py \
                 > "$OUT/pytest_tp.log" 2>&1; python3 -m pytest -q -p no:cacheprovider test_gpu.py -k "tensor_parallel or lossless" \
                 >> "$OUT/pytest_tp.log" 2>&1; grep -E "passed|failed|Error|assert" "$OUT/pytest_tp.log" | tail -15) ;;
    fio-strided) # one rank's pieces of row-parallel weights are every other (1/N) run of a row: 16 KiB of each 32 KiB
      # row of bloom-7b1's dense_4h_to_h at N=2, 8 KiB at N=4, 4 KiB at N=8; a layout per rank reads them contiguously
      F=$SCRATCH/fio_strided.bin  # fio lays the file out first (8 GiB)
      for spec in read,1M read:16k,16k read:24k,8k read:28k,4k; do
        sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
        .device/fio --name=strided --filename="$F" --rw="${spec%,*}" --bs="${spec#*,}" --direct=1 --ioengine=io_uring \
          --iodepth=64 --size=8G --output-format=json > "$OUT/fio_$(echo "$spec" | tr ':,' '__').json" 2>&1
        python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['jobs'][0]['read']; print(sys.argv[2], round(r['bw_bytes']/1e9,2), 'GB/s of the bytes read')" \
          "$OUT/fio_$(echo "$spec" | tr ':,' '__').json" "$spec"
      done ;;
    peers-tp) # DeepSpeed ZeRO-Inference on the same GPUs, in its own multi-GPU mode (each GPU fetches a slice over its
      # PCIe, then all-gathers), started by torchrun; the same checkpoint as bench-tp
      python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/ds .device/ds/*.whl
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      PYTHONPATH=/tmp/zs:/tmp/ds NCCL_NVLS_ENABLE=0 timeout "${PEER_TIMEOUT:-400}" python3 -m torch.distributed.run \
        --standalone --nproc-per-node "${TP:-2}" benches/peers/run_peer.py --system deepspeed --model "$CK" \
        --batch "${PEER_BATCH:-1,16}" --prompt 512 --gen "${PEER_GEN:-32}" 2>"$OUT/peer_ds_tp.err" \
        | grep '^{' | tee -a "$OUT/peers_tp.jsonl"; tail -3 "$OUT/peer_ds_tp.err" ;;
    lossless) # the lossless code beside DFloat11 (its encoder and kernel, carried unpacked in .device/df11) on the
      # same 16M-element tensors; then the GPU tests of compressed streaming
      python3 benches/lossless_bench.py --elements 16777216 --dfloat11 .device/df11 --json "$OUT/lossless.json" \
        2>"$OUT/lossless.err" | tee "$OUT/lossless.jsonl"; tail -2 "$OUT/lossless.err"
      (cd tests && python3 -m pytest -q -p no:cacheprovider test_gpu.py -k lossless > "$OUT/pytest_lossless.log" 2>&1;
       tail -3 "$OUT/pytest_lossless.log") ;;
    lossless-sweep) # the decoder's tuning and lane count on one 16M-element bf16 tensor, each decode checked bit for bit
      python3 benches/lossless_bench.py --elements 16777216 --json "$OUT/lossless_sweep.json" --sweep "${SWEEP:-128:64:2,128:128:4,128:32:1,128:64:1,128:128:2,128:256:4,128:256:8,64:64:2,256:64:2,512:64:2}" \
        2>"$OUT/lossless_sweep.err" | tee "$OUT/lossless_sweep.jsonl"; tail -2 "$OUT/lossless_sweep.err" ;;
    bench-kv) # the KV cache on the device and in host memory (issue 17), bloom-7b1 fp16 under FlexGen's 16 GiB, each
      # batch planned on its own: the largest batches only fit with the cache on the host
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      $Z bench "$CK" --offload cpu --gpu-memory 16GiB --kv-offload ${KV_OFFLOADS:-none,host,host-compute} --batch ${KV_BATCHES:-8,16,32,64} \
        --prompt 512 --gen 32 ${KV_MICRO:+--micro-batch $KV_MICRO} ${KV_PREDICT:+--predict} ${KV_REPEATS:+--repeats $KV_REPEATS} \
        ${KV_CPU_LAYERS:+--kv-cpu-layers $KV_CPU_LAYERS} ${KV_PLANNED:+--planned $KV_PLANNED} ${KV_PLANNED_ONLY:+--planned-only} ${KV_TRACE:+--trace "$OUT/trace_kv${KV_TAG:+_$KV_TAG}.json"} \
        ${KV_TRACE_PREFILL:+--trace-prefill "$OUT/trace_prefill_kv${KV_TAG:+_$KV_TAG}.json"} $([ "${KV_GRAPHS:-}" = 0 ] && echo --no-cuda-graphs) --json "$OUT/bench_kv${KV_TAG:+_$KV_TAG}.json"
      # each row's peak against its memory plan (item 36)
      python3 benches/memory_replay.py "$OUT/bench_kv${KV_TAG:+_$KV_TAG}.json" | tail -n 14 ;;
    profile-steps) # where a decode step's time goes (item 51): bloom-7b1 fp16 under 16 GiB at PROFILE_BATCH (7), every
      # block resident, graphed and eager, each row run once more under torch's profiler (its trace gzipped)
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      for how in graph eager; do
        $Z bench "$CK" --offload none --gpu-memory 16GiB --batch ${PROFILE_BATCH:-7} --prompt 512 --gen 32 --predict \
          $([ $how = eager ] && echo --no-cuda-graphs) --profile "$OUT/profile_$how.json" --json "$OUT/bench_profile_$how.json" \
          | grep -E "^none|predicted within"
        python3 benches/profile_summary.py "$OUT/profile_$how.json" --skip 4 --bench "$OUT/bench_profile_$how.json" \
          --json "$OUT/profile_summary_$how.json" | tail -n 3
        gzip -f "$OUT/profile_$how.json"
      done ;;
    profile-streamed) # the planner's eager batch-7 choice with one block streamed (items 47-48: a millisecond a step over
      # its prediction in four runs), bloom-7b1 fp16 under 16 GiB, offload cpu, profiled as profile-steps' rows
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      $Z bench "$CK" --offload cpu --gpu-memory 16GiB --batch ${PROFILE_BATCH:-7} --prompt 512 --gen 32 --predict \
        --max-resident-blocks ${PROFILE_RESIDENT:-29} --profile "$OUT/profile_streamed.json" --json "$OUT/bench_profile_streamed.json" | grep -E "^cpu|predicted within"
      python3 benches/profile_summary.py "$OUT/profile_streamed.json" --skip 4 --bench "$OUT/bench_profile_streamed.json" \
        --json "$OUT/profile_summary_streamed.json" | tail -n 3
      gzip -f "$OUT/profile_streamed.json" ;;
    bench-graph) # decode steps with every block resident as one CUDA graph and launched from Python, in one call
      # (performance.md item 29): bloom-7b1 fp16 under 16 GiB at GRAPH_BATCHES (7), each with its prediction
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      for how in graph eager; do
        $Z bench "$CK" --offload none --gpu-memory 16GiB --batch ${GRAPH_BATCHES:-7} --prompt 512 --gen ${GRAPH_GEN:-32} --predict \
          --repeats ${GRAPH_REPEATS:-3} $([ $how = eager ] && echo --no-cuda-graphs) --json "$OUT/bench_graph_$how.json"
      done
      python3 benches/memory_replay.py "$OUT"/bench_graph_*.json | tail -n 3 ;;
    prefill-ab) # a prefill block timed as the calibration does against a pass's worth back to back (item 32),
      # bloom-7b1 shapes, alternating; the clock log shows the two ways' clocks
      python3 benches/prefill_sustained_ab.py bloom-7b1 --batch ${PREFILL_BATCHES:-1,8,16,64} --prompt 512 \
        --rounds ${PREFILL_ROUNDS:-3} --json "$OUT/prefill_sustained_ab.json" ;;
    graph-ab) # the calibration's graphed step against the model's layout, a warm card, steps synchronised one by one
      # and after a prefill, one process, alternating (performance.md items 41, 45, 46): bloom-7b1 shapes at
      # GRAPHAB_BATCHES (7); the clock log shows each way's clocks
      python3 benches/graph_probe_ab.py bloom-7b1 --batch ${GRAPHAB_BATCHES:-7} --prompt 512 --gen 32 \
        --rounds ${GRAPHAB_ROUNDS:-5} --json "$OUT/graph_probe_ab.json" ;;
    mask-ab) # a step's attention calls with the engine's rounded-row mask against a contiguous one, one process,
      # alternating (performance.md item 49): bloom-7b1 shapes, batch MASK_BATCH (7), S over 513-543
      python3 benches/mask_alignment_ab.py bloom-7b1 --batch ${MASK_BATCH:-7} --keys 513-543 \
        --rounds ${MASK_ROUNDS:-5} --json "$OUT/mask_alignment_ab.json" ;;
    copy-ab) # decode blocks alone against beside a streamed block's copy, one process, alternating (item 54): bloom-7b1
      # shapes, batches COPYAB_BATCH (7), 544 keys, a pass's 30 blocks against one block's 384 MiB host-to-device
      python3 benches/copy_interference_ab.py bloom-7b1 --batch ${COPYAB_BATCH:-7} --prompt 512 --gen 32 \
        --rounds ${COPYAB_ROUNDS:-9} --json "$OUT/copy_interference_ab.json" ;;
    ring-host-cost) # a streamed block's cost to the launching thread, the ring's slot views kept against made at
      # every copy, one process, interleaved (performance.md item 48): a tiny 30-block bloom, steps launch-bound
      python3 benches/ring_host_cost.py --device cuda --rounds ${RING_ROUNDS:-8} --json "$OUT/ring_host_cost.json" ;;
    cpu-jitter) # the CPUs' decode attention call by call, the thread counts taking turns (performance.md item 60):
      # JITTER_BATCH (16), JITTER_LAYERS (30, host-compute's), JITTER_THREADS, JITTER_ROUNDS, JITTER_CALLS, JITTER_GAPS
      python3 benches/cpu_attention_jitter.py --batch ${JITTER_BATCH:-16} --layers ${JITTER_LAYERS:-30} \
        --threads ${JITTER_THREADS:-16,15,14,12} --rounds ${JITTER_ROUNDS:-8} --calls ${JITTER_CALLS:-200} \
        --gap-ms ${JITTER_GAPS:-0,2} --json "$OUT/cpu_jitter_b${JITTER_BATCH:-16}.jsonl" | grep '"summary"' ;;
    test-graph) (cd tests && python3 -m pytest -q -p no:cacheprovider test_gpu.py -k "graph" > "$OUT/pytest_graph.log" 2>&1;
      echo "rc=$?" >> "$OUT/pytest_graph.log"); tail -3 "$OUT/pytest_graph.log" ;;
    ab-split-layout) # which layers a "split" cache attends on the CPUs, both layouts in one process, alternating
      # (performance.md item 17): bloom-7b1 under 16 GiB, AB_BATCHES (16,64), AB_ROUNDS (3), micro-batches of 16
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      python3 benches/split_layout_ab.py "$CK" --gpu-memory 16GiB --batch ${AB_BATCHES:-16,64} --micro-batch 16 \
        --rounds ${AB_ROUNDS:-3} --json "$OUT/split_layout_ab.json" ;;
    split-anatomy) # a "split" step's CPU layers clocked (the wait for the device, the attention) in the engine's layout
      # against every layer on the CPUs, and the calibration's own timings of those steps, one model, alternating
      # (performance.md items 20 and 57): ANAT_BATCHES (16,64)
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      python3 benches/split_anatomy.py "$CK" --gpu-memory 16GiB --batch ${ANAT_BATCHES:-16,64} --micro-batch 16 \
        --rounds ${ANAT_ROUNDS:-2} --json "$OUT/split_anatomy.json" ;;
    calibration-ab) # the calibration's host-compute block on one layer against layers in turn, and the uplink's rate
      # against the link's, one process (performance.md item 19): bloom-7b1 shapes, CAL_BATCHES (8,16,64)
      python3 benches/calibration_ab.py bloom-7b1 --batch ${CAL_BATCHES:-8,16,64} --rounds ${CAL_ROUNDS:-2} \
        --json "$OUT/calibration_ab.json" ;;
    bench-kv-predict) # the same with the batch planner's prediction beside each row (calibrated in the run)
      CK=$SCRATCH/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" --dtype fp16 > /dev/null
      $Z bench "$CK" --offload cpu --gpu-memory 16GiB --kv-offload ${KV_OFFLOADS:-none,host,host-compute} \
        --batch ${KV_BATCHES:-8,32,64} --prompt 512 --gen 32 --predict --json "$OUT/bench_kv_predict.json" ;;
    peers-flexgen) # FlexGen 0.1.8 (its wheel carried in .device/flexgen_whl, its offline runner in .device/flexgen_peer.py
      # from shared/peers), OPT-30B dummy weights, FG_PERCENT of weights/cache/activations on the GPU, attention on the
      # CPU, batch FG_GPU_BATCH x FG_BATCHES, prompt 512, gen 32: FlexGen's own numbers in its own log
      python3 -m pip install -q --no-deps --no-index --target /tmp/fg .device/flexgen_whl/flexgen-*.whl || exit 1
      PYTHONPATH=/tmp/fg:$PYTHONPATH python3 .device/flexgen_peer.py --model facebook/opt-30b --path _DUMMY_ \
        --percent ${FG_PERCENT:-20 80 0 100 0 100} --gpu-batch-size ${FG_GPU_BATCH:-32} \
        --num-gpu-batches ${FG_BATCHES:-2} --prompt-len 512 --gen-len 32 --cpu-cache-compute 2>&1 \
        | tee "$OUT/flexgen.log" | grep -i -E "throughput|latency|peak" ;;
    bench-opt30b) # zstream on the same shapes under the same 16 GiB, its weights made in host memory at load (60 GB of
      # fp16 next to FlexGen's on a 64 GiB disk do not fit), each placement and batch planned on its own
      CK=$SCRATCH/opt-30b-in-memory; [ -f "$CK/config.json" ] || $Z make-checkpoint opt-30b "$CK" --in-memory > /dev/null
      $Z bench "$CK" --offload cpu --gpu-memory 16GiB --kv-offload ${OPT_KV:-host,split,host-compute} \
        --batch ${OPT_BATCHES:-64} --prompt 512 --gen 32 ${OPT_MICRO:+--micro-batch $OPT_MICRO} \
        ${OPT_QUANT:+--quantize $OPT_QUANT} ${OPT_PREDICT:+--predict} ${OPT_PLANNED:+--planned $OPT_PLANNED} \
        ${OPT_PLANNED_ONLY:+--planned-only} ${OPT_TRACE:+--trace "$OUT/trace_opt30b${OPT_TAG:+_$OPT_TAG}.json"} \
        --json "$OUT/bench_opt30b${OPT_TAG:+_$OPT_TAG}.json" ;;
    test-kv) (cd tests && python3 -m pytest -q -p no:cacheprovider test_gpu.py -k "kv" > "$OUT/pytest_kv.log" 2>&1;
      echo "rc=$?" >> "$OUT/pytest_kv.log"); tail -3 "$OUT/pytest_kv.log" ;;
    bench-lossless) CK=$SCRATCH/llama-2-7b-bf16; [ -f "$CK/config.json" ] || $Z make-checkpoint llama-2-7b "$CK" --dtype bf16 > /dev/null
      $Z bench "$CK" --offload cpu --compress none,lossless --batch 1,16,64 --prompt 512 --gen "${LOSSLESS_GEN:-32}" \
        --json "$OUT/bench_lossless.json" ;;
    bench-lossless-nvme) # plain and coded from disk, page cache dropped before each, alternating for NVME_ROUNDS
      # rounds (the disk's rate drifts: the ratio is taken per round); each run measures the disk with fio on its own
      # files, the bound it is held to. NVME_BLOCKS of llama-2-7b's 32 blocks (all by default).
      B=${NVME_BLOCKS:-32}; CK=$SCRATCH/llama-2-7b-bf16-$B
      [ -f "$CK/config.json" ] || $Z make-checkpoint llama-2-7b "$CK" --dtype bf16 --blocks "$B" > /dev/null
      C=$CK-lossless; [ -f "$C/config.json" ] || $Z pack "$CK" "$C" --compress lossless --device cuda
      # the first read pass after 9-22 GB of fresh writes ran at 0.4 GB/s twice (the drive still busy with them)
      sync; sleep "${SETTLE_S:-60}"
      for round in $(seq "${NVME_ROUNDS:-3}"); do for ck in "$CK" "$C"; do sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
        $Z bench "$ck" --offload nvme --batch 1 --prompt 512 --gen "${NVME_GEN:-4}" --fio .device/fio \
          ${NVME_TRACE:+--trace "$OUT/trace_$(basename "$ck")_round$round.json"} \
          --json "$OUT/bench_lossless_nvme_$(basename "$ck")_round$round.json" | grep -E "^nvme|fio_gbps|disk_gbps"
      done; done ;;
    head-cost) # what a replicated head costs each rank a step: bloom-7b1's (250880 x 4096 fp16) at batch 1/16/64
      python3 - <<'PY' | tee "$OUT/head_cost.txt"
import torch, torch.nn.functional as F
w = torch.randn(250880, 4096, dtype=torch.float16, device="cuda") * 0.02
for b in (1, 16, 64):
    x = torch.randn(b, 1, 4096, dtype=torch.float16, device="cuda")
    for _ in range(3): F.linear(x, w)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20): F.linear(x, w)
    e.record(); e.synchronize()
    print(f"head batch {b}: {s.elapsed_time(e) / 20:.3f} ms ({w.numel() * 2 / 1e9:.2f} GB of weights)")
PY
      ;;
    bench-tp) NCCL_NVLS_ENABLE=0 $Z bench bloom-7b1 --tp 1,"${TP:-2}" --offload cpu --batch 1,16,64 --prompt 512 --gen 32 \
                 --json "$OUT/bench_tp.json" --trace "$OUT/trace_tp.json" ;;
    bench-tp-int4) NCCL_NVLS_ENABLE=0 $Z bench bloom-7b1 --tp 1,"${TP:-2}" --offload cpu --quantize int4 --batch 1,16,64 \
                 --prompt 512 --gen 32 --json "$OUT/bench_tp_int4.json" ;;
    bench-tp-llama) NCCL_NVLS_ENABLE=0 $Z bench llama-2-7b --tp 1,"${TP:-2}" --offload cpu --batch 1,16,64 --prompt 512 \
                 --gen 32 --json "$OUT/bench_tp_llama.json" ;;
    bench-tp-nvme) CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      L=$SCRATCH/bloom-7b1-tp${TP:-2}; [ -f "$L/tensor-parallel.json" ] || $Z pack "$CK" "$L" --quantize none --tensor-parallel "${TP:-2}" --quiet
      sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
      NCCL_NVLS_ENABLE=0 $Z bench "$L" --tp "${TP:-2}" --offload nvme --batch 1,16 --prompt 512 --gen 8 --fio .device/fio \
        --json "$OUT/bench_tp_nvme.json" ;;
    bench-176b) # BLOOM-176B (issue 15), its weights made in host memory at load (352 GB of fp16 do not fit a 235 GiB
      # disk; make-checkpoint --in-memory writes the config and tokenizer only): BLOCKS_176B of its 70 blocks (a
      # slice at real width on one or two GPUs; all 70 on 4 or 8), 1 rank and TP176 ranks, fp16 and int4
      N=${BLOCKS_176B:-70}; CK=$SCRATCH/bloom-176b-$N
      [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-176b "$CK" --in-memory --blocks "$N" > /dev/null
      for q in none int4; do NCCL_NVLS_ENABLE=0 $Z bench "$CK" --offload cpu --tp "${TP176:-1,$(nvidia-smi -L | wc -l)}" \
        --batch 1,16,64 --prompt 512 --gen 32 $([ $q = int4 ] && echo --quantize int4) \
        --json "$OUT/bench_176b_${N}_$q.json"; done ;;
    bench-tp-70b) CK=$SCRATCH/llama-2-70b-${BLOCKS_70B:-40}
      [ -f "$CK/config.json" ] || python3 -c "import sys, zstream; from zstream.api.synthetic import PRESETS
zstream.make_checkpoint({**PRESETS['llama-2-70b'], 'num_hidden_layers': int(sys.argv[2])}, sys.argv[1], progress=False)" "$CK" "${BLOCKS_70B:-40}"
      NCCL_NVLS_ENABLE=0 $Z bench "$CK" --tp "${TP:-2}" --offload cpu --gpu-memory 40GiB --batch 1,16 --prompt 512 --gen 16 \
        --json "$OUT/bench_tp_70b.json" ;;
    sweep) python3 benches/reader_sweep.py --dir $SCRATCH/sweep --gib 8 --fio .device/fio --budget-s "${SWEEP_BUDGET:-240}" \
             --json "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1; tail -30 "$OUT/sweep.log" ;;
    bench-cpu) $Z bench bloom-7b1 --offload cpu --batch 1,16,64 --prompt 512 --gen 32 \
                 --json "$OUT/bench_cpu.json" --trace "$OUT/trace_cpu.json" ;;
    bench-cpu-quick) $Z bench bloom-7b1 --offload cpu --batch 1,16 --prompt 512 --gen 8 \
                 --json "$OUT/bench_cpu_quick.json" --trace "$OUT/trace_cpu.json" ;;
    bench-nvme) sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
                $Z bench bloom-7b1 --offload nvme --batch "${NVME_BATCH:-1,16}" --prompt 512 --gen "${NVME_GEN:-8}" --fio .device/fio \
                 --json "$OUT/bench_nvme.json" --trace "$OUT/trace_nvme.json" ;;
    bench-none) $Z bench bloom-7b1 --offload none --batch 1,16,64 --prompt 512 --gen 32 --json "$OUT/bench_none.json" ;;
    bench-budget) $Z bench bloom-7b1 --offload cpu --batch 1,16 --prompt 512 --gen 16 --gpu-memory 8GiB,16GiB,32GiB \
                 --json "$OUT/bench_budget.json" ;;
    bench-ats) $Z bench bloom-7b1 --offload ats --batch 1,16,64 --prompt 512 --gen 32 --json "$OUT/bench_ats.json" ;;
    bench-ats-in-place) $Z bench bloom-7b1 --offload ats --batch 1,16,64 --prompt 512 --gen 16 --copy-from-tokens 100 \
                 --json "$OUT/bench_ats_in_place.json" ;;
    load-test) $Z bench bloom-7b1 --offload cpu --batch 1 --prompt 16 --gen 2 --load-test --fio .device/fio \
                 --json "$OUT/load_test.json" ;;
    bench-llama) $Z bench llama-2-7b --offload cpu --batch 1,16,64 --prompt 512 --gen 32 --json "$OUT/bench_llama.json" ;;
    max-batch) $Z bench bloom-7b1 --offload cpu --batch 1 --prompt 512 --gen 32 --gpu-memory 16GiB --max-batch \
                 --json "$OUT/max_batch.json" ;;
    peers) # DeepSpeed ZeRO-Inference (cpu, pinned), Accelerate (device_map, 3 GiB GPU), all on the GPU: same checkpoint
      python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/ds .device/ds/*.whl
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      for sys in gpu deepspeed accelerate; do
        PYTHONPATH=/tmp/zs:/tmp/ds timeout "${PEER_TIMEOUT:-240}" python3 .device/peers/run_peer.py --system $sys \
          --model "$CK" --batch "${PEER_BATCH:-1,16}" --prompt 512 --gen "${PEER_GEN:-32}" 2>"$OUT/peer_$sys.err" \
          | grep '^{' | tee -a "$OUT/peers.jsonl"; tail -3 "$OUT/peer_$sys.err"
      done ;;
    peers-nvme)
      python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/ds .device/ds/*.whl
      mkdir -p /tmp/aio && for d in .device/ds/*.deb; do dpkg -x "$d" /tmp/aio; done
      export CPATH=/tmp/aio/usr/include LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/aio/usr/lib/x86_64-linux-gnu
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
      PYTHONPATH=/tmp/zs:/tmp/ds TORCH_CUDA_ARCH_LIST=9.0 timeout "${PEER_TIMEOUT:-300}" python3 .device/peers/run_peer.py --system deepspeed \
        --offload nvme --model "$CK" --batch 1 --prompt 512 --gen "${PEER_GEN:-4}" 2>"$OUT/peer_ds_nvme.err" \
        | grep '^{' | tee -a "$OUT/peers.jsonl"; tail -3 "$OUT/peer_ds_nvme.err" ;;
    criterion) # the criterion bench binary built here (cargo bench --no-run), beside fio on the same file, then
               # pytest-benchmark at bloom-7b1's block size
      export CARGO_TARGET_DIR=$SCRATCH/cb; mkdir -p $CARGO_TARGET_DIR
      .device/readers-bench --bench 2>&1 | grep -E "^readers|time:|thrpt:" | tee "$OUT/criterion.txt"
      f=$(ls $CARGO_TARGET_DIR/zstream-bench/readers-*.safetensors | head -1)
      sync; echo 3 > /proc/sys/vm/drop_caches
      .device/fio --name=criterion-file --rw=read --bs=1M --iodepth=64 --ioengine=io_uring --direct=1 \
        --filename="$f" --output-format=json > "$OUT/criterion_fio.json" && python3 -c \
        "import json,sys; print('fio GB/s', json.load(open(sys.argv[1]))['jobs'][0]['read']['bw_bytes']/1e9)" "$OUT/criterion_fio.json"
      (cd tests && ZSTREAM_BENCH_HIDDEN=4096 python3 -m pytest -q -p no:cacheprovider ../benches/test_bench_store.py \
        --benchmark-json "$OUT/pytest_benchmark.json" --benchmark-columns=median,rounds 2>&1 | tail -15) ;;
    test-quant) (cd tests && python3 -m pytest -q -p no:cacheprovider test_kernels.py test_quant.py \
                   test_quantized_models.py "test_gpu.py::test_quantized_streaming_on_the_gpu_matches_the_cpu" \
                   > "$OUT/pytest_quant.log" 2>&1; grep -E "passed|failed|Error|assert" "$OUT/pytest_quant.log" | tail -15) ;;
    register) python3 benches/register_scaling.py "$OUT/register_scaling.json" ;;
    dequant) python3 benches/dequant_bench.py --check --json "$OUT/dequant.json" 2>&1 | tail -20 ;;
    accuracy) # after peers-int4, which saves DeepSpeed's 4-bit logits for the same tokens
      python3 benches/quant_accuracy.py bloom-7b1 --peer-logits /tmp/ds_int4_logits.pt --peer-name "deepspeed int4" \
        --json "$OUT/quant_accuracy_bloom.json" 2>&1 | grep '^{'
      python3 benches/quant_accuracy.py llama-2-7b --json "$OUT/quant_accuracy_llama.json" 2>&1 | grep '^{' ;;
    bench-int4) $Z bench bloom-7b1 --offload cpu --quantize int4 --batch 1,16,64 --prompt 512 --gen 32 \
                 --json "$OUT/bench_int4.json" --trace "$OUT/trace_int4.json" ;;
    bench-int8) $Z bench bloom-7b1 --offload cpu --quantize int8 --batch 1,16,64 --prompt 512 --gen 32 \
                 --json "$OUT/bench_int8.json" ;;
    bench-int4-llama) for q in int4 int8; do $Z bench llama-2-7b --offload cpu --quantize $q --batch 1,16,64 \
                 --prompt 512 --gen 32 --json "$OUT/bench_llama_$q.json"; done ;;
    bench-int4-nvme) # pack once (quantized on the GPU), then stream the packed checkpoint from disk, caches dropped
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      P=$ZSTREAM_CACHE/packed/bloom-7b1-int4; [ -f "$P/config.json" ] || { /usr/bin/time -f "pack %e s" \
        $Z pack "$CK" "$P" --quantize int4 2>&1 | tail -3; }
      sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
      $Z bench "$P" --offload nvme --batch "${NVME_BATCH:-1,16}" --prompt 512 --gen "${NVME_GEN:-8}" --fio .device/fio \
        --json "$OUT/bench_int4_nvme.json" ;;
    peers-int4) # DeepSpeed ZeRO-Inference, 4-bit group-64 weights (quantized_initialization), cpu offload, pinned
      python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/ds .device/ds/*.whl
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      PYTHONPATH=/tmp/zs:/tmp/ds TORCH_CUDA_ARCH_LIST=9.0 timeout "${PEER_TIMEOUT:-400}" python3 benches/peers/run_peer.py \
        --system deepspeed --quant-bits 4 --logits-out /tmp/ds_int4_logits.pt --model "$CK" --batch "${PEER_BATCH:-1,16,64}" --prompt 512 --gen "${PEER_GEN:-32}" \
        2>"$OUT/peer_ds_int4.err" | grep '^{' | tee -a "$OUT/peers.jsonl"; tail -3 "$OUT/peer_ds_int4.err" ;;
    compare)
      python3 -m pip install -q --upgrade --no-deps --no-index --target /tmp/zs_old .device/baseline/zstream-*.whl || exit 1
      CK=$ZSTREAM_CACHE/synthetic/bloom-7b1; [ -f "$CK/config.json" ] || $Z make-checkpoint bloom-7b1 "$CK" > /dev/null
      start=$SECONDS
      for round in 1 2 3; do for q in fp16 int4; do for build in baseline new; do
        [ $((SECONDS - start)) -gt "${COMPARE_BUDGET_S:-330}" ] && break 3
        args=(bench "$CK" --offload cpu --batch 1,16 --prompt 512 --gen "${COMPARE_GEN:-32}"
              --json "$OUT/compare_${build}_${q}_${round}.json")
        [ $q = int4 ] && args+=(--quantize int4)
        if [ $build = baseline ]; then PYTHONPATH=/tmp/zs_old python3 -m zstream.cli "${args[@]}" > /dev/null 2>&1
        else $Z "${args[@]}" > /dev/null 2>&1; fi
        echo "round $round $q $build done at $((SECONDS - start)) s"
      done; done; done
      python3 benches/compare_builds.py "$OUT" | tee "$OUT/compare.txt" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
