"""The engine process's side of ``--api-server-count N``: streams and calls of every HTTP process, served from one
event loop over the engine.

Why an event loop of its own: ``Engine.stream_async`` is already how one HTTP process follows its requests (one
wake-up per step per loop); here the loop stands in for N HTTP processes' loops. Each stream's deltas go into an
outbox per HTTP process, flushed as one ``ApiEvents`` frame once the loop has run every task a step woke, so the
frames per step are one per process, not one per stream. A stream the HTTP process aborts (its client left) is
cancelled here, which closes ``stream_async`` and aborts the request in its replica; an HTTP process that dies
has all of its streams aborted the same way (``drop``).

Calls (``ApiCall``) run by name from ``engine_link.CALLS``: cheap reads on the loop, anything that blocks in a
thread. Nothing here knows HTTP; the HTTP processes know nothing of the engine's internals.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from flotilla.ipc.channel import Channel, ChannelHub, EncodeError, SendTimeout
from flotilla.server.engine_link import CALLS, ApiAbort, ApiCall, ApiError, ApiEvent, ApiEvents, ApiHello, \
    ApiReady, ApiReply, ApiSubmit, error_of, to_engine_decoder

log = logging.getLogger(__name__)


class EngineService:
    """One PULL for every HTTP process's messages (``in_addr``) and one PUSH per HTTP process (``out_addrs[k]``),
    bound on ``hub`` (ipc sockets in the engine's private folder). ``set_engine`` once the engine is loaded; until
    then streams and calls fail as "loading" (the HTTP processes answer 503 meanwhile)."""

    def __init__(self, hub: ChannelHub, count: int):
        self._in, self.in_addr = hub.bind("pull", "api-in", to_engine_decoder,
                                          on_bad_frame=lambda data, e: log.error("dropped a bad frame: %s", e))
        self._out: list[Channel] = []
        self.out_addrs: list[str] = []
        for k in range(count):
            ch, addr = hub.bind("push", f"api-out-{k}", send_timeout_ms=0)
            self._out.append(ch)
            self.out_addrs.append(addr)
        self.engine: Any = None
        self._incarnation = [0] * count
        self._streams: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._outbox: list[list[ApiEvent]] = [[] for _ in range(count)]
        self._flush_due = [False] * count
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="flotilla-api-loop", daemon=True)
        self._reader = threading.Thread(target=self._read, name="flotilla-api-in", daemon=True)
        self._loop_thread.start()
        self._reader.start()

    # ------------------------------------------------------------------------------------------ control
    def set_engine(self, engine: Any) -> None:
        """The engine is loaded: tell every HTTP process that said hello (later ones are told on their hello)."""
        self._loop.call_soon_threadsafe(self._ready, engine)

    def drop(self, proc: int) -> None:
        """HTTP process ``proc`` died: abort every stream it had (its clients' connections are gone)."""
        self._loop.call_soon_threadsafe(self._drop, proc)

    @property
    def loop_thread_id(self) -> int | None:
        """The loop thread's native id (per-thread CPU accounting in bench-serve)."""
        return self._loop_thread.native_id

    def connected(self) -> int:
        """HTTP processes that said hello (their latest incarnation)."""
        return sum(1 for inc in self._incarnation if inc)

    def streams(self) -> int:
        """Streams open now (for tests and stats)."""
        return len(self._streams)

    def close(self, timeout: float = 5.0) -> None:
        """Abort every stream and stop the threads; close the hub afterwards (it owns the sockets)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._reader.join(timeout)
        fut = asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop)
        try:
            fut.result(timeout)
        except Exception:
            log.warning("streams did not end within %ss", timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout)
        if not self._loop_thread.is_alive():
            self._loop.close()

    # ------------------------------------------------------------------------------------------ the loop's side
    def _read(self) -> None:
        while not self._stop.is_set():
            msgs = self._in.recv_many(200, max_items=4096)
            if msgs:
                self._loop.call_soon_threadsafe(self._handle_all, msgs)

    def _handle_all(self, msgs: list[Any]) -> None:
        for msg in msgs:
            try:
                self._handle(msg)
            except Exception:  # one bad message must not end the loop that serves every stream
                log.exception("could not handle %s", type(msg).__name__)

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, ApiHello):
            if not 0 <= msg.proc < len(self._out):
                log.error("hello from an unknown HTTP process slot %d", msg.proc)
                return
            if msg.incarnation > self._incarnation[msg.proc]:
                self._drop(msg.proc)
                self._incarnation[msg.proc] = msg.incarnation
            if self.engine is not None:
                self._send(msg.proc, self._ready_msg())
            return
        if not 0 <= msg.proc < len(self._out) or msg.incarnation != self._incarnation[msg.proc]:
            return  # a late message of a dead incarnation
        if isinstance(msg, ApiSubmit):
            if self.engine is None:
                self._emit(msg.proc, ApiEvent(msg.sid, None, ApiError("failed", "the engine is still loading")))
                return
            key = (msg.proc, msg.sid)
            self._streams[key] = self._loop.create_task(self._run(msg, key))
        elif isinstance(msg, ApiAbort):
            task = self._streams.pop((msg.proc, msg.sid), None)
            if task is not None:
                task.cancel()
        elif isinstance(msg, ApiCall):
            self._loop.create_task(self._call(msg))

    async def _run(self, msg: ApiSubmit, key: tuple[int, int]) -> None:
        proc, sid = key
        gen = self.engine.stream_async(msg.prompt, msg.sampling_params, input_ids=msg.input_ids,
                                       request_id=msg.request_id, accepted=msg.accepted)
        try:
            async for delta in gen:
                self._emit(proc, ApiEvent(sid, delta))
            self._emit(proc, ApiEvent(sid, None))  # the end of the stream
        except asyncio.CancelledError:
            pass  # aborted by its HTTP process, or that process died: closing the stream aborts the request
        except Exception as e:
            self._emit(proc, ApiEvent(sid, None, error_of(e)))
        finally:
            await gen.aclose()
            if self._streams.get(key) is asyncio.current_task():
                del self._streams[key]

    async def _call(self, msg: ApiCall) -> None:
        try:
            if msg.method not in CALLS:
                raise RuntimeError(f"{msg.method!r} cannot be called from an HTTP process")
            if self.engine is None:
                from flotilla.frontend.request import RequestFailed

                raise RequestFailed("the engine is still loading")
            fn = getattr(self.engine, msg.method, None)
            if fn is None:
                raise RuntimeError(f"this engine has no {msg.method}")
            if CALLS[msg.method]:
                value = fn(*msg.args, **msg.kwargs)
            else:
                value = await asyncio.to_thread(fn, *msg.args, **msg.kwargs)
            reply = ApiReply(msg.cid, value.to_dict() if hasattr(value, "to_dict") else value)
        except Exception as e:
            reply = ApiReply(msg.cid, None, error_of(e))
        if msg.incarnation == self._incarnation[msg.proc]:
            try:
                self._send(msg.proc, reply)
            except EncodeError as e:
                self._send(msg.proc, ApiReply(msg.cid, None, error_of(e)))

    def _emit(self, proc: int, event: ApiEvent) -> None:
        self._outbox[proc].append(event)
        if not self._flush_due[proc]:
            self._flush_due[proc] = True
            self._loop.call_soon(self._flush, proc)

    def _flush(self, proc: int) -> None:
        self._flush_due[proc] = False
        events, self._outbox[proc] = self._outbox[proc], []
        if not events:
            return
        try:
            self._send(proc, ApiEvents(events))
        except EncodeError:  # one delta msgpack cannot carry: end that stream with the error, send the rest
            for ev in events:
                try:
                    self._send(proc, ApiEvents([ev]))
                except EncodeError as e:
                    self._send(proc, ApiEvents([ApiEvent(ev.sid, None, error_of(e))]))
                    task = self._streams.pop((proc, ev.sid), None)
                    if task is not None:
                        task.cancel()

    def _send(self, proc: int, msg: Any) -> None:
        try:
            self._out[proc].send(msg, timeout_ms=0)
        except SendTimeout:
            pass  # no peer: that HTTP process is dead or restarting, and its streams are being dropped

    def _ready_msg(self) -> ApiReady:
        tok = getattr(self.engine, "tokenizer", None)
        return ApiReady(int(self.engine.max_model_len), getattr(tok, "chat_template", None))

    def _ready(self, engine: Any) -> None:
        self.engine = engine
        for proc, inc in enumerate(self._incarnation):
            if inc:
                self._send(proc, self._ready_msg())

    def _drop(self, proc: int) -> None:
        for key in [k for k in self._streams if k[0] == proc]:
            self._streams.pop(key).cancel()
        self._outbox[proc].clear()

    async def _cancel_all(self) -> None:
        tasks = list(self._streams.values())
        self._streams.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)
