"""Command line: ``flotilla demo | generate | make-tiny-model | serve | bench``.

``serve`` and ``generate`` take every engine option; they are built from ``EngineConfig``'s fields
(``flotilla.launch.factory``), so ``--help`` lists exactly what the engine accepts. ``--config FILE.yaml`` sets
any of a subcommand's options from a file (keys are the option names, with ``-`` or ``_``); flags on the command
line override the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flotilla.launch.factory import MappingAction, add_engine_args, make_engine, model_of, parse_mapping

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


# ============================================================================================ --config


class ConfigFileError(ValueError):
    """A --config file that does not fit the subcommand's options; the message names the key."""


def _options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each settable option under its file key: the long flag without ``--``, dashes as underscores."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public accessor for a parser's actions
        if isinstance(action, argparse._HelpAction) or action.dest == "config":
            continue
        for flag in action.option_strings:
            if flag.startswith("--") and not (isinstance(action, argparse.BooleanOptionalAction)
                                              and flag.startswith("--no-")):
                out[flag[2:].replace("-", "_")] = action
    return out


def _convert(key: str, value: Any, action: argparse.Action) -> Any:
    """A file value as argparse would have parsed it, with an error naming the key and what it takes."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{key}: must be true or false, got {value!r}")
        return value
    if isinstance(action, MappingAction):  # a mapping ({name: path}), or the command line's items as a list
        if isinstance(value, dict) and value and all(isinstance(k, str) and k and isinstance(v, str) and v
                                                     for k, v in value.items()):
            return dict(value)
        try:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"must be a mapping of names to paths ({{sql: /adapters/sql}}), got {value!r}")
            return parse_mapping(value)
        except ValueError as e:
            raise ConfigFileError(f"{key}: {e}") from None
    kind: Any = action.type or str
    what = {int: "an int", float: "a number", str: "a string"}.get(kind, getattr(kind, "__name__", str(kind)))
    values = value if action.nargs in ("+", "*") else [value]
    if action.nargs in ("+", "*") and not (isinstance(value, list) and value):
        raise ConfigFileError(f"{key}: must be a non-empty list, got {value!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, list, dict)) or v is None or (kind is int and isinstance(v, float)):
            raise ConfigFileError(f"{key}: must be {what}, got {v!r}")
        try:
            v = kind(v) if not isinstance(v, str) or kind is str else kind(v.strip())
        except (TypeError, ValueError):
            raise ConfigFileError(f"{key}: must be {what}, got {v!r}") from None
        if action.choices is not None and v not in action.choices:
            raise ConfigFileError(f"{key}: must be one of {list(action.choices)}, got {v!r}")
        out.append(v)
    return out if action.nargs in ("+", "*") else out[0]


def config_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's settings as ``{dest: value}`` for ``parser.set_defaults``, so the command line still wins."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigFileError(f"cannot read it: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"must hold a mapping of option names to values, got {type(data).__name__}")
    options = _options_by_key(parser)
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        action = options.get(key)
        if action is None:
            raise ConfigFileError(f"unknown key {raw_key!r}; allowed: {', '.join(sorted(options))}")
        out[action.dest] = _convert(str(raw_key), value, action)
    return out


# ============================================================================================ commands


_DEMO_PROMPTS = ("The capital of France is", "Hello", "Once upon a time", "The quick brown fox")
_DEMO_TOKENS = 16


def _first_words(text: str, width: int = 34) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _demo_table(prompts: tuple[str, ...], outs: list[dict[str, Any]]) -> str:
    """prompt | tokens | finish | first words, aligned."""
    rows = [("prompt", "tokens", "finish", "first words")]
    rows += [(repr(p), str(o["completion_tokens"]), str(o["finish_reason"]), repr(_first_words(o["text"])))
             for p, o in zip(prompts, outs)]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def cmd_demo(args: argparse.Namespace) -> int:
    """Greedy generation on one replica (tp=1) and on the requested layout: the layouts must agree token for
    token, which is what data (and tensor) parallelism promise."""
    from flotilla import Engine, SamplingParams
    from flotilla.tools.tiny import tiny_model_path

    path = tiny_model_path("llama")
    print(f"checkpoint: {path}")
    print("  a tiny llama (a few layers, a 512-token vocabulary) whose weights are random: the text below is\n"
          "  gibberish by design. The point is that every layout produces the same tokens.")
    greedy = SamplingParams(max_new_tokens=_DEMO_TOKENS, temperature=0.0, ignore_eos=True)
    layout = f"dp={args.dp_size} tp={args.tp_size}"
    common = dict(device="cpu", dtype="float32")
    print("\n[1/2] one replica, tp=1")
    with Engine(model=str(path), **common) as engine:
        reference = engine.generate(list(_DEMO_PROMPTS), greedy, use_tqdm=False)
    print(_demo_table(_DEMO_PROMPTS, reference))
    print(f"\n[2/2] {layout}")
    with Engine(model=str(path), dp_size=args.dp_size, tp_size=args.tp_size, **common) as engine:
        outs = engine.generate(list(_DEMO_PROMPTS), greedy, use_tqdm=False)
        stats = engine.stats()
        print(_demo_table(_DEMO_PROMPTS, outs))
        print("streaming:", end=" ", flush=True)
        for delta in engine.stream("Once upon a time", SamplingParams(max_new_tokens=12, temperature=0.8, seed=1)):
            print(delta["text"], end="", flush=True)
        print()
    replicas = stats["replicas"]
    print(f"replicas: {len(replicas)} ({sum(bool(r['alive']) for r in replicas)} alive), steps per replica: "
          f"{[r.get('num_steps', 0) for r in replicas]}")
    diffs = [(p, _first_difference(a["token_ids"], b["token_ids"])) for p, a, b in zip(_DEMO_PROMPTS, reference, outs)]
    bad = [(p, k) for p, k in diffs if k is not None]
    if bad:
        for p, k in bad:
            print(f"MISMATCH: {p!r} differs from tp=1 at generated token {k}")
        return 1
    print(f"tp=1 and {layout} agree token for token on all {len(_DEMO_PROMPTS)} prompts "
          f"({len(_DEMO_PROMPTS) * _DEMO_TOKENS} tokens).")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flotilla import SamplingParams

    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, lora_name=args.lora_name)
    try:
        engine = make_engine(args)
    except ValueError as e:  # a bad option, named by the engine's validation
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 2
    try:
        for delta in engine.stream(args.prompt, sp):
            print(delta["text"], end="", flush=True)
        print()
    finally:
        engine.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flotilla.server.launch import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from flotilla.tools.bench import cmd_bench as run

    return run(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from flotilla.tools.bench_serve import cmd_bench_serve as run

    return run(args)


def cmd_soak(args: argparse.Namespace) -> int:
    from flotilla.tools.soak import run_soak

    return run_soak(args)


# ============================================================================================ parser


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="read options from a YAML mapping (keys: option names, with - or _); flags given on the "
                        "command line override it")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (loopback by default; 0.0.0.0 exposes the server to the network)")
    g.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed once ready)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1, /admin, /tokenize and /detokenize (default: "
                        "$FLOTILLA_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    g.add_argument("--api-server-count", type=int, default=1,
                   help="HTTP processes sharing the listening socket, over the engine in this process (1: one "
                        "process serves HTTP and runs the engine's front end; docs/server.md)")
    g.add_argument("--log-level", default="info", choices=_LOG_LEVELS)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (the engine's seed is --engine-seed)")
    g.add_argument("--lora-name", default=None, help="generate with this LoRA adapter (one of --lora-modules)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its subcommand parsers by name."""
    parser = argparse.ArgumentParser(prog="flotilla")
    sub = parser.add_subparsers(dest="cmd", required=True)
    subs: dict[str, argparse.ArgumentParser] = {}

    p = subs["demo"] = sub.add_parser("demo", help="generate on a tiny random model, on one and on several replicas")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=1)
    p.set_defaults(fn=cmd_demo)

    p = subs["generate"] = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt")
    _add_config_arg(p)
    _add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(fn=cmd_generate)

    p = subs["serve"] = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    _add_config_arg(p)
    _add_serve_args(p)
    add_engine_args(p)
    p.set_defaults(fn=cmd_serve)

    p = subs["bench"] = sub.add_parser("bench", help="offline throughput / latency benchmark (flotilla or "
                                                     "transformers CB)")
    from flotilla.tools.bench import add_bench_args

    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)

    p = subs["bench-serve"] = sub.add_parser("bench-serve", help="serving benchmark: streaming completions against "
                                                                 "a running server or one started here")
    from flotilla.tools.bench_serve import add_bench_serve_args

    add_bench_serve_args(p)
    p.set_defaults(fn=cmd_bench_serve)

    p = subs["soak"] = sub.add_parser("soak", help="chaos soak: traffic while replicas are killed, stopped, scaled "
                                                   "and updated; checks nothing is lost or duplicated")
    from flotilla.tools.soak import add_soak_args

    add_soak_args(p)
    p.set_defaults(fn=cmd_soak)

    p = subs["make-tiny-model"] = sub.add_parser("make-tiny-model", help="build a tiny random Hugging Face "
                                                                         "checkpoint", add_help=False)
    p.set_defaults(fn=None)
    return parser, subs


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse, reading ``--config`` first when given; exits with a usage error naming what is wrong."""
    parser, subs = build_parser()
    args, rest = parser.parse_known_args(argv)
    config = getattr(args, "config", None)
    if config:
        sub = subs[args.cmd]
        try:
            sub.set_defaults(**config_defaults(config, sub))
        except ConfigFileError as e:
            sub.error(f"--config {config}: {e}")
        args, rest = parser.parse_known_args(argv)
    if args.cmd in ("generate", "serve"):
        try:
            model_of(args)
        except ValueError as e:
            subs[args.cmd].error(str(e))
    if rest and args.cmd != "make-tiny-model":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _imply_lora(args)
    return args, rest


def _imply_lora(args: argparse.Namespace) -> None:
    """``--lora-modules`` turns LoRA on by itself (vLLM asks for ``--enable-lora`` too; here one flag is enough);
    an explicit ``--no-enable-lora`` with adapters stays a conflict, which the engine's validation names."""
    if getattr(args, "lora_modules", None) and not hasattr(args, "enable_lora"):
        args.enable_lora = True


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.cmd == "make-tiny-model":
        from flotilla.tools.tiny import cli_main

        return cli_main(rest)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
