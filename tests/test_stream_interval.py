"""``stream_interval`` (sglang's ``--stream-interval``): a stream gets a delta once that many new tokens are there,
its first and last at once, with nothing lost; a bad value is refused naming the field."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from conftest import tiny
from flotilla.config import EngineConfig
from flotilla.errors import InvalidParameter
from flotilla.server.synthetic import SyntheticEngine


@pytest.mark.parametrize("interval", [1, 4])
@pytest.mark.parametrize("n", [1, 2])
def test_deltas_come_every_interval_tokens_and_add_up_to_the_result(interval: int, n: int) -> None:
    eng = SyntheticEngine(AutoTokenizer.from_pretrained(tiny("llama")), step_ms=1, stream_interval=interval)

    async def run() -> list[dict]:
        return [d async for d in eng.stream_async("x", {"max_new_tokens": 23, "n": n, "seed": 1})]

    try:
        deltas = asyncio.run(run())
    finally:
        eng.shutdown()
    for i in range(n):
        mine = [d for d in deltas if d.get("index", 0) == i]
        sizes = [len(d["token_ids"]) for d in mine]
        assert sizes[0] >= 1 and sum(sizes) == 23
        assert all(s >= interval for s in sizes[1:-1])  # between the first and the last: at least the interval
        assert mine[-1]["finished"] and "".join(d["text"] for d in mine) == mine[-1]["result"]["text"]
        if interval > 1:
            assert len(mine) <= 2 + 22 // interval


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_stream_interval_names_the_field(bad) -> None:
    with pytest.raises(InvalidParameter, match="stream_interval"):
        EngineConfig(model=tiny("llama"), stream_interval=bad).validate()


def test_the_cursor_never_says_news_when_it_would_give_none() -> None:
    """``Engine.stream`` waits on ``has_news`` and then calls ``take``: they must agree, or it spins."""
    from flotilla.frontend.detokenizer import IncrementalDetokenizer
    from flotilla.frontend.request import RequestState, StreamCursor
    from flotilla.ipc.messages import TokenOutput
    from flotilla.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny("llama"))
    state = RequestState("r", [1, 2], SamplingParams(max_new_tokens=20), IncrementalDetokenizer(tok, [1, 2]))
    state.wake_every = 3
    cursor = StreamCursor()
    got = []
    for k in range(10):
        state.apply(TokenOutput("r", [100 + k], text=f"w{k} ", finished=k == 9, finish_reason="length"))
        news = cursor.has_news(state)
        delta = cursor.take(state)
        assert news == (delta is not None), k
        if delta is not None:
            got.append(len(delta["token_ids"]))
    assert got == [1, 3, 3, 3] and cursor.done
