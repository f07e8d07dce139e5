"""Engine options on the command line, built from ``EngineConfig``'s fields, and the engine made from them.

Both ``flotilla serve`` (through ``flotilla.server.launch``) and ``flotilla generate`` use this module, so the
server and the CLI never import each other. Every option's name, type, help and choices come from the
dataclass field (``metadata={"help": ..., "choices": ...}``); its default stays the dataclass default, because an
option the user did not pass never reaches the engine (``default=argparse.SUPPRESS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.config import EngineConfig

# Fields whose plain flag would clash with a front-end option of the same name (``serve --host`` is the HTTP
# address; ``generate --seed`` is the sampling seed): they get these flags instead.
RENAMED_FLAGS: dict[str, str] = {"host": "engine-host", "seed": "engine-seed"}
# Not an option: filled in by EngineConfig.resolve().
_INTERNAL_FIELDS = frozenset({"hf_config"})


@dataclass(frozen=True)
class EngineOption:
    """One EngineConfig field as a command-line option."""

    field: str   # the EngineConfig field
    flag: str    # "--tp-size"
    dest: str    # the argparse Namespace attribute ("tp_size"; "engine_host" for a renamed field)


def engine_options() -> list[EngineOption]:
    """Every user-settable EngineConfig field, in declaration order."""
    out = []
    for f in dataclasses.fields(EngineConfig):
        if f.name in _INTERNAL_FIELDS:
            continue
        name = RENAMED_FLAGS.get(f.name, f.name.replace("_", "-"))
        out.append(EngineOption(f.name, f"--{name}", name.replace("-", "_")))
    return out


def _scalar_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field's annotation: ``int``, ``str | None``, ``list[int] | None``..."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) != 1:
            raise TypeError(f"EngineConfig field type {hint!r} has no command-line form")
        return _scalar_type(non_none[0])
    if typing.get_origin(hint) is list:
        return args[0], True
    if typing.get_origin(hint) is dict:
        return dict, False
    if hint in (bool, int, float, str):
        return hint, False
    raise TypeError(f"EngineConfig field type {hint!r} has no command-line form")


def parse_mapping(values: list[str] | str) -> dict[str, str]:
    """A dict option's values as ``{name: value}``. Each item is ``NAME=VALUE``, a JSON object of names to values
    (``'{"sql": "/a", "chat": "/b"}'``), or vLLM's LoRA form ``'{"name": "sql", "path": "/a"}'`` (an object whose
    keys are ``name`` and ``path``, and optionally ``base_model_name``). Raises ValueError saying what is wrong."""
    import json

    out: dict[str, str] = {}
    for item in [values] if isinstance(values, str) else values:
        text = item.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{item!r} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{item!r} must be a JSON object")
            if set(obj) & {"name", "path"} and set(obj) <= {"name", "path", "base_model_name"}:  # vLLM's form
                if not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
                    raise ValueError(f"{item!r} needs both \"name\" and \"path\" (strings)")
                obj = {obj["name"]: obj["path"]}
            pairs = list(obj.items())
        else:
            name, sep, value = text.partition("=")
            if not sep:
                raise ValueError(f"{item!r} must be NAME=PATH, or a JSON object such as "
                                 "'{\"name\": \"sql\", \"path\": \"/adapters/sql\"}'")
            pairs = [(name.strip(), value.strip())]
        for name, value in pairs:
            if not isinstance(name, str) or not name or not isinstance(value, str) or not value:
                raise ValueError(f"{item!r}: names and values must be non-empty strings")
            if name in out:
                raise ValueError(f"{name!r} is given twice")
            out[name] = value
    return out


class MappingAction(argparse.Action):
    """A ``dict[str, str]`` EngineConfig field on the command line (``--lora-modules sql=/a chat=/b``): one or
    more items, parsed by ``parse_mapping``; a bad item is a usage error naming the option."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, parse_mapping(values))
        except ValueError as e:
            parser.error(f"{option_string or self.dest}: {e}")


def add_engine_args(parser: argparse.ArgumentParser, required_model: bool = False) -> None:
    """One option per EngineConfig field: bool -> ``--x/--no-x``, lists -> several values, choices from the
    config's constants. ``--model`` is not required here because it may come from ``--config``."""
    hints = typing.get_type_hints(EngineConfig)
    by_name = {f.name: f for f in dataclasses.fields(EngineConfig)}
    group = parser.add_argument_group("engine options (EngineConfig; unset options keep the engine's defaults)")
    for opt in engine_options():
        f = by_name[opt.field]
        kind, is_list = _scalar_type(hints[opt.field])
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None:
            help_text += f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:  # NAME=VALUE items or JSON objects (MappingAction)
            kwargs.update(action=MappingAction, nargs="+", metavar="NAME=VALUE")
        else:
            kwargs["type"] = kind
            if is_list:
                kwargs["nargs"] = "+"
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if opt.field == "model":
            kwargs["required"] = required_model
        group.add_argument(opt.flag, **kwargs)
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--ray", action="store_true", help="run the rank workers as Ray actors (RayEngine)")
    ray.add_argument("--gpus-per-rank", type=float, default=argparse.SUPPRESS,
                     help="with --ray: GPUs per rank; below 1, replicas of one rank share a GPU (default: 1)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields the user set (on the command line or in --config), model excluded."""
    return {opt.field: getattr(args, opt.dest) for opt in engine_options()
            if opt.field != "model" and hasattr(args, opt.dest)}


def model_of(args: argparse.Namespace) -> str:
    model = getattr(args, "model", None)
    if not model:
        raise InvalidParameter("model", "pass --model PATH (or set `model:` in the --config file)")
    return str(model)


def make_engine(args: argparse.Namespace) -> Any:
    """An Engine (or a RayEngine with ``--ray``) from parsed options; raises ValueError naming a bad field."""
    kwargs = engine_kwargs(args)
    if getattr(args, "ray", False):
        from flotilla.frontend.ray_engine import RayEngine

        if hasattr(args, "gpus_per_rank"):
            kwargs["gpus_per_rank"] = args.gpus_per_rank
        return RayEngine(model=model_of(args), **kwargs)
    if hasattr(args, "gpus_per_rank"):
        raise InvalidParameter("gpus_per_rank", "only applies with --ray")
    from flotilla.frontend.engine import Engine

    return Engine(model=model_of(args), **kwargs)
