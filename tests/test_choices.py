"""n > 1: several completions of one prompt on one replica, sharing the prompt's KV through the prefix
cache, choice i seeded with seed + i; and the scheduler's wait that makes the sharing happen."""

from __future__ import annotations

import pytest

from conftest import PROMPTS
from flotilla import SamplingParams


def test_n_choices_share_the_prompt_and_follow_their_seeds(llama_dp2_engine):
    engine = llama_dp2_engine  # Engine(tiny llama, dp_size=2, cpu, float32), shared (tests/conftest.py)
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, seed=11, n=3, ignore_eos=True)
    (out,) = engine.generate([PROMPTS[2]], sp, use_tqdm=False)
    assert len(out["outputs"]) == 3 and out["completion_tokens"] == 36
    singles = engine.generate([PROMPTS[2]] * 3, [SamplingParams(max_new_tokens=12, temperature=0.9, seed=11 + i,
                                                                ignore_eos=True) for i in range(3)],
                              use_tqdm=False)
    assert [o["token_ids"] for o in out["outputs"]] == [s["token_ids"] for s in singles]
    assert out["text"] == out["outputs"][0]["text"]
    # the later choices found the first one's prompt pages in the cache (same replica, one step later)
    assert all(o["cached_tokens"] >= 16 for o in out["outputs"][1:])
    with pytest.raises(ValueError, match="n:"):
        next(engine.stream(PROMPTS[0], SamplingParams(n=2)))
    with pytest.raises(ValueError, match="n:"):
        SamplingParams(n=0)


def test_scheduler_defers_a_same_prefix_sibling_one_step():
    from flotilla.worker.kv_cache import KVBlockManager
    from flotilla.worker.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(8, 4096, 4096, (0,)), KVBlockManager(64, 4))
    prompt = list(range(1, 14))
    sp = SamplingParams(max_new_tokens=4)
    for rid in ("a", "b"):
        sched.add(rid, prompt, sp)
    sched.add("c", list(range(50, 60)), sp)
    first = sched.schedule()
    assert [s.rid for s in first.seqs] == ["a", "c"]  # b waits: a computes the same first page
    sched.process(first, [7, 8])
    second = sched.schedule()
    b = next(s for s in second.seqs if s.rid == "b")
    assert b.cached_tokens == 12  # a's three full pages
