"""The engine requests behind one HTTP request: submit them together, merge their deltas, abort on close.

Every engine request is consumed through ``engine.stream_async``, even for non-streaming responses, so that
time-to-first-token and inter-token latency are measured the same way for both, and so that closing the
iterator (client gone) always aborts the request in its replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from flotilla.frontend.request import RequestFailed
from flotilla.server.engine_client import Delta, EngineClient
from flotilla.server.errors import ClientDisconnected, Receive, from_value_error, unavailable
from flotilla.server.metrics import RequestTimer, ServerMetrics

T = TypeVar("T")


@dataclass
class Job:
    """One choice of one HTTP response: ``index`` in the response, the engine request id it runs under, and
    ``prompt``, which of the request's prompts it answers (the choices of one prompt run as one engine stream)."""

    index: int
    request_id: str
    input_ids: list[int]
    params: dict[str, Any]
    prompt: int = 0


class StreamEnded(RuntimeError):
    """The engine's stream stopped without a final (``finished``) delta: a broken engine, never a normal end."""


class _End:
    """Marks the end of one pump in the merged queue."""


class Run:
    """Submits its jobs together, yields their deltas in arrival order, aborts what is in flight when closed.

    The jobs of one prompt are one engine stream: ``stream_async`` with their number as ``n`` (the engine seeds
    and places the choices); its deltas carry ``"index"``, the choice, when there are several."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, jobs: list[Job], accepted: bool = False):
        """``accepted``: ``start`` returns once the engine queued every request (its ``accepted`` delta), not at
        the first token: a streaming response sends its status line then."""
        self.jobs = jobs
        self._metrics = metrics
        groups: dict[int, list[int]] = {}
        for pos, job in enumerate(jobs):
            groups.setdefault(job.prompt, []).append(pos)
        self._groups = list(groups.values())  # per engine stream: the positions in ``jobs`` of its choices
        self._gens = [engine.stream_async(sampling_params=_with_n(jobs[g[0]].params, len(g)),
                                          input_ids=jobs[g[0]].input_ids, request_id=jobs[g[0]].request_id,
                                          accepted=accepted)
                      for g in self._groups]
        self._timers = [RequestTimer(metrics) for _ in jobs]
        self._firsts: list[tuple[int, Delta]] = []
        self._left = [len(g) for g in self._groups]  # choices of each stream not finished yet
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False

    def _position(self, k: int, delta: Delta) -> int:
        """Which job a delta of stream ``k`` belongs to."""
        return self._groups[k][delta.get("index", 0)]

    def _on_delta(self, k: int, delta: Delta) -> int:
        pos = self._position(k, delta)
        self._timers[pos].on_delta(delta)
        if delta["finished"]:
            self._left[k] -= 1
        return pos

    def _end_group(self, k: int, reason: str) -> None:
        for pos in self._groups[k]:
            self._timers[pos].on_end(reason)

    async def start(self) -> None:
        """Submit every request and wait for each stream's first delta (with ``accepted``: its acceptance). The
        engine validates at submission, so a bad parameter raises here, before the HTTP status line is sent."""
        tasks = [asyncio.ensure_future(self._first(k)) for k in range(len(self._gens))]
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
            raise errors[0]  # type: ignore[misc]
        self._firsts = [t.result() for t in tasks]
        for job in self.jobs:
            self._metrics.prompt_tokens.inc(len(job.input_ids))

    async def _first(self, k: int) -> tuple[int, Delta]:
        try:
            delta = await self._gens[k].__anext__()
        except ValueError:
            for pos in self._groups[k]:
                self._timers[pos].done = True  # rejected before it was queued: not a request to count
            raise
        except StopAsyncIteration:
            self._end_group(k, "error")
            raise StreamEnded(f"the engine's stream for {self.jobs[self._groups[k][0]].request_id} ended before "
                              "any token") from None
        except Exception:
            self._end_group(k, "error")
            raise
        if delta.get("accepted"):
            return self._groups[k][0], delta  # nothing to count or show: ``events`` skips it
        return self._on_delta(k, delta), delta

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) pairs; raises whatever a request failed with after it started (RequestFailed
        when its replicas died), or StreamEnded if a stream stopped without finishing."""
        if len(self._gens) == 1:
            async for item in self._single():
                yield item
            return
        queue: asyncio.Queue[tuple[int, Delta | BaseException | _End]] = asyncio.Queue()
        self._pumps = [asyncio.ensure_future(self._pump(k, queue))
                       for k in range(len(self._gens)) if self._left[k]]
        for item in self._firsts:
            if not item[1].get("accepted"):
                yield item
        pending = len(self._pumps)
        while pending:
            i, got = await queue.get()
            if isinstance(got, _End):
                pending -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield i, got

    async def _single(self) -> AsyncIterator[tuple[int, Delta]]:
        """One stream (every chat request, most completions): read in the consumer's own task. Merging needs a
        pump task and a queue per stream, which cost a task switch per delta; one stream needs no merging."""
        if not self._firsts[0][1].get("accepted"):
            yield self._firsts[0]
        if not self._left[0]:
            return
        gen = self._gens[0]
        try:
            async for delta in gen:
                yield self._on_delta(0, delta), delta
                if not self._left[0]:
                    return
        except Exception:
            self._end_group(0, "error")
            raise
        self._end_group(0, "error")
        raise StreamEnded(f"the engine's stream for {self.jobs[self._groups[0][0]].request_id} ended before it "
                          "finished")

    async def _pump(self, k: int, queue: asyncio.Queue[tuple[int, Delta | BaseException | _End]]) -> None:
        try:
            async for delta in self._gens[k]:
                queue.put_nowait((self._on_delta(k, delta), delta))
                if not self._left[k]:
                    break
            if self._left[k]:
                raise StreamEnded(f"the engine's stream for {self.jobs[self._groups[k][0]].request_id} ended "
                                  "before it finished")
        except Exception as e:
            self._end_group(k, "error")
            queue.put_nowait((k, e))
        finally:
            queue.put_nowait((k, _End()))

    async def aclose(self) -> None:
        """Abort what is still running. Idempotent; safe whether or not ``start`` succeeded."""
        if self._closed:
            return
        self._closed = True
        for t in self._pumps:
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for gen in self._gens:
            await gen.aclose()  # type: ignore[attr-defined]  # its ``finally`` aborts the request
        for timer in self._timers:
            timer.on_end("abort")


