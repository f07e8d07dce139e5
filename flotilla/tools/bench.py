"""``flotilla bench``: offline throughput of a fixed workload, through Flotilla or, side by side, through
transformers' continuous batching.

Workloads (token ids, never text, so a shape's small stand-in tokenizer does not matter):

* ``nanovllm``: nano-vllm's bench.py. Python ``random.seed(0)``; 256 prompts of ``randint(100, 1024)`` ids
  drawn with ``randint(0, 10000)`` (modulo the vocabulary), then 256 output lengths ``randint(100, 1024)``;
  temperature 0.6, ignore_eos. 142,827 input and 133,966 output tokens.
* ``random``: ``--num-prompts`` prompts of ``--input-len`` uniform random ids, ``--output-len`` tokens each,
  greedy, ignore_eos (numpy seed ``--seed``). With one prompt this is the decode-latency probe.
* ``sglang-random``: sglang's bench_offline_throughput with ``--dataset-name random-ids`` defaults. numpy
  seed 1; input lengths ``randint(1, 1025, 1000)``, then output lengths the same way, then
  ``offsets = randint(0, vocab, 1000)``; token j of prompt i is ``(offsets[i] + i + j) % vocab``; greedy,
  ignore_eos, prefix cache off. 512,842 input and 510,855 output tokens.

Every run is preceded by untimed warm-up requests (16 of 256 input and 16 output tokens by default), which
compile the Triton kernels and fill the allocator's pools. The timed span runs from the first submit to the
last completion. TTFT is first token minus submit; TPOT is (last token - first token) / (tokens - 1) per
request; ITL is the gap between successive token arrivals at the front end (the decode step as a user sees
it, engine overheads included).

``--roofline`` (CUDA, dense models) measures the device-to-device copy bandwidth in the same process before
the engine starts and sets the median ITL against bytes-read-per-step / bandwidth, where a step reads every
weight but the embedding table plus the KV cache of the median step's context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from flotilla.config import ATTENTION_BACKENDS, DEVICES, DTYPES, KV_CACHE_DTYPES, LOAD_FORMATS

WARMUP_INPUT, WARMUP_OUTPUT = 256, 16


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    temperature: float = 0.0
    enable_prefix_caching: bool | None = None  # None: the engine's default
    warmup: list[tuple[list[int], int]] = field(default_factory=list)

    @property
    def input_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def _warmup(n: int, vocab: int, seed: int = 12345) -> list[tuple[list[int], int]]:
    rng = np.random.RandomState(seed)
    return [(rng.randint(0, vocab, WARMUP_INPUT).tolist(), WARMUP_OUTPUT) for _ in range(n)]


def nanovllm_workload(vocab: int, num_prompts: int = 256, warmup: int = 16) -> Workload:
    """nano-vllm's bench.py, draw for draw (ids taken modulo a vocabulary smaller than 10001)."""
    rnd = random.Random(0)
    prompts = [[rnd.randint(0, 10000) % vocab for _ in range(rnd.randint(100, 1024))] for _ in range(num_prompts)]
    outs = [rnd.randint(100, 1024) for _ in range(num_prompts)]
    return Workload("nanovllm", prompts, outs, temperature=0.6, warmup=_warmup(warmup, vocab))


def random_workload(vocab: int, num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                    warmup: int = 16) -> Workload:
    rng = np.random.RandomState(seed)
    prompts = [rng.randint(0, vocab, input_len).tolist() for _ in range(num_prompts)]
    return Workload("random", prompts, [output_len] * num_prompts, warmup=_warmup(warmup, vocab))


def sglang_random_workload(vocab: int, num_prompts: int = 1000, warmup: int = 16) -> Workload:
    """sglang bench_offline_throughput, ``--dataset-name random-ids`` with its defaults."""
    np.random.seed(1)
    in_lens = np.random.randint(1, 1025, num_prompts)
    out_lens = np.random.randint(1, 1025, num_prompts)
    offsets = np.random.randint(0, vocab, num_prompts)
    prompts = [((offsets[i] + i + np.arange(in_lens[i])) % vocab).tolist() for i in range(num_prompts)]
    return Workload("sglang-random", prompts, [int(x) for x in out_lens], enable_prefix_caching=False,
                    warmup=_warmup(warmup, vocab))


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    if args.workload == "nanovllm":
        return nanovllm_workload(vocab, args.num_prompts or 256, args.warmup_requests)
    if args.workload == "sglang-random":
        return sglang_random_workload(vocab, args.num_prompts or 1000, args.warmup_requests)
    if not (args.num_prompts and args.input_len and args.output_len):
        raise SystemExit("--workload random needs --num-prompts, --input-len and --output-len")
    return random_workload(vocab, args.num_prompts, args.input_len, args.output_len, args.seed, args.warmup_requests)


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    """One request's timeline (perf_counter seconds)."""

    submit: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in that delta)
    finish: float = 0.0
    output_tokens: int = 0


