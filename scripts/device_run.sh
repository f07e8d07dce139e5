#!/bin/bash
# The GPU runs behind docs/benchmarks.md, in the stages the device lease allows (each well under 10 minutes).
# Run from the repository root on the GPU machine, after the wheel prelude (../shared/device/prelude.sh):
#   bash scripts/device_run.sh check    # kernels vs reference, engine greedy equality, first benchmarks
#   bash scripts/device_run.sh report   # the report figures (transformers CB side by side, sglang-random)
#   bash scripts/device_run.sh ray      # RayEngine vs Engine, dp=1 and dp=2 sharing one GPU (docs/benchmarks.md §8)
#   bash scripts/device_run.sh overlap  # overlap scheduling vs the synchronous order (docs/benchmarks.md §15)
#   bash scripts/device_run.sh serve-procs  # --api-server-count 1 vs 2: synthetic, then dp=1 and dp=2 (§12)
# Logs and JSON results are written to $RES and packed after every step into $OUT/results.tgz (the device
# tool returns at most 8 files), so what finished comes back even if a later step runs out of time.
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

bench() {  # bench NAME TIMEOUT_S ARGS...: flotilla bench writing $OUT/NAME.json
  local name="$1" limit="$2"; shift 2
  step "$name" "$limit" python3 -m flotilla bench "$@" --json "$OUT/$name.json"
}

