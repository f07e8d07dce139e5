"""GPU checks and tile measurement for the fused MoE; run on the device machine (see scripts/device_run.sh moe).

    python scripts/moe_check.py sweep --out DIR      # tiles per batch bucket for qwen3-30b-a3b's MoE shape;
                                                      # writes flotilla/model/layers/moe_configs/*.json
    python scripts/moe_check.py layer --out DIR      # one MoE layer: Triton (chosen tiles) vs torch reference
    python scripts/moe_check.py profile --out DIR    # one qwen3-30b-a3b decode step: graph vs eager, top kernels
    python scripts/moe_check.py equality --out DIR   # tiny MoE checkpoints: greedy tokens vs transformers (fp32),
                                                      # CUDA graphs vs eager (fp32 and bf16)

Timings flush the L2 between launches: in a real decode step a layer's experts are not in the L2 (the other
47 layers' weights passed through it since), so a warm-L2 timing would pick tiles for the wrong regime.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from flotilla.model.layers import fused_moe as fm  # noqa: E402

SHAPE = dict(E=128, N=768, K=2048, top_k=8)  # Qwen3-30B-A3B, tp=1
SWEEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

_flush = None


def timed(fn, iters: int = 10) -> float:
    """Median microseconds of ``fn`` with the L2 flushed (a 256 MB write) before each launch."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    ts = []
    for _ in range(iters):
        _flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def candidates(block_m: int) -> list[dict]:
    if block_m == 16:
        grid = itertools.product((32, 64, 128), (64, 128, 256), (4,), (3, 4), (1,))
    elif block_m == 128:
        grid = itertools.product((64, 128), (64,), (8,), (3, 4), (8,))
    else:
        grid = itertools.product((64, 128), (64, 128), (4,), (3, 4), (8,))
    return [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s, GROUP_M=g) for n, k, w, s, g in grid]


def block_ms(t: int, top_k: int, e: int) -> list[int]:
    avg = t * top_k / e
    return [bm for bm in (16, 32, 64, 128) if bm == 16 or bm <= 4 * avg]


def _weights(seed: int = 0):
    e, n, k = SHAPE["E"], SHAPE["N"], SHAPE["K"]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(e, k, n, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    return w13, w2


def all_variants() -> list[tuple[int, str, dict]]:
    return [(bm, which, c) for bm in (16, 32, 64, 128) for which in ("up", "down") for c in candidates(bm)]


def compile_part(part: int, parts: int) -> None:
    """Compile (by launching once) every ``parts``-th sweep variant into Triton's on-disk cache, so the
    sweep's own process finds them compiled; several of these run side by side."""
    e, n, k, top_k = SHAPE["E"], SHAPE["N"], SHAPE["K"], SHAPE["top_k"]
    w13, w2 = _weights()
    t = 64
    x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
    ids = torch.rand(t, e, device="cuda").topk(top_k, dim=-1).indices.to(torch.int32)
    wts = torch.rand(t, top_k, device="cuda")
    act = torch.empty(t * top_k, n, device="cuda", dtype=torch.bfloat16)
    outb = torch.empty(t * top_k, k, device="cuda", dtype=torch.bfloat16)
    for i, (bm, which, c) in enumerate(all_variants()):
        if i % parts != part:
            continue
        s_ids, experts, total = fm.align_triton(ids, e, bm)
        try:
            if which == "up":
                fm._gemm(x, w13, act, None, s_ids, experts, total, n, top_k, True, bm, c)
            else:
                fm._gemm(act, w2, outb, wts.view(-1), s_ids, experts, total, k, 1, False, bm, c)
        except Exception as exc:  # noqa: BLE001
            print(f"compile skip {bm} {which} {c}: {type(exc).__name__}", flush=True)
    torch.cuda.synchronize()


def prewarm(parts: int = 12) -> float:
    import subprocess

    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "compile", "--part", str(i), "--parts", str(parts)])
             for i in range(parts)]
    for pr in procs:
        pr.wait()
    return time.perf_counter() - t0


