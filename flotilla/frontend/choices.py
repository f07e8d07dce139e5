"""The n choices of one prompt, followed as one stream.

``InputProcessor.make_choices`` makes the requests (choice i seeded with seed + i, all under one affinity key, so
the controller puts them on one replica, which shares the prompt's KV among them); ``follow_choices`` yields
their deltas as they come, each with ``"index"``, the choice it belongs to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from flotilla.frontend.request import RequestState, StreamCursor


async def follow_choices(states: list[RequestState], ev: asyncio.Event,
                         abort: Callable[[str], Any]) -> AsyncIterator[dict[str, Any]]:
    """Deltas of submitted choices (``ev`` their shared waiter) until every one has finished; each delta has
    ``"index"`` (its position in ``states``). A failed choice raises ``RequestFailed``; closing the iterator
    before the end aborts the choices still running."""
    cursors = [StreamCursor() for _ in states]
    left = len(states)
    try:
        while left:
            await ev.wait()
            ev.clear()
            for i, (state, cursor) in enumerate(zip(states, cursors)):
                if cursor.done:
                    continue
                delta = cursor.take(state)
                if delta is not None:
                    delta["index"] = i
                    if delta["finished"]:
                        left -= 1
                    yield delta
    finally:
        for state in states:
            state.remove_async_waiter(ev)
        for state in states:
            if not state.finished:
                abort(state.rid)


def choices_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One prompt's result from its choices' results, as ``generate`` gives it: a request's own result, or with
    n > 1 the first choice's fields plus "outputs" (every choice) and the completion tokens of all of them."""
    if len(results) == 1:
        return results[0]
    return {**results[0], "outputs": results,
            "completion_tokens": sum(r["completion_tokens"] for r in results)}
