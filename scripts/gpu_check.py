"""GPU checks and measurements for the fast path; run on the device machine (see scripts/device_run.sh).

    python scripts/gpu_check.py kernels    # Triton attention + fused layers vs the torch reference; timings
    python scripts/gpu_check.py equality   # greedy tokens: CUDA graphs vs eager vs torch backend, via Engine
    python scripts/gpu_check.py runner     # ModelRunner-level decode step: graph replay, eager, fused off,
                                           # host overhead, and the top kernels of a step (torch profiler)

Also importable on CPU: ``check_attention`` runs under TRITON_INTERPRET=1 (tests/test_gpu_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flotilla.model.attention import AttentionMetadata, TorchAttention  # noqa: E402
from flotilla.model.attention.torch_backend import write_kv  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def make_case(q_lens, ctx, heads, kv_heads, dim, dev, dtype, block_size=16, gen=None, spare_blocks=3,
              kv_dtype=None):
    """A random paged batch: metadata, K/V pools (in ``kv_dtype``, default ``dtype``) with the new tokens' rows
    not yet written, and q/k/v."""
    gen = gen or torch.Generator().manual_seed(0)
    b = len(q_lens)
    need = [-(-c // block_size) for c in ctx]
    nblocks = sum(need) + spare_blocks
    perm = torch.randperm(nblocks, generator=gen).numpy()
    tables = np.zeros((b, max(need)), np.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    pos = np.concatenate([np.arange(c - q, c) for q, c in zip(q_lens, ctx)])
    seq = np.repeat(np.arange(b), q_lens)
    slots = tables[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
    cu = np.zeros(b + 1, np.int32)
    np.cumsum(q_lens, out=cu[1:])
    meta = AttentionMetadata(torch.from_numpy(slots).to(dev), torch.from_numpy(cu).to(dev),
                             torch.tensor(ctx, dtype=torch.int32, device=dev), torch.from_numpy(tables).to(dev),
                             list(q_lens), list(ctx), block_size, max(q_lens), max(ctx), all(q == 1 for q in q_lens))
    t = sum(q_lens)
    kc = torch.randn(nblocks, block_size, kv_heads, dim, generator=gen).to(dev, kv_dtype or dtype)
    vc = torch.randn(nblocks, block_size, kv_heads, dim, generator=gen).to(dev, kv_dtype or dtype)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=gen).to(dev, dtype)
    q = qkv[:, :heads * dim].reshape(t, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].reshape(t, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].reshape(t, kv_heads, dim)
    return meta, kc, vc, q, k, v


def check_attention(dev: str = "cuda", dtype: torch.dtype = torch.bfloat16, verbose: bool = True,
                    kv_dtype: torch.dtype | None = None) -> None:
    """Triton backend vs the torch reference on fresh random paged batches (poisoned outputs, every case);
    with ``kv_dtype`` (an FP8 type) both read the same FP8 pool, so they must agree as closely as in ``dtype``."""
    from flotilla.model.attention.triton_backend import MIXED_MODES, TritonAttention

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(1234)
    rs = np.random.RandomState(0)
    cases = [
        ([1, 1, 1], [5, 70, 200], 4, 2, 16),                 # decode with split-K
        ([1] * 40, rs.randint(1, 300, 40).tolist(), 4, 2, 16),  # decode, bigger batch
        ([7, 1, 100, 65], [7, 33, 250, 65], 4, 2, 16),       # mixed prefill, cached prefixes
        ([64, 3], [64, 130], 8, 8, 32),                      # MHA
        ([1, 1], [17, 300], 6, 2, 24),                       # head_dim not a power of two, group 3
        ([1, 9, 1, 1, 40, 1], [60, 9, 1, 230, 100, 7], 4, 2, 16),  # mixed: decode rows split off, between chunks
        ([1] * 12 + [2], rs.randint(2, 200, 13).tolist(), 4, 1, 16),  # mixed, mostly decodes, split-K, MQA
    ]
    if dev == "cuda":
        cases += [([1], [1024], 32, 8, 128), ([1] * 64, rs.randint(1, 2000, 64).tolist(), 16, 8, 128),
                  ([300, 1, 1, 513], [300, 900, 40, 2000], 32, 8, 128), ([2048], [2048], 16, 8, 128)]
    for mixed in MIXED_MODES:
        _check_attention_cases(TritonAttention(torch.device(dev), mixed=mixed), cases, dev, dtype, gen, tol, verbose,
                               kv_dtype)
    if kv_dtype is None:
        _check_padded_rows(TritonAttention(torch.device(dev)), dev, dtype, gen, verbose)


def _check_attention_cases(be, cases, dev, dtype, gen, tol, verbose, kv_dtype=None) -> None:
    for q_lens, ctx, h, kvh, d in cases:
        meta, kc, vc, q, k, v = make_case(q_lens, ctx, h, kvh, d, dev, dtype, gen=gen, kv_dtype=kv_dtype)
        kc2, vc2 = kc.clone(), vc.clone()
        be.write_kv(kc, vc, k, v, meta.slot_mapping)
        write_kv(kc2, vc2, k.contiguous(), v.contiguous(), meta.slot_mapping)
        # bit for bit in the model's dtype; into FP8 the two casts may round a tie differently: a few bytes
        differ = max((a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()
                     for a, b in ((kc, kc2), (vc, vc2)))
        assert differ <= (0 if kv_dtype is None else 1e-3), f"write_kv differs from the reference ({differ:.2e})"
        be.plan(meta)
        o = be.forward(q.contiguous(), kc, vc, meta, d ** -0.5)
        r = TorchAttention().forward(q.contiguous(), kc2, vc2, meta, d ** -0.5)
        e = rel(o, r)
        if verbose:
            pool = "" if kv_dtype is None else f" {kv_dtype}"
            print(f"attention [{be.mixed}{pool}] q_lens={q_lens[:4]}.. ctx={ctx[:4]}.. H={h} KVH={kvh} D={d} "
                  f"decode={meta.is_decode} rel={e:.2e}")
        assert torch.isfinite(o).all() and e < tol, (be.mixed, q_lens, ctx, e)
        # a second layer of the same forward reuses the forward's plan and scratch: the same output
        assert torch.equal(be.forward(q.contiguous(), kc, vc, meta, d ** -0.5), o), (be.mixed, q_lens, ctx)


def _check_padded_rows(be, dev, dtype, gen, verbose) -> None:
    # padded decode rows (slot -1, context 0) leave the cache alone and give zeros
    meta, kc, vc, q, k, v = make_case([1, 1], [9, 40], 4, 2, 16, dev, dtype, gen=gen)
    meta.slot_mapping[1] = -1
    meta.context_lens[1] = 0
    before = kc.clone()
    be.write_kv(kc, vc, k, v, meta.slot_mapping)
    expect = before.view(-1, 2, 16).clone()
    expect[int(meta.slot_mapping[0])] = k[0]
    assert torch.equal(kc.view(-1, 2, 16), expect), "a negative slot must be skipped"
    o = be.forward(q.contiguous(), kc, vc, meta, 0.25)
    assert torch.all(o[1] == 0) and torch.isfinite(o).all()
    if verbose:
        print("attention: padded rows ok")


def check_fused(dev: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> None:
    """Fused RMSNorm / rotary / SiLU-and-mul vs the torch layers (with the hooks off)."""
    from transformers import LlamaConfig

    from flotilla.model.layers import fused
    from flotilla.model.layers.activation import silu_and_mul
    from flotilla.model.layers.norm import RMSNorm
    from flotilla.model.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(5)
    saved = fused.ENABLED
    fused.ENABLED = False
    try:
        for n in (128, 1024, 4096):
            x = torch.randn(37, n, generator=gen).to(dev, dtype) * 3
            norm = RMSNorm(n, 1e-6).to(dev, dtype)
            norm.weight.data.copy_((1 + 0.1 * torch.randn(n, generator=gen)).to(dev, dtype))
            r, y = norm(x), fused.rms_norm(x, norm.weight, 1e-6)
            print(f"rms_norm n={n}: rel={rel(y, r):.1e} differing={(y != r).sum().item()}/{r.numel()}")
            assert rel(y, r) < 1e-2
        qkv = torch.randn(11, (8 + 2 * 2) * 128, generator=gen).to(dev, dtype)
        q3 = qkv[:, :1024].reshape(11, 8, 128)
        norm = RMSNorm(128, 1e-6).to(dev, dtype)
        r, y = norm(q3), fused.rms_norm(q3, norm.weight, 1e-6)
        print(f"rms_norm per-head view: rel={rel(y, r):.1e}")
        assert rel(y, r) < 1e-2
        x = torch.randn(6, 1024, generator=gen).to(dev, dtype)
        res = torch.randn(6, 1024, generator=gen).to(dev, dtype)
        norm = RMSNorm(1024, 1e-6).to(dev, dtype)
        (ry, rr), (y, rs_) = norm.add(x, res), fused.add_rms_norm(x, res, norm.weight, 1e-6)
        print(f"add_rms_norm: rel={rel(y, ry):.1e} residual equal={torch.equal(rr, rs_)}")
        assert rel(y, ry) < 1e-2 and torch.equal(rr, rs_)
        x = torch.randn(9, 2 * 3072, generator=gen).to(dev, dtype)
        r, y = silu_and_mul(x), fused.silu_and_mul(x)
        print(f"silu_and_mul: rel={rel(y, r):.1e} differing={(y != r).sum().item()}/{r.numel()}")
        assert rel(y, r) < 1e-2
        rot = RotaryEmbedding(LlamaConfig(head_dim=128, rope_theta=500000.0), 128, 4096).to(dev)
        k3 = qkv[:, 1024:1280].reshape(11, 2, 128)
        pos = torch.randint(0, 4096, (11,), generator=gen).to(dev)
        (rq, rk), (fq, fk) = rot(pos, q3, k3), fused.rotary(pos, q3, k3, rot.cos, rot.sin)
        print(f"rotary: rel q={rel(fq, rq):.1e} k={rel(fk, rk):.1e} differing={(fq != rq).sum().item()}")
        assert rel(fq, rq) < 1e-2 and rel(fk, rk) < 1e-2
    finally:
        fused.ENABLED = saved


def time_ms(fn, warmup: int = 5, iters: int = 50) -> float:
    """Median of CUDA-event timings."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_attention() -> list[dict]:
    """Triton vs torch backend, one layer's attention, llama-3.1-8b and qwen3-0.6b head layouts."""
    from flotilla.model.attention.triton_backend import TritonAttention

    rs = np.random.RandomState(1)
    cases = [
        ("decode bs=1 ctx=1024 (llama-8b heads)", [1], [1024], 32, 8),
        ("decode bs=1 ctx=8192 (llama-8b heads)", [1], [8192], 32, 8),
        ("decode bs=64 ctx~U[100,2048] (llama-8b)", [1] * 64, rs.randint(100, 2048, 64).tolist(), 32, 8),
        ("decode bs=256 ctx~U[200,2048] (qwen3-0.6b)", [1] * 256, rs.randint(200, 2048, 256).tolist(), 16, 8),
        ("prefill 8x1024 new (qwen3-0.6b)", [1024] * 8, [1024] * 8, 16, 8),
        ("prefill 512 chunk after 3584 cached (llama-8b)", [512], [4096], 32, 8),
        ("mixed: 200 decodes + 2x1024 prefill (qwen3-0.6b)", [1] * 200 + [1024] * 2,
         rs.randint(200, 2048, 200).tolist() + [1024, 1024], 16, 8),
    ]
    tri = TritonAttention(torch.device("cuda"))
    ref = TorchAttention()
    rows = []
    for name, q_lens, ctx, h, kvh in cases:
        meta, kc, vc, q, k, v = make_case(q_lens, ctx, h, kvh, 128, "cuda", torch.bfloat16, spare_blocks=64)
        write_kv(kc, vc, k.contiguous(), v.contiguous(), meta.slot_mapping)
        q = q.contiguous()
        tri.plan(meta)
        t_tri = time_ms(lambda: tri.forward(q, kc, vc, meta, 128 ** -0.5))
        t_ref = time_ms(lambda: ref.forward(q, kc, vc, meta, 128 ** -0.5), warmup=2, iters=10)
        kv_bytes = sum(ctx) * kvh * 128 * 2 * 2
        rows.append({"case": name, "triton_ms": t_tri, "torch_ms": t_ref, "speedup": t_ref / t_tri,
                     "kv_GBps_triton": kv_bytes / t_tri / 1e6})
        print(f"{name:<52} triton {t_tri:8.3f} ms  torch {t_ref:8.3f} ms  x{t_ref / t_tri:6.1f}  "
              f"(KV read {kv_bytes / t_tri / 1e6:6.0f} GB/s)")
    return rows


