"""A request as the front end tracks it: enough to stream it, finish it, or resume it elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flotilla.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from flotilla.ipc.messages import TokenOutput
from flotilla.sampling import SamplingParams


@dataclass
class RequestState:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    detok: IncrementalDetokenizer
    replica: int = -1             # the replica it is on (-1: none yet, or held while paused)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    # the prompt's own log-probabilities (SamplingParams.prompt_logprobs): index i is prompt token i's
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    affinity: str | None = None   # requests with one key go to one replica (the choices of one prompt)
    # failover bookkeeping, written by the dispatcher only (router/dispatch.py): when it was last sent to a
    # replica, whether that replica put it in a batch (the evidence for charging a death), how many replica
    # deaths were charged to it, whether it runs alone (a suspect), and whether the user asked it to end (a
    # failover then ends it instead of resuming it)
    dispatched_at: float = 0.0
    ran_on: int | None = None
    deaths: int = 0
    alone: bool = False
    abort_requested: bool = False
    # detokenized in the replica (TokenOutput.text): output ids whose text the replica has not sent yet
    held: int = 0
    replica_text: bool = False
    # stream_interval: its streams are woken, and get a delta, once this many new tokens are there (the first token
    # and the end at once): wake_all skips a waiter that would find too few, and StreamCursor gives it nothing
    wake_every: int = 1
    _woken_at: int = field(default=0, repr=False)
    _async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.stops = StopStringMatcher(self.sampling.stop)

    # ------------------------------------------------------------------------------------------ updates
    def apply(self, out: TokenOutput) -> bool:
        """Take one step's output; returns True when a stop string ended the request here (the worker must
        then be told to abort it)."""
        if self.finished:
            return False
        if out.prompt_logprobs is not None:
            self._take_prompt_logprobs(out)
        if out.token_ids:
            self.output_ids.extend(out.token_ids)
            if out.logprobs:
                self.logprobs.extend(out.logprobs)
            if out.top_logprobs:
                self.top_logprobs.extend(out.top_logprobs)
            if out.text is not None:  # the replica's leader detokenized and matched the stop strings
                self.replica_text = True
                self.text += out.text
                self.held = out.held
                if out.text_end is not None:
                    self.text = self.text[:out.text_end]
            else:
                delta = self.detok.add(out.token_ids)
                if out.finished:
                    delta += self.detok.flush()
                self.text += delta
                cut = self.stops.find(self.text, len(delta))
                if cut is not None:
                    self.text = self.text[:cut]
                    self._finish("stop")
                    return True
        if out.cached_tokens:
            self.cached_tokens = out.cached_tokens
        if out.finished:
            if out.error:
                self.error = out.error
            self._finish(out.finish_reason or "stop")
        return False

    def _take_prompt_logprobs(self, out: TokenOutput) -> None:
        """Placed by index: a recomputed prefill (preemption, failover) sends the same values again."""
        n = len(self.prompt_ids)
        if len(self.prompt_logprobs) < n:
            self.prompt_logprobs = [None] * n
            self.prompt_top_logprobs = [None] * n
        for k, lp in enumerate(out.prompt_logprobs):
            i = out.prompt_start + k
            if 0 < i < n:
                self.prompt_logprobs[i] = lp
                if out.prompt_top_logprobs is not None:
                    self.prompt_top_logprobs[i] = [(int(t[0]), float(t[1])) for t in out.prompt_top_logprobs[k]]

    def finish_locally(self, reason: str) -> None:
        """End a request the front end knows is done (its budget was spent before its replica died)."""
        if self.replica_text:  # the replica held the text of its last ``held`` ids back: decode them here
            if self.held:
                n = len(self.output_ids) - self.held
                detok = IncrementalDetokenizer(self.detok.tok, self.prompt_ids + self.output_ids[:n])
                self.text += detok.add(self.output_ids[n:]) + detok.flush()
                self.held = 0
        else:
            self.text += self.detok.flush()
        self._finish(reason)

    def resume_state(self) -> dict[str, Any]:
        """What a replica that takes this request over needs to go on with its text (``AddRequest``'s fields)."""
        if not self.replica_text:
            return {}
        keep = self.stops.holdback
        return {"held": self.held, "text_tail": self.text[-keep:] if keep else "",
                "text_len": len(self.text)}

    def fail(self, message: str) -> None:
        if not self.finished:
            self.error = message
            self._finish("error")

    def _finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason

    # ------------------------------------------------------------------------------------------ views
    def streamable_text(self) -> str:
        """Text safe to show now: the tail that could still become a stop string is held back."""
        if self.finished or not self.stops.holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self.stops.holdback)]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.rid,
            "text": self.text,
            "token_ids": list(self.output_ids),
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
        }
        if self.sampling.logprobs:
            out["logprobs"] = list(self.logprobs)
            if self.sampling.top_logprobs:
                out["top_logprobs"] = [list(t) for t in self.top_logprobs]
        if self.sampling.prompt_logprobs is not None:
            n = len(self.prompt_ids)
            out["prompt_logprobs"] = list(self.prompt_logprobs) or [None] * n
            if self.sampling.prompt_logprobs:
                out["prompt_top_logprobs"] = [list(t) if t is not None else None
                                              for t in self.prompt_top_logprobs] or [None] * n
        return out

    # ------------------------------------------------------------------------------------------ waiting
    def add_async_waiter(self, ev: asyncio.Event | None = None) -> asyncio.Event:
        """An event set on every change, on the running loop; ``ev``: one the caller shares among several
        requests (the choices of one prompt, followed as one stream)."""
        ev = asyncio.Event() if ev is None else ev
        self._async_waiters.append((asyncio.get_running_loop(), ev))
        return ev

    def remove_async_waiter(self, ev: asyncio.Event) -> None:
        self._async_waiters = [(lp, e) for lp, e in self._async_waiters if e is not ev]

    def wake(self) -> None:
        wake_all([self])


