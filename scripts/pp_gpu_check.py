"""Issue 11 on a 2-GPU machine: pipeline parallel (NCCL point to point) gives transformers' greedy tokens.

Usage (repository root, after the wheel prelude): python3 scripts/pp_gpu_check.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
    from flotilla import Engine, SamplingParams

    n = 16
    path = tiny("llama")
    want = [hf_greedy(path, hf_tokenize(path, p), n) for p in PROMPTS] * 2
    layouts = [dict(pp_size=2), dict(pp_size=2, pp_layer_partition=[3, 1]), dict(pp_size=2, dp_size=2)]
    bad = 0
    for kw in layouts:
        t0 = time.monotonic()
        try:
            with Engine(model=path, device="cuda", dtype="float32", **kw) as engine:
                outs = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
                                       use_tqdm=False)
                rep = engine.stats()["replicas"][0]
            ok = [o["token_ids"] for o in outs] == want
            print(kw, "equal" if ok else "DIFFERENT", f"{time.monotonic() - t0:.1f}s", rep["stage_forwards"],
                  rep["max_in_flight"], flush=True)
            bad += not ok
        except Exception as e:  # keep going: one line per layout
            print(kw, "ERROR", type(e).__name__, str(e)[:1500], flush=True)
            bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
