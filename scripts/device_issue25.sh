#!/bin/bash
# Issue 25's GPU runs (docs/benchmarks.md §16), in stages that each end well inside the device tool's 10 minutes.
# From the repository root on the GPU machine, after the wheel prelude (../shared/device/prelude.sh):
#   bash scripts/device_issue25.sh check     # overlap == sync token equality; batch-256 decode and mixed-step profiles
#   bash scripts/device_issue25.sh sglang    # sglang-random (llama-3.1-8b shape, 1,000 prompts): sync vs overlap,
#                                            # each with the per-step host trace (FLOTILLA_STEP_TRACE)
#   bash scripts/device_issue25.sh knobs     # overlap on, then the scheduler knobs beside it (same call)
#   bash scripts/device_issue25.sh split     # mixed-batch attention: split vs unified (kernels, profile, sglang)
#   bash scripts/device_issue25.sh moe       # attention kernels re-checked; qwen3-30b-a3b decode bs=1 roofline and
#                                            # sglang-random (1,000 prompts)
#   bash scripts/device_issue25.sh moe_mem   # qwen3-30b-a3b sglang-random 1,000 at gpu_memory_utilization 0.85 and
#                                            # 0.$MEM (default 92): KV room, not kernels, bounds its rows
#   bash scripts/device_issue25.sh fp8       # FP8 KV cache: kernels on FP8 pools; 8B sglang-random auto vs fp8
#   bash scripts/device_issue25.sh moe_fp8   # qwen3-30b-a3b sglang-random 1,000: auto, then the FP8 KV cache (same call)
#   bash scripts/device_issue25.sh moe_cb    # qwen3-30b-a3b nanovllm (16 prompts): Flotilla, then transformers CB
#   bash scripts/device_issue25.sh ratio     # qwen3-0.6b nanovllm: Flotilla, then transformers CB (the 40x row)
# Every step has a timeout; logs and JSON go to $RES and are packed into $OUT/results.tgz after each step.
set -uo pipefail
FINAL="${OUT:-./out}"
RES="${RES:-/tmp/flotilla-results}"
OUT="$RES"
mkdir -p "$OUT" "$FINAL"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export FLOTILLA_TINY_CACHE="${FLOTILLA_TINY_CACHE:-/tmp/flotilla-tiny}"
stage="${1:-check}"

step() {  # step NAME TIMEOUT_S CMD...: run with a limit, log to $OUT/NAME.log, never stop the stage
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date +%T))"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name rc=$rc"
  tar -czf "$FINAL/results.tgz" -C "$OUT" .
}

bench() {  # bench NAME TIMEOUT_S ARGS...: flotilla bench writing $OUT/NAME.json, its step trace in NAME.trace.json
  local name="$1" limit="$2"; shift 2
  FLOTILLA_STEP_TRACE="$OUT/$name.trace.json" step "$name" "$limit" python3 -m flotilla bench "$@" --json "$OUT/$name.json"
  [ -f "$OUT/$name.trace.json" ] && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; \
print(json.dumps(s))" "$OUT/$name.trace.json"
  return 0  # a backend without a step trace (transformers) is not a failed step
}