def sweep_attention() -> dict:
    """Time the Triton kernels under several tile / pipelining configs; prints the best per case."""
    from flotilla.model.attention import triton_backend as tb

    rs = np.random.RandomState(2)
    decode_cases = [
        ("decode bs=256 ctx~U[200,2048] qwen3-0.6b", [1] * 256, rs.randint(200, 2048, 256).tolist(), 16, 8),
        ("decode bs=64 ctx~U[100,2048] llama-8b", [1] * 64, rs.randint(100, 2048, 64).tolist(), 32, 8),
        ("decode bs=1 ctx=1024 llama-8b", [1], [1024], 32, 8),
    ]
    prefill_cases = [
        ("prefill 8x1024 qwen3-0.6b", [1024] * 8, [1024] * 8, 16, 8),
        ("prefill 512 after 3584 llama-8b", [512], [4096], 32, 8),
    ]
    decode_cfgs = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 3), (32, 2, 4),
                   (64, 8, 3), (128, 8, 4), (64, 2, 3)]
    prefill_cfgs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                    (128, 32, 4, 3), (64, 32, 4, 3)]
    saved_d, saved_p = dict(tb.DECODE_CONFIG), dict(tb.PREFILL_CONFIG)
    out: dict = {}
    be = tb.TritonAttention(torch.device("cuda"))
    try:
        for kind, cases, cfgs in (("decode", decode_cases, decode_cfgs), ("prefill", prefill_cases, prefill_cfgs)):
            for name, q_lens, ctx, h, kvh in cases:
                meta, kc, vc, q, k, v = make_case(q_lens, ctx, h, kvh, 128, "cuda", torch.bfloat16, spare_blocks=64)
                write_kv(kc, vc, k.contiguous(), v.contiguous(), meta.slot_mapping)
                q = q.contiguous()
                ref = TorchAttention().forward(q, kc, vc, meta, 128 ** -0.5)
                rows = []
                for c in cfgs:
                    if kind == "decode":
                        tb.DECODE_CONFIG.update(BLOCK_N=c[0], num_warps=c[1], num_stages=c[2])
                    else:
                        tb.PREFILL_CONFIG.update(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])
                    meta.extra.clear()
                    be.plan(meta)
                    try:
                        o = be.forward(q, kc, vc, meta, 128 ** -0.5)
                        assert rel(o, ref) < 2e-2
                        t = time_ms(lambda: be.forward(q, kc, vc, meta, 128 ** -0.5), warmup=3, iters=30)
                    except Exception as e:  # a config that does not compile (shared memory) is skipped
                        print(f"  {name} {c}: {type(e).__name__}: {str(e)[:80]}")
                        continue
                    rows.append((t, c))
                rows.sort()
                kv_bytes = sum(ctx) * kvh * 128 * 2 * 2
                print(f"{name}: " + "  ".join(f"{c}={t:.3f}ms" for t, c in rows[:5]) +
                      f"  | base {dict((c, t) for t, c in rows).get(cfgs[0], float('nan')):.3f}ms"
                      f"  | best {kv_bytes / rows[0][0] / 1e6:.0f} GB/s")
                out[name] = [(c, t) for t, c in rows]
    finally:
        tb.DECODE_CONFIG.clear()
        tb.DECODE_CONFIG.update(saved_d)
        tb.PREFILL_CONFIG.clear()
        tb.PREFILL_CONFIG.update(saved_p)
    return out


