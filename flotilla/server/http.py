"""OpenAI-compatible HTTP front end: ``/v1/completions``, ``/v1/chat/completions`` (SSE streaming),
``/v1/models``, ``/health`` and ``/metrics``.

The server is a thin translation layer. All validation of sampling parameters lives in the engine
(``SamplingParams`` raises ``ValueError("field: ...")``); this module only renames engine fields to the API's
names (``max_new_tokens`` -> ``max_tokens``) so that a 400 names what the client actually sent.

Every engine request is consumed through ``engine.stream_async``, even for non-streaming responses, so that
time-to-first-token and inter-token latency are measured the same way for both, and so that closing the
iterator (client gone) always aborts the request in its replica.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from flotilla.request import RequestFailed

log = logging.getLogger(__name__)

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]

# =============================================================================================== errors


class APIError(Exception):
    """An error the client should see, in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param,
                                                                        self.code))


class ClientDisconnected(Exception):
    """The client went away before a response was ready; the request has been aborted."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad_param(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_parameter")


def _from_value_error(err: ValueError, aliases: dict[str, str]) -> APIError:
    """Turn the engine's ``ValueError("field: ...")`` into a 400 naming the API's parameter for that field."""
    text = str(err)
    head, sep, rest = text.partition(":")
    if sep and head.isidentifier():
        param = aliases.get(head, head)
        return APIError(400, f"{param}:{rest}", param=param, code="invalid_parameter")
    return APIError(400, text, code="invalid_parameter")


def _unavailable(message: str) -> APIError:
    return APIError(503, message, code="service_unavailable")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, including FastAPI's own (422 validation, 404 route, 405 method), in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()


def _validation_error(errors: Iterable[dict[str, Any]]) -> APIError:
    """pydantic's first complaint as a 400 whose ``param`` is the dotted path inside the body."""
    first = next(iter(errors), None)
    if first is None:
        return APIError(400, "invalid request body")
    # drop "body" and pydantic's union-member tags ("str", "list[str]") so the path names only fields
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON body: {first.get('msg', '')}", code="invalid_json")
    if not loc:
        return APIError(400, f"request body: {first.get('msg', 'invalid')}", code="invalid_request_body")
    # param is the top-level field (what OpenAI reports); the message keeps the full path, e.g.
    # "messages.0.role: Input should be 'system', ..."
    msg = "unrecognized request argument" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid")
    return APIError(400, f"{'.'.join(loc)}: {msg}", param=loc[0], code="invalid_parameter")


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict", "none")
                                      or "[" in part)


# =============================================================================================== bodies


class _Strict(BaseModel):
    # Unknown fields are an error (as in OpenAI's API): a typo such as ``top_kk`` must not silently sample
    # with defaults.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields common to both endpoints. The last group is Flotilla's extras (``extra_body`` in openai)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras
    ignore_eos: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_call_id, tool_calls ... reach the chat template as is
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # accepted so that clients which always send them work; non-default values are refused (see _check_chat)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


