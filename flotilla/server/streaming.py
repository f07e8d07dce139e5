"""Server-sent events: the response class, the frames, and the runner that never cuts a stream.

Once a stream has started the status line (200) is gone, so a failure can only be reported inside it. Every
stream therefore ends in one of two ways: the choices' finish chunks (and the usage chunk when asked) then
``data: [DONE]``; or ``data: {"error": {...}}`` saying why, then ``data: [DONE]``. A client never sees a stream
that simply stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi.responses import StreamingResponse

from flotilla.frontend.request import RequestFailed
from flotilla.server.engine_client import Delta
from flotilla.server.errors import RAW_SEND, Receive, Scope, Send, error_body, internal_error
from flotilla.server.runs import Run, wait_disconnect
from flotilla.server.usage import usage, usage_so_far

log = logging.getLogger(__name__)

Frame = Callable[[int, Delta, int], "dict[str, Any] | None"]
"""(choice index, delta, tokens of that choice already sent) -> one chunk, or None to send nothing."""
FastFrame = Callable[[int, Delta], "bytes | None"]
"""(choice index, delta) -> the chunk's SSE bytes from a ``ChunkTemplate``, or None to use ``Frame``."""


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their source, the moment the client disconnects.

    Starlette's StreamingResponse notices a disconnect only on its next write under ASGI spec 2.4 (uvicorn
    drops writes to a closed socket silently), so a stream waiting for a slow token could outlive its
    client. Here a listener runs beside the writer, and the body iterator is always ``aclose``-d, which
    runs the engine stream's ``finally`` and aborts the request. The source yields bytes, written as they
    come (no per-chunk ``str.encode``).
    """

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        writer = asyncio.ensure_future(self._write(send, scope.get(RAW_SEND) or send))
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({writer, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (writer, watch):
                t.cancel()
            await asyncio.gather(writer, watch, return_exceptions=True)
            await self._source.aclose()  # type: ignore[attr-defined]
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]

    async def _write(self, send: Send, body_send: Send) -> None:
        """The start through every layer; the body chunks through ``body_send`` (the send ``CatchAllMiddleware``
        was given, when it left it in the scope: the layers inside it only pass body messages on)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._source:
            await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
        await body_send({"type": "http.response.body", "body": b"", "more_body": False})


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode("utf-8")


DONE = b"data: [DONE]\n\n"

_TEXT, _FINISH = "\x00flotilla-text\x00", "\x00flotilla-finish\x00"
_encode = msgspec.json.Encoder().encode


class ChunkTemplate:
    """The SSE bytes of a chunk whose only varying fields are one string and ``finish_reason``, pre-encoded.

    A streamed token's chunk is a dozen constant fields around a few characters of text; building its dict and
    running ``json.dumps`` over it was the largest share of the server's work per chunk. The chunk is encoded
    once with placeholders and split around them; each chunk then costs two small encodes and a join. The
    output is byte-identical to ``sse(chunk)`` (msgspec escapes strings exactly as ``json.dumps(...,
    ensure_ascii=False)`` does; tests/test_server_encoding.py checks every BMP character).

    ``shape(text, finish)`` must return the chunk's dict with the two values in place, in the key order the
    slow path uses.
    """

    def __init__(self, shape: Callable[[Any, Any], dict[str, Any]]):
        raw = sse(shape(_TEXT, _FINISH))
        text_at, finish_at = _encode(_TEXT), _encode(_FINISH)
        head, rest = raw.split(text_at)
        mid, tail = rest.split(finish_at)
        self._head, self._mid, self._tail = head, mid, tail

    def render(self, text: str, finish_reason: str | None) -> bytes:
        return b"".join((self._head, _encode(text), self._mid, _encode(finish_reason), self._tail))


@dataclass(frozen=True)
class UsageMode:
    """``stream_options``: a final usage chunk (``include_usage``, OpenAI), usage so far on every chunk
    (``continuous_usage_stats``, vLLM's; it works with or without ``include_usage``)."""

    final: bool = False
    continuous: bool = False

    @classmethod
    def of(cls, options: Any) -> "UsageMode":
        if options is None:
            return cls()
        return cls(final=bool(options.include_usage), continuous=bool(options.continuous_usage_stats))


def _error_event(exc: Exception) -> bytes:
    if isinstance(exc, RequestFailed):
        return sse(error_body(str(exc), "server_error", code="service_unavailable"))
    log.error("stream failed", exc_info=exc)
    return sse(internal_error(exc).body())


async def stream_frames(run: Run, frame: Frame, base: dict[str, Any], mode: UsageMode,
                        head: list[dict[str, Any]], offload: bool = False,
                        fast: FastFrame | None = None) -> AsyncIterator[bytes]:
    """SSE bytes for a run: ``head`` chunks, one chunk per delta (``frame`` may skip empty ones), the usage
    chunk if asked, then ``[DONE]``; or an error event then ``[DONE]``.

    ``offload`` runs ``frame`` in a worker thread: with logprobs it detokenizes candidates, which must not
    hold up the event loop (and every other client's stream with it). ``fast``, tried first for every delta
    when given, renders the common chunk from a template (see ``ChunkTemplate``); it is only passed when
    the chunk carries no per-chunk usage.
    """
    seen = [0] * len(run.jobs)
    results: list[dict[str, Any]] = [{} for _ in run.jobs]

    def with_usage(chunk: dict[str, Any], i: int) -> dict[str, Any]:
        if mode.continuous:
            return {**chunk, "usage": usage_so_far(len(run.jobs[i].input_ids), seen[i])}
        return {**chunk, "usage": None} if mode.final else chunk

    try:
        try:
            for chunk in head:
                yield sse(with_usage(chunk, 0))
            async for i, delta in run.events():
                if fast is not None:
                    raw = fast(i, delta)
                    if raw is not None:
                        seen[i] += len(delta["token_ids"])
                        if delta["finished"]:
                            results[i] = delta["result"]
                        yield raw
                        continue
                if offload:
                    chunk = await asyncio.to_thread(frame, i, delta, seen[i])
                else:
                    chunk = frame(i, delta, seen[i])
                seen[i] += len(delta.get("token_ids") or ())
                if delta["finished"]:
                    results[i] = delta["result"]
                if chunk is not None:
                    yield sse(with_usage(chunk, i))
            if mode.final:
                prompts = len({j.prompt for j in run.jobs})
                yield sse({**base, "choices": [], "usage": usage(results, len(run.jobs) // max(1, prompts))})
        except Exception as e:  # the status is already 200: say why in the stream
            yield _error_event(e)
        yield DONE
    finally:
        await run.aclose()
