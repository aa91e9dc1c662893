#!/bin/bash
# one device call: the H200 sweep first where the card is an H200; the rotated jitter first elsewhere
export OUT
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader | tee $OUT/card.txt
grep -m1 "^model\s" /proc/cpuinfo | tee -a $OUT/card.txt; date -u | tee -a $OUT/card.txt
sweep() {
  KV_MICRO=16 KV_PREDICT=1 KV_OFFLOADS=none,host,host-compute,split KV_BATCHES=8,16,64 KV_TAG=all \
    timeout $(($1 - SECONDS)) bash benches/gpu_session.sh bench-kv > $OUT/session.log 2>&1
  echo "sweep rc=$? at $SECONDS s" | tee -a $OUT/card.txt
  mkdir -p $OUT/sweep_meta && cp $OUT/gpu*.txt $OUT/gpu_clocks.csv $OUT/host.txt $OUT/sweep_meta/ 2>/dev/null
  KV_MICRO=16 KV_PREDICT=1 KV_PLANNED=128 KV_PLANNED_ONLY=1 KV_TAG=planned \
    timeout $(($2 - SECONDS)) bash benches/gpu_session.sh bench-kv > $OUT/planned.log 2>&1
  echo "planned rc=$? at $SECONDS s" | tee -a $OUT/card.txt
}
jitter() {
  JITTER_BATCH=16 timeout $(($1 - SECONDS)) bash benches/gpu_session.sh cpu-jitter > $OUT/jitter16.log 2>&1
  echo "jitter rc=$? at $SECONDS s" | tee -a $OUT/card.txt
}
if grep -q H200 $OUT/card.txt; then sweep 470 580; jitter 592
else jitter 140; sweep 480 592; fi
