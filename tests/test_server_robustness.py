"""Failure paths of the HTTP server, driven by small stand-in engines (the real one cannot be made to fail on
cue): every error is OpenAI-shaped JSON, tokenization never blocks the event loop, streams never just stop.

The stand-ins implement ``EngineClient`` with the tiny model's real tokenizer, so everything but the engine is
the production code path.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from flotilla.server import ServerThread, build_app
from flotilla.server.completions import top_by_text
from flotilla.server.tokens import TokenStrings

MODEL = "fake"


@pytest.fixture(scope="module")
def tokenizer(llama_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_path)


class ScriptedEngine:
    """Yields ``deltas`` for every request, then raises ``fail_with`` if set (mid-stream); ``first_error`` is
    raised on the first advance instead (at submission)."""

    max_model_len = 128

    def __init__(self, tokenizer: Any, deltas: list[dict[str, Any]], fail_with: Exception | None = None,
                 first_error: Exception | None = None):
        self.tokenizer = tokenizer
        self.deltas, self.fail_with, self.first_error = deltas, fail_with, first_error
        self.closed = 0

    def stats(self) -> dict[str, Any]:
        return {"replicas": [{"id": 0, "alive": True, "running": 0, "waiting": 0}], "num_requests_inflight": 0}

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        raise NotImplementedError

    async def stream_async(self, prompt: str | None = None, sampling_params: Any = None, *,
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           accepted: bool = False) -> AsyncIterator[dict]:
        try:
            if self.first_error is not None:
                raise self.first_error
            for d in self.deltas:
                await asyncio.sleep(0)
                yield d
            if self.fail_with is not None:
                raise self.fail_with
        finally:
            self.closed += 1


def _delta(text: str, ids: list[int], finished: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"text": text, "token_ids": ids, "finished": finished,
                         "finish_reason": "length" if finished else None}
    if finished:
        d["result"] = {"text": text, "token_ids": ids, "finish_reason": "length", "prompt_tokens": 3,
                       "completion_tokens": len(ids), "cached_tokens": 0}
    return d


def _events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


# ============================================================================================ error shape


def _is_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_engine_exception_is_a_json_500(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [], first_error=RuntimeError("the GPU caught fire"))
    with TestClient(build_app(engine, MODEL)) as tc:
        err = _is_openai_error(tc.post("/v1/chat/completions", json=CHAT), 500)
        assert err["type"] == "server_error" and "the GPU caught fire" in err["message"]
        err = _is_openai_error(tc.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 500)
        assert "RuntimeError" in err["message"]
        assert tc.get("/health").status_code == 200  # the app survives


def test_failure_after_start_of_a_non_streamed_request_is_a_json_500(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [_delta("a", [10])], fail_with=KeyError("lost state"))
    with TestClient(build_app(engine, MODEL)) as tc:
        err = _is_openai_error(tc.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 500)
        assert "lost state" in err["message"]
    assert engine.closed == 1


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"model": "fake", "prompt": "abc\\ud800def"}', "prompt"),
    ("/v1/completions", '{"model": "fake", "prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"model": "fake", "prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud83d"}', "prompt"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
])
def test_lone_surrogate_is_a_400_naming_the_field(tokenizer: Any, path: str, body: str, param: str) -> None:
    engine = ScriptedEngine(tokenizer, [_delta("a", [10], finished=True)])
    with TestClient(build_app(engine, MODEL)) as tc:
        r = tc.post(path, content=body.encode("ascii"), headers={"content-type": "application/json"})
        err = _is_openai_error(r, 400)
        assert err["param"] == param and "surrogate" in err["message"]


def test_unknown_route_and_method_are_openai_shaped(tokenizer: Any) -> None:
    with TestClient(build_app(ScriptedEngine(tokenizer, []), MODEL)) as tc:
        assert _is_openai_error(tc.get("/v1/nothing"), 404)["code"] == "not_found"
        assert _is_openai_error(tc.get("/v1/completions"), 405)["code"] == "method_not_allowed"


# ============================================================================================ streams never cut


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_failing_midway_ends_with_an_error_event_then_done(tokenizer: Any, path: str) -> None:
    engine = ScriptedEngine(tokenizer, [_delta("one", [10]), _delta(" two", [11])],
                            fail_with=RuntimeError("replica exploded"))
    body = {**CHAT, "stream": True} if "chat" in path else {"model": MODEL, "prompt": "Hi", "stream": True}
    with TestClient(build_app(engine, MODEL)) as tc:
        r = tc.post(path, json=body)
    assert r.status_code == 200
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "replica exploded" in err["message"] and err["type"] == "server_error"
    texts = [json.loads(e)["choices"][0].get("text", json.loads(e)["choices"][0].get("delta", {}).get("content"))
             for e in events[:-2]]
    assert "one" in texts and " two" in texts  # what was generated before the failure was sent
    assert engine.closed == 1


def test_stream_that_stops_without_finishing_says_so(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [_delta("one", [10])])  # no finished delta, no exception
    with TestClient(build_app(engine, MODEL)) as tc:
        r = tc.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "stream": True})
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    assert "ended before it finished" in json.loads(events[-2])["error"]["message"]


def test_finished_stream_ends_with_finish_chunk_then_done(tokenizer: Any) -> None:
    engine = ScriptedEngine(tokenizer, [_delta("one", [10]), _delta(" two", [11], finished=True)])
    with TestClient(build_app(engine, MODEL)) as tc:
        r = tc.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "stream": True,
                                             "stream_options": {"include_usage": True}})
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 1
    assert not any("error" in json.loads(e) for e in events[:-1])


# ============================================================================================ no blocking on the loop


class GatedTokenizer:
    """The real tokenizer, except that encoding a huge text waits until the test opens the gate."""

    def __init__(self, real: Any):
        self._real = real
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any:
        if len(text) > 1_000_000:
            self.started.set()
            assert self.gate.wait(60), "the test never opened the gate"
            text = text[:20]
        return self._real(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __len__(self) -> int:
        return len(self._real)


def test_health_answers_while_a_huge_prompt_is_tokenized(tokenizer: Any) -> None:
    gated = GatedTokenizer(tokenizer)
    engine = ScriptedEngine(gated, [_delta("ok", [10], finished=True)])
    engine.max_model_len = 1 << 18  # so that 10 MB of text passes the cheap size check and is tokenized
    server = ServerThread(build_app(engine, MODEL)).start()
    result: dict[str, Any] = {}

    def huge() -> None:
        result["r"] = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x" * 10_000_000},
                                 timeout=120)

    t = threading.Thread(target=huge)
    try:
        t.start()
        assert gated.started.wait(60), "the huge request never reached the tokenizer"
        # the tokenizer is now blocked mid-request; if it ran on the event loop, nothing else could be served
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 200
        assert "r" not in result  # ordering: /health completed while the huge prompt was still being tokenized
        tok = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello"}, timeout=30)
        assert tok.status_code == 200 and tok.json()["count"] >= 1
        gated.gate.set()
        t.join(60)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "ok"
    finally:
        gated.gate.set()
        t.join(5)
        server.stop()


# ============================================================================================ token strings


def test_logprob_bytes_are_the_tokens_own_bytes(tokenizer: Any) -> None:
    ids = list(tokenizer("é")["input_ids"])[-2:]  # byte-level BPE: é (C3 A9) is two single-byte tokens here
    strings = TokenStrings(tokenizer)
    assert [strings.text(t) for t in ids] == ["\ufffd", "\ufffd"]  # what decoding each alone gives
    assert [strings.bytes(t) for t in ids] == [b"\xc3", b"\xa9"]
    assert b"".join(strings.bytes(t) for t in tokenizer("naïve café")["input_ids"][1:]).decode() == "naïve café"
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert strings.bytes(special) == b"<|im_end|>"


def test_completion_top_logprobs_keep_k_distinct_entries(tokenizer: Any) -> None:
    c3, a9 = list(tokenizer("é")["input_ids"])[-2:]
    a, b = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")
    strings = TokenStrings(tokenizer)
    row = [(c3, -0.1), (a9, -0.2), (a, -0.3), (b, -0.4)]  # two candidates both decode to U+FFFD alone
    assert top_by_text(strings, row, 3) == {"bytes:\\xc3": -0.1, "bytes:\\xa9": -0.2, "a": -0.3}
    assert top_by_text(strings, row, 4) == {"bytes:\\xc3": -0.1, "bytes:\\xa9": -0.2, "a": -0.3, "b": -0.4}
    # text offsets count a split character once, at its first piece
    ids = list(tokenizer("aé b")["input_ids"])
    ids = ids[-4:] if len(ids) > 4 else ids
    assert [strings.label(t) for t in ids] == ["a", "bytes:\\xc3", "bytes:\\xa9", " b"]
    assert [strings.num_chars(t) for t in ids] == [1, 1, 0, 2]


class GatedEngine(ScriptedEngine):
    """Acknowledges a request at once (``accepted``), then holds its first token until ``gate`` is set."""

    def __init__(self, tokenizer: Any, deltas: list[dict[str, Any]]):
        super().__init__(tokenizer, deltas)
        self.gate = threading.Event()
        self.asked_accepted: list[bool] = []

    async def stream_async(self, prompt: str | None = None, sampling_params: Any = None, *,
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           accepted: bool = False) -> AsyncIterator[dict]:
        from flotilla.frontend.request import ACCEPTED

        self.asked_accepted.append(accepted)
        if accepted:
            yield dict(ACCEPTED)
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        for d in self.deltas:
            yield d


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_gets_its_status_once_admitted_before_the_first_token(tokenizer, route):
    """The status line and headers come as soon as the engine queued the request: a client whose read timeout is
    below the time to first token is not left waiting for them. Non-streaming requests do not ask for it."""
    engine = GatedEngine(tokenizer, [_delta("hi", [5]), _delta(" there", [6], finished=True)])
    server = ServerThread(build_app(engine, MODEL)).start()
    body = {"model": MODEL, "stream": True, "max_tokens": 2}
    body.update({"prompt": "x"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    try:
        with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=30) as r:
            assert r.status_code == 200 and not engine.gate.is_set()  # headers while the first token is held
            assert r.headers["content-type"].startswith("text/event-stream")
            engine.gate.set()
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(ln[6:])["choices"][0].get("text") or
                       (json.loads(ln[6:])["choices"][0].get("delta") or {}).get("content") or ""
                       for ln in lines[:-1] if json.loads(ln[6:]).get("choices"))
        assert text == "hi there"  # the acknowledgement added no text
        assert engine.asked_accepted == [True]
        engine.gate.clear()
        threading.Timer(0.2, engine.gate.set).start()
        r = httpx.post(f"{server.url}{route}", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 200 and engine.asked_accepted == [True, False]
    finally:
        server.stop()
