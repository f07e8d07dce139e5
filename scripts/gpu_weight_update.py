"""GPU check of in-place weight updates (docs/weight_updates.md), on the device machine:

    python3 scripts/gpu_weight_update.py

Engine(A) on CUDA with decode CUDA graphs: update to B's tensors -> the same tokens as Engine(B); back to A;
release_memory(weights=True) frees the GPU memory and resume_memory() gives the same tokens again (graphs
captured anew); the update itself is timed.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from safetensors.torch import load_file  # noqa: E402

from flotilla import Engine, SamplingParams  # noqa: E402
from flotilla.tools.tiny import tiny_model_path  # noqa: E402

PROMPTS = ["The capital of France is", "Hello", "Once upon a time there was a little fox", "A"]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(str(path), "*.safetensors"))):
        out.update(load_file(f))
    return out


def tokens(engine) -> list[list[int]]:
    return [o["token_ids"] for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


def main() -> int:
    a, b = tiny_model_path("llama", seed=0), tiny_model_path("llama", seed=1)
    opts = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    ok = True
    with Engine(model=str(b), **opts) as eb:
        want_b = tokens(eb)
    for dp in (1, 2):
        with Engine(model=str(a), dp_size=dp, **opts) as engine:
            want_a = tokens(engine)
            ok &= want_a != want_b
            wb = {k: v.cuda() for k, v in weights(b).items()}  # a trainer's tensors live on the GPU
            t0 = time.perf_counter()
            engine.update_weights(wb)
            dt = time.perf_counter() - t0
            got_b = tokens(engine)
            engine.update_weights_from_disk(a)
            got_a = tokens(engine)
            before = free_gib()
            engine.release_memory(weights=True)
            released = free_gib()
            engine.resume_memory()
            resumed = free_gib()
            again = tokens(engine)
            stats = engine.stats()
            print(f"dp={dp}: update {dt * 1000:.0f} ms; B tokens {got_b == want_b}; back to A {got_a == want_a}; "
                  f"after release/resume {again == want_a}; free GiB {before:.1f} -> {released:.1f} -> {resumed:.1f}; "
                  f"versions {stats['weight_version']} {[r['weight_version'] for r in stats['replicas']]}")
            ok &= got_b == want_b and got_a == want_a and again == want_a and released > before + 1
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
