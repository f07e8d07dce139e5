#!/bin/bash
# LoRA on the GPU (issue 30; docs/benchmarks.md §17), from the repository root after the wheel prelude:
#   bash scripts/device_lora.sh all      # kernels vs the torch reference; qwen3-0.6b and llama-3.1-8b figures
#   bash scripts/device_lora.sh kernels | q06 | l8b
# Every step has a timeout; logs and JSON are packed into $OUT/results.tgz after each step.
set -uo pipefail
FINAL="${OUT:-./out}"
RES="${RES:-/tmp/flotilla-lora}"
mkdir -p "$RES" "$FINAL"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
stage="${1:-all}"

step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date +%T))"
  timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  grep -v "Loading weights\|it/s\]" "$RES/$name.log" | tail -n "${TAIL:-20}"
  echo "=== $name rc=$rc"
  tar -czf "$FINAL/results.tgz" -C "$RES" .
}

case "$stage" in
  kernels|all)
    nvidia-smi --query-gpu=name --format=csv,noheader
    step lora_kernels 120 python3 scripts/lora_gpu.py kernels --out "$RES" ;;&
  q06|all)
    step lora_q06 200 python3 scripts/lora_gpu.py engine --shape qwen3-0.6b --out "$RES" ;;&
  l8b|all)
    step lora_l8b 260 python3 scripts/lora_gpu.py engine --shape llama-3.1-8b --out "$RES" ;;
  *)
    [ "$stage" = kernels ] || [ "$stage" = q06 ] || echo "unknown stage $stage" ;;
esac
