"""Structured output from the API's fields: OpenAI's ``response_format`` and the extra-body names vLLM and
sglang accept, as the engine's ``structured_output`` (enforced by a grammar mask in the sampler).

| field | engine constraint |
| --- | --- |
| ``response_format: {"type": "json_object"}`` | any JSON object |
| ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`` | that schema |
| vLLM ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` | json / regex / choice / grammar |
| vLLM ``structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}`` | the same |
| sglang ``json_schema`` (text) / ``regex`` / ``ebnf`` (GBNF, converted to Lark) | json / regex / grammar |

At most one may be given; ``grammar`` is llguidance's Lark dialect.
"""

from __future__ import annotations

import json
from typing import Any

from flotilla.server.errors import bad_param

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "json_schema": "json", "regex": "regex", "ebnf": "grammar"}

EXTRA_FIELDS = frozenset(_GUIDED) | {"structured_outputs"}  # read from a body's extras (not "unknown")


def structured_output(body: Any) -> dict[str, Any] | None:
    """The engine's ``structured_output`` for a request body, or None; a 400 naming the field when two are
    given or one is malformed."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None:
        kind = rf.get("type", "text") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise bad_param("response_format", "json_schema needs {\"name\": ..., \"schema\": {...}}")
            found.append(("response_format", {"json": spec.get("schema") or {"type": "object"}}))
        elif kind != "text":
            raise bad_param("response_format", f"type must be text, json_object or json_schema, got {kind!r}")
    extra = getattr(body, "model_extra", None) or {}
    for name, key in _GUIDED.items():
        value = extra.get(name)
        if value is None:
            continue
        if name == "ebnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark  # the function (the package attribute is its module)

            try:
                value = gbnf_to_lark(value)
            except Exception as e:
                raise bad_param("ebnf", f"is not a valid GBNF grammar: {e}") from None
        if key == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise bad_param(name, f"is not valid JSON: {e}") from None
        found.append((name, {key: value}))
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_param("structured_outputs", "must be an object")
        found.append(("structured_outputs", dict(so)))
    if len(found) > 1:
        raise bad_param(found[1][0], f"give one constraint only; {found[0][0]} is set too")
    return found[0][1] if found else None

