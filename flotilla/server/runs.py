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

from flotilla.request import RequestFailed
from flotilla.server.engine_client import Delta, EngineClient
from flotilla.server.errors import ClientDisconnected, Receive, from_value_error, unavailable
from flotilla.server.metrics import RequestTimer, ServerMetrics

T = TypeVar("T")


@dataclass
class Job:
    """One engine request: one choice of one HTTP response."""

    index: int
    request_id: str
    input_ids: list[int]
    params: dict[str, Any]
    affinity: str | None = None  # the choices of one prompt share one key (one replica, the prompt's KV)


class StreamEnded(RuntimeError):
    """The engine's stream stopped without a final (``finished``) delta: a broken engine, never a normal end."""


class _End:
    """Marks the end of one pump in the merged queue."""


class Run:
    """Submits its jobs together, yields their deltas in arrival order, aborts what is in flight when closed."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, jobs: list[Job]):
        self.jobs = jobs
        self._metrics = metrics
        self._gens = [engine.stream_async(sampling_params=j.params, input_ids=j.input_ids, request_id=j.request_id,
                                          **({"affinity": j.affinity} if j.affinity else {}))
                      for j in jobs]
        self._timers = [RequestTimer(metrics) for _ in jobs]
        self._firsts: list[Delta] = []
        self._pumps: list[asyncio.Task[None]] = []
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
            raise errors[0]  # type: ignore[misc]
        self._firsts = [t.result() for t in tasks]
        for job in self.jobs:
            self._metrics.prompt_tokens.inc(len(job.input_ids))

    async def _first(self, i: int) -> Delta:
        try:
            delta = await self._gens[i].__anext__()
        except ValueError:
            self._timers[i].done = True  # rejected before it was queued: not a request to count
            raise
        except StopAsyncIteration:
            self._timers[i].on_end("error")
            raise StreamEnded(f"the engine's stream for {self.jobs[i].request_id} ended before any token") from None
        except Exception:
            self._timers[i].on_end("error")
            raise
        self._timers[i].on_delta(delta)
        return delta

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) pairs; raises whatever a request failed with after it started (RequestFailed
        when its replicas died), or StreamEnded if a stream stopped without finishing."""
        if len(self._gens) == 1:
            async for item in self._single():
                yield item
            return
        queue: asyncio.Queue[tuple[int, Delta | BaseException | _End]] = asyncio.Queue()
        self._pumps = [asyncio.ensure_future(self._pump(i, queue))
                       for i, d in enumerate(self._firsts) if not d["finished"]]
        for i, d in enumerate(self._firsts):
            yield i, d
        pending = len(self._pumps)
        while pending:
            i, item = await queue.get()
            if isinstance(item, _End):
                pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    async def _single(self) -> AsyncIterator[tuple[int, Delta]]:
        """One job (every chat request, most completions): its stream is read in the consumer's own task.
        Merging needs a pump task and a queue per job, which cost a task switch per delta; one stream needs
        no merging."""
        first = self._firsts[0]
        yield 0, first
        if first["finished"]:
            return
        timer, gen = self._timers[0], self._gens[0]
        try:
            async for delta in gen:
                timer.on_delta(delta)
                yield 0, delta
                if delta["finished"]:
                    return
        except Exception:
            timer.on_end("error")
            raise
        timer.on_end("error")
        raise StreamEnded(f"the engine's stream for {self.jobs[0].request_id} ended before it finished")

    async def _pump(self, i: int, queue: asyncio.Queue[tuple[int, Delta | BaseException | _End]]) -> None:
        finished = False
        try:
            async for delta in self._gens[i]:
                self._timers[i].on_delta(delta)
                finished = finished or bool(delta.get("finished"))
                queue.put_nowait((i, delta))
            if not finished:
                raise StreamEnded(f"the engine's stream for {self.jobs[i].request_id} ended before it finished")
        except Exception as e:
            self._timers[i].on_end("error")
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _End()))

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
