"""LoRA on the GPU (docs/lora.md, docs/benchmarks.md §17): the Triton kernels against the torch reference, then
the engine's figures with dummy weights of real shapes and random rank-16 adapters.

    python3 scripts/lora_gpu.py kernels --out DIR
    python3 scripts/lora_gpu.py engine --shape qwen3-0.6b --out DIR     # decode step at batch 64: base engine,
    python3 scripts/lora_gpu.py engine --shape llama-3.1-8b --out DIR   # LoRA engine on base rows, 8 adapters mixed;
                                                                        # adapter load and update times

Each prints its figures and writes DIR/lora_<stage>[_<shape>].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flotilla.lora.adapter import TARGETS, AdapterConfig, write_adapter  # noqa: E402
from flotilla.lora.kernels import apply_reference, apply_triton, segments  # noqa: E402
from flotilla.lora.layers import LoraBatch  # noqa: E402


def kernels(out: Path) -> dict:
    """apply_triton == apply_reference (bf16, relative error) on decode- and prefill-like batches, eager and
    through the graph buffers (fill_graph), with base rows mixed in."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    cases = [("decode64_8", 64, 8, 4096, 6144, 48), ("decode64_8_down", 64, 8, 14336, 4096, 16),
             ("prefill1500_3", 1500, 3, 1024, 4096, 32), ("decode1_1", 1, 1, 4096, 4096, 16),
             ("mixed300_4_base", 300, 4, 2048, 3072, 16)]
    for name, t, nslots, k, n, r in cases:
        x = (torch.randn(t, k, generator=g) * 0.5).to(torch.bfloat16).to(dev)
        a = (torch.randn(8, r, k, generator=g) * 0.05).to(torch.bfloat16).to(dev)
        b = (torch.randn(8, n, r, generator=g) * 0.05).to(torch.bfloat16).to(dev)
        y0 = (torch.randn(t, n, generator=g)).to(torch.bfloat16).to(dev)
        slot_ids = np.random.default_rng(t).integers(-1 if "base" in name else 0, nslots, size=t)
        seg = segments(slot_ids)
        groups = [(s, torch.from_numpy(ix.astype(np.int64)).to(dev)) for s, ix in seg.groups]
        ref = apply_reference(x.float(), y0.float(), a.float(), b.float(), groups)
        batch = LoraBatch(8, dev, True)
        batch.set_rows(slot_ids)
        got = apply_triton(x, y0.clone(), a, b, *batch.meta, rank=r).float()
        batch.graph_buffers(max(t, 64))
        batch.fill_graph(np.concatenate([slot_ids, -np.ones(max(t, 64) - t, dtype=np.int64)]))
        yg = torch.cat([y0, torch.zeros(max(t, 64) - t, n, dtype=y0.dtype, device=dev)]).contiguous()
        xg = torch.cat([x, torch.zeros(max(t, 64) - t, k, dtype=x.dtype, device=dev)]).contiguous()
        got_graph = apply_triton(xg, yg, a, b, *batch.meta, rank=r)[:t].float()
        delta = (ref - y0.float()).norm().item()
        err = (got - ref).norm().item() / max(delta, 1e-9)
        err_graph = (got_graph - ref).norm().item() / max(delta, 1e-9)
        untouched = bool(torch.equal(got[slot_ids < 0], y0.float()[slot_ids < 0])) if (slot_ids < 0).any() else True
        torch.cuda.synchronize()
        reps = 50
        batch.set_rows(slot_ids)
        yt = y0.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            apply_triton(x, yt, a, b, *batch.meta, rank=r)
        torch.cuda.synchronize()
        us_triton = (time.perf_counter() - t0) / reps * 1e6
        xb, yb, ab, bb = x, y0.clone(), a, b
        t0 = time.perf_counter()
        for _ in range(reps):
            apply_reference(xb, yb, ab, bb, groups)
        torch.cuda.synchronize()
        us_ref = (time.perf_counter() - t0) / reps * 1e6
        ok = err < 2e-2 and err_graph < 2e-2 and untouched
        rows.append({"case": name, "tokens": t, "slots": nslots, "k": k, "n": n, "rank_width": r, "rel_err": err,
                     "rel_err_graph": err_graph, "base_rows_untouched": untouched, "ok": ok,
                     "us_triton": us_triton, "us_torch_reference": us_ref})
        print(f"{name:18s} rel_err {err:.2e} graph {err_graph:.2e} base-untouched {untouched} "
              f"triton {us_triton:7.1f} us  torch ref {us_ref:7.1f} us  {'OK' if ok else 'FAIL'}", flush=True)
    res = {"card": torch.cuda.get_device_name(), "cases": rows, "all_ok": all(r["ok"] for r in rows)}
    (out / "lora_kernels.json").write_text(json.dumps(res, indent=1))
    return res


