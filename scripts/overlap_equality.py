"""Overlap scheduling against the synchronous order: the same prompts through two engines, tokens compared exactly.

What it runs, per (model, dtype): one engine with ``enable_overlap_schedule=False`` and one with it on, CUDA
graphs on where the device has them, tp 1, the same requests submitted at once:

* a mix of prompt lengths (1 token to well past ``max_num_batched_tokens``, so long prompts are prefilled in
  chunks across steps while the short ones already decode: mixed prefill + decode steps) and of output
  lengths (sequences finish at different steps, so decode batches move through the CUDA-graph buckets);
* half greedy, half seeded sampling (temperature, top-p, top-k, one seed per request);
* scenario ``mixed``: every request fits ``max_num_seqs`` and the KV pool, so both orders build the same
  batches step for step and tokens must match exactly in any dtype;
* scenario ``slots``: more requests than ``max_num_seqs``: a request that finishes at step N frees its slot one
  step later under overlap (its row of step N+1 is planned before step N's ids are read), so later batches can
  differ in size; in float32 the tokens must still match, in bf16 the row reports how many do.

Stop conditions are length-only (``ignore_eos``): with EOS stops a finished sequence also wastes one row of the
step in flight under overlap, which changes batch composition in the same way as ``slots``.

Prints one JSON object per row and a summary; exits 1 if an asserted row differs.

    python3 scripts/overlap_equality.py --device cuda --json overlap_equality.json
    python3 scripts/overlap_equality.py --device cpu --models llama --dtypes float32 --quick   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _requests(vocab: int, n: int, long_len: int, max_out: int, seed: int = 11):
    """(prompts, sampling dicts): lengths from 1 to ``long_len``, outputs 1..``max_out``, half greedy, half seeded."""
    rs = np.random.RandomState(seed)
    fixed = [1, 2, 3, 15, 16, 17, 31, 33, 64, 100, long_len // 2, long_len]
    lens = (fixed + rs.randint(1, long_len + 1, max(0, n - len(fixed))).tolist())[:n]
    prompts = [rs.randint(5, vocab, k).tolist() for k in lens]
    outs = rs.randint(1, max_out + 1, n).tolist()
    outs[0] = max_out  # at least one request runs to the end
    sps = []
    for i, m in enumerate(outs):
        if i % 2 == 0:
            sps.append({"max_new_tokens": m, "temperature": 0.0, "ignore_eos": True})
        else:
            sps.append({"max_new_tokens": m, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 1000 + i,
                        "ignore_eos": True})
    return prompts, sps


def _run(path: str, prompts, sps, overlap: bool, device: str, **kw) -> tuple[list[list[int]], dict]:
    from flotilla.frontend.engine import Engine

    t0 = time.perf_counter()
    with Engine(model=path, device=device, enable_overlap_schedule=overlap, **kw) as eng:
        start = time.perf_counter() - t0
        t1 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=sps, use_tqdm=False)
        gen = time.perf_counter() - t1
        stats = eng.stats()
    rep = (stats.get("replicas") or [{}])[0]
    info = {"start_s": round(start, 1), "generate_s": round(gen, 2)}
    for key in ("num_steps", "num_overlapped_steps", "num_preemptions"):
        if isinstance(rep, dict) and rep.get(key) is not None:
            info[key] = rep[key]
    return [o["token_ids"] for o in outs], info


def _compare(a: list[list[int]], b: list[list[int]], sps) -> dict:
    same = [x == y for x, y in zip(a, b)]
    greedy = [s for s, sp in zip(same, sps) if sp["temperature"] == 0.0]
    seeded = [s for s, sp in zip(same, sps) if sp["temperature"] != 0.0]
    first = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            d = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            first.append({"request": i, "first_diff_at": d, "len": [len(x), len(y)]})
    return {"equal": f"{sum(same)}/{len(same)}", "greedy_equal": f"{sum(greedy)}/{len(greedy)}",
            "seeded_equal": f"{sum(seeded)}/{len(seeded)}", "tokens": sum(len(x) for x in a),
            "all_equal": all(same) and len(a) == len(b), "diffs": first[:8]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="llama,qwen3", help="tiny architectures, and/or built-in shapes "
                    "(e.g. llama-3.1-8b: dummy weights of the real shape)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--scenarios", default="mixed,slots")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter requests (CPU smoke run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from flotilla.model.shapes import SHAPES, write_shape
    from flotilla.tools.tiny import tiny_model_path

    if a.device == "cuda":
        import torch

        print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    rows, failed = [], []
    for model in a.models.split(","):
        shape = model in SHAPES
        path = str(write_shape(model) if shape else tiny_model_path(model))
        vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
        for dtype in a.dtypes.split(","):
            if a.device == "cpu" and dtype != "float32":
                continue
            for scen in a.scenarios.split(","):
                if a.quick:
                    n, long_len, max_out, budget = 12, 80, 12, 32
                elif shape:
                    n, long_len, max_out, budget = 48, 1500, 48, 512
                else:
                    n, long_len, max_out, budget = 64, 900, 64, 256
                prompts, sps = _requests(vocab, n, long_len, max_out)
                kw = dict(dtype=dtype, max_model_len=2048, max_num_batched_tokens=budget)
                kw["max_num_seqs"] = n if scen == "mixed" else max(2, n // 4)
                if shape:
                    kw.update(load_format="dummy", gpu_memory_utilization=0.85)
                else:
                    kw["kv_cache_tokens"] = 65536 if a.device == "cuda" else 16384
                if a.device == "cuda":
                    kw.update(enable_cuda_graph=True, cuda_graph_max_bs=kw["max_num_seqs"])
                sync, s_info = _run(path, prompts, sps, False, a.device, **kw)
                over, o_info = _run(path, prompts, sps, True, a.device, **kw)
                cmp = _compare(sync, over, sps)
                asserted = scen == "mixed" or dtype == "float32"
                row = {"model": model, "dtype": dtype, "scenario": scen, "device": a.device, "requests": n,
                       "asserted": asserted, **cmp, "sync": s_info, "overlap": o_info,
                       "options": {k: v for k, v in kw.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if asserted and not cmp["all_equal"]:
                    failed.append(f"{model}/{dtype}/{scen}")
    print("\noverlap vs sync, tokens compared exactly")
    print(f"{'model':<14}{'dtype':<10}{'scenario':<9}{'equal':>8}{'greedy':>8}{'seeded':>8}{'tokens':>8}"
          f"{'sync s':>8}{'ovl s':>8}{'ovl steps':>11}  asserted")
    for r in rows:
        ov = r["overlap"]
        print(f"{r['model']:<14}{r['dtype']:<10}{r['scenario']:<9}{r['equal']:>8}{r['greedy_equal']:>8}"
              f"{r['seeded_equal']:>8}{r['tokens']:>8}{r['sync']['generate_s']:>8}{ov['generate_s']:>8}"
              f"{str(ov.get('num_overlapped_steps', '-')) + '/' + str(ov.get('num_steps', '-')):>11}  "
              f"{'yes' if r['asserted'] else 'no'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "failed": failed}, f, indent=1)
    print("FAILED: " + ", ".join(failed) if failed else "all asserted rows equal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
