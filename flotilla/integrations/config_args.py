"""A config dataclass from a plain dict, the way Ray hands application arguments over.

``serve run module:builder key=value``, ``serve build`` and a Serve config file's ``args:`` all call an application
builder with one dict. A config file's values are already typed (YAML); the command line's are all strings. So a
string given for a field that is not a plain ``str`` is read as that field's type: ints, floats, bools
(``true``/``false``), ``none``/``null`` where None is allowed, and JSON for dicts (``engine_kwargs='{"tp_size": 2}'``).
A value that cannot be read, or a key the config has no field for, fails naming the field; the dataclass's own
``__post_init__`` then checks the values as it does for a config built in Python.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from flotilla.errors import InvalidParameter

T = TypeVar("T")
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def config_from_args(cls: type[T], args: Mapping[str, Any]) -> T:
    """``cls(**args)`` with unknown keys refused and command-line strings read as each field's type."""
    if not isinstance(args, Mapping):
        raise InvalidParameter(cls.__name__, f"application arguments must be a dict, got {type(args).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in args if k not in fields)
    if unknown:
        raise InvalidParameter(cls.__name__, f"unknown field(s) {unknown}; the fields are {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in args and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise InvalidParameter(cls.__name__, f"missing required field(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: coerce(name, value, hints[name]) for name, value in args.items()})


def _allowed(hint: Any) -> set[type]:
    """The plain types a hint admits: ``int | str | None`` -> {int, str, NoneType}, ``dict[str, Any]`` -> {dict}."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set().union(*(_allowed(a) for a in typing.get_args(hint)))
    if hint is Any:
        return {object}
    origin = typing.get_origin(hint)
    return {origin if origin is not None else hint}


def coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type when it is a command-line string; anything else is left to the config."""
    kinds = _allowed(hint)
    if not isinstance(value, str) or kinds <= {str} or object in kinds:
        return value
    text = value.strip()
    if type(None) in kinds and text.lower() in _NONE:
        return None
    if bool in kinds:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidParameter(name, f"must be true or false, got {value!r}")
    if int in kinds:
        try:
            return int(text)
        except ValueError:
            if str not in kinds and float not in kinds:
                raise InvalidParameter(name, f"must be an int, got {value!r}") from None
    if float in kinds:
        try:
            return float(text)
        except ValueError:
            if str not in kinds:
                raise InvalidParameter(name, f"must be a number, got {value!r}") from None
    if dict in kinds or list in kinds or tuple in kinds:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidParameter(name, f"must be JSON ({e.msg} at column {e.colno}), got {value!r}") from None
        if type(parsed) not in kinds and not (tuple in kinds and isinstance(parsed, list)):
            raise InvalidParameter(name, f"must be a JSON {' or '.join(sorted(k.__name__ for k in kinds))}, "
                                         f"got {value!r}")
        return parsed
    return value
