#!/bin/bash
# The GPU runs behind docs/benchmarks.md's MoE section, in two stages (each well under the device's limit).
# Run from the repository root on the GPU machine, after the wheel prelude (../shared/device/prelude.sh):
#   bash scripts/moe_device_run.sh check    # kernel tests, tile sweep, layer timings, tiny-MoE equality, decode bs=1
#   bash scripts/moe_device_run.sh report   # kernel tests, tiny-MoE equality, decode profile, sglang-random
#   bash scripts/moe_device_run.sh compare  # nanovllm: Flotilla vs transformers CB (NUM_PROMPTS=16 ... to fit)
# Logs and JSON go to $RES, packed after every step into $OUT/moe_results.tgz.
set -uo pipefail
FINAL="${OUT:-./out}"
RES="${RES:-/tmp/flotilla-moe}"
mkdir -p "$RES" "$FINAL"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FLOTILLA_TINY_CACHE="${FLOTILLA_TINY_CACHE:-/tmp/flotilla-tiny}"
stage="${1:-check}"

step() {  # step NAME TIMEOUT_S CMD...: run with a limit, log to $RES/NAME.log, never stop the stage
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date +%T))"
  timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-20}" "$RES/$name.log"
  echo "=== $name rc=$rc"
  cp flotilla/model/layers/moe_configs/*.json "$RES/" 2>/dev/null
  tar -czf "$FINAL/moe_results.tgz" -C "$RES" .
}

bench() {  # bench NAME TIMEOUT_S ARGS...
  local name="$1" limit="$2"; shift 2
  step "$name" "$limit" python3 -m flotilla bench "$@" --json "$RES/$name.json"
}

case "$stage" in
  check)
    TAIL=8 step tests 100 python3 -m pytest -q --maxfail=4 -p no:cacheprovider tests/test_moe_kernels.py
    TAIL=16 step sweep 110 python3 scripts/moe_check.py sweep --out "$RES"
    TAIL=14 step layer 40 python3 scripts/moe_check.py layer --out "$RES"
    TAIL=30 bench decode_qwen30b 140 --model-shape qwen3-30b-a3b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline --cuda-graph-max-bs 16 --max-num-seqs 16
    ;;
  report)  # correctness on tiny checkpoints, where a decode step goes, sglang-random
    TAIL=8 step tests 60 python3 -m pytest -q --maxfail=4 -p no:cacheprovider tests/test_moe_kernels.py
    TAIL=6 step equality 60 python3 scripts/moe_check.py equality --out "$RES"
    TAIL=45 step profile 75 python3 scripts/moe_check.py profile --out "$RES"
    bench sglang_random200_qwen30b 110 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 200
    ;;
  compare)  # nanovllm: Flotilla and transformers' continuous batching, one after the other on one GPU
    # NUM_PROMPTS (64), WARMUP (16), FLOTILLA_S (75) and TRANSFORMERS_S (210) size it to the device time left
    N="${NUM_PROMPTS:-64}" W="${WARMUP:-16}"
    W_ARGS=(--model-shape qwen3-30b-a3b --workload nanovllm --num-prompts "$N" --warmup-requests "$W")
    bench "nanovllm${N}_qwen30b" "${FLOTILLA_S:-75}" "${W_ARGS[@]}"
    TAIL=30 bench "nanovllm${N}_qwen30b_transformers" "${TRANSFORMERS_S:-210}" "${W_ARGS[@]}" --backend transformers
    ;;
esac