# ---------------------------------------------------------------------------------------------- engine
def _engine_tokens(path: str, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    from flotilla.frontend.engine import Engine

    with Engine(model=path, device="cuda", **kw) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0.0,
                                                                  "ignore_eos": True}, use_tqdm=False)
    return [o["token_ids"] for o in outs]


def check_equality() -> dict:
    """Greedy tokens on tiny checkpoints, bf16 and fp32: CUDA graphs (Triton) vs eager Triton vs eager torch
    backend, and graphs with overlap scheduling; graphs must equal eager Triton (and overlap) exactly. Also transformers' own greedy tokens for fp32."""
    from flotilla.tools.tiny import tiny_model_path

    rs = np.random.RandomState(7)
    # 9 prompts: decode batches of 9 replay the bs=16 graph (7 padded rows); lengths cross page edges
    prompts = [rs.randint(5, 500, n).tolist() for n in (1, 3, 15, 16, 17, 40, 100, 250, 600)]
    report = {}
    for arch, dtype in (("llama", "bfloat16"), ("llama", "float32"), ("qwen3", "bfloat16")):
        path = str(tiny_model_path(arch))
        if True:
            common = dict(dtype=dtype, kv_cache_tokens=16384, max_model_len=1024)
            g = _engine_tokens(path, prompts, 48, attention_backend="triton", enable_cuda_graph=True, **common)
            e = _engine_tokens(path, prompts, 48, attention_backend="triton", enable_cuda_graph=False, **common)
            t = _engine_tokens(path, prompts, 48, attention_backend="torch", enable_cuda_graph=False, **common)
            o = _engine_tokens(path, prompts, 48, attention_backend="triton", enable_cuda_graph=True,
                               enable_overlap_schedule=True, **common)
            same_ge = sum(a == b for a, b in zip(g, e))
            same_gt = sum(a == b for a, b in zip(g, t))
            same_go = sum(a == b for a, b in zip(g, o))
            row = {"graph==eager": f"{same_ge}/{len(prompts)}", "graph==torch": f"{same_gt}/{len(prompts)}",
                   "overlap==sync (graphs)": f"{same_go}/{len(prompts)}"}
            if dtype == "float32":
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
                ref = []
                for p in prompts:
                    ids = torch.tensor([p], device="cuda")
                    with torch.no_grad():
                        o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
                    ref.append(o[0, len(p):].tolist())
                row["graph==transformers"] = f"{sum(a == b for a, b in zip(g, ref))}/{len(prompts)}"
                del hf
            report[f"{arch}/{dtype}"] = row
            print(f"equality {arch}/{dtype}: {row}")
            if dtype == "float32":  # bf16: a padded graph batch may run other GEMM kernels than eager
                assert same_ge == len(prompts), "CUDA graph replay must give the eager tokens"
                assert same_go == len(prompts), "overlap scheduling must give the synchronous tokens"
    return report


