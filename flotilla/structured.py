"""Structured output: a ``StructuredOutput`` constraint as a grammar for llguidance, checked at the edge.

Why llguidance: it builds a token mask from JSON schemas, regexes and Lark grammars in Rust, with no GPU
kernel of its own (the mask is applied to the logits in the sampler), and it installs as one small wheel
with no further dependencies. The per-step mask cost at batch 256 is measured in docs/benchmarks.md
(``scripts/grammar_mask_bench.py``).
"""

from __future__ import annotations

import json
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.sampling import StructuredOutput

# Compact JSON (", " and ": " only, no free whitespace): a model, a random one above all, cannot spend its
# token budget on blank space inside an object.
JSON_OPTIONS: Any = {"whitespace_flexible": False}


def grammar_of(so: StructuredOutput) -> str:
    """The llguidance grammar text of a constraint."""
    from llguidance import LLMatcher

    if so.json is not None:
        schema = json.loads(so.json) if isinstance(so.json, str) else so.json
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if so.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if so.regex is not None:
        return LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    return LLMatcher.grammar_from_lark(so.grammar)


def check(so: StructuredOutput) -> None:
    """Refuse a constraint that cannot compile (a bad schema, regex or grammar), naming the field."""
    from llguidance import LLMatcher

    name = next(n for n in ("json", "regex", "choice", "grammar") if getattr(so, n) is not None) \
        if not so.json_object else "json_object"
    try:
        grammar = grammar_of(so)
    except (ValueError, TypeError) as e:  # not JSON, or not an object
        raise InvalidParameter(f"structured_output.{name}", f"{e}") from None
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise InvalidParameter(f"structured_output.{name}", f"{error.strip().splitlines()[0]}")