def _with_n(params: dict[str, Any], n: int) -> dict[str, Any]:
    return {**params, "n": n} if n > 1 else params


async def collect(run: Run) -> list[dict[str, Any]]:
    """Run to completion; the final result of every choice, by index."""
    results: list[dict[str, Any]] = [{} for _ in run.jobs]
    try:
        async for i, delta in run.events():
            if delta["finished"]:
                results[i] = delta["result"]
    finally:
        await run.aclose()
    return results


async def wait_disconnect(receive: Receive) -> None:
    """Return once the client has gone. Only call after the body was read: it consumes ASGI messages."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, but cancel it (which aborts its engine requests) if the client disconnects first.
    Starlette does not cancel a handler when its client leaves, so without this a long non-streaming
    request would keep a replica busy for nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
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


async def start_or_error(request: Request, run: Run, aliases: dict[str, str]) -> None:
    """Start ``run``; the engine's ValueError becomes a 400 naming the API's field, RequestFailed a 503.
    Anything else propagates to the catch-all (a 500 in OpenAI's shape)."""
    try:
        await unless_disconnected(request, run.start())
    except ValueError as e:
        raise from_value_error(e, aliases) from None
    except RequestFailed as e:
        raise unavailable(str(e)) from None


async def collect_or_error(request: Request, run: Run) -> list[dict[str, Any]]:
    try:
        return await unless_disconnected(request, collect(run))
    except RequestFailed as e:
        raise unavailable(str(e)) from None
