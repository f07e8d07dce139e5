"""An HTTP process's engine: ``EngineClient`` (and the RL routes' client) over the engine process's sockets.

Streams: ``stream_async`` sends an ``ApiSubmit`` and yields what the engine process sends back for it; closing
the iterator early sends an ``ApiAbort``. A reader thread takes each ``ApiEvents`` frame, appends every event to
its stream's queue and wakes the waiting streams with one hand-off to the event loop per frame (a step of 256
streams is one wake-up, not 256).

Calls: every other engine method is an ``ApiCall`` by name that blocks its caller until the ``ApiReply`` (the
server already calls the slow ones in worker threads; ``stats`` and ``list_lora_adapters`` are answered on the
engine process's loop, in well under a millisecond).

When the engine process is gone (``engine_lost``: its pid is no longer our parent, or a call timed out because
nothing answers) every open stream ends with ``RequestFailed`` (the client sees the stream's error event), and
every new request and ``/health`` answer 503 until the process exits (``http_process.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from flotilla.frontend.request import RequestFailed
from flotilla.ipc.channel import Channel, SendTimeout, connect
from flotilla.server.engine_client import Delta, Tokenizer
from flotilla.server.engine_link import ApiAbort, ApiCall, ApiEvent, ApiEvents, ApiHello, ApiReady, ApiReply, \
    ApiSubmit, exception_of, from_engine_decoder, pack_tensors

#: How long a call waits for its reply when the caller gives no timeout: long enough for a scale or a weight
#: update (they carry their own timeouts inside the engine), short enough that a wedged engine is noticed.
CALL_TIMEOUT_S = 3600.0
QUICK_CALL_TIMEOUT_S = 10.0


class _Stream:
    __slots__ = ("events", "wake")

    def __init__(self) -> None:
        self.events: deque[ApiEvent] = deque()
        self.wake = asyncio.Event()


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: ApiReply | None = None


class RemoteEngine:
    """The engine of this HTTP process (slot ``proc``, ``incarnation`` of it), reached at ``in_addr`` (its
    requests) and ``out_addr`` (its answers). ``on_ready(self)`` runs on ``loop`` once the engine is loaded."""

    def __init__(self, tokenizer: Tokenizer, proc: int, incarnation: int, in_addr: str, out_addr: str,
                 loop: asyncio.AbstractEventLoop, on_ready: Any = None):
        self.tokenizer = tokenizer
        self.max_model_len = 0
        self.proc, self.incarnation = proc, incarnation
        self._loop = loop
        self._on_ready = on_ready
        self._push: Channel = connect("push", in_addr)
        self._pull: Channel = connect("pull", out_addr, from_engine_decoder)
        self._send_lock = threading.Lock()  # the loop and worker threads (calls) share the PUSH
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.lost: str | None = None  # why the engine is unreachable, once it is
        self._stop = threading.Event()
        self._send(ApiHello(proc, incarnation))
        self._reader = threading.Thread(target=self._read, name="flotilla-engine-link", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------------------------ streams
    async def stream_async(self, prompt: str | None = None, sampling_params: Mapping[str, Any] | None = None, *,
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           accepted: bool = False) -> AsyncIterator[Delta]:
        if self.lost:
            raise RequestFailed(self.lost)
        sid = next(self._ids)
        stream = self._streams[sid] = _Stream()
        finished = False
        try:
            self._send(ApiSubmit(self.proc, self.incarnation, sid, prompt, input_ids,
                                 dict(sampling_params) if sampling_params is not None else None, request_id,
                                 accepted))
            while True:
                while not stream.events:
                    if self.lost:
                        raise RequestFailed(self.lost)
                    stream.wake.clear()
                    await stream.wake.wait()
                ev = stream.events.popleft()
                if ev.error is not None:
                    finished = True
                    raise exception_of(ev.error)
                if ev.delta is None:  # the engine's stream ended
                    finished = True
                    return
                delta = _coalesce(ev.delta, stream.events)
                if delta.get("finished") and "index" not in delta:
                    finished = True  # the request is over: a consumer that stops here aborts nothing
                yield delta
        finally:
            self._streams.pop(sid, None)
            if not finished and not self.lost:
                try:
                    self._send(ApiAbort(self.proc, self.incarnation, sid))
                except Exception:
                    pass

    # ------------------------------------------------------------------------------------------ calls
    def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        """Run ``engine.<method>(*args, **kwargs)`` in the engine process; its exception is raised here."""
        if self.lost:
            raise RequestFailed(self.lost)
        cid = next(self._ids)
        pending = self._pending[cid] = _Pending()
        try:
            self._send(ApiCall(self.proc, self.incarnation, cid, method, pack_tensors(list(args)),
                               pack_tensors(kwargs)))
            if not pending.done.wait(timeout):
                raise TimeoutError(f"the engine process did not answer {method} within {timeout:g}s")
        finally:
            self._pending.pop(cid, None)
        reply = pending.reply
        if reply is None:
            raise RequestFailed(self.lost or "the engine process is gone")
        if reply.error is not None:
            raise exception_of(reply.error)
        return reply.value

    def stats(self) -> Mapping[str, Any]:
        return self.call("stats", timeout=QUICK_CALL_TIMEOUT_S)  # type: ignore[no-any-return]

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        return self.call("list_lora_adapters", timeout=QUICK_CALL_TIMEOUT_S)  # type: ignore[no-any-return]

    def get_weight_version(self) -> int:
        return int(self.call("get_weight_version", timeout=QUICK_CALL_TIMEOUT_S))

    def __getattr__(self, name: str) -> Any:
        """Every other engine method the server uses (``engine_link.CALLS``: scale, LoRA loads, the RL routes'
        weight updates, pause, memory) is a blocking call of the same name."""
        from flotilla.server.engine_link import CALLS

        if name in CALLS:
            return lambda *args, **kwargs: self.call(name, *args, **kwargs)
        raise AttributeError(name)

    # ------------------------------------------------------------------------------------------ life
    def engine_lost(self, why: str) -> None:
        """The engine process is gone: fail every open stream and call now (from any thread)."""
        if self.lost:
            return
        self.lost = why
        for pending in list(self._pending.values()):
            pending.done.set()
        try:
            self._loop.call_soon_threadsafe(self._wake_all)
        except RuntimeError:  # the loop closed
            pass

    def close(self) -> None:
        self._stop.set()
        self._reader.join(2.0)
        self._push.close()
        self._pull.close()

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            try:
                self._push.send(msg, timeout_ms=5_000)
            except SendTimeout:
                self.engine_lost("the engine process does not take requests")
                raise RequestFailed(self.lost or "the engine process is gone") from None

    def _read(self) -> None:
        while not self._stop.is_set():
            msgs = self._pull.recv_many(200, max_items=1024)
            woken: list[_Stream] = []
            ready: ApiReady | None = None
            for msg in msgs:
                if isinstance(msg, ApiEvents):
                    for ev in msg.events:
                        stream = self._streams.get(ev.sid)
                        if stream is not None:
                            stream.events.append(ev)
                            woken.append(stream)
                elif isinstance(msg, ApiReply):
                    pending = self._pending.get(msg.cid)
                    if pending is not None:
                        pending.reply = msg
                        pending.done.set()
                elif isinstance(msg, ApiReady):
                    ready = msg
            try:
                if woken:
                    self._loop.call_soon_threadsafe(_set_all, woken)
                if ready is not None:
                    self._loop.call_soon_threadsafe(self._ready, ready)
            except RuntimeError:  # the loop closed: this process is ending
                return

    def _ready(self, msg: ApiReady) -> None:
        first = self.max_model_len == 0
        self.max_model_len = msg.max_model_len
        if msg.chat_template is not None:
            self.tokenizer.chat_template = msg.chat_template
        if first and self._on_ready is not None:
            self._on_ready(self)

    def _wake_all(self) -> None:
        for stream in self._streams.values():
            stream.wake.set()


def _set_all(streams: list[_Stream]) -> None:
    for s in streams:
        s.wake.set()


_LISTS = ("token_ids", "logprobs", "top_logprobs")


def _coalesce(delta: Delta, queued: deque[ApiEvent]) -> Delta:
    """``delta`` with the deltas queued right behind it for the same choice folded in: when this process fell
    behind the engine, one chunk carries what several steps made (as one process's stream cursor does), instead of
    several chunks written at one instant."""
    while queued and not delta.get("finished") and not delta.get("accepted"):
        nxt = queued[0].delta
        if nxt is None or queued[0].error is not None or nxt.get("index") != delta.get("index") or \
                nxt.get("accepted"):
            break
        queued.popleft()
        merged = dict(nxt)
        merged["text"] = delta.get("text", "") + nxt.get("text", "")
        for key in _LISTS:
            if key in delta or key in nxt:
                merged[key] = list(delta.get(key) or ()) + list(nxt.get(key) or ())
        delta = merged
    return delta