# =============================================================================================== metrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """Prometheus metrics in a registry of this app's own, so several apps (tests) never collide in the global
    one. Engine gauges are read from ``engine.stats()`` at scrape time rather than pushed."""

    def __init__(self, get_engine: Callable[[], Any]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("flotilla_prompt_tokens", "Prompt tokens of accepted requests.", registry=r)
        self.generation_tokens = Counter("flotilla_generation_tokens", "Tokens generated and streamed.",
                                         registry=r)
        self.cached_tokens = Counter("flotilla_prefix_cache_hit_tokens",
                                     "Prompt tokens of finished requests served from the prefix cache.", registry=r)
        self.requests = Counter("flotilla_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("flotilla_time_to_first_token_seconds", "From submission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flotilla_inter_token_latency_seconds",
                             "Gap between streamed tokens (a gap carrying k tokens counts k times gap/k).",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("flotilla_e2e_request_latency_seconds", "From submission to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished_prompt_tokens = 0
        self.finished_cached_tokens = 0
        r.register(_EngineCollector(get_engine, self))

    def record_finish(self, result: dict[str, Any], elapsed: float) -> None:
        self.requests.labels(result.get("finish_reason") or "stop").inc()
        self.e2e.observe(elapsed)
        cached = int(result.get("cached_tokens") or 0)
        self.cached_tokens.inc(cached)
        self.finished_cached_tokens += cached
        self.finished_prompt_tokens += int(result.get("prompt_tokens") or 0)

    def hit_rate(self) -> float:
        return self.finished_cached_tokens / self.finished_prompt_tokens if self.finished_prompt_tokens else 0.0


class _EngineCollector:
    """Gauges refreshed from ``engine.stats()`` on every scrape (a custom collector, so nothing goes stale)."""

    _PER_REPLICA = (("running", "Requests running in the replica."),
                    ("waiting", "Requests queued in the replica."),
                    ("kv_used", "KV cache blocks (or tokens) in use in the replica."),
                    ("cached_tokens", "Tokens held by the replica's prefix cache."),
                    ("alive", "1 while the replica's workers are alive."))

    def __init__(self, get_engine: Callable[[], Any], metrics: ServerMetrics):
        self._get_engine, self._metrics = get_engine, metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        engine = self._get_engine()
        stats = _safe_stats(engine) if engine is not None else None
        families = {k: GaugeMetricFamily(f"flotilla_replica_{k}", doc, labels=["replica"])
                    for k, doc in self._PER_REPLICA}
        for rep in (stats or {}).get("replicas", []):
            for key, fam in families.items():
                fam.add_metric([str(rep.get("id"))], float(rep.get(key) or 0))
        yield from families.values()
        yield GaugeMetricFamily("flotilla_num_requests_inflight", "Requests in flight in the engine.",
                                value=float((stats or {}).get("num_requests_inflight", 0)))
        yield GaugeMetricFamily("flotilla_engine_ready", "1 once the engine is loaded.",
                                value=1.0 if engine is not None else 0.0)
        yield GaugeMetricFamily("flotilla_prefix_cache_hit_rate",
                                "Cached / prompt tokens over finished requests since start.",
                                value=self._metrics.hit_rate())


def _safe_stats(engine: Any) -> dict[str, Any] | None:
    try:
        return engine.stats()
    except Exception:  # an engine that is shutting down must not break /health or /metrics
        log.exception("engine.stats() failed")
        return None


class _Timer:
    """Latency bookkeeping for one engine request."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.done = False

    def on_delta(self, delta: dict[str, Any]) -> None:
        now = time.monotonic()
        k = len(delta.get("token_ids") or ())
        if k:
            self.metrics.generation_tokens.inc(k)
            if self.last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                for _ in range(k):
                    self.metrics.itl.observe((now - self.last) / k)
            self.last = now
        if delta.get("finished") and not self.done:
            self.done = True
            self.metrics.record_finish(delta.get("result") or {"finish_reason": delta.get("finish_reason")},
                                       now - self.t0)

    def on_end(self, reason: str) -> None:
        """The request ended without a final delta: the client left ("abort") or it failed ("error")."""
        if not self.done:
            self.done = True
            self.metrics.requests.labels(reason).inc()


# =============================================================================================== engine runs


@dataclass
class _Job:
    """One engine request: one choice of one HTTP response."""

    index: int
    request_id: str
    input_ids: list[int]
    params: dict[str, Any]


_END = object()


