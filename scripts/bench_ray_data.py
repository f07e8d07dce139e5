"""Ray Data batch inference against ``flotilla bench`` offline, on the same work: prints both and the ratio.

The same workload (``flotilla bench``'s: ``--workload nanovllm`` by default, token ids, ignore_eos) runs twice:

1. offline, exactly as ``flotilla bench`` runs it (``flotilla.tools.bench.run_flotilla``: one Engine, every request
   submitted at once through ``stream_async``, after warm-up requests);
2. through ``flotilla.integrations.ray_data.build_processor`` (a preprocess that builds each row's
   ``input_ids`` and ``sampling_params``, the engine stage, a postprocess), on a local Ray instance, with the same
   engine options. Its stage is ``FlotillaStage`` with a timer around each batch and the same warm-up requests
   run in the actor before the first batch, so both timed spans run from the first submit to the last completion
   and leave engine start-up out (start-up and the whole job's wall time are reported beside them).

Usage (GPU; see docs/ray.md for the wheels the GPU machine needs)::

    python3 scripts/bench_ray_data.py --model-shape qwen3-0.6b --workload nanovllm --json out.json
    python3 scripts/bench_ray_data.py --model /path/to/ckpt --workload random --num-prompts 32 --input-len 32 \\
        --output-len 16 --device cpu --warmup-requests 2          # a CPU smoke run

Engine options are ``flotilla bench``'s flags; ``--batch-size``, ``--concurrency`` and
``--max-concurrent-batches`` are the processor's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flotilla.tools.bench import add_bench_args, make_workload, model_folder, run_flotilla, summarize
from flotilla.integrations.ray_data import FlotillaProcessorConfig, FlotillaStage, Processor


@dataclass
class BenchConfig(FlotillaProcessorConfig):
    """The processor's config plus the warm-up requests its actors run before the first batch."""

    warmup: list[tuple[list[int], int]] = field(default_factory=list)
    temperature: float = 0.0


class TimedStage(FlotillaStage):
    """``FlotillaStage`` that runs the warm-up in ``__init__`` and stamps each batch's start and end."""

    def __init__(self, config: BenchConfig):
        super().__init__(config)
        if config.warmup:
            import asyncio

            rows = [{"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": config.temperature,
                                                           "ignore_eos": True}} for ids, n in config.warmup]
            asyncio.run_coroutine_threadsafe(self._run(rows), self._loop).result()

    def __call__(self, batch):
        import pyarrow as pa

        start = time.time()
        table = super().__call__(batch)
        end = time.time()
        n = table.num_rows
        return table.append_column("bench_start", pa.array([start] * n)).append_column("bench_end", pa.array([end] * n))


class TimedProcessor(Processor):
    stage_cls = TimedStage


def run_ray_data(args: argparse.Namespace, model: str, wl: Any, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    import os

    import ray

    # the actors import this checkout's flotilla and, on the GPU machine, the carried wheels (prelude.sh's PYTHONPATH)
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    ray.init(include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": path}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        kwargs = {k: v for k, v in engine_kwargs.items() if k != "gpus_per_rank"}
        config = BenchConfig(model_source=model, engine_kwargs=kwargs, concurrency=args.concurrency,
                             batch_size=args.batch_size, max_concurrent_batches=args.max_concurrent_batches,
                             launcher=args.launcher, gpus_per_rank=args.gpus_per_rank, warmup=wl.warmup,
                             temperature=wl.temperature)
        temperature = wl.temperature
        rows = [{"i": i, "input_ids": ids, "n": n} for i, (ids, n) in enumerate(zip(wl.prompts, wl.output_lens))]

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            return {"i": row["i"], "input_ids": row["input_ids"],
                    "sampling_params": {"max_tokens": row["n"], "temperature": temperature, "ignore_eos": True}}

        def post(row: dict[str, Any]) -> dict[str, Any]:
            return {k: row[k] for k in ("i", "num_input_tokens", "num_generated_tokens", "bench_start", "bench_end")}

        processor = TimedProcessor(config, pre, post)
        t0 = time.perf_counter()
        out = processor(ray.data.from_items(rows)).take_all()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    if sorted(r["i"] for r in out) != list(range(len(rows))):
        raise RuntimeError("the Ray Data run lost or duplicated rows")
    span = max(r["bench_end"] for r in out) - min(r["bench_start"] for r in out)
    out_tokens = sum(r["num_generated_tokens"] for r in out)
    in_tokens = sum(r["num_input_tokens"] for r in out)
    return {"duration_s": span, "job_wall_s": wall, "total_output_tokens": out_tokens, "total_input_tokens": in_tokens,
            "output_throughput": out_tokens / span, "total_token_throughput": (in_tokens + out_tokens) / span,
            "request_throughput": len(out) / span, "batch_size": args.batch_size, "concurrency": args.concurrency,
            "max_concurrent_batches": args.max_concurrent_batches, "launcher": args.launcher}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="rows per map_batches call")
    p.add_argument("--concurrency", type=int, default=1, help="engines (Ray Data actors)")
    p.add_argument("--max-concurrent-batches", type=int, default=8, help="batches one actor runs at once")
    p.add_argument("--launcher", default="ray", choices=["ray", "mp"], help="how each actor's engine starts its ranks")
    args = p.parse_args(argv)
    with model_folder(args) as model:
        cfg = json.loads((Path(model) / "config.json").read_text())
        wl = make_workload(args, int(cfg["vocab_size"]))
        records, info = run_flotilla(args, model, wl)
        offline = summarize(wl, records)
        offline["engine_start_s"] = info["engine_start_s"]
        ray_data = run_ray_data(args, model, wl, info["engine_config"])
        ratio = ray_data["output_throughput"] / offline["output_throughput"]
        result = {"model": args.model or f"shape:{args.model_shape}", "workload": wl.name,
                  "num_requests": len(wl.prompts), "engine_config": info["engine_config"],
                  "offline": offline, "ray_data": ray_data, "ratio_output_throughput": ratio}
        print(f"workload={wl.name} requests={len(wl.prompts)} model={result['model']}")
        print(f"offline (flotilla bench)  {offline['output_throughput']:10.1f} output tok/s  "
              f"{offline['duration_s']:.2f} s")
        print(f"ray data                  {ray_data['output_throughput']:10.1f} output tok/s  "
              f"{ray_data['duration_s']:.2f} s  (job wall {ray_data['job_wall_s']:.1f} s with start-up)")
        print(f"ratio ray_data/offline    {ratio:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0


if __name__ == "__main__":
    sys.exit(main())