def percentiles_ms(xs: list[float]) -> dict[str, float]:
    """Mean and p50/p90/p99 of durations in seconds, in milliseconds."""
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    a = np.asarray(xs, dtype=np.float64) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(wl: Workload, records: list[Record]) -> dict[str, Any]:
    start = min(r.submit for r in records)
    end = max(r.finish for r in records)
    dur = max(end - start, 1e-9)
    out_tokens = sum(r.output_tokens for r in records)
    ttft = [r.arrivals[0][0] - r.submit for r in records if r.arrivals]
    tpot = [(r.arrivals[-1][0] - r.arrivals[0][0]) / (r.output_tokens - 1)
            for r in records if r.arrivals and r.output_tokens > 1]
    itl: list[float] = []
    for r in records:
        for (t0, _), (t1, k) in zip(r.arrivals, r.arrivals[1:]):
            itl.extend([(t1 - t0) / k] * k)
    return {
        "workload": wl.name, "num_requests": len(records), "duration_s": dur,
        "total_input_tokens": wl.input_tokens, "total_output_tokens": out_tokens,
        "expected_output_tokens": wl.output_tokens,
        "request_throughput": len(records) / dur, "input_throughput": wl.input_tokens / dur,
        "output_throughput": out_tokens / dur, "total_token_throughput": (wl.input_tokens + out_tokens) / dur,
        "ttft_ms": percentiles_ms(ttft), "tpot_ms": percentiles_ms(tpot), "itl_ms": percentiles_ms(itl),
    }


# ---------------------------------------------------------------------------------------------- flotilla
async def _flotilla_requests(engine, prompts: list[list[int]], params: list[Any]) -> list[Record]:
    async def one(ids: list[int], sp: Any) -> Record:
        rec = Record(time.perf_counter())
        async for delta in engine.stream_async(input_ids=ids, sampling_params=sp):
            now = time.perf_counter()
            if delta["token_ids"]:
                rec.arrivals.append((now, len(delta["token_ids"])))
            if delta["finished"]:
                rec.finish = now
                rec.output_tokens = delta["result"]["completion_tokens"]
        return rec

    return list(await asyncio.gather(*(one(ids, sp) for ids, sp in zip(prompts, params))))


def run_flotilla(args: argparse.Namespace, model: str, wl: Workload) -> tuple[list[Record], dict[str, Any]]:
    from flotilla.sampling import SamplingParams

    kwargs: dict[str, Any] = dict(
        tp_size=args.tp_size, dp_size=args.dp_size, enable_dp_attention=args.enable_dp_attention, device=args.device,
        dtype=args.dtype, load_format=args.load_format, attention_backend=args.attention_backend,
        enable_cuda_graph=not args.no_cuda_graph, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        cuda_graph_max_bs=args.cuda_graph_max_bs, enable_overlap_schedule=args.overlap_schedule)
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.kv_cache_tokens:
        kwargs["kv_cache_tokens"] = args.kv_cache_tokens
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    prefix = wl.enable_prefix_caching if args.prefix_caching is None else args.prefix_caching == "on"
    if prefix is not None:
        kwargs["enable_prefix_caching"] = prefix
    if args.ray:
        from flotilla.frontend.ray_engine import RayEngine as EngineCls

        kwargs["gpus_per_rank"] = args.gpus_per_rank
    else:
        from flotilla.frontend.engine import Engine as EngineCls  # type: ignore[assignment]
    t0 = time.perf_counter()
    engine = EngineCls(model=model, **kwargs)
    info: dict[str, Any] = {"engine_start_s": time.perf_counter() - t0,
                            "engine_config": {k: v for k, v in kwargs.items()}}
    try:
        def params(out_len: int) -> SamplingParams:
            return SamplingParams(max_new_tokens=out_len, temperature=wl.temperature, ignore_eos=True)

        if wl.warmup:
            t0 = time.perf_counter()
            asyncio.run(_flotilla_requests(engine, [p for p, _ in wl.warmup], [params(n) for _, n in wl.warmup]))
            info["warmup_s"] = time.perf_counter() - t0
        records = asyncio.run(_flotilla_requests(engine, wl.prompts, [params(n) for n in wl.output_lens]))
        info["stats"] = engine.stats().to_dict()
    finally:
        engine.shutdown()
    return records, info