class _Run:
    """The engine requests behind one HTTP request: submits them together, merges their deltas in arrival
    order, and aborts whatever is still in flight when closed."""

    def __init__(self, engine: Any, metrics: ServerMetrics, jobs: list[_Job]):
        self.jobs = jobs
        self._metrics = metrics
        self._gens = [engine.stream_async(sampling_params=j.params, input_ids=j.input_ids, request_id=j.request_id)
                      for j in jobs]
        self._timers = [_Timer(metrics) for _ in jobs]
        self._firsts: list[dict[str, Any]] = []
        self._pumps: list[asyncio.Task] = []
        self._closed = False

    async def start(self) -> None:
        """Submit every request and wait for each one's first delta. The engine validates at submission, so a
        bad parameter raises here, before the HTTP status line is sent."""
        tasks = [asyncio.ensure_future(self._first(i)) for i in range(len(self._gens))]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.aclose()
            raise
        errors = [t.exception() for t in tasks if t.exception() is not None]
        if errors:
            await self.aclose()
            raise errors[0]
        self._firsts = [t.result() for t in tasks]
        for job in self.jobs:
            self._metrics.prompt_tokens.inc(len(job.input_ids))

    async def _first(self, i: int) -> dict[str, Any]:
        try:
            delta = await self._gens[i].__anext__()
        except RequestFailed:
            self._timers[i].on_end("error")
            raise
        except ValueError:
            self._timers[i].done = True  # rejected before it was queued: not a request to count
            raise
        self._timers[i].on_delta(delta)
        return delta

    async def events(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(choice index, delta) pairs; raises RequestFailed if a request fails after it started."""
        queue: asyncio.Queue = asyncio.Queue()
        self._pumps = [asyncio.ensure_future(self._pump(i, queue))
                       for i, d in enumerate(self._firsts) if not d["finished"]]
        for i, d in enumerate(self._firsts):
            yield i, d
        pending = len(self._pumps)
        while pending:
            i, item = await queue.get()
            if item is _END:
                pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    async def _pump(self, i: int, queue: asyncio.Queue) -> None:
        try:
            async for delta in self._gens[i]:
                self._timers[i].on_delta(delta)
                queue.put_nowait((i, delta))
        except Exception as e:
            self._timers[i].on_end("error")
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _END))

    async def aclose(self) -> None:
        """Abort what is still running. Idempotent; safe whether or not ``start`` succeeded."""
        if self._closed:
            return
        self._closed = True
        for t in self._pumps:
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for gen in self._gens:
            await gen.aclose()  # its ``finally`` aborts the request if it is still in flight
        for timer in self._timers:
            timer.on_end("abort")


async def _wait_disconnect(receive: ASGIReceive) -> None:
    """Return once the client has gone. Only call after the body was read: it consumes ASGI messages."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, but cancel it (which aborts its engine requests) if the client disconnects first.
    Starlette does not cancel a handler when its client leaves, so without this a long non-streaming
    request would keep a replica busy for nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, the moment the client disconnects.

    Starlette's StreamingResponse notices a disconnect only on its next write under ASGI spec 2.4 (uvicorn
    drops writes to a closed socket silently), so a stream waiting for a slow token could outlive its
    client. Here a listener runs beside the writer, and the body iterator is always ``aclose``-d, which
    runs the engine stream's ``finally`` and aborts the request.
    """

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._source = content

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: Callable) -> None:
        writer = asyncio.ensure_future(self._write(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({writer, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (writer, watch):
                t.cancel()
            await asyncio.gather(writer, watch, return_exceptions=True)
            await self._source.aclose()  # type: ignore[attr-defined]
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]

    async def _write(self, send: Callable) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._source:
            await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# =============================================================================================== translation


class _TokenText:
    """Token id -> the text it decodes to alone (what OpenAI's logprobs call a token), memoised."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id])
            self._cache[token_id] = text
        return text


def _usage(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    results = list(results)
    prompt = sum(r.get("prompt_tokens", 0) for r in results)
    completion = sum(r.get("completion_tokens", 0) for r in results)
    cached = sum(r.get("cached_tokens", 0) or 0 for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sampling(body: _SamplingFields, max_new_tokens: int) -> dict[str, Any]:
    """The engine's SamplingParams fields from the API's; unset fields keep the engine's defaults."""
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "ignore_eos", "stop_token_ids"):
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return params


def _check_common(body: _SamplingFields) -> None:
    if body.n != 1:
        raise _bad_param("n", f"only n=1 is supported, got {body.n}")
    if body.logit_bias:
        raise _bad_param("logit_bias", "is not supported")
    if body.stream_options is not None and not body.stream:
        raise _bad_param("stream_options", "is only allowed when stream is true")


def _default_max_tokens(prompt_len: int, max_model_len: int, param: str) -> int:
    room = max_model_len - prompt_len
    if room < 1:
        raise _bad_param(param, f"the prompt has {prompt_len} tokens, which leaves no room in the context "
                                f"length {max_model_len}")
    return room


@dataclass
class _ServerState:
    engine: Any
    model_name: str
    api_key: str | None
    metrics: ServerMetrics = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def ready_engine(self) -> Any:
        if self.engine is None:
            raise _unavailable("the engine is still loading")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")


# --------------------------------------------------------------------------------------------- completions


def _completion_prompts(body: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """Token ids for every prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]  # type: ignore[list-item]
    if not prompt:
        raise _bad_param("prompt", "must not be empty")
    out = []
    for p in prompt:
        ids = list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
        if not ids:
            raise _bad_param("prompt", "must not be empty (it tokenizes to no tokens)")
        out.append(ids)
    return out


def _completion_jobs(body: CompletionRequest, state: _ServerState, rid: str) -> list[_Job]:
    _check_common(body)
    if body.echo:
        raise _bad_param("echo", "is not supported")
    if body.suffix:
        raise _bad_param("suffix", "is not supported")
    if body.best_of not in (None, 1):
        raise _bad_param("best_of", f"only best_of=1 is supported, got {body.best_of}")
    engine = state.ready_engine()
    jobs = []
    for i, ids in enumerate(_completion_prompts(body, engine.tokenizer)):
        max_new = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        params = _sampling(body, max_new)
        if body.logprobs is not None:
            params["logprobs"], params["top_logprobs"] = True, body.logprobs
        jobs.append(_Job(i, f"{rid}-{i}", ids, params))
    return jobs


_COMPLETION_ALIASES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs", "input_ids": "prompt",
                       "sampling_params": "body"}


def _completion_logprobs(text_of: _TokenText, delta_ids: list[int], lps: list[float] | None,
                         tops: list[Any] | None, offset: int) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs block for some tokens; offsets are into the completion text."""
    tokens = [text_of(t) for t in delta_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    lps = list(lps or [])
    block: dict[str, Any] = {"tokens": tokens, "token_logprobs": [lps[k] if k < len(lps) else None
                                                                   for k in range(len(tokens))],
                             "text_offset": offsets, "top_logprobs": None}
    if tops is not None:
        block["top_logprobs"] = [{text_of(int(tid)): float(lp) for tid, lp in row} for row in tops]
    return block, offset


# --------------------------------------------------------------------------------------------- chat


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; content parts are joined (text only)."""
    out = []
    for i, m in enumerate(body.messages):
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise _bad_param(f"messages.{i}.content", f"content part type {part.type!r} is not supported "
                                                              "(text only)")
                texts.append(part.text)
            msg["content"] = "".join(texts)
        out.append(msg)
    return out


def _chat_prompt_ids(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    messages = _chat_messages(body)
    if not getattr(tokenizer, "chat_template", None):
        raise _bad_param("messages", "this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and friends
        raise _bad_param("messages", f"the chat template rejected them: {e}") from None
    # The template already writes any BOS it wants; adding special tokens again would double it.
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise _bad_param("messages", "the chat template produced an empty prompt")
    return ids


def _check_chat(body: ChatCompletionRequest) -> None:
    _check_common(body)
    if body.tools:
        raise _bad_param("tools", "tool calling is not supported")
    if body.tool_choice not in (None, "none", "auto"):
        raise _bad_param("tool_choice", "tool calling is not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _bad_param("response_format", "only {\"type\": \"text\"} is supported")
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad_param("top_logprobs", "requires logprobs to be true")


def _chat_job(body: ChatCompletionRequest, state: _ServerState, rid: str) -> tuple[_Job, dict[str, str]]:
    _check_chat(body)
    engine = state.ready_engine()
    ids = _chat_prompt_ids(body, engine.tokenizer)
    limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is None:  # OpenAI's chat default: as much as the context allows
        limit = _default_max_tokens(len(ids), engine.max_model_len, "messages")
    params = _sampling(body, limit)
    if body.logprobs:
        params["logprobs"], params["top_logprobs"] = True, body.top_logprobs or 0
    aliases = {"max_new_tokens": limit_name, "input_ids": "messages", "prompt": "messages",
               "sampling_params": "body"}
    return _Job(0, rid, ids, params), aliases


def _chat_logprobs(text_of: _TokenText, delta_ids: list[int], lps: list[float] | None,
                   tops: list[Any] | None) -> dict[str, Any]:
    def entry(tid: int, lp: float | None) -> dict[str, Any]:
        tok = text_of(int(tid))
        return {"token": tok, "logprob": None if lp is None else float(lp), "bytes": list(tok.encode("utf-8"))}

    lps = list(lps or [])
    content = []
    for k, tid in enumerate(delta_ids):  # one entry per token, even if the engine sent no logprob for it
        item = entry(tid, lps[k] if k < len(lps) else None)
        item["top_logprobs"] = [entry(t, v) for t, v in tops[k]] if tops is not None and k < len(tops) else []
        content.append(item)
    return {"content": content}


# --------------------------------------------------------------------------------------------- shared


def _delta_tops(delta: dict[str, Any], job: _Job, seen: int) -> list[Any] | None:
    """Top logprobs for a delta's tokens: from the delta if the engine sends them there, else (final delta
    only) from the result."""
    if not job.params.get("top_logprobs"):
        return None
    if "top_logprobs" in delta:
        return delta["top_logprobs"]
    result = delta.get("result")
    if result and "top_logprobs" in result:
        return result["top_logprobs"][seen:seen + len(delta.get("token_ids") or ())]
    return []


async def _start_or_error(request: Request, run: _Run, aliases: dict[str, str]) -> None:
    try:
        await _unless_disconnected(request, run.start())
    except ValueError as e:
        raise _from_value_error(e, aliases) from None
    except RequestFailed as e:
        raise _unavailable(str(e)) from None


async def _collect(run: _Run) -> list[dict[str, Any]]:
    """Run to completion; the final result of every choice, by index."""
    results: list[dict[str, Any]] = [{} for _ in run.jobs]
    try:
        async for i, delta in run.events():
            if delta["finished"]:
                results[i] = delta["result"]
    finally:
        await run.aclose()
    return results


async def _stream_frames(run: _Run, frame: Callable[[int, dict[str, Any], int], dict[str, Any] | None],
                         usage_chunk: Callable[[list[dict[str, Any]]], dict[str, Any]] | None,
                         head: list[dict[str, Any]]) -> AsyncIterator[str]:
    """SSE text for a run: ``head`` chunks, one chunk per delta (``frame`` may skip empty ones), the usage
    chunk if asked, then ``[DONE]``. A failure mid-stream becomes an error event: the status is already 200."""
    seen = [0] * len(run.jobs)
    results: list[dict[str, Any]] = [{} for _ in run.jobs]
    try:
        for chunk in head:
            yield _sse(chunk)
        try:
            async for i, delta in run.events():
                chunk = frame(i, delta, seen[i])
                seen[i] += len(delta.get("token_ids") or ())
                if delta["finished"]:
                    results[i] = delta["result"]
                if chunk is not None:
                    yield _sse(chunk)
        except RequestFailed as e:
            yield _sse(error_body(str(e), "server_error", code="service_unavailable"))
        except Exception as e:
            log.exception("stream failed")
            yield _sse(error_body(f"internal error: {e}", "server_error"))
        else:
            if usage_chunk is not None:
                yield _sse(usage_chunk(results))
        yield "data: [DONE]\n\n"
    finally:
        await run.aclose()


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# =============================================================================================== app


def build_app(engine: Any, model_name: str, api_key: str | None = None) -> FastAPI:
    """The HTTP app for ``engine`` (or for ``None`` while it loads: /health is 503 until ``set_engine``)."""
    app = FastAPI(title="Flotilla", summary="OpenAI-compatible LLM server", version="0.1.0")
    state = _ServerState(engine, model_name, api_key)
    state.metrics = ServerMetrics(lambda: state.engine)
    app.state.flotilla = state
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    _install_error_handlers(app)
    _add_open_routes(app, state)
    _add_model_routes(app, state)
    _add_completion_route(app, state)
    _add_chat_route(app, state)
    _add_admin_routes(app, state)
    return app


class ScaleRequest(BaseModel):
    dp_size: int
    drain_timeout_s: float = 60.0


def _add_admin_routes(app: FastAPI, state: _ServerState) -> None:
    @app.post("/admin/scale")
    async def scale(body: ScaleRequest) -> dict[str, Any]:
        """Grow or shrink the data-parallel replicas while serving (behind the API key, like /v1)."""
        engine = state.ready_engine()
        try:
            await asyncio.to_thread(engine.scale, body.dp_size, body.drain_timeout_s)
        except ValueError as e:
            raise _from_value_error(e, {}) from None
        except (RuntimeError, TimeoutError) as e:
            raise _unavailable(f"scaling failed: {e}") from None
        stats = engine.stats()
        return {"dp_size": stats.get("dp_size"), "replicas": [
            {"id": r["id"], "alive": r["alive"]} for r in stats["replicas"]]}


def set_engine(app: FastAPI, engine: Any) -> None:
    """Attach the engine once it is loaded (``serve`` starts listening first, so /health can say 503)."""
    app.state.flotilla.engine = engine


class _AuthMiddleware:
    """Bearer-key check for /v1 and /admin, as plain ASGI so it runs before the body is parsed (a bad key is a
    401 even when the body is malformed) and without wrapping streaming responses."""

    _PROTECTED = ("/v1/", "/admin/")

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path + "/").startswith(self._PROTECTED) and not self._authorized(scope):
            err = APIError(401, "Incorrect or missing API key; send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
            response = err.response()
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def _add_open_routes(app: FastAPI, state: _ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 when every replica is alive; 503 while loading or when any replica is down."""
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        stats = _safe_stats(state.engine)
        if stats is None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        replicas = [{"id": r.get("id"), "alive": bool(r.get("alive"))} for r in stats.get("replicas", [])]
        ok = bool(replicas) and all(r["alive"] for r in replicas)
        return JSONResponse({"status": "ok" if ok else "degraded", "replicas": replicas},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_model_routes(app: FastAPI, state: _ServerState) -> None:
    def card() -> dict[str, Any]:
        out = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "flotilla"}
        if state.engine is not None:
            out["max_model_len"] = state.engine.max_model_len
        return out

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        state.check_model(model)
        return card()


def _add_completion_route(app: FastAPI, state: _ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        rid = _rid("cmpl")
        jobs = _completion_jobs(body, state, rid)
        run = _Run(state.engine, state.metrics, jobs)
        await _start_or_error(request, run, _COMPLETION_ALIASES)
        text_of = _TokenText(state.engine.tokenizer)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            return SSEResponse(_completion_stream(run, body, base, text_of))
        try:
            results = await _unless_disconnected(request, _collect(run))
        except RequestFailed as e:
            raise _unavailable(str(e)) from None
        choices = []
        for job, res in zip(jobs, results):
            logprobs = None
            if body.logprobs is not None:
                logprobs, _ = _completion_logprobs(text_of, res["token_ids"], res.get("logprobs"),
                                                   res.get("top_logprobs") if body.logprobs else None, 0)
            choices.append({"index": job.index, "text": res["text"], "logprobs": logprobs,
                            "finish_reason": res["finish_reason"]})
        return JSONResponse({**base, "choices": choices, "usage": _usage(results), "system_fingerprint": None})


def _completion_stream(run: _Run, body: CompletionRequest, base: dict[str, Any],
                       text_of: _TokenText) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    offsets = [0] * len(run.jobs)

    def frame(i: int, delta: dict[str, Any], seen: int) -> dict[str, Any] | None:
        ids = delta.get("token_ids") or []
        if not ids and not delta["text"] and not delta["finished"]:
            return None
        logprobs = None
        if body.logprobs is not None:
            tops = _delta_tops(delta, run.jobs[i], seen)
            logprobs, offsets[i] = _completion_logprobs(text_of, ids, delta.get("logprobs"), tops, offsets[i])
        choice = {"index": i, "text": delta["text"], "logprobs": logprobs, "finish_reason": delta["finish_reason"]}
        return {**base, "choices": [choice], **({"usage": None} if include_usage else {})}

    def usage_chunk(results: list[dict[str, Any]]) -> dict[str, Any]:
        return {**base, "choices": [], "usage": _usage(results)}

    return _stream_frames(run, frame, usage_chunk if include_usage else None, head=[])


def _add_chat_route(app: FastAPI, state: _ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        rid = _rid("chatcmpl")
        job, aliases = _chat_job(body, state, rid)
        run = _Run(state.engine, state.metrics, [job])
        await _start_or_error(request, run, aliases)
        text_of = _TokenText(state.engine.tokenizer)
        base = {"id": rid, "created": int(time.time()), "model": state.model_name, "system_fingerprint": None}
        if body.stream:
            return SSEResponse(_chat_stream(run, body, base, text_of))
        try:
            (res,) = await _unless_disconnected(request, _collect(run))
        except RequestFailed as e:
            raise _unavailable(str(e)) from None
        logprobs = None
        if body.logprobs:
            logprobs = _chat_logprobs(text_of, res["token_ids"], res.get("logprobs"),
                                      res.get("top_logprobs") if body.top_logprobs else None)
        choice = {"index": 0, "message": {"role": "assistant", "content": res["text"]}, "logprobs": logprobs,
                  "finish_reason": res["finish_reason"]}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": _usage([res])})


def _chat_stream(run: _Run, body: ChatCompletionRequest, base: dict[str, Any],
                 text_of: _TokenText) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def frame(i: int, delta: dict[str, Any], seen: int) -> dict[str, Any] | None:
        ids = delta.get("token_ids") or []
        if not ids and not delta["text"] and not delta["finished"]:
            return None
        logprobs = None
        if body.logprobs:
            logprobs = _chat_logprobs(text_of, ids, delta.get("logprobs"), _delta_tops(delta, run.jobs[i], seen))
        choice = {"index": i, "delta": {"content": delta["text"]} if delta["text"] or ids else {},
                  "logprobs": logprobs, "finish_reason": delta["finish_reason"]}
        return {**base, "choices": [choice], **extra}

    def usage_chunk(results: list[dict[str, Any]]) -> dict[str, Any]:
        return {**base, "choices": [], "usage": _usage(results)}

    role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}], **extra}
    return _stream_frames(run, frame, usage_chunk if include_usage else None, head=[role])


# =============================================================================================== serving


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound now, so that port 0 yields a real port before the server starts."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn on a pre-bound socket in a background thread: used by ``serve`` (the main thread loads the
    engine meanwhile, so Ctrl-C and Ray's signal handling stay where they belong) and by the tests."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 access_log: bool = False):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="flotilla-http", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # reported by start()/wait(), not lost in a thread
            self.error = e

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def wait(self) -> None:
        """Block until the server stops (joins in slices so that Ctrl-C reaches the main thread)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a process manager stopping us) shuts down as gracefully as Ctrl-C does."""
    raise KeyboardInterrupt


def serve(args: Any) -> int:
    """``flotilla serve``: listen first (so /health answers 503 while the model loads), then load the engine in
    the main thread, then serve until Ctrl-C or SIGTERM; the engine is always shut down."""
    from flotilla.cli import make_engine

    api_key = args.api_key or os.environ.get("FLOTILLA_API_KEY") or None
    name = args.served_model_name or args.model
    app = build_app(None, name, api_key)
    server = ServerThread(app, args.host, args.port, log_level=getattr(args, "log_level", "info"), access_log=True)
    if not api_key and not _is_loopback(args.host):
        print(f"flotilla: warning: listening on {args.host} without an API key (pass --api-key or set "
              "FLOTILLA_API_KEY)", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    engine = None
    try:
        server.start()
        print(f"flotilla: loading {args.model}; {server.url}/health answers 503 until it is ready",
              file=sys.stderr, flush=True)
        engine = make_engine(args)
        set_engine(app, engine)
        print(f"flotilla: serving {name} on {server.url}", flush=True)
        server.wait()
        return 1 if server.error else 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        if engine is not None:
            engine.shutdown()
        signal.signal(signal.SIGTERM, previous)
