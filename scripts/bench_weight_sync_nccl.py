"""Weight sync over NCCL (issue 20), on a machine with two GPUs or more:

    python3 scripts/bench_weight_sync_nccl.py [--shapes qwen3-0.6b,llama-3.1-8b] [--repeats 5] > nccl.json

A trainer process on the last GPU is rank 0 of the weight-sync group (plain ``init_process_group("nccl",
...)``, no ``device_id``); the engine (tp=1, dp = GPUs - 1) runs on the others. First a correctness check on a
tiny llama: Engine(A) receives B's tensors by broadcast and gives Engine(B)'s greedy tokens. Then, per shape,
``update_weights_from_distributed`` is timed (median of ``--repeats`` after a warm-up) from the engine call to
its return, the trainer broadcasting at the same time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flotilla import Engine, SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "Hello", "Once upon a time there was a little fox", "A"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(port: int, world_size: int, device: int, source: str, commands, results) -> None:
    """Rank 0: builds its tensors (a checkpoint's, or random ones of a shape) on its GPU, broadcasts on cue."""
    import torch.distributed as dist

    torch.cuda.set_device(device)
    if os.path.isdir(source) and any(f.endswith(".safetensors") for f in os.listdir(source)):
        from flotilla.model.loader import iter_safetensors

        items = [(n, t.to(device=f"cuda:{device}", dtype=torch.bfloat16)) for n, t in iter_safetensors(source)]
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(source)
        with torch.device("meta"):
            shapes = AutoModelForCausalLM.from_config(cfg).state_dict()
        items = [(n, torch.randn(p.shape, dtype=torch.bfloat16, device=f"cuda:{device}") * 0.02)
                 for n, p in shapes.items() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    from flotilla.rl import weights_meta

    results.put(weights_meta(items))
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=0)
    results.put("joined")
    while commands.get():
        for _, t in items:
            dist.broadcast(t, src=0)
        torch.cuda.synchronize()
        results.put("sent")
    dist.destroy_process_group()


def run(source: str, engine_kw: dict, repeats: int, check: bool) -> dict:
    n_gpus = torch.cuda.device_count()
    dp = n_gpus - 1
    ctx = mp.get_context("spawn")
    port = free_port()
    commands, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=trainer, args=(port, 1 + dp, n_gpus - 1, source, commands, results), daemon=True)
    proc.start()
    names, dtypes, shapes = results.get(timeout=600)
    row: dict = {"dp": dp, "tensors": len(names)}
    try:
        with Engine(dp_size=dp, device="cuda", dtype="bfloat16", **engine_kw) as engine:
            before = [o["token_ids"] for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
            engine.init_weights_update_group("127.0.0.1", port, 1, 1 + dp, backend="nccl", timeout=300)
            assert results.get(timeout=300) == "joined"
            times = []
            for i in range(1 if check else repeats + 1):
                commands.put(True)
                t0 = time.perf_counter()
                engine.update_weights_from_distributed(names, dtypes, shapes, timeout=300)
                times.append(time.perf_counter() - t0)
                assert results.get(timeout=300) == "sent"
            row["tokens"] = [o["token_ids"] for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
            row["changed"] = row["tokens"] != before
            if not check:
                row.update(update_s=statistics.median(times[1:]), all_s=[round(x, 4) for x in times[1:]])
            engine.destroy_weights_update_group()
    finally:
        commands.put(False)
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3-0.6b,llama-3.1-8b")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        print(json.dumps({"error": "needs two GPUs or more", "gpus": torch.cuda.device_count()}))
        return 2
    from flotilla.model.shapes import write_shape
    from flotilla.tools.tiny import tiny_model_path

    a, b = str(tiny_model_path("llama", seed=0)), str(tiny_model_path("llama", seed=1))
    out: dict = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
    with Engine(model=b, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2) as eb:
        want = [o["token_ids"] for o in eb.generate(PROMPTS, GREEDY, use_tqdm=False)]
    check = run(b, {"model": a, "gpu_memory_utilization": 0.2}, 1, check=True)
    out["check"] = {"tokens_equal_engine_b": check["tokens"] == want, "changed": check["changed"]}
    out["results"] = []
    for shape in [s for s in args.shapes.split(",") if s]:
        path = str(write_shape(shape))
        row = run(path, {"model": path, "load_format": "dummy", "gpu_memory_utilization": 0.45,
                         "max_model_len": 2048, "kv_cache_tokens": 32768}, args.repeats, check=False)
        row.pop("tokens")
        out["results"].append({"shape": shape, **row})
    print(json.dumps(out, indent=2))
    return 0 if out["check"]["tokens_equal_engine_b"] and out["check"]["changed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
