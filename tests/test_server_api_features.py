"""The API features real clients need, through the official openai client: echo + logprobs (lm-eval's
loglikelihood requests) equal to transformers, structured output parsed by ``.parse()``, guided regex and
choice, named and required tool calls (also streamed), n and best_of; and the tool-call parsers."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest
import torch

from conftest import _hf_model, hf_tokenize
from flotilla.server import ServerThread, build_app
from flotilla.server.tool_stream import ToolCallStream, merge_pieces
from flotilla.server.tools import HERMES, LLAMA3_JSON, parse_tool_calls, tool_constraint

MODEL = "tiny-llama"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string", "maxLength": 12},
                                                                          "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
                                                           "required": ["city", "days"],
                                                           "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def engine(llama_dp2_engine):
    yield llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared by the session (tests/conftest.py)


@pytest.fixture(scope="module")
def client(engine):
    srv = ServerThread(build_app(engine, MODEL)).start()
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()


def test_echo_logprobs_equal_transformers(client, llama_path):
    prompt = "Once upon a time there was a little fox"
    ids = hf_tokenize(llama_path, prompt)
    with torch.no_grad():
        logp = _hf_model(llama_path)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(prompt)
        assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + max_tokens
        want = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert lp.top_logprobs[0] is None
        for tok, tok_lp, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            # OpenAI's rule: the k most likely, and the token itself when it is not among them
            assert 1 <= len(top) <= 2 and top[tok] == pytest.approx(tok_lp, abs=1e-6)
        assert r.usage.completion_tokens == max_tokens and r.usage.prompt_tokens == len(ids)
        # offsets into the text: the BOS adds no characters (the text does not hold it), never decreasing
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        if max_tokens:
            assert lp.text_offset[-1] == len(prompt)


def test_json_schema_parse(client):
    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(max_length=8)
        age: int = pydantic.Field(ge=0, le=120)
        ok: bool

    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") else \
        client.beta.chat.completions.parse
    r = parse(model=MODEL, messages=[{"role": "user", "content": "Describe a person"}], response_format=Person,
              max_tokens=96, temperature=0)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, max_tokens=64, seed=1)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_guided_regex_and_choice(client):
    r = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, seed=3,
                                  extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yes or no?"}],
                                       max_tokens=8, extra_body={"guided_choice": ["yes", "no"]}, n=3, seed=0)
    assert len(r.choices) == 3 and all(c.message.content in ("yes", "no") for c in r.choices)


def test_named_and_required_tool_calls(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME], max_tokens=96,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME], max_tokens=96,
                                       tool_choice="required", seed=5)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    # streamed: the call arrives as tool-call deltas that add up to the same kind of call
    stream = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=96, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, args, finish, parts, first = "", "", None, 0, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                first = first or tc
                name += tc.function.name or ""
                args += tc.function.arguments or ""
                parts += bool(tc.function.arguments)
            finish = c.finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    # OpenAI's shape: a header (index, id, type, name), then the arguments in pieces as they are written
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and parts > 1
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    # tool_choice none: tools are not used, plain content comes back
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


def test_n_and_best_of(client, llama_path):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, seed=9, temperature=1.0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(hf_tokenize(llama_path, "Hello"))  # the prompt counts once, not per choice
    one = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=10, temperature=1.0,
                                    extra_body={"ignore_eos": True})
    assert r.choices[1].text == one.choices[0].text  # choice 1 draws with seed + 1
    r = client.completions.create(model=MODEL, prompt=["Hello", "A"], max_tokens=4, n=2, best_of=3, seed=1,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage.completion_tokens == 2 * 3 * 4
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                       n=2, stream=True, stream_options={"include_usage": True})
    seen = {c.index for chunk in r for c in chunk.choices}
    assert seen == {0, 1}


def _streamed(text: str, fmt: str, step: int) -> tuple[str, list[tuple[str, str]], int]:
    """Feed ``text`` ``step`` characters at a time: (content, [(name, arguments)], deltas holding arguments)."""
    stream = ToolCallStream(fmt)
    pieces = []
    for i in range(0, len(text), step):
        pieces.append(merge_pieces(stream.feed(text[i:i + step])))
    pieces.append(merge_pieces(stream.finish()))
    content, calls, arg_parts = "", {}, 0
    for p in pieces:
        content += p.get("content", "")
        for tc in p.get("tool_calls", []):
            if "id" in tc:
                assert tc["type"] == "function" and tc["id"].startswith("call_")
                calls[tc["index"]] = [tc["function"]["name"], tc["function"]["arguments"]]
            else:
                calls[tc["index"]][1] += tc["function"]["arguments"]
                arg_parts += 1
    return content, [tuple(calls[i]) for i in sorted(calls)], arg_parts


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_tool_calls_add_up_to_the_parsed_reply(step):
    hermes = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris \\" {", '
              '"days": [1, {"n": 2}]}}\n</tool_call>\n<tool_call>\n{"arguments": {"zone": "UTC"}, "name": "get_time"}'
              '\n</tool_call>')
    content, calls, parts = _streamed(hermes, HERMES, step)
    want_content, want = parse_tool_calls(hermes, HERMES)
    assert content.strip() == want_content
    assert [(n, json.loads(a)) for n, a in calls] == [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                                       for c in want]
    if step < 1000:
        assert parts > 1  # the first call's arguments came in pieces (the second, keys reversed, whole)
    llama = ' {"name": "get_time", "parameters": {"zone": "U{TC}"}}'
    content, calls, _ = _streamed(llama, LLAMA3_JSON, step)
    assert content == "" and [(n, json.loads(a)) for n, a in calls] == [("get_time", {"zone": "U{TC}"})]
    for plain in ("just text, a < b and {braces}", "<tool_ca is not a tag", "{not a call"):
        for fmt in (HERMES, LLAMA3_JSON):
            content, calls, _ = _streamed(plain, fmt, step)
            assert (content, calls) == (plain, [])
    # cut short by the length limit inside the arguments: the call keeps what it had
    content, calls, _ = _streamed('<tool_call>\n{"name": "f", "arguments": {"a": "xy', HERMES, step)
    assert calls == [("f", '{"a": "xy')]


def test_tool_call_parsers():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(text, HERMES)
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"zone": "UTC"}}', LLAMA3_JSON)
    assert content is None and calls[0]["function"]["name"] == "get_time"
    assert parse_tool_calls("just text {", LLAMA3_JSON) == ("just text {", [])
    assert parse_tool_calls("<tool_call>not json</tool_call>", HERMES)[1] == []
    grammar = tool_constraint([WEATHER], "get_weather", HERMES)["grammar"]
    assert grammar.startswith('start: "<tool_call>\\n"') and "%json" in grammar
