"""Overlap scheduling: step N+1 planned while step N's sampled ids are still on the device.

The scheduler half (placeholders, deferred page publishing, no preemption of a sequence whose token is on
the device, no slot for a sequence its pending token surely ends) is driven directly; the engine half is
compared token for token with the synchronous order on every layout, greedy and seeded, with the rows that
force a synchronous step (structured output, penalties), preemption, aborts and a poisoned row.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, RequestFailed, SamplingParams
from flotilla.ipc.messages import SeqPlan
from flotilla.worker import faults
from flotilla.worker.feed import feed_input_ids
from flotilla.worker.kv_cache import KVBlockManager
from flotilla.worker.scheduler import PLACEHOLDER, Scheduler, SchedulerConfig

OPTS = dict(device="cpu", dtype="float32")
GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True)


def _sched(blocks: int = 64, block_size: int = 4, prefix: bool = True, max_len: int = 4096) -> Scheduler:
    return Scheduler(SchedulerConfig(8, 4096, max_len, (99,)), KVBlockManager(blocks, block_size,
                                                                              enable_prefix_cache=prefix))


# ---------------------------------------------------------------------------------------------- scheduler
def test_next_step_is_fed_from_the_device_and_record_fills_the_placeholder():
    s = _sched()
    s.add("a", [1, 2, 3, 4, 5, 6], SamplingParams(max_new_tokens=8))
    s.add("b", [7, 8, 9], SamplingParams(max_new_tokens=8))
    b1 = s.schedule()
    s.advance(b1)  # launched; ids not read yet
    a, b = s.by_rid["a"], s.by_rid["b"]
    assert a.tokens[-1] == PLACEHOLDER and a.pending == 1 and (a.feed_row, b.feed_row) == (0, 1)
    b2 = s.schedule()  # planned while step 1 runs
    assert [p.prev_row for p in b2.plans] == [0, 1]
    assert [p.start for p in b2.plans] == [6, 3]
    s.advance(b2)
    assert a.pending == 2
    out1 = s.record(b1, [11, 12])
    assert [(o.rid, o.token_ids) for o in out1] == [("a", [11]), ("b", [12])]
    assert a.tokens[6:] == [11, PLACEHOLDER] and a.pending == 1
    out2 = s.record(b2, [13, 14])
    assert a.tokens[6:] == [11, 13] and b.tokens[3:] == [12, 14] and a.pending == b.pending == 0
    assert all(not o.finished for o in out1 + out2)


def test_a_sequence_stopped_by_the_step_in_flight_wastes_one_slot_and_is_skipped():
    s = _sched()
    s.add("a", [1, 2, 3], SamplingParams(max_new_tokens=8))
    b1 = s.schedule()
    s.advance(b1)
    b2 = s.schedule()
    s.advance(b2)
    out = s.record(b1, [99])  # eos: "a" stops at step 1, while step 2 (which computed it once more) runs
    assert out[0].finished and out[0].finish_reason == "stop"
    assert s.record(b2, [5]) == []  # its row of step 2 is dropped
    assert s.kv.usage() == 0.0 and not s.has_work()


def test_a_pending_token_that_reaches_the_length_limit_gets_no_slot():
    s = _sched()
    s.add("a", [1, 2, 3], SamplingParams(max_new_tokens=1))
    s.add("b", [4, 5, 6], SamplingParams(max_new_tokens=5))
    b1 = s.schedule()
    s.advance(b1)
    b2 = s.schedule()  # "a"'s one output is the placeholder: it ends by length whatever the id
    assert [seq.rid for seq in b2.seqs] == ["b"]
    out = s.record(b1, [7, 8])
    assert out[0].finished and out[0].finish_reason == "length" and not out[1].finished


def test_pages_holding_a_placeholder_are_published_once_known():
    s = _sched(block_size=4)
    s.add("a", [1, 2, 3], SamplingParams(max_new_tokens=8))
    b1 = s.schedule()
    s.advance(b1)      # computed 0..2, token 3 = placeholder
    b2 = s.schedule()  # computes position 3 (the placeholder's id, fed on the device): fills page 0
    s.advance(b2)
    assert s.kv.match_prefix([1, 2, 3, 0, 9])[1] == 0  # a page keyed on the placeholder is never published
    s.record(b1, [42])
    blocks, cached = s.kv.match_prefix([1, 2, 3, 42, 9])
    assert cached == 4  # now known: the page is in the prefix cache under its real ids
    s.kv.release(blocks)


def test_a_sequence_whose_token_is_on_the_device_is_never_preempted():
    s = _sched(blocks=3, block_size=4, prefix=False)  # 12 slots
    s.add("old", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_new_tokens=8))  # pages 0-1
    s.add("new", [8, 9, 10], SamplingParams(max_new_tokens=8))             # page 2
    b1 = s.schedule()
    s.advance(b1)
    b2 = s.schedule()  # positions 7 and 3: both still fit their pages
    s.advance(b2)
    # "old" at position 8 needs a page and the pool is full; the only victim, "new", has tokens on the device
    assert s.schedule() is None and s.num_preemptions == 0
    s.record(b1, [11, 12])
    s.record(b2, [13, 14])
    b3 = s.schedule()  # every token known: "new" is preempted as usual
    assert s.num_preemptions == 1 and [seq.rid for seq in b3.seqs] == ["old"]


def test_feed_overwrites_exactly_the_fed_rows():
    ids = torch.tensor([5, 6, 7, 0, 8, 0])  # plans: 3 prefill tokens, 1 fed, 1 plain decode, 1 fed
    plans = [SeqPlan([5, 6, 7], 0, [0], False), SeqPlan([0], 4, [1], True, prev_row=2),
             SeqPlan([8], 2, [2], True), SeqPlan([0], 9, [3], True, prev_row=0)]
    feed_input_ids(ids, plans, torch.tensor([31, 32, 33]), [3, 1, 1, 1])
    assert ids.tolist() == [5, 6, 7, 33, 8, 31]


# ---------------------------------------------------------------------------------------------- engine
def _run(path, overlap: bool, prompts, params, **layout):
    with Engine(model=path, **OPTS, enable_overlap_schedule=overlap, **layout) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        stats = engine.stats()["replicas"]
    return [o["token_ids"] for o in outs], [o["finish_reason"] for o in outs], stats


MIXED = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
         SamplingParams(max_new_tokens=17, temperature=0.8, seed=7, ignore_eos=True),
         SamplingParams(max_new_tokens=11, temperature=1.0, top_k=20, seed=3, ignore_eos=True),
         SamplingParams(max_new_tokens=30, temperature=0.7, top_p=0.9, seed=11, ignore_eos=True)]


@pytest.mark.parametrize("layout", [
    {},
    dict(tp_size=2),
    dict(tp_size=2, dp_size=2, enable_dp_attention=True),
    dict(pp_size=2),  # pipeline replicas overlap by micro-batches: the flag leaves them as they are
])
def test_overlap_gives_the_synchronous_tokens(layout):
    path = tiny("llama")
    prompts = PROMPTS * 2
    params = MIXED * (len(prompts) // len(MIXED))
    sync, sync_reasons, _ = _run(path, False, prompts, params, **layout)
    over, over_reasons, stats = _run(path, True, prompts, params, **layout)
    assert over == sync and over_reasons == sync_reasons
    greedy_rows = [i for i, p in enumerate(params) if p.temperature == 0.0]
    for i in greedy_rows:  # and greedy is transformers' own
        assert over[i] == hf_greedy(path, hf_tokenize(path, prompts[i]), 24)
    if layout.get("pp_size", 1) == 1:
        assert all(r["num_overlapped_steps"] > 0 for r in stats), stats
    else:
        assert all(r["num_overlapped_steps"] == 0 for r in stats)


def test_overlap_with_eos_stops_penalties_preemption_and_prefix_hits():
    """Rows that stop early on their own tokens (eos not ignored), penalised rows (their steps run
    synchronously), a pool small enough to preempt, and prompts that share pages."""
    path = tiny("llama")
    long = PROMPTS[0] * 3
    prompts = [long, long + " again", PROMPTS[1], PROMPTS[2], long, PROMPTS[3]]
    params = [SamplingParams(max_new_tokens=40, temperature=0.0),  # eos allowed: stops whenever it samples eos
              SamplingParams(max_new_tokens=25, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_new_tokens=25, temperature=0.9, seed=5, frequency_penalty=0.5, ignore_eos=True),
              SamplingParams(max_new_tokens=25, temperature=0.0, ignore_eos=True),
              SamplingParams(max_new_tokens=25, temperature=0.8, seed=9, ignore_eos=True),
              SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[3, 5, 7, 11, 13])]
    layout = dict(kv_cache_tokens=160, block_size=4)
    sync, sync_reasons, s_stats = _run(path, False, prompts, params, **layout)
    over, over_reasons, o_stats = _run(path, True, prompts, params, **layout)
    assert over == sync and over_reasons == sync_reasons
    assert o_stats[0]["num_preemptions"] > 0 and o_stats[0]["num_overlapped_steps"] > 0


def test_structured_output_runs_synchronously_beside_overlapped_rows():
    path = tiny("llama")
    so = SamplingParams(max_new_tokens=12, temperature=0.0, structured_output={"regex": "[ab]{3,12}"})
    plain = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    sync, _, _ = _run(path, False, prompts, [plain, so, plain])
    with Engine(model=path, **OPTS, enable_overlap_schedule=True) as engine:
        first = engine.generate(prompts[:1], plain, use_tqdm=False)[0]  # alone: overlapped
        outs = engine.generate(prompts, [plain, so, plain], use_tqdm=False)
        replica = engine.stats()["replicas"][0]
    assert [o["token_ids"] for o in outs] == sync
    assert first["token_ids"] == sync[0]
    text = outs[1]["text"]
    assert 3 <= len(text) <= 12 and set(text) <= {"a", "b"}
    assert 0 < replica["num_overlapped_steps"] < replica["num_steps"]


def test_abort_while_a_step_is_in_flight():
    path = tiny("llama")
    with Engine(model=path, **OPTS, enable_overlap_schedule=True) as engine:
        long = SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True)
        deltas = engine.stream(PROMPTS[0], long, request_id="to-abort")
        next(deltas)
        next(deltas)
        assert engine.abort("to-abort")
        rest = list(deltas)
        assert rest[-1]["finish_reason"] == "abort"
        after = engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)  # the replica serves on, exactly
    assert [o["token_ids"] for o in after] == [hf_greedy(path, hf_tokenize(path, p), 20) for p in PROMPTS[:2]]


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_poisoned_row_fails_alone_under_overlap(monkeypatch, tp_size):
    monkeypatch.setenv(faults.BAD_SAMPLING_RID, "poisoned")
    path = tiny("llama")
    with Engine(model=path, **OPTS, tp_size=tp_size, enable_overlap_schedule=True) as engine:
        good = engine.stream(PROMPTS[0], GREEDY, request_id="mate")
        first = next(good)
        with pytest.raises(RequestFailed, match="sampling failed"):
            list(engine.stream(PROMPTS[1], GREEDY, request_id="poisoned"))
        mate = first["token_ids"] + [t for d in good for t in d["token_ids"]]
        again = engine.generate([PROMPTS[2]], GREEDY, use_tqdm=False)[0]
    assert mate == hf_greedy(path, hf_tokenize(path, PROMPTS[0]), 20)
    assert again["token_ids"] == hf_greedy(path, hf_tokenize(path, PROMPTS[2]), 20)
