"""Detokenization and stop strings in the replicas' leaders (flotilla/worker/texts.py), against the front end's path.

The leader's text for any chunking of the ids is ``tokenizer.decode``'s; a stop string cuts where the front end
would cut it, also when it starts in an earlier step's text; a request resumed on another replica (a failover) at
any point, an incomplete UTF-8 character included, goes on with no character repeated or lost; and the synthetic
engine (the same ``ReplicaTexts``) serves the same texts and finish reasons both ways.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from transformers import AutoTokenizer

from conftest import tiny
from flotilla.frontend.detokenizer import IncrementalDetokenizer
from flotilla.frontend.request import RequestState
from flotilla.ipc.messages import TokenOutput
from flotilla.sampling import SamplingParams
from flotilla.worker.texts import ReplicaTexts

TEXT = ("Caf\u00e9 cr\u00e8me, na\u00efve \u00fcber \u2014 \u00bfqu\u00e9 tal? \u4f60\u597d\u4e16\u754c "
        "\U0001f98a\U0001f332 the fox walked down to the river")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tok(request):
    return AutoTokenizer.from_pretrained(tiny(request.param))


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i:i + n])
        i += n
    return out


def _run(texts: ReplicaTexts, state: RequestState, chunks: list[list[int]], last: bool) -> bool:
    """Feed ``chunks`` through the leader's texts and the front end's state; True once the request finished."""
    for k, ids in enumerate(chunks):
        out = TokenOutput(state.rid, ids, finished=last and k == len(chunks) - 1,
                          finish_reason="length" if last and k == len(chunks) - 1 else None)
        texts.apply([out])
        state.apply(out)
        if state.finished:
            return True
    return False


def _state(tok, prompt: list[int], output_ids: list[int], stop: list[str]) -> RequestState:
    return RequestState("r", prompt, SamplingParams(max_new_tokens=len(output_ids) + 1, stop=stop),
                        IncrementalDetokenizer(tok, prompt))


@pytest.mark.parametrize("seed", range(3))
def test_leader_text_equals_decode_and_failover_at_any_point_loses_nothing(tok, seed: int) -> None:
    rng = random.Random(seed)
    prompt = list(tok("Hello there")["input_ids"])
    ids = list(tok(TEXT, add_special_tokens=False)["input_ids"])
    want = tok.decode(ids, skip_special_tokens=True)
    chunks = _chunks(ids, rng)
    for cut in range(len(chunks) + 1):  # the replica dies after ``cut`` chunks; another takes the request over
        state = _state(tok, prompt, ids, [])
        a = ReplicaTexts("", tok)
        a.add("r", prompt, [], [])
        _run(a, state, chunks[:cut], last=False)
        b = ReplicaTexts("", tok)
        b.add("r", prompt, list(state.output_ids), [], **state.resume_state())
        assert _run(b, state, chunks[cut:], last=True) or not chunks[cut:]
        if not chunks[cut:]:
            state.finish_locally("length")
        assert state.text == want, (cut, state.held)


def test_stop_strings_cut_where_the_front_end_cuts_them(tok) -> None:
    prompt = list(tok("Hello")["input_ids"])
    ids = list(tok(TEXT, add_special_tokens=False)["input_ids"])
    full = tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    for stop in ["\u00e8me", "\u4e16\u754c \U0001f98a", "river", "qu\u00e9 tal? \u4f60", "never there"]:
        for trial in range(4):
            chunks = _chunks(ids, rng)
            ref = _state(tok, prompt, ids, [stop, "zzz"])  # the front end's own path
            for k, c in enumerate(chunks):
                if ref.apply(TokenOutput("r", c, finished=k == len(chunks) - 1, finish_reason="length")
                             ) or ref.finished:
                    break
            texts = ReplicaTexts("", tok)
            texts.add("r", prompt, [], [stop, "zzz"])
            state = _state(tok, prompt, ids, [stop, "zzz"])
            stopped = []
            for k, c in enumerate(chunks):
                out = TokenOutput("r", c, finished=k == len(chunks) - 1, finish_reason="length" if
                                  k == len(chunks) - 1 else None)
                stopped += texts.apply([out])
                assert not state.apply(out)  # the front end has nothing to abort: the leader ended it
                if state.finished:
                    break
            assert state.text == ref.text and state.finish_reason == ref.finish_reason, (stop, trial)
            if stop in full:
                assert state.text == full[:full.index(stop)] and state.finish_reason == "stop"
                # ended here, unless the stop came with the last chunk (already finished: nothing to end)
                assert stopped == ([] if len(state.output_ids) == len(ids) else ["r"])
            assert len(texts) == 0  # finished either way: nothing kept


def test_a_stop_string_spanning_a_failover_is_found(tok) -> None:
    prompt = list(tok("Hello")["input_ids"])
    ids = list(tok(TEXT, add_special_tokens=False)["input_ids"])
    full = tok.decode(ids, skip_special_tokens=True)
    stop = "cr\u00e8me, na"
    for cut in range(1, 12):
        state = _state(tok, prompt, ids, [stop])
        a = ReplicaTexts("", tok)
        a.add("r", prompt, [], [stop])
        _run(a, state, [[i] for i in ids[:cut]], last=False)
        if state.finished:
            continue
        b = ReplicaTexts("", tok)
        b.add("r", prompt, list(state.output_ids), [stop], **state.resume_state())
        _run(b, state, [[i] for i in ids[cut:]], last=True)
        assert state.text == full[:full.index(stop)] and state.finish_reason == "stop", cut


def _texts_of(engine, prompts: list[str], stops: list[list[str]]) -> list[tuple[str, str, list[int]]]:
    async def one(i: int) -> tuple[str, str, list[int]]:
        last = None
        async for d in engine.stream_async(prompts[i], {"max_new_tokens": 40, "stop": stops[i]},
                                           request_id=f"req-{i}"):
            last = d
        return last["result"]["text"], last["result"]["finish_reason"], last["result"]["token_ids"]

    async def all_of() -> list:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    return asyncio.run(all_of())


def test_the_synthetic_engine_serves_the_same_texts_both_ways(tok) -> None:
    from flotilla.server.synthetic import SyntheticEngine

    prompts = ["a", "b", "c", "d"]
    ref = SyntheticEngine(tok, step_ms=0.5, detokenize_in_replicas=False)
    try:
        plain = _texts_of(ref, prompts, [[] for _ in prompts])
        # stop strings taken from the middle of each request's own text
        stops = [[t[len(t) // 2:len(t) // 2 + 3]] if len(t) > 8 else [] for t, _, _ in plain]
        want = _texts_of(ref, prompts, stops)
    finally:
        ref.shutdown()
    eng = SyntheticEngine(tok, step_ms=0.5, detokenize_in_replicas=True)
    try:
        got = _texts_of(eng, prompts, stops)
        assert eng.replica_cpu_s > 0
    finally:
        eng.shutdown()
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
    assert any(r == "stop" for _, r, _ in got)


def test_an_engine_detokenizing_in_its_front_end_gives_the_same_texts(llama_dp1_engine, llama_path: str) -> None:
    """The reference path (``detokenize_in_replicas=False``) and the default agree on a real engine: plain texts,
    stop strings cut mid-text, streamed pieces."""
    from flotilla.frontend.engine import Engine

    prompts = ["The capital of France is", "Once upon a time", "A"]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    base = llama_dp1_engine.generate(prompts, greedy, use_tqdm=False)
    stops = [[o["text"][len(o["text"]) // 2:len(o["text"]) // 2 + 3]] for o in base]
    with_stops = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=s) for s in stops]
    got = llama_dp1_engine.generate(prompts, with_stops, use_tqdm=False)
    with Engine(model=llama_path, device="cpu", dtype="float32", detokenize_in_replicas=False) as ref:
        assert [o["text"] for o in ref.generate(prompts, greedy, use_tqdm=False)] == [o["text"] for o in base]
        want = ref.generate(prompts, with_stops, use_tqdm=False)
        streamed = "".join(d["text"] for d in ref.stream(prompts[0], with_stops[0]))
    assert [(o["text"], o["finish_reason"], o["token_ids"]) for o in got] == \
        [(o["text"], o["finish_reason"], o["token_ids"]) for o in want]
    assert any(o["finish_reason"] == "stop" for o in got)
    assert streamed == "".join(d["text"] for d in llama_dp1_engine.stream(prompts[0], with_stops[0]))
