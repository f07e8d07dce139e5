"""DP attention and Qwen3-MoE: the same greedy tokens as transformers, idle groups stay in step."""

from __future__ import annotations

import pytest

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

N = 24
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


def expected(path, prompts=PROMPTS):
    return [hf_greedy(path, hf_tokenize(path, p), N) for p in prompts]


@pytest.mark.parametrize("layout", [
    dict(),
    dict(tp_size=2),
    dict(tp_size=2, dp_size=2, enable_dp_attention=True),
])
def test_qwen3_moe_matches_transformers(layout):
    path = tiny("qwen3_moe")
    with Engine(model=path, **OPTS, **layout) as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected(path)


def test_dense_dp_attention_four_ranks():
    path = tiny("qwen3")
    with Engine(model=path, tp_size=4, dp_size=2, enable_dp_attention=True, **OPTS) as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert len(engine.stats()["replicas"]) == 2
    assert [o["token_ids"] for o in outs] == expected(path)


@pytest.fixture(scope="module")
def dpa_engine():
    with Engine(model=tiny("qwen3_moe"), tp_size=2, dp_size=2, enable_dp_attention=True, **OPTS) as engine:
        yield engine


def test_single_request_with_an_idle_group(dpa_engine):
    path = tiny("qwen3_moe")
    out = dpa_engine.generate([PROMPTS[2]], GREEDY, use_tqdm=False)[0]
    assert out["token_ids"] == expected(path, [PROMPTS[2]])[0]
    steps = [r["num_steps"] for r in dpa_engine.stats()["replicas"]]
    assert sorted(steps)[0] == 0 or min(steps) < max(steps)  # one group did the work, the other idled along


def test_burst_on_one_group(dpa_engine):
    path = tiny("qwen3_moe")
    replica = dpa_engine.stats()["replicas"][1]["id"]
    states = [dpa_engine._new_state(p, None, GREEDY) for p in PROMPTS * 2]
    for s in states:
        dpa_engine.dispatcher.dispatch_to(s, replica)
    dpa_engine._wait(states, timeout=120)
    assert [s.output_ids for s in states] == expected(path) * 2


def test_dp_attention_validation():
    path = tiny("llama")
    with pytest.raises(ValueError, match="dp_size"):
        Engine(model=path, tp_size=2, dp_size=4, enable_dp_attention=True, **OPTS)
    with pytest.raises(ValueError, match="num_attention_heads"):
        # 4 heads cannot be split over an attention-TP group of 8
        Engine(model=path, tp_size=8, dp_size=1, enable_dp_attention=True, **OPTS)
    with pytest.raises(ValueError, match="tp_size"):
        Engine(model=path, tp_size=3, **OPTS)
