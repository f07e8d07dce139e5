#!/bin/bash
# One H200 call for this wave's serving and weight-update figures (docs/benchmarks.md §11, §12).
# Run from the repo root on the device machine after the prelude; writes JSON and logs under $OUT.
set -u
W="--model-shape qwen3-0.6b -n 1024 --input-len 256 --output-len 256 --client-processes 4"
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -25 "$OUT/$name.log"; }
run serve_dp1_c256 150 python3 -m flotilla bench-serve $W --concurrency 256 --offline --json "$OUT/serve_dp1_c256.json"
run serve_dp2_c256 150 python3 -m flotilla bench-serve $W --concurrency 256 --offline --dp-size 2 --json "$OUT/serve_dp2_c256.json"
run serve_dp1_c32 110 python3 -m flotilla bench-serve --model-shape qwen3-0.6b -n 256 --input-len 256 --output-len 256 \
    --client-processes 2 --concurrency 32 --json "$OUT/serve_dp1_c32.json"
run ipc 150 python3 scripts/bench_weight_update_ipc.py --repeats 3
cp "$OUT/ipc.log" "$OUT/ipc.json" 2>/dev/null