def _adapters(cfg: dict, folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` random rank-``rank`` adapters on every projection of the model's shape, as PEFT folders."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv, hd = cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads
    inter = cfg["intermediate_size"]
    dims = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
            "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {(layer, t): (torch.randn(rank, dims[t][0], generator=g, dtype=torch.bfloat16) * 0.01,
                                torch.randn(dims[t][1], rank, generator=g, dtype=torch.bfloat16) * 0.01)
                   for layer in range(cfg["num_hidden_layers"]) for t in TARGETS}
        p = folder / f"adapter{i}"
        write_adapter(p, AdapterConfig(rank, 2.0 * rank, 2.0, list(TARGETS)), tensors)
        paths.append(p)
    return paths


def _decode_step_ms(engine, batch: int, loras: list[str | None], in_len: int, long: int, short: int) -> dict:
    """Per-step decode time at ``batch`` rows: (time of ``long`` output tokens - time of ``short``) / difference
    (prefill and ramp cancel out). Request i runs adapter ``loras[i % len(loras)]``."""
    rng = np.random.default_rng(0)
    vocab = int(engine.vocab_size)
    prompts = [rng.integers(0, vocab, size=in_len).tolist() for _ in range(batch)]

    def run(n: int) -> float:
        sps = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True, "lora_name": loras[i % len(loras)]}
               for i in range(batch)]
        t0 = time.perf_counter()
        engine.generate(input_ids=prompts, sampling_params=sps, use_tqdm=False)
        return time.perf_counter() - t0

    run(8)  # warm-up (compiles, graphs)
    longs = [run(long) for _ in range(2)]
    shorts = [run(short) for _ in range(2)]
    ms = (min(longs) - min(shorts)) / (long - short) * 1e3
    return {"batch": batch, "step_ms": ms, "long_s": longs, "short_s": shorts}


def engine(shape: str, out: Path, batch: int, adapters: int, rank: int) -> dict:
    from flotilla import Engine
    from flotilla.model.shapes import shape_config, write_shape

    tmp = Path(tempfile.mkdtemp(prefix="lora-gpu-"))
    model = write_shape(shape, tmp / "model")
    cfg = shape_config(shape)
    t0 = time.perf_counter()
    paths = _adapters(cfg, tmp, adapters, rank)
    print(f"wrote {adapters} rank-{rank} adapters in {time.perf_counter() - t0:.1f}s", flush=True)
    common = dict(load_format="dummy", max_num_seqs=max(batch, 16), cuda_graph_max_bs=max(batch, 16),
                  max_model_len=2048, gpu_memory_utilization=0.80)
    res: dict = {"card": torch.cuda.get_device_name(), "shape": shape, "batch": batch, "adapters": adapters,
                 "rank": rank}
    with Engine(str(model), **common) as e:
        res["base_engine"] = _decode_step_ms(e, batch, [None], 128, 160, 32)
    print(f"base engine: {res['base_engine']['step_ms']:.3f} ms/step", flush=True)
    with Engine(str(model), enable_lora=True, max_loras=adapters, max_lora_rank=rank, **common) as e:
        loads = []
        for i, p in enumerate(paths):
            t0 = time.perf_counter()
            e.load_lora_adapter(f"a{i}", str(p))
            loads.append(time.perf_counter() - t0)
        res["load_s"] = loads
        print(f"adapter load: median {statistics.median(loads) * 1e3:.0f} ms ({loads[0] * 1e3:.0f} ms first)",
              flush=True)
        res["lora_engine_base_rows"] = _decode_step_ms(e, batch, [None], 128, 160, 32)
        print(f"LoRA engine, base rows: {res['lora_engine_base_rows']['step_ms']:.3f} ms/step",
              flush=True)
        names = [f"a{i}" for i in range(adapters)]
        res["lora_engine_mixed"] = _decode_step_ms(e, batch, names, 128, 160, 32)
        print(f"LoRA engine, {adapters} adapters mixed: {res['lora_engine_mixed']['step_ms']:.3f} ms/step", flush=True)
        res["lora_engine_mixed_with_base"] = _decode_step_ms(e, batch, [None, *names], 128, 160, 32)
        g = torch.Generator().manual_seed(7)
        from flotilla.lora.adapter import peft_name

        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv, hd = cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or hidden // heads
        inter = cfg["intermediate_size"]
        dims = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
                "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                "down_proj": (inter, hidden)}
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for t in TARGETS:
                tensors[peft_name(layer, t, "A")] = torch.randn(rank, dims[t][0], generator=g) * 0.01
                tensors[peft_name(layer, t, "B")] = torch.randn(dims[t][1], rank, generator=g) * 0.01
        t0 = time.perf_counter()
        version = e.update_lora_weights("a0", tensors)
        res["update_s"] = time.perf_counter() - t0
        res["update_version"] = version
        res["update_bytes"] = sum(v.numel() * 2 for v in tensors.values())
        mb = res["update_bytes"] / 1e6
        print(f"update_lora_weights (rank {rank}, {mb:.0f} MB bf16): {res['update_s'] * 1e3:.0f} ms", flush=True)
    base = res["base_engine"]["step_ms"]
    res["mixed_over_base"] = res["lora_engine_mixed"]["step_ms"] / base
    res["lora_base_rows_over_base"] = res["lora_engine_base_rows"]["step_ms"] / base
    print(f"{shape}: mixed / base engine = {res['mixed_over_base']:.3f}x (target <= 1.3x); "
          f"LoRA engine base rows / base engine = {res['lora_base_rows_over_base']:.3f}x", flush=True)
    (out / f"lora_engine_{shape}.json").write_text(json.dumps(res, indent=1))
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["kernels", "engine"])
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.stage == "kernels":
        return 0 if kernels(out)["all_ok"] else 1
    engine(a.shape, out, a.batch, a.adapters, a.rank)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
