"""The server's mapping of OpenAI/vLLM/sglang structured-output fields onto the engine's ``structured_output``."""
from __future__ import annotations

from types import SimpleNamespace

import llguidance
import pytest
from flotilla.server.errors import APIError
from flotilla.server.structured import structured_output


def body(response_format=None, **extra):
    return SimpleNamespace(response_format=response_format, model_extra=extra)


def test_sglang_ebnf_is_converted_to_a_lark_grammar_llguidance_accepts():
    out = structured_output(body(ebnf='root ::= "yes" | "no"'))
    assert set(out) == {"grammar"}
    grammar = out["grammar"]
    assert "yes" in grammar and "no" in grammar
    # the converted grammar compiles: llguidance's Lark front end accepts it
    llguidance.LLMatcher.grammar_from_lark(grammar)


def test_bad_ebnf_and_two_constraints_name_the_field():
    with pytest.raises(APIError) as e:
        structured_output(body(ebnf="root ::= ("))
    assert e.value.status == 400 and e.value.param == "ebnf"
    with pytest.raises(APIError) as e:
        structured_output(body({"type": "json_object"}, regex="a+"))
    assert e.value.status == 400 and e.value.param == "regex" and "response_format" in e.value.message


def test_openai_json_schema_and_vllm_guided_fields():
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
    assert structured_output(body(schema)) == {"json": {"type": "integer"}}
    assert structured_output(body(guided_json='{"type": "string"}')) == {"json": {"type": "string"}}
    assert structured_output(body(guided_choice=["a", "b"])) == {"choice": ["a", "b"]}
    assert structured_output(body()) is None
