"""Structured output: JSON schemas, regexes, choices and grammars hold even with random weights, bad
constraints are refused at the edge, and the bitmask unpacking equals a bit-by-bit reference."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from conftest import tiny
from flotilla import SamplingParams

OPTS = dict(device="cpu", dtype="float32")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(llama_dp2_engine):
    yield llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared by the session (tests/conftest.py)


def _gen(engine, so, n=4, **kw):
    sps = [SamplingParams(max_new_tokens=96, temperature=1.0, seed=i, structured_output=so, **kw) for i in range(n)]
    return engine.generate(["Tell me about a person:"] * n, sps, use_tqdm=False)


def test_json_schema_output_validates_with_random_weights(engine):
    for out in _gen(engine, {"json": SCHEMA}):
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_json_schema_as_text_and_json_object(engine):
    for out in _gen(engine, {"json": json.dumps(SCHEMA)}, n=2):
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    for out in _gen(engine, {"json_object": True}, n=3):
        if out["finish_reason"] == "stop":  # an open-ended object may run out of tokens; a finished one parses
            assert isinstance(json.loads(out["text"]), dict)
        else:
            assert out["text"].startswith("{")


def test_regex_choice_and_grammar(engine):
    for out in _gen(engine, {"regex": r"[0-9]{3}-[a-z]{2,5}"}):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", out["text"]), out["text"]
    choices = ["yes", "no", "maybe later"]
    outs = _gen(engine, {"choice": choices}, n=6)
    assert all(o["text"] in choices and o["finish_reason"] == "stop" for o in outs)
    for out in _gen(engine, {"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'}):
        assert re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", out["text"]), out["text"]


def test_greedy_constrained_output_is_deterministic_and_streams(engine):
    sp = SamplingParams(max_new_tokens=96, temperature=0.0, structured_output={"json": SCHEMA})
    a = engine.generate(["Hello"], sp, use_tqdm=False)[0]
    deltas = list(engine.stream("Hello", sp))
    assert "".join(d["text"] for d in deltas) == a["text"]
    jsonschema.validate(json.loads(a["text"]), SCHEMA)


def test_bad_constraints_are_refused_at_the_edge(engine):
    bad = [({"regex": "a(b"}, "structured_output.regex"),
           ({"json": "{not json"}, "structured_output.json"),
           ({"grammar": "start: ???"}, "structured_output.grammar"),
           ({"regex": "a", "choice": ["b"]}, "exactly one"),
           ({"choice": []}, "structured_output.choice"),
           ({"nope": 1}, "unknown field")]
    for so, needle in bad:
        with pytest.raises(ValueError, match=re.escape(needle)):
            engine.generate(["x"], SamplingParams(max_new_tokens=4, structured_output=so) if "nope" not in so
                            else {"max_new_tokens": 4, "structured_output": so}, use_tqdm=False)
    # the engine serves on
    assert engine.generate(["x"], {"max_new_tokens": 2}, use_tqdm=False)[0]["completion_tokens"] == 2


def test_unpacked_bitmask_equals_llguidance():
    import llguidance.torch as llt

    from flotilla.worker.grammar import unpack_bitmask

    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=g)
    vocab = 150
    ref = torch.zeros(3, vocab)
    for r in range(3):
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                ref[r, t] = float("-inf")
    ours = torch.zeros(3, vocab).masked_fill_(~unpack_bitmask(bitmask, vocab), float("-inf"))
    assert torch.equal(ours, ref)
    assert llt.get_bitmask_shape(3, vocab) == tuple(bitmask.shape)  # the layout llguidance fills


def test_a_resumed_request_replays_its_tokens_into_the_matcher():
    from flotilla.sampling import StructuredOutput
    from flotilla.worker.grammar import Grammars
    from transformers import AutoTokenizer

    path = tiny("llama")
    tok = AutoTokenizer.from_pretrained(path)
    grammars = Grammars(path, len(tok), (tok.eos_token_id,))
    so = StructuredOutput(regex="abc[0-9]+")
    grammars.add("r", so, tok("abc", add_special_tokens=False)["input_ids"])
    logits = torch.zeros(1, len(tok))
    rows = grammars.mask(logits, ["r"])
    allowed = [t for t in range(len(tok)) if logits[0, t] > float("-inf")]
    assert rows and allowed and all(tok.decode([t])[:1].isdigit() for t in allowed if t != tok.eos_token_id)
    with pytest.raises(ValueError, match="do not fit"):
        grammars.add("s", so, tok("xyz", add_special_tokens=False)["input_ids"])