# ---------------------------------------------------------------------------------------------- transformers
def run_transformers(args: argparse.Namespace, model: str, wl: Workload) -> tuple[list[Record], dict[str, Any]]:
    """The same requests through transformers' continuous batching manager (the engine behind
    ``generate_batch``), one ``add_request`` per prompt so each keeps its own output length."""
    import inspect

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    if args.load_format == "dummy":
        cfg = AutoConfig.from_pretrained(model)
        with torch.device(device):
            hf: Any = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)  # type: ignore[arg-type]
    hf.eval()
    gen = GenerationConfig(max_new_tokens=max(wl.output_lens), do_sample=wl.temperature > 0,
                           temperature=wl.temperature if wl.temperature > 0 else None, top_p=1.0, top_k=0,
                           eos_token_id=-1, pad_token_id=0)
    cm_kwargs: dict[str, Any] = dict(generation_config=gen, block=True, timeout=30)
    if "workload_hints" in inspect.signature(hf.continuous_batching_context_manager).parameters:
        from transformers.generation.continuous_batching.utils import WorkloadHints

        cm_kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, wl.prompts)),
                                                    max_generated_length=max(wl.output_lens),
                                                    num_requests=len(wl.prompts))
    info: dict[str, Any] = {"transformers_device": device, "transformers_dtype": dtype_name}
    print(f"transformers: model built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    with hf.continuous_batching_context_manager(**cm_kwargs) as mgr:
        info["engine_start_s"] = time.perf_counter() - t0

        def batch(prompts: list[list[int]], outs: list[int], tag: str) -> list[Record]:
            recs: dict[str, Record] = {}
            for i, (ids, n) in enumerate(zip(prompts, outs)):
                rid = f"{tag}{i}"
                recs[rid] = Record(time.perf_counter())
                mgr.add_request(ids, request_id=rid, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
            done, tokens, t_start, last = 0, 0, time.perf_counter(), time.perf_counter()
            while done < len(recs):
                if time.perf_counter() - last > 10:  # a slow run cut short by a time limit still says how far it got
                    last = time.perf_counter()
                    print(f"transformers {tag}: {last - t_start:.0f} s, {done}/{len(recs)} requests finished, "
                          f"{tokens} of their output tokens", file=sys.stderr, flush=True)
                res = mgr.get_result(timeout=1)
                if res is None:
                    if not mgr.is_running():
                        raise RuntimeError("transformers' continuous batching loop stopped")
                    continue
                if not res.is_finished() or res.request_id not in recs:
                    continue
                if res.error:
                    raise RuntimeError(f"transformers request {res.request_id} failed: {res.error}")
                rec = recs[res.request_id]
                stamps = res.timestamps or []
                rec.arrivals = [(t, 1) for t in stamps]
                rec.finish = stamps[-1] if stamps else time.perf_counter()
                rec.output_tokens = len(res.generated_tokens)
                tokens += rec.output_tokens
                done += 1
            return list(recs.values())

        if wl.warmup:
            t1 = time.perf_counter()
            batch([p for p, _ in wl.warmup], [n for _, n in wl.warmup], "warmup")
            info["warmup_s"] = time.perf_counter() - t1
        records = batch(wl.prompts, wl.output_lens, "r")
    return records, info


# ---------------------------------------------------------------------------------------------- roofline
def copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of
    ``iters`` copies of ``nbytes``, timed with CUDA events after a warm-up)."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def roofline(cfg: dict[str, Any], wl: Workload, result: dict[str, Any], bandwidth: float,
             kv_cache_dtype: str = "auto") -> dict[str, Any]:
    from flotilla.model.shapes import kv_bytes, step_weight_bytes

    ctx = len(wl.prompts[0]) + wl.output_lens[0] // 2  # the median decode step's context
    per_elem = 2 if kv_cache_dtype == "auto" else 1  # bf16, or an FP8 cache
    w, kv = step_weight_bytes(cfg), kv_bytes(cfg, ctx, per_elem)  # MoE: the routed experts' weights only
    floor_ms = (w + kv) / bandwidth * 1e3
    step_ms = result["itl_ms"]["p50"]
    return {"copy_bandwidth_GBps": bandwidth / 1e9, "weight_bytes_GB": w / 1e9, "kv_bytes_GB": kv / 1e9,
            "bytes_per_step_GB": (w + kv) / 1e9, "median_step_context": ctx, "roofline_ms": floor_ms,
            "median_step_ms": step_ms, "tokens_per_s": 1e3 / step_ms if step_ms else 0.0,
            "pct_of_roofline": 100.0 * floor_ms / step_ms if step_ms else 0.0}


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face checkpoint folder")
    src.add_argument("--model-shape", help="a built-in shape (flotilla.model.shapes): qwen3-0.6b, llama-3.1-8b, "
                     "qwen3-30b-a3b; implies --load-format dummy")
    p.add_argument("--backend", default="flotilla", choices=["flotilla", "transformers"])
    p.add_argument("--workload", default="nanovllm", choices=["nanovllm", "random", "sglang-random"])
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--ray", action="store_true", help="run the rank workers as Ray actors")
    p.add_argument("--gpus-per-rank", type=float, default=1.0, help="with --ray: below 1, ranks share a GPU")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--overlap-schedule", action=argparse.BooleanOptionalAction, default=True,
                   help="enable_overlap_schedule: plan step N+1 while step N runs (the engine's default)")
    p.add_argument("--prefix-caching", default=None, choices=["on", "off"],
                   help="default: off for sglang-random, the engine's default otherwise")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--cuda-graph-max-bs", type=int, default=256, help="largest decode batch replayed from a CUDA "
                   "graph (raise it with --max-num-seqs)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="kv_cache_dtype: fp8 stores K/V in FP8 (half of bf16's bytes, twice the tokens)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--roofline", action="store_true", help="measure copy bandwidth and report %% of the decode "
                   "roofline (CUDA; MoE counts the routed experts only; meant for --num-prompts 1)")
    p.add_argument("--json", default=None, help="write the results to this file")