# ---------------------------------------------------------------------------------------------- runner
def _runner(shape: str, max_bs: int, enable_graph: bool = True, backend: str = "triton"):
    from flotilla.config import EngineConfig
    from flotilla.model.shapes import write_shape
    from flotilla.worker.model_runner import ModelRunner

    path = write_shape(shape)
    cfg = EngineConfig(model=str(path), device="cuda", load_format="dummy", attention_backend=backend,
                       enable_cuda_graph=enable_graph, cuda_graph_max_bs=max_bs, max_num_seqs=max_bs,
                       max_model_len=4096, gpu_memory_utilization=0.8).resolve()
    runner = ModelRunner(cfg, torch.device("cuda"))
    runner.allocate_kv(min(runner.plan_kv_blocks(), 40000))
    return runner


def _decode_plans(runner, bs: int, ctx: int, rs: np.random.RandomState):
    from flotilla.ipc.messages import SeqPlan

    pages = -(-(ctx + 1) // runner.block_size)
    perm = rs.permutation(runner.num_blocks)[: bs * pages]
    return [SeqPlan([int(rs.randint(0, 1000))], ctx, perm[i * pages:(i + 1) * pages].tolist(), True) for i in range(bs)]


def _fill_kv(runner, plans) -> None:
    """Random K/V for every page the plans use, so attention reads real-looking data."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    for attn in runner.model.attention_layers():
        attn.k_cache.normal_(0, 1, generator=gen)
        attn.v_cache.normal_(0, 1, generator=gen)


def profile_runner(shape: str, bs: int, ctx: int, top: int = 12) -> dict:
    from flotilla.model.layers import fused
    from flotilla.worker.cuda_graph import CudaGraphRunner

    rs = np.random.RandomState(0)
    runner = _runner(shape, max_bs=max(bs, 1))
    plans = _decode_plans(runner, bs, ctx, rs)
    _fill_kv(runner, plans)
    g = runner.graphs
    res: dict = {"shape": shape, "bs": bs, "ctx": ctx}
    bsz = g.bucket(bs)
    # graph replay alone (GPU time of one step)
    g.run(plans)
    res["graph_replay_ms"] = time_ms(lambda: g.graphs[bsz].replay())
    # the whole runner.forward (host prep + copies + replay) + argmax + .tolist(), wall clock
    walls = []
    for _ in range(30):
        t0 = time.perf_counter()
        runner.forward(plans).argmax(-1).tolist()
        walls.append((time.perf_counter() - t0) * 1e3)
    res["runner_step_wall_ms"] = statistics.median(walls[5:])
    # the sampler on these logits (temperature 0.6, as the nanovllm workload), build to .tolist()
    from flotilla.sampling import SamplingParams
    from flotilla.worker.sampler import Sampler, SamplingBatch

    sp = SamplingParams(temperature=0.6, max_new_tokens=1000, ignore_eos=True)
    sampler, logits = Sampler(), runner.forward(plans)
    prompts, outputs = [[1] * ctx] * bs, [[2] * 10] * bs
    walls = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler(logits, SamplingBatch.build([sp] * bs, prompts, outputs, runner.vocab_size, "cuda")).token_ids.tolist()
        walls.append((time.perf_counter() - t0) * 1e3)
    res["sampler_wall_ms"] = statistics.median(walls[3:])
    # eager (no graph)
    saved, runner.graphs = runner.graphs, None
    with torch.inference_mode():
        res["eager_ms"] = time_ms(lambda: runner.forward(plans), warmup=3, iters=10)
        eager_logits = runner.forward(plans).clone()
    runner.graphs = saved
    graph_logits = runner.forward(plans).clone()
    res["graph_vs_eager_max_abs_diff"] = (graph_logits - eager_logits).abs().max().item()
    # the same step with the fused layers off (graph recaptured for this size)
    for label, attr in (("graph_replay_unfused_ms", "ENABLED"),):
        setattr(fused, attr, False)
        try:
            g2 = CudaGraphRunner(runner, bsz, 4096)
            g2.sizes = [bsz]
            g2.capture()
            g2.run(plans)
            res[label] = time_ms(lambda: g2.graphs[bsz].replay())
            del g2
        finally:
            setattr(fused, attr, True)
    # top kernels of an eager step
    from torch.profiler import ProfilerActivity, profile

    runner.graphs = None
    with torch.inference_mode():
        for _ in range(2):
            runner.forward(plans)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.forward(plans)
            torch.cuda.synchronize()
    runner.graphs = saved
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top)
    res["profile_top_kernels"] = table
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top_kernels"}, indent=1))
    print(table)
    del runner
    torch.cuda.empty_cache()
    return res


def pageable_copy_probe() -> dict:
    """Does a ``non_blocking`` host-to-device copy from pageable (not pinned) memory wait for the work already
    queued on the stream? A ~50 ms sleep kernel is queued, then the copies are timed on the host."""
    res = {}
    x = np.arange(4096, dtype=np.int64)
    for label, make in (("pageable", lambda: torch.from_numpy(x)), ("pinned", lambda: torch.from_numpy(x).pin_memory())):
        src = make()
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # ~25-50 ms of GPU time at H100 clocks
        t0 = time.perf_counter()
        src.to("cuda", non_blocking=True)
        res[f"{label}_copy_host_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res[f"{label}_then_sync_ms"] = round((time.perf_counter() - t1) * 1e3, 3)
    print("pageable copy probe", json.dumps(res))
    return res


def profile_mixed(shape: str, bs: int, ctx: int, prefill: int, top: int = 14) -> dict:
    """One mixed step (``bs`` decodes at context ``ctx`` + one prefill chunk of ``prefill`` new tokens), run
    eagerly as the engine runs such steps: GPU time (events), host time to launch it, top kernels."""
    from flotilla.ipc.messages import SeqPlan

    rs = np.random.RandomState(1)
    runner = _runner(shape, max_bs=max(bs, 1))
    plans = _decode_plans(runner, bs, ctx, rs)
    pages = -(-prefill // runner.block_size)
    used = {b for p in plans for b in p.block_table}
    free = [b for b in range(runner.num_blocks) if b not in used][:pages]
    plans.append(SeqPlan(rs.randint(0, 1000, prefill).tolist(), 0, free, True))
    _fill_kv(runner, plans)
    saved, runner.graphs = runner.graphs, None
    res: dict = {"shape": shape, "bs": bs, "ctx": ctx, "prefill": prefill}
    with torch.inference_mode():
        for _ in range(3):
            runner.forward(plans)
        torch.cuda.synchronize()
        launch, gpu = [], []
        for _ in range(10):
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            runner.forward(plans)
            e1.record()
            launch.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize()
            gpu.append(e0.elapsed_time(e1))
        res["host_launch_ms"] = round(statistics.median(launch), 3)
        res["gpu_ms_incl_host_stalls"] = round(statistics.median(gpu), 3)
        # GPU time alone: queue the step behind a sleep so the host is far ahead, then time with events
        gpu2 = []
        for _ in range(5):
            torch.cuda.synchronize()
            torch.cuda._sleep(200_000_000)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            runner.forward(plans)
            e1.record()
            torch.cuda.synchronize()
            gpu2.append(e0.elapsed_time(e1))
        res["gpu_ms_queued"] = round(statistics.median(gpu2), 3)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                runner.forward(plans)
            torch.cuda.synchronize()
    runner.graphs = saved
    res["profile_top_kernels"] = prof.key_averages().table(sort_by="self_device_time_total", row_limit=top)
    print(json.dumps({k: v for k, v in res.items() if k != "profile_top_kernels"}, indent=1))
    print(res["profile_top_kernels"])
    del runner
    torch.cuda.empty_cache()
    return res


def cpu_step_cost(bs: int = 256) -> dict:
    """Host time of one decode step's bookkeeping at batch ``bs`` (scheduler, plan encode, graph-runner host
    prep, sampler build, process, output encode), none of it overlapped with the GPU except the sampler build."""
    from flotilla.ipc.messages import BatchPlan, StepOutput, encoder
    from flotilla.sampling import SamplingParams
    from flotilla.worker.kv_cache import KVBlockManager
    from flotilla.worker.sampler import SamplingBatch
    from flotilla.worker.scheduler import Scheduler, SchedulerConfig
    from flotilla.worker.leader import _RowIds

    kv = KVBlockManager(40000, 16, enable_prefix_cache=True)
    sch = Scheduler(SchedulerConfig(bs, 8192, 40960, (2,)), kv)
    rs = np.random.RandomState(0)
    sp = SamplingParams(max_new_tokens=4000, temperature=0.6, ignore_eos=True)
    for i in range(bs):
        sch.add(f"r{i}", rs.randint(0, 10000, rs.randint(100, 1024)).tolist(), sp)
    while True:
        b = sch.schedule()
        if all(len(p.token_ids) == 1 for p in b.plans):
            break
        sch.process(b, [1] * len(b.sampled))
    t = dict(schedule=0.0, encode=0.0, sampler_build=0.0, host_prep=0.0, process=0.0, output_encode=0.0)
    n = 50
    for _ in range(n):
        t0 = time.perf_counter()
        b = sch.schedule()
        t1 = time.perf_counter()
        encoder.encode(BatchPlan(b.plans))
        t2 = time.perf_counter()
        seqs = b.sampled
        SamplingBatch.build([x.sampling for x in seqs], _RowIds(seqs, "prompt_ids"), _RowIds(seqs, "output_ids"),
                            151936, "cpu")
        t3 = time.perf_counter()
        plans = b.plans
        w = max(len(p.block_table) for p in plans)
        hbt = np.zeros((len(plans), w), np.int32)
        for i, p in enumerate(plans):
            hbt[i, :len(p.block_table)] = p.block_table
        t4 = time.perf_counter()
        outs = sch.process(b, [5] * len(seqs))
        t5 = time.perf_counter()
        encoder.encode(StepOutput(0, outs, sch.load()))
        t6 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            t[key] += dt
    res = {k: v / n * 1e3 for k, v in t.items()}
    res["total_ms"] = sum(res.values())
    print("cpu step cost (ms) at bs", bs, json.dumps({k: round(v, 3) for k, v in res.items()}))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kernels", "attention", "sweep", "equality", "runner", "mixed"])
    ap.add_argument("--tag", default="", help="suffix of the JSON file's name")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--runner-cases", default="llama-3.1-8b:1:1024,qwen3-0.6b:256:800")
    ap.add_argument("--mixed-cases", default="llama-3.1-8b:256:768:512", help="shape:decodes:context:prefill")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(0), torch.__version__)
    result: dict = {}
    if a.what == "kernels":
        check_attention("cuda", torch.bfloat16)
        check_attention("cuda", torch.float32)
        check_fused("cuda", torch.bfloat16)
        result["attention"] = bench_attention()
    elif a.what == "attention":  # correctness only: both mixed-batch modes, both dtypes, and the FP8 pools
        check_attention("cuda", torch.bfloat16)
        check_attention("cuda", torch.float32)
        for kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            check_attention("cuda", torch.bfloat16, kv_dtype=kv_dtype)
        result["attention"] = "ok"
    elif a.what == "sweep":
        result["sweep"] = sweep_attention()
    elif a.what == "equality":
        result["equality"] = check_equality()
    elif a.what == "mixed":
        result["pageable_copy"] = pageable_copy_probe()
        result["mixed"] = []
        for case in a.mixed_cases.split(","):
            shape, bs, ctx, pf = case.split(":")
            result["mixed"].append(profile_mixed(shape, int(bs), int(ctx), int(pf)))
    else:
        result["cpu_step"] = cpu_step_cost(256)
        result["runner"] = []
        for case in a.runner_cases.split(","):
            shape, bs, ctx = case.split(":")
            result["runner"].append(profile_runner(shape, int(bs), int(ctx)))
    name = a.what if a.what != "runner" else "runner_" + "_".join(c.split(":")[0] for c in a.runner_cases.split(","))
    with open(os.path.join(a.out, f"gpu_check_{name}{a.tag}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
