"""Command line: ``flotilla demo | generate | make-tiny-model | serve | bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--enable-dp-attention", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--load-balance", default="round_robin",
                   choices=["round_robin", "shortest_queue", "least_tokens", "prefix_aware"])
    p.add_argument("--ray", action="store_true", help="run the rank workers as Ray actors")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(tp_size=args.tp_size, dp_size=args.dp_size, enable_dp_attention=args.enable_dp_attention,
                device=args.device, dtype=args.dtype, load_format=args.load_format, load_balance=args.load_balance)


def make_engine(args: argparse.Namespace):
    if getattr(args, "ray", False):
        from flotilla.ray_engine import RayEngine

        return RayEngine(model=args.model, **engine_kwargs(args))
    from flotilla.engine import Engine

    return Engine(model=args.model, **engine_kwargs(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from flotilla import Engine, SamplingParams
    from flotilla.testing.tiny import tiny_model_path

    path = tiny_model_path("llama")
    print(f"tiny llama checkpoint: {path}")
    prompts = ["The capital of France is", "Hello", "Once upon a time", "The quick brown fox"]
    with Engine(model=str(path), device="cpu", dtype="float32", dp_size=args.dp_size, tp_size=args.tp_size) as engine:
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))
        for p, o in zip(prompts, outs):
            print(f"{p!r} -> {o['text']!r} ({o['completion_tokens']} tokens, {o['finish_reason']})")
        print("streaming:", end=" ", flush=True)
        for delta in engine.stream("Once upon a time", SamplingParams(max_new_tokens=16, temperature=0.8, seed=1)):
            print(delta["text"], end="", flush=True)
        print()
        print(json.dumps(engine.stats(), indent=1))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flotilla import SamplingParams

    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)
    engine = make_engine(args)
    try:
        for delta in engine.stream(args.prompt, sp):
            print(delta["text"], end="", flush=True)
        print()
    finally:
        engine.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flotilla.server.http import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from flotilla.bench import cmd_bench as run

    return run(args)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (loopback by default; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed once ready)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FLOTILLA_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flotilla")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="generate with data parallel on a tiny model built locally")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=1)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="generate text for one prompt")
    _add_engine_args(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    _add_engine_args(p)
    _add_serve_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("bench", help="offline throughput / latency benchmark (flotilla or transformers CB)")
    from flotilla.bench import add_bench_args

    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("make-tiny-model", help="build a tiny random Hugging Face checkpoint", add_help=False)
    p.set_defaults(fn=None)

    args, rest = parser.parse_known_args(argv)
    if args.cmd == "make-tiny-model":
        from flotilla.testing.tiny import cli_main

        return cli_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