@contextlib.contextmanager
def model_folder(args: argparse.Namespace) -> Iterator[str]:
    """The checkpoint folder to load: ``--model``, or for ``--model-shape`` a temporary folder with its config
    and tokenizer (dummy weights), removed when the block ends."""
    if not args.model_shape:
        yield args.model
        return
    from flotilla.model.shapes import write_shape

    if args.load_format not in ("auto", "dummy"):
        raise SystemExit("--model-shape has no weights: use --load-format dummy")
    args.load_format = "dummy"
    tmp = write_shape(args.model_shape)
    try:
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_bench(args: argparse.Namespace) -> int:
    with model_folder(args) as model:
        cfg = json.loads((Path(model) / "config.json").read_text())
        wl = make_workload(args, int(cfg["vocab_size"]))
        bandwidth = None
        if args.roofline:
            bandwidth = copy_bandwidth()
        runner = run_flotilla if args.backend == "flotilla" else run_transformers
        records, info = runner(args, model, wl)
        result = summarize(wl, records)
        result.update(backend=args.backend, model=args.model or f"shape:{args.model_shape}",
                      load_format=args.load_format, **info)
        result["env"] = _env()
        if bandwidth is not None:
            result["roofline"] = roofline(cfg, wl, result, bandwidth, args.kv_cache_dtype)
        print(format_result(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0


def _env() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def format_result(r: dict[str, Any]) -> str:
    lines = [
        f"backend={r['backend']} model={r['model']} workload={r['workload']} requests={r['num_requests']}",
        f"duration            {r['duration_s']:.2f} s",
        f"requests/s          {r['request_throughput']:.2f}",
        f"input tokens/s      {r['input_throughput']:.1f}  ({r['total_input_tokens']} tokens)",
        f"output tokens/s     {r['output_throughput']:.1f}  ({r['total_output_tokens']} tokens)",
        f"total tokens/s      {r['total_token_throughput']:.1f}",
    ]
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms")):
        s = r[key]
        lines.append(f"{label:<20}mean {s['mean']:.2f}  p50 {s['p50']:.2f}  p90 {s['p90']:.2f}  p99 {s['p99']:.2f}")
    if "roofline" in r:
        f = r["roofline"]
        lines.append(f"roofline            {f['bytes_per_step_GB']:.2f} GB/step at {f['copy_bandwidth_GBps']:.0f} GB/s "
                     f"= {f['roofline_ms']:.3f} ms; median step {f['median_step_ms']:.3f} ms "
                     f"({f['tokens_per_s']:.1f} tok/s) = {f['pct_of_roofline']:.1f}% of roofline")
    return "\n".join(lines)
