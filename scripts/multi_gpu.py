"""Issue 10 on a multi-GPU machine: every layout gives tp=1's greedy tokens over NCCL, Engine and RayEngine.

Usage (repository root, after the wheel prelude): python3 scripts/multi_gpu.py --out $OUT
Prints one line per layout and writes multi_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

PROMPTS = ["The capital of France is", "Hello", "Once upon a time there was a little fox who lived in a deep "
           "green forest near the river", "A"]
LAYOUTS = [dict(tp_size=2), dict(dp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)]


def run(cls, path, **kw):
    from flotilla import SamplingParams

    t0 = time.monotonic()
    with cls(model=path, device="cuda", dtype="float32", **kw) as engine:
        outs = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True),
                               use_tqdm=False)
    return [o["token_ids"] for o in outs], time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()
    from flotilla import Engine
    from flotilla.tools.tiny import tiny_model_path

    results = []
    engines = [("Engine", Engine)]
    if args.ray:
        import ray

        from flotilla.frontend.ray_engine import RayEngine

        ray.init(include_dashboard=False, log_to_driver=False)
        engines.append(("RayEngine", RayEngine))
    for arch in ("llama", "qwen3_moe"):
        path = str(tiny_model_path(arch, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=32)
                   if arch == "qwen3_moe" else tiny_model_path(arch, hidden_size=256, intermediate_size=512,
                                                                num_attention_heads=8, num_key_value_heads=2,
                                                                head_dim=32))
        ref, secs = run(Engine, path)
        print(f"{arch} tp=1 reference in {secs:.1f}s", flush=True)
        for name, cls in engines:
            for layout in LAYOUTS:
                try:
                    toks, secs = run(cls, path, **layout)
                    ok = toks == ref
                    err = None
                except Exception as e:  # keep going: one broken layout must not hide the others
                    ok, secs, err = False, 0.0, f"{type(e).__name__}: {e}"
                results.append({"arch": arch, "engine": name, "layout": layout, "equal_to_tp1": ok,
                                "seconds": round(secs, 1), "error": err})
                print(f"{arch} {name} {layout}: {'EQUAL' if ok else 'DIFFERENT'} ({secs:.1f}s) {err or ''}", flush=True)
    with open(os.path.join(args.out, "multi_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["equal_to_tp1"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
