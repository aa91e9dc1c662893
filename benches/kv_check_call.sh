#!/usr/bin/env bash
# Issue 17's check in one device call: every bloom-7b1 placement at 16 GiB against the planner (the sweep), then the
# planner's own row, each stage stopped at its deadline in the call's seconds, and $OUT packed so that the device
# tool brings it all back (it returns at most eight files): the two bench JSONs, card.txt and one logs.tgz.
#   bash benches/kv_check_call.sh [SWEEP_DEADLINE_S] [PLANNED_DEADLINE_S]       (carry .device: the wheel)
#   KV_CHECK_CARD=H200: run nothing unless the card's name has it (an H100 lease then costs only its start).
#   KV_CHECK_JITTER=1: the jitter stage (performance.md item 60) first, on a host of Xeon model 207 only.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/logs"
SESSION=${GPU_SESSION:-benches/gpu_session.sh} CPUINFO=${CPUINFO:-/proc/cpuinfo}  # (the test: stand-ins)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; grep -m1 "^model\s" "$CPUINFO"
  date -u; } | tee "$OUT/card.txt"
if [ -n "${KV_CHECK_CARD:-}" ] && ! head -1 "$OUT/card.txt" | grep -q "$KV_CHECK_CARD"; then
  echo "not an $KV_CHECK_CARD: nothing run" | tee -a "$OUT/card.txt"; rm -rf "$OUT/logs"; exit 0
fi
stage() {  # stage DEADLINE_S NAME STAGE [VAR=VALUE...]: gpu_session.sh's STAGE, its output in logs/NAME.log
  local deadline=$1 name=$2 what=$3 rc; shift 3
  if [ $((deadline - SECONDS)) -gt 0 ]; then
    env "$@" timeout $((deadline - SECONDS)) bash "$SESSION" "$what" > "$OUT/logs/$name.log" 2>&1; rc=$?
  else rc="skipped, past its deadline"; fi
  echo "$name rc=$rc at $SECONDS s" | tee -a "$OUT/card.txt"
  for f in host.txt gpu.txt gpu_power.txt gpu_clocks.csv gpu_clocks_utc_offset.txt; do  # each stage writes its own
    [ -f "$OUT/$f" ] && mv "$OUT/$f" "$OUT/logs/$name-$f"
  done
}
if [ -n "${KV_CHECK_JITTER:-}" ] && grep -q "^model\s*: 207" "$OUT/card.txt"; then
  stage 150 jitter cpu-jitter JITTER_BATCH=16
  [ -f "$OUT/cpu_jitter_b16.jsonl" ] && mv "$OUT/cpu_jitter_b16.jsonl" "$OUT/logs/"
fi
KV="KV_MICRO=16 KV_PREDICT=1"
# shellcheck disable=SC2086
stage "${1:-470}" sweep bench-kv $KV KV_OFFLOADS=none,host,host-compute,split KV_BATCHES=8,16,64 KV_TAG=all
# shellcheck disable=SC2086
stage "${2:-592}" planned bench-kv $KV KV_PLANNED=128 KV_PLANNED_ONLY=1 KV_TAG=planned
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