def sweep(out: pathlib.Path) -> dict:
    e, n, k, top_k = SHAPE["E"], SHAPE["N"], SHAPE["K"], SHAPE["top_k"]
    dt = torch.bfloat16
    print(f"prewarm: {prewarm():.1f}s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13, w2 = _weights()
    table, detail = {}, {}
    t0 = time.perf_counter()
    for t in SWEEP_BUCKETS:
        x = torch.randn(t, k, device="cuda", generator=gen).to(dt)
        ids = torch.rand(t, e, device="cuda", generator=gen).topk(top_k, dim=-1).indices.to(torch.int32)
        weights = torch.rand(t, top_k, device="cuda", generator=gen)
        act = torch.empty(t * top_k, n, device="cuda", dtype=dt)
        outb = torch.empty(t * top_k, k, device="cuda", dtype=dt)
        best = None
        for bm in block_ms(t, top_k, e):
            s_ids, experts, total = fm.align_triton(ids, e, bm)
            res = {}
            for which in ("up", "down"):
                scores = []
                for c in candidates(bm):
                    if which == "up":
                        fn = lambda c=c: fm._gemm(x, w13, act, None, s_ids, experts, total, n, top_k, True, bm, c)  # noqa: E731
                    else:
                        fn = lambda c=c: fm._gemm(act, w2, outb, weights.view(-1), s_ids, experts, total, k, 1,  # noqa: E731
                                                  False, bm, c)
                    try:
                        scores.append((timed(fn), c))
                    except Exception as exc:  # noqa: BLE001  (out of shared memory and the like)
                        print(f"  skip bm={bm} {which} {c}: {type(exc).__name__}")
                scores.sort(key=lambda r: r[0])
                res[which] = scores[0]
            total_us = res["up"][0] + res["down"][0]
            print(f"T={t:5d} BLOCK_M={bm:3d}: up {res['up'][0]:8.1f} us {res['up'][1]}  down {res['down'][0]:8.1f} us "
                  f"{res['down'][1]}", flush=True)
            detail[f"{t}/{bm}"] = {"up_us": res["up"][0], "down_us": res["down"][0]}
            if best is None or total_us < best[0]:
                best = (total_us, bm, res)
        _, bm, res = best
        table[str(t)] = {"BLOCK_M": bm, "up": res["up"][1], "down": res["down"][1],
                         "measured_us": {"up": round(res["up"][0], 2), "down": round(res["down"][0], 2)}}
    doc = {"shape": SHAPE, "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
           "how": "scripts/moe_check.py sweep: median of 10 launches, L2 flushed before each, uniform random "
                  "top-8 routing; per bucket the BLOCK_M whose best up + best down GEMMs is fastest",
           "sweep_s": round(time.perf_counter() - t0, 1), "configs": table}
    path = fm.CONFIG_DIR / fm.config_file_name(e, n, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / path.name.replace("=", "").replace(",", "_")).write_text(json.dumps(doc, indent=1) + "\n")
    (out / "sweep_detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    fm._load_configs.cache_clear()
    return doc


def layer(out: pathlib.Path) -> dict:
    """The whole layer (routing included) per bucket, with the stored tiles; the torch path at a few sizes;
    and the bytes of the experts a batch really touches against the copy bandwidth."""
    from flotilla.tools.bench import copy_bandwidth
    from flotilla.model.layers.moe import grouped_experts, route

    e, n, k, top_k = SHAPE["E"], SHAPE["N"], SHAPE["K"], SHAPE["top_k"]
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(1)
    w13 = (torch.randn(e, 2 * n, k, device="cuda", generator=gen) * 0.02).to(dt)
    w2 = (torch.randn(e, k, n, device="cuda", generator=gen) * 0.02).to(dt)
    bw = copy_bandwidth()
    rows = {}
    for t in SWEEP_BUCKETS:
        x = torch.randn(t, k, device="cuda", generator=gen).to(dt)
        logits = torch.randn(t, e, device="cuda", generator=gen).to(dt)
        us = timed(lambda: fm.fused_moe(x, logits, w13, w2, top_k, True))
        touched = int(torch.unique(fm.route_triton(logits, top_k, True)[1]).numel())
        floor_us = touched * 3 * n * k * 2 / bw * 1e6
        row = {"triton_us": round(us, 1), "experts_touched": touched, "weight_floor_us": round(floor_us, 1),
               "pct_of_floor": round(100 * floor_us / us, 1), "config": fm.get_config(e, n, k, t)["BLOCK_M"]}
        if t in (1, 64, 512):
            def ref():
                w, i = route(logits, top_k, True)
                return grouped_experts(x, w13, w2, w, i)
            row["torch_us"] = round(timed(ref, iters=3), 1)
            got, want = fm.fused_moe(x, logits, w13, w2, top_k, True).float(), ref().float()
            row["rel_err_vs_torch"] = float((got - want).norm() / want.norm())
        rows[t] = row
        print(f"layer T={t:5d}: {row}", flush=True)
    doc = {"copy_bandwidth_GBps": bw / 1e9, "rows": rows}
    (out / "moe_layer.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _engine_tokens(path: str, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    from flotilla.frontend.engine import Engine

    with Engine(model=path, device="cuda", **kw) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0.0,
                                                                  "ignore_eos": True}, use_tqdm=False)
    return [o["token_ids"] for o in outs]


def _hf_tokens(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ref = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        ref.append(o[0, len(p):].tolist())
    del hf
    return ref


def equality(out: pathlib.Path) -> dict:
    """Greedy tokens of tiny Qwen3-MoE checkpoints: Flotilla (Triton MoE, graphs and eager) vs transformers in
    float32 on the GPU; graphs vs eager in bf16."""
    from flotilla.tools.tiny import tiny_model_path

    rs = np.random.RandomState(7)
    prompts = [rs.randint(5, 500, n).tolist() for n in (1, 3, 15, 17, 40, 100, 250)]  # decode bs 7 -> graph 8
    report = {}
    for name, over in (("qwen3_moe", {}), ("qwen3_moe-e32k4", dict(num_experts=32, num_experts_per_tok=4))):
        path = str(tiny_model_path("qwen3_moe", **over))
        for dtype in ("float32", "bfloat16"):
            common = dict(dtype=dtype, kv_cache_tokens=16384, max_model_len=1024, attention_backend="triton",
                          cuda_graph_max_bs=16)
            g = _engine_tokens(path, prompts, 32, enable_cuda_graph=True, **common)
            e = _engine_tokens(path, prompts, 32, enable_cuda_graph=False, **common)
            row = {"graph==eager": f"{sum(a == b for a, b in zip(g, e))}/{len(prompts)}"}
            if dtype == "float32":
                ref = _hf_tokens(path, prompts, 32)
                row["graph==transformers"] = f"{sum(a == b for a, b in zip(g, ref))}/{len(prompts)}"
                row["eager==transformers"] = f"{sum(a == b for a, b in zip(e, ref))}/{len(prompts)}"
            report[f"{name}/{dtype}"] = row
            print(f"equality {name}/{dtype}: {row}", flush=True)
    (out / "moe_equality.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def profile(out: pathlib.Path, bs: int = 1, ctx: int = 1152, top: int = 25) -> dict:
    """One qwen3-30b-a3b decode step at batch ``bs``: graph replay time (GPU only), the sum of its kernels'
    times, and the top kernels of an eager step by GPU time (where the step's time goes)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from gpu_check import _decode_plans, _fill_kv, _runner, time_ms

    runner = _runner("qwen3-30b-a3b", max_bs=max(bs, 1))
    plans = _decode_plans(runner, bs, ctx, np.random.RandomState(0))
    _fill_kv(runner, plans)
    g = runner.graphs
    g.run(plans)
    res: dict = {"bs": bs, "ctx": ctx, "graph_replay_ms": time_ms(lambda: g.graphs[g.bucket(bs)].replay())}
    saved, runner.graphs = runner.graphs, None
    with torch.inference_mode():
        eager = runner.forward(plans).clone()
        res["eager_ms"] = time_ms(lambda: runner.forward(plans), warmup=3, iters=10)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.forward(plans)
            torch.cuda.synchronize()
    runner.graphs = saved
    graph_logits = runner.forward(plans).clone()
    res["graph_vs_eager_max_abs_diff"] = (graph_logits - eager).abs().max().item()
    res["graph_vs_eager_argmax_equal"] = bool(torch.equal(graph_logits.argmax(-1), eager.argmax(-1)))
    evs = prof.key_averages()
    res["kernel_ms_per_step"] = sum(e.self_device_time_total for e in evs) / 5 / 1e3
    res["kernels_per_step"] = sum(e.count for e in evs if e.self_device_time_total > 0) / 5
    table = evs.table(sort_by="self_device_time_total", row_limit=top)
    print(json.dumps(res, indent=1))
    print(table)
    res["table"] = table
    (out / "moe_profile.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["sweep", "layer", "equality", "compile", "profile"])
    p.add_argument("--out", default=".")
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    a = p.parse_args()
    if a.what == "compile":
        compile_part(a.part, a.parts)
        return 0
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    {"sweep": sweep, "layer": layer, "equality": equality, "profile": profile}[a.what](out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