def wake_all(states: Iterable[RequestState]) -> None:
    """Wake the async waiters of many requests with one hand-off per event loop.

    Each ``call_soon_threadsafe`` writes to the loop's self-pipe and takes its lock; one per request per
    step (256 requests at ~100 steps/s) was a large share of the front end's time, so a step's wake-ups
    are grouped by loop and set there in one callback."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for state in states:
        if state.wake_every > 1 and not state.finished:
            n = len(state.output_ids)
            if state._woken_at and n - state._woken_at < state.wake_every:
                continue  # its consumer would find fewer tokens than the interval: let it sleep
            state._woken_at = n
        for loop, ev in state._async_waiters:
            by_loop.setdefault(loop, []).append(ev)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the loop closed
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for ev in events:
        ev.set()


class StreamCursor:
    """How much of a request a stream consumer has seen; deltas are cut from the cumulative state, so a
    wake-up that arrives late or twice loses and repeats nothing."""

    def __init__(self) -> None:
        self.tokens = 0
        self.chars = 0
        self.done = False

    def has_news(self, s: RequestState) -> bool:
        """``take`` would return a delta now (a waiter loops on this: it must never say yes when take says no)."""
        if s.finished:
            return not self.done
        new = len(s.output_ids) - self.tokens
        if self.tokens and new < s.wake_every:
            return False
        return new > 0 or len(s.streamable_text()) > self.chars

    def take(self, s: RequestState) -> dict[str, Any] | None:
        if self.done:
            return None
        finished = s.finished
        text = s.streamable_text()
        ids = s.output_ids[self.tokens:]
        if not finished and ((not ids and len(text) <= self.chars) or (self.tokens and len(ids) < s.wake_every)):
            return None
        if finished and s.finish_reason == "error":
            self.done = True
            raise RequestFailed(f"request {s.rid} failed: {s.error}")
        delta: dict[str, Any] = {"request_id": s.rid, "text": text[self.chars:], "token_ids": list(ids),
                                 "finished": finished, "finish_reason": s.finish_reason if finished else None}
        if s.sampling.logprobs:
            delta["logprobs"] = s.logprobs[self.tokens:self.tokens + len(ids)]
            if s.sampling.top_logprobs:
                delta["top_logprobs"] = [list(t) for t in s.top_logprobs[self.tokens:self.tokens + len(ids)]]
        self.tokens += len(ids)
        self.chars = len(text)
        if finished:
            self.done = True
            delta["result"] = s.result()
        return delta


# What ``stream_async(..., accepted=True)`` yields first, once the request is queued (validated and submitted)
ACCEPTED: dict[str, Any] = {"text": "", "token_ids": [], "finished": False, "accepted": True}


async def follow(state: RequestState, ev: asyncio.Event, abort: Callable[[str], Any]) -> AsyncIterator[dict[str, Any]]:
    """Deltas of a submitted request as its waiter ``ev`` is woken (one every ``state.wake_every`` tokens, the
    first and the last at once); closing the iterator before the end aborts the request (a client that left)."""
    cursor = StreamCursor()
    try:
        while True:
            await ev.wait()
            ev.clear()
            delta = cursor.take(state)
            if delta is not None:
                yield delta
                if delta["finished"]:
                    return
    finally:
        state.remove_async_waiter(ev)
        if not state.finished:
            abort(state.rid)


class RequestFailed(RuntimeError):
    """A request could not be completed (its replica died, or the engine shut down)."""

