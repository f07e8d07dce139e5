"""Tool calling: ``tools`` into the chat template, the model's tool-call text parsed back into OpenAI's
``tool_calls``, and for ``tool_choice`` "required" or a named function a grammar that makes the model write
a call that always parses (the arguments valid against the function's JSON schema).

Two formats, chosen from the chat template: Qwen's (Hermes-style) ``<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`` blocks when the template mentions ``<tool_call>``, else Llama 3's JSON tool calls
(``{"name": ..., "parameters": {...}}`` as the whole reply).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from flotilla.server.errors import bad_param

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_format(chat_template: str | None) -> str:
    return HERMES if chat_template and "<tool_call>" in chat_template else LLAMA3_JSON


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | None:
    """Validate ``tools`` and ``tool_choice``; returns the forced function's name, "*" for "required", or
    None (the model decides, or no tools)."""
    names = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) or \
                not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_param(f"tools.{i}", "must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                                          "\"parameters\": {...}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise bad_param(f"tools.{i}.function.parameters", "must be a JSON schema object")
        names.append(fn["name"])
    if tool_choice in (None, "auto", "none"):
        return None
    if not names:
        raise bad_param("tool_choice", "needs tools")
    if tool_choice == "required":
        return "*"
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or fn.get("name") not in names:
        raise bad_param("tool_choice", f"must be none, auto, required or {{\"type\": \"function\", \"function\": "
                                       f"{{\"name\": one of {names}}}}}, got {tool_choice!r}")
    return fn["name"]


def _call_schema(fn: dict[str, Any], fmt: str) -> dict[str, Any]:
    args_key = "arguments" if fmt == HERMES else "parameters"
    params = fn.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def tool_constraint(tools: list[dict[str, Any]], forced: str, fmt: str) -> dict[str, Any]:
    """The engine's structured_output that makes the reply one call of ``forced`` (a name, or "*": any)."""
    fns = [t["function"] for t in tools if forced == "*" or t["function"]["name"] == forced]
    schema = _call_schema(fns[0], fmt) if len(fns) == 1 else {"anyOf": [_call_schema(f, fmt) for f in fns]}
    if fmt == LLAMA3_JSON:
        return {"json": schema}
    return {"grammar": 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)}


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left over or None, OpenAI tool_calls) from a reply; text that is not a well-formed call stays
    content."""
    found: list[tuple[str, Any]] = []
    if fmt == HERMES:
        rest = text
        for m in _HERMES_BLOCK.finditer(text):
            obj = _load(m.group(1))
            if obj is None or "name" not in obj:
                continue
            found.append((obj["name"], obj.get("arguments", obj.get("parameters", {}))))
            rest = rest.replace(m.group(0), "", 1)
        content = rest.strip() or None
    else:
        obj = _load(text.strip())
        if obj is not None and isinstance(obj.get("name"), str) and ("parameters" in obj or "arguments" in obj):
            found.append((obj["name"], obj.get("parameters", obj.get("arguments"))))
            content = None
        else:
            content = text
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in found]
    return (content if calls else text), calls


def _load(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