SG=(--model-shape llama-3.1-8b --workload sglang-random)
case "$stage" in
  check)
    python3 -c "import msgspec, zmq, triton, transformers, torch; print('imports ok', triton.__version__, torch.__version__)" || exit 1
    TAIL=12 step eq_tiny 230 python3 scripts/overlap_equality.py --models llama,qwen3 --dtypes float32,bfloat16 \
      --scenarios mixed --json "$OUT/eq_tiny.json"
    TAIL=8 step eq_slots 90 python3 scripts/overlap_equality.py --models llama --dtypes float32,bfloat16 \
      --scenarios slots --json "$OUT/eq_slots.json"
    TAIL=60 step mixed 100 python3 scripts/gpu_check.py mixed --mixed-cases llama-3.1-8b:256:768:512 --out "$OUT"
    TAIL=45 step runner 130 python3 scripts/gpu_check.py runner --runner-cases llama-3.1-8b:256:768 --out "$OUT"
    ;;
  sglang)
    bench sg_sync 200 "${SG[@]}" --no-overlap-schedule
    bench sg_overlap 200 "${SG[@]}" --overlap-schedule
    ;;
  knobs)  # each beside the overlap run of the same call; extra arguments in KNOBS, one run per ';'-separated set
    bench sg_overlap 180 "${SG[@]}" --overlap-schedule
    IFS=';' read -ra sets <<<"${KNOBS:---max-num-batched-tokens 2048}"
    i=0
    for s in "${sets[@]}"; do
      i=$((i + 1))
      # shellcheck disable=SC2086
      bench "sg_knob$i" 180 "${SG[@]}" --overlap-schedule $s
    done
    ;;
  split)  # mixed batches: decode rows to the decode kernel (split, the default) beside the unified baseline
    TAIL=6 step attention 150 python3 scripts/gpu_check.py attention --out "$OUT"
    for mode in unified split; do
      TAIL=30 FLOTILLA_ATTENTION_MIXED=$mode step "mixed_$mode" 80 python3 scripts/gpu_check.py mixed \
        --mixed-cases llama-3.1-8b:256:768:512 --out "$OUT" --tag "_$mode"
    done
    FLOTILLA_ATTENTION_MIXED=unified bench sg_overlap_unified 150 "${SG[@]}" --overlap-schedule
    bench sg_overlap_split 150 "${SG[@]}" --overlap-schedule
    bench sg_sync_split 150 "${SG[@]}" --no-overlap-schedule
    ;;
  moe)
    TAIL=6 step attention 120 python3 scripts/gpu_check.py attention --out "$OUT"
    TAIL=30 bench moe_decode_bs1 150 --model-shape qwen3-30b-a3b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline --cuda-graph-max-bs 16 --max-num-seqs 16
    bench moe_sglang1000 240 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 1000
    ;;
  moe_mem)  # qwen3-30b-a3b sglang-random 1,000: the KV room lever (gpu_memory_utilization) beside the default 0.85
    bench moe_sg_mem085 270 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 1000
    bench moe_sg_mem${MEM:-92} 270 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 1000 \
      --gpu-memory-utilization "0.${MEM:-92}"
    ;;
  fp8)  # the FP8 KV cache: kernels against the torch reference on FP8 pools, then 8B sglang-random auto vs fp8
    TAIL=8 step attention 200 python3 scripts/gpu_check.py attention --out "$OUT"
    bench sg_kv_auto 150 "${SG[@]}"
    bench sg_kv_fp8 150 "${SG[@]}" --kv-cache-dtype fp8
    ;;
  moe_fp8)  # qwen3-30b-a3b sglang-random 1,000: auto beside the FP8 KV cache (twice the sequences in the same room)
    bench moe_sg_auto 270 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 1000
    bench moe_sg_fp8 270 --model-shape qwen3-30b-a3b --workload sglang-random --num-prompts 1000 --kv-cache-dtype fp8
    ;;
  moe_cb)  # both sides finished in one call: 16 prompts, transformers given what the call has left
    CB=(--model-shape qwen3-30b-a3b --workload nanovllm --num-prompts 16 --warmup-requests 2)
    bench moe_nano16 110 "${CB[@]}"
    TAIL=30 bench moe_nano16_transformers "${TRANSFORMERS_S:-440}" "${CB[@]}" --backend transformers
    ;;
  ratio)
    bench nano06 120 --model-shape qwen3-0.6b --workload nanovllm
    TAIL=30 bench nano06_transformers "${TRANSFORMERS_S:-420}" --model-shape qwen3-0.6b --workload nanovllm \
      --backend transformers
    ;;
  eq8b)
    TAIL=8 step eq_8b 200 python3 scripts/overlap_equality.py --models llama-3.1-8b --dtypes bfloat16 \
      --scenarios mixed --json "$OUT/eq_8b.json"
    ;;
  *)
    echo "unknown stage $stage"; exit 2 ;;
esac