case "$stage" in
  check)
    python3 -c "import msgspec, zmq, triton, transformers, torch; print('imports ok', msgspec.__version__, zmq.__version__, triton.__version__, transformers.__version__, torch.__version__)" || exit 1
    TAIL=40 step kernels 150 python3 scripts/gpu_check.py kernels --out "$OUT"
    TAIL=12 step equality 200 python3 scripts/gpu_check.py equality --out "$OUT"
    bench nanovllm_qwen06 150 --model-shape qwen3-0.6b --workload nanovllm
    bench decode_llama8b 120 --model-shape llama-3.1-8b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline
    TAIL=80 step runner 150 python3 scripts/gpu_check.py runner --out "$OUT"
    ;;
  tune)
    TAIL=12 step sweep 200 python3 scripts/gpu_check.py sweep --out "$OUT"
    TAIL=70 step runner 200 python3 scripts/gpu_check.py runner --out "$OUT"
    bench decode_llama8b 120 --model-shape llama-3.1-8b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline
    bench sglang_random_llama8b 200 --model-shape llama-3.1-8b --workload sglang-random
    ;;
  perf)  # profiles of one decode step, and the llama-3.1-8b figures
    TAIL=45 step runner_llama8b 150 python3 scripts/gpu_check.py runner --runner-cases llama-3.1-8b:1:1024 --out "$OUT"
    TAIL=45 step runner_qwen06 150 python3 scripts/gpu_check.py runner --runner-cases qwen3-0.6b:256:800 --out "$OUT"
    bench decode_llama8b 120 --model-shape llama-3.1-8b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline
    bench sglang_random_llama8b 200 --model-shape llama-3.1-8b --workload sglang-random
    bench nanovllm_qwen06 120 --model-shape qwen3-0.6b --workload nanovllm
    ;;
  report)  # Flotilla and transformers CB on the nanovllm workload, one after the other on one GPU
    bench nanovllm_qwen06 120 --model-shape qwen3-0.6b --workload nanovllm
    bench nanovllm_qwen06_transformers 420 --model-shape qwen3-0.6b --workload nanovllm --backend transformers
    ;;
  verify)  # correctness of the final tree: kernels vs reference, greedy tokens graph/eager/torch/transformers
    TAIL=40 step kernels 200 python3 scripts/gpu_check.py kernels --out "$OUT"
    TAIL=12 step equality 240 python3 scripts/gpu_check.py equality --out "$OUT"
    bench decode_llama8b 120 --model-shape llama-3.1-8b --workload random --num-prompts 1 --input-len 1024 \
      --output-len 256 --warmup-requests 2 --roofline
    ;;
  ray)  # RayEngine vs Engine (mp) on one GPU, dp=1 and dp=2 sharing it; then the same tree before the front-end
        # change (a copy of the previous commit's flotilla/ in .fe_old, carried with the call), side by side
    step frontend 60 bash -c "python3 scripts/frontend_bench.py --json $OUT/frontend.json; \
      cd .fe_old && PYTHONPATH=\$PWD:\$PYTHONPATH python3 ../scripts/frontend_bench.py --json $OUT/frontend_old.json"
    bench mp_dp1 120 --model-shape qwen3-0.6b --workload nanovllm
    bench ray_dp1 150 --model-shape qwen3-0.6b --workload nanovllm --ray
    bench mp_dp2 150 --model-shape qwen3-0.6b --workload nanovllm --dp-size 2
    bench ray_dp2 150 --model-shape qwen3-0.6b --workload nanovllm --dp-size 2 --ray --gpus-per-rank 0.5
    for dp in 1 2; do
      step "old_mp_dp$dp" 150 bash -c "cd .fe_old && PYTHONPATH=\$PWD:\$PYTHONPATH python3 -m flotilla bench --model-shape qwen3-0.6b \
        --workload nanovllm --dp-size $dp --json $OUT/old_mp_dp$dp.json"
    done
    ;;
  ray-throughput)  # the same four layouts on a throughput-bound workload (1024 requests, 256 in / 256 out)
    wl=(--model-shape qwen3-0.6b --workload random --num-prompts 1024 --input-len 256 --output-len 256)
    bench tp_mp_dp1 150 "${wl[@]}"
    bench tp_ray_dp2 150 "${wl[@]}" --dp-size 2 --ray --gpus-per-rank 0.5
    bench tp_mp_dp2 150 "${wl[@]}" --dp-size 2
    bench tp_ray_dp1 150 "${wl[@]}" --ray
    ;;
  ray-concurrency)  # is two replicas on one GPU more than twice the batch? dp=1 with 512 sequences beside them
    wl=(--model-shape qwen3-0.6b --workload random --num-prompts 1024 --input-len 256 --output-len 256)
    bench cc_mp_dp1_seqs512 150 "${wl[@]}" --max-num-seqs 512 --cuda-graph-max-bs 512
    bench cc_ray_dp2 150 "${wl[@]}" --dp-size 2 --ray --gpus-per-rank 0.5
    bench cc_mp_dp1 150 "${wl[@]}"
    ;;
  overlap)  # issue 18: overlap scheduling against the synchronous order, side by side (same GPU, same call)
    TAIL=12 step equality 240 python3 scripts/gpu_check.py equality --out "$OUT"  # includes overlap == sync
    for mode in sync overlap; do
      flag=(--no-overlap-schedule); [ "$mode" = overlap ] && flag=(--overlap-schedule)
      bench "nanovllm_qwen06_$mode" 120 --model-shape qwen3-0.6b --workload nanovllm "${flag[@]}"
      bench "decode_llama8b_$mode" 120 --model-shape llama-3.1-8b --workload random --num-prompts 1 \
        --input-len 1024 --output-len 256 --warmup-requests 2 --roofline "${flag[@]}"
      bench "sglang_random_llama8b_$mode" 200 --model-shape llama-3.1-8b --workload sglang-random "${flag[@]}"
    done
    bench nanovllm_qwen06_transformers 420 --model-shape qwen3-0.6b --workload nanovllm --backend transformers
    ;;
  serve-procs)  # issue 28: HTTP processes over one engine (docs/benchmarks.md §12), 1 vs 2, each beside its baseline
    S=(--synthetic --synthetic-step-ms 0 -n 2048 --concurrency 256 --input-len 16 --output-len 256 --client-processes 4)
    for n in 1 2; do
      step "syn_procs$n" 50 python3 -m flotilla bench-serve "${S[@]}" --api-server-count $n --json "$OUT/syn_procs$n.json"
    done
    W=(--model-shape qwen3-0.6b --dtype bfloat16 -n 1024 --input-len 256 --output-len 256 --client-processes 4 \
       --concurrency 256 --offline)
    for dp in 1 2; do
      for n in 1 2; do
        step "serve_dp${dp}_procs$n" 110 python3 -m flotilla bench-serve "${W[@]}" --dp-size $dp --api-server-count $n \
          --json "$OUT/serve_dp${dp}_procs$n.json"
      done
    done
    ;;
  *)
    echo "unknown stage $stage"; exit 2 ;;
esac
