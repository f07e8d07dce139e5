"""The OpenAI-compatible HTTP server, driven through the official ``openai`` client.

One engine (dp_size=2, CPU, the tiny llama) and one uvicorn server on 127.0.0.1:0 serve the whole module; error
paths that need a dead or missing engine use a small stand-in instead of real processes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import openai
import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from flotilla.frontend.request import RequestFailed
from conftest import start_cli_serve
from flotilla.server import ServerThread, build_app, set_engine

MODEL = "tiny-llama"
KEY = "sk-test-0123456789"
PROMPT = "The capital of France is"


# ============================================================================================ fixtures


@pytest.fixture(scope="module")
def engine(llama_dp2_engine):
    yield llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared by the session (tests/conftest.py)


@pytest.fixture(scope="module")
def server(engine) -> ServerThread:
    srv = ServerThread(build_app(engine, MODEL, KEY)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def chat_ids(engine, messages: list[dict[str, str]]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


# ============================================================================================ happy paths


def test_models_and_health(client: openai.OpenAI, server: ServerThread) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(f"{server.url}/health")  # open: no key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert len(r.json()["replicas"]) == 2


def test_chat(client: openai.OpenAI, engine) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    ref = engine.generate(input_ids=[chat_ids(engine, messages)],
                          sampling_params={"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True})[0]
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:  # greedy: the chosen token is the most likely one
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_completion_tokens=7, stream=True, logprobs=True, top_logprobs=2,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.0,
                                                        "repetition_penalty": 1.1})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum(len(c.choices[0].logprobs.content) for c in content) == 7
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_equals_engine_greedy(client: openai.OpenAI, engine) -> None:
    """Token for token: the server's greedy tokens (as logprob token strings) and logprobs are the engine's."""
    sp = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": True}
    ref = engine.generate(PROMPT, sp)[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.text == ref["text"]
    assert len(choice.logprobs.tokens) == len(ref["token_ids"])
    for name, t in zip(choice.logprobs.tokens, ref["token_ids"]):  # pieces of a character: OpenAI's bytes: form
        text = engine.tokenizer.decode([t])
        assert name == text if "\ufffd" not in text else name.startswith("bytes:\\x")
    assert choice.logprobs.token_logprobs == pytest.approx(ref["logprobs"], abs=1e-3)
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == ref["prompt_tokens"]

    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_token_prompt_stop_and_batch(client: openai.OpenAI, engine) -> None:
    greedy = dict(model=MODEL, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    ids = list(engine.tokenizer(PROMPT)["input_ids"])
    by_ids = client.completions.create(prompt=ids, max_tokens=5, **greedy)
    by_text = client.completions.create(prompt=PROMPT, max_tokens=5, **greedy)
    assert by_ids.choices[0].logprobs.tokens == by_text.choices[0].logprobs.tokens
    batch = client.completions.create(prompt=[PROMPT, "Hello"], max_tokens=4, **greedy)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].logprobs.tokens == by_text.choices[0].logprobs.tokens[:4]
    assert batch.usage.completion_tokens == 8

    full = by_text.choices[0].text
    stop = full[1:3] or "e"
    expected = engine.generate(PROMPT, {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True,
                                        "stop": [stop]})[0]
    cut = client.completions.create(prompt=PROMPT, max_tokens=5, stop=stop, **greedy)
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected["text"], expected["finish_reason"])


# ============================================================================================ errors


def test_wrong_or_missing_key(server: ServerThread) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json")  # 401 before the body is parsed
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 200


@pytest.mark.parametrize("kwargs, param", [
    ({"top_p": 0}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"logprobs": 99}, "logprobs"),
    ({"extra_body": {"top_k": "many"}}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"extra_body": {"guided_regex": "a(b"}}, "structured_output.regex"),
    ({"extra_body": {"suffix": "x"}}, "suffix"),
    ({"stop": 5}, "stop"),
])
def test_bad_parameter_is_400_naming_it(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400
    assert err.value.param == param and param in err.value.message


def test_bad_chat_parameters(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    for kwargs, param in [({"n": 200}, "n"), ({"top_p": 0}, "top_p"), ({"max_completion_tokens": 0},
                                                                     "max_completion_tokens"),
                          ({"top_logprobs": 3}, "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=msgs, **kwargs)
        assert err.value.param == param, kwargs
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert err.value.param == "messages"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])


def test_validation_errors_are_400_not_422(server: ServerThread, auth: dict[str, str]) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL}, headers=auth)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"


# ============================================================================================ load, metrics, aborts


def test_64_concurrent_streams(server: ServerThread) -> None:
    before = metrics(server.url)

    async def one(ac: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        common: dict[str, Any] = dict(model=MODEL, max_tokens=8, stream=True, stream_options={"include_usage": True},
                                      temperature=0.8, seed=i, extra_body={"ignore_eos": True})
        tokens, usage, finish = 0, None, None
        if i % 2:
            stream = await ac.chat.completions.create(messages=[{"role": "user", "content": f"Story {i}"}],
                                                      logprobs=True, **common)
            async for c in stream:
                if c.choices and c.choices[0].logprobs:
                    tokens += len(c.choices[0].logprobs.content)
                if c.choices and c.choices[0].finish_reason:
                    finish = c.choices[0].finish_reason
                usage = c.usage or usage
        else:
            stream = await ac.completions.create(prompt=f"Request number {i} says", logprobs=0, **common)
            async for c in stream:
                if c.choices:
                    tokens += len(c.choices[0].logprobs.tokens)
                    finish = c.choices[0].finish_reason or finish
                usage = c.usage or usage
        return tokens, usage.completion_tokens, finish

    async def main() -> list[tuple[int, int, str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as ac:
            return await asyncio.gather(*(one(ac, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [(8, 8, "length")] * 64
    after = metrics(server.url)
    gen = ("flotilla_generation_tokens_total", ())
    assert after[gen] - before.get(gen, 0) == 64 * 8
    assert after[("flotilla_prompt_tokens_total", ())] > before.get(("flotilla_prompt_tokens_total", ()), 0)
    assert after[("flotilla_requests_total", (("finish_reason", "length"),))] >= 64


def test_metrics(server: ServerThread, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("flotilla_prompt_tokens", "flotilla_generation_tokens", "flotilla_time_to_first_token_seconds",
                 "flotilla_inter_token_latency_seconds", "flotilla_replica_running", "flotilla_replica_waiting",
                 "flotilla_prefix_cache_hit_rate", "flotilla_prefix_cache_hit_tokens"):
        assert name in names, name
    m = metrics(server.url)
    assert {labels for (name, labels) in m if name == "flotilla_replica_running"} == \
        {(("replica", "0"),), (("replica", "1"),)}
    assert m[("flotilla_time_to_first_token_seconds_count", ())] >= 1
    assert m[("flotilla_inter_token_latency_seconds_count", ())] >= 1
    assert 0.0 <= m[("flotilla_prefix_cache_hit_rate", ())] <= 1.0


def test_stream_disconnect_aborts(server: ServerThread, engine, auth: dict[str, str]) -> None:
    aborts = ("flotilla_requests_total", (("finish_reason", "abort"),))
    before = metrics(server.url).get(aborts, 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": engine.max_model_len - 16, "stream": True,
            "ignore_eos": True}
    steps_before = sum(r.get("num_steps", 0) for r in engine.stats()["replicas"])
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth, timeout=30) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n == 2:
                break
        assert engine.stats()["num_requests_inflight"] == 1
    assert wait_until(lambda: engine.stats()["num_requests_inflight"] == 0, timeout=5)
    assert wait_until(lambda: metrics(server.url).get(aborts, 0) == before + 1, timeout=2)
    # it stopped early, not by running to max_tokens: far fewer decode steps than tokens asked for
    steps = sum(r.get("num_steps", 0) for r in engine.stats()["replicas"])
    if "num_steps" in engine.stats()["replicas"][0]:
        assert steps - steps_before < body["max_tokens"] // 2


def test_non_stream_disconnect_aborts(server: ServerThread, engine, auth: dict[str, str]) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": engine.max_model_len - 16, "ignore_eos": True}
    steps_before = sum(r.get("num_steps", 0) for r in engine.stats()["replicas"])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=0.2)
    assert wait_until(lambda: engine.stats()["num_requests_inflight"] == 0, timeout=5)
    if "num_steps" in engine.stats()["replicas"][0]:
        steps = sum(r.get("num_steps", 0) for r in engine.stats()["replicas"])
        assert steps - steps_before < body["max_tokens"] // 2


# ============================================================================================ no engine / dead replica


class _DeadEngine:
    """Stands in for an engine whose every replica died: stats say so and requests fail."""

    max_model_len = 64

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def stats(self) -> dict[str, Any]:
        return {"replicas": [{"id": 0, "alive": False, "running": 0, "waiting": 0}], "num_requests_inflight": 0}

    async def stream_async(self, prompt=None, sampling_params=None, *, input_ids=None, request_id=None, accepted=False):
        raise RequestFailed("no replica can take the request: replica 0 died")
        yield  # pragma: no cover  (makes this an async generator, like the engine's)


def test_not_ready_and_dead_replica_are_503(llama_path: str) -> None:
    from transformers import AutoTokenizer

    app = build_app(None, MODEL, None)
    with TestClient(app) as tc:
        assert tc.get("/health").status_code == 503
        r = tc.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert tc.get("/metrics").status_code == 200
        set_engine(app, _DeadEngine(AutoTokenizer.from_pretrained(llama_path)))
        assert tc.get("/health").status_code == 503
        r = tc.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 2})
        assert r.status_code == 503 and "died" in r.json()["error"]["message"]


# ============================================================================================ CLI


def test_cli_serve(llama_path: str) -> None:
    """``flotilla serve --port 0`` prints its URL once ready, serves, and exits cleanly on SIGTERM."""
    proc, url = start_cli_serve(llama_path)
    try:
        assert url, "no 'serving' line"
        assert httpx.get(f"{url}/health").status_code == 200
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
        r = c.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the engine's rank workers should be child processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers left running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_admin_scale_behind_the_key(server: ServerThread, engine, auth: dict[str, str]) -> None:
    url = f"{server.url}/admin/scale"
    assert httpx.post(url, json={"dp_size": 3}, timeout=10).status_code == 401
    bad = httpx.post(url, json={"dp_size": 0}, headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dp_size"
    up = httpx.post(url, json={"dp_size": 3}, headers=auth, timeout=120)
    assert up.status_code == 200 and len(up.json()["replicas"]) == 3
    down = httpx.post(url, json={"dp_size": 2}, headers=auth, timeout=120)
    assert down.status_code == 200 and len(down.json()["replicas"]) == 2
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# ============================================================================================ OpenAI-API details


def test_unknown_fields_are_ignored_and_logged_once(client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    extra = {"prompt_cache_key": "k1", "safety_identifier": "user-1", "verbosity": "low", "x_test_field_once": 1}
    with caplog.at_level("WARNING", logger="flotilla.server.state"):
        for _ in range(2):
            r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, reasoning_effort="low",
                                               extra_body={**extra, "ignore_eos": True})
            assert r.usage.completion_tokens == 2
        c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"x_test_field_once": 1})
        assert c.choices[0].text is not None
    logged = [rec.getMessage() for rec in caplog.records if "x_test_field_once" in rec.getMessage()]
    assert len(logged) == 1 and "ignoring" in logged[0]


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                   "function": {"name": "g"}}},
     "tool_choice"),
])
def test_bad_or_unsupported_chat_fields_are_refused(client: openai.OpenAI, kwargs: dict[str, Any],
                                                        param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       **kwargs)
    assert err.value.param == param and param in err.value.message


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    for only_continuous in (False, True):
        opts = {"continuous_usage_stats": True} if only_continuous else {"include_usage": True,
                                                                         "continuous_usage_stats": True}
        chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=6, stream=True, stream_options=opts,
                                                     extra_body={"ignore_eos": True}))
        assert all(c.usage is not None for c in chunks)
        done = [c.usage.completion_tokens for c in chunks]
        assert done == sorted(done) and done[0] == 0  # the role chunk: nothing generated yet
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
        if only_continuous:  # no final usage-only chunk without include_usage
            assert chunks[-1].choices and done[-1] == 6
        else:
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True,
                                            stream_options={"continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    assert [c.usage.completion_tokens for c in chunks][-1] == 5


def test_chat_logprob_bytes_and_exactly_k(client: openai.OpenAI, engine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=16,
                                       temperature=0, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    specials = set(engine.tokenizer.all_special_tokens)
    # the tokens' own bytes concatenate to the text (a token inside a multi-byte character is not U+FFFD's bytes)
    raw = b"".join(bytes(item.bytes) for item in content if item.token not in specials)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 5  # a list: tokens sharing a text are all kept
        for top in item.top_logprobs:
            assert top.bytes is not None


def test_completion_top_logprobs_have_k_distinct_entries(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5,
                                  extra_body={"ignore_eos": True})
    tops = r.choices[0].logprobs.top_logprobs
    assert len(tops) == 12
    assert all(len(row) == 5 for row in tops)
    for row, lp in zip(tops, r.choices[0].logprobs.token_logprobs):  # greedy: the best candidate is the token
        assert max(row.values()) == pytest.approx(lp, abs=1e-4)


def test_tokenize_and_detokenize(server: ServerThread, engine, auth: dict[str, str]) -> None:
    url = server.url
    assert httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}).status_code == 401
    assert httpx.post(f"{url}/detokenize", json={"tokens": [5]}).status_code == 401
    r = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": PROMPT}, headers=auth)
    ids = list(engine.tokenizer(PROMPT)["input_ids"])
    assert r.status_code == 200
    assert r.json() == {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": None}
    r = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False,
                                            "return_token_strs": True}, headers=auth)
    plain = list(engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert r.json()["tokens"] == plain and len(r.json()["token_strs"]) == len(plain)
    messages = [{"role": "user", "content": "Hello there"}]
    r = httpx.post(f"{url}/tokenize", json={"messages": messages}, headers=auth)
    assert r.json()["tokens"] == chat_ids(engine, messages)  # exactly what /v1/chat/completions would run
    r = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": ids}, headers=auth)
    assert r.status_code == 200 and r.json() == {"prompt": engine.tokenizer.decode(ids)}
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [1, 10**7]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{url}/tokenize", json={"prompt": "x", "messages": messages}, headers=auth)
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    wrong = httpx.post(f"{url}/tokenize", json={"model": "gpt-17", "prompt": "x"}, headers=auth)
    assert wrong.status_code == 404
    # lm-eval's remote tokenizer: special tokens and the chat template from GET /tokenizer_info
    assert httpx.get(f"{url}/tokenizer_info").status_code == 401
    info = httpx.get(f"{url}/tokenizer_info", headers=auth).json()
    tok = engine.tokenizer
    assert (info["eos_token"], info["bos_token"]) == (str(tok.eos_token), str(tok.bos_token))
    assert info["model_max_length"] == engine.max_model_len and info["vocab_size"] == len(tok)
    assert info["chat_template"] == tok.chat_template


def test_models_report_max_model_len(client: openai.OpenAI, engine) -> None:
    (card,) = client.models.list().data
    assert card.model_extra["max_model_len"] == engine.max_model_len
