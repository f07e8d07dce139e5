"""A worker never dies on a message: bad requests fail alone, and the worker serves on with the same
processes and transformers-equal tokens (tiny model on CPU; see tests/test_worker_harness.py)."""

from __future__ import annotations

import pytest

from conftest import hf_greedy
from flotilla.ipc.messages import AddRequest, encoder
from flotilla.sampling import SamplingParams
from flotilla.worker import faults
from test_worker_harness import WorkerHarness

pytestmark = pytest.mark.timeout(300)

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


def _mutated(**fields) -> SamplingParams:
    """SamplingParams changed after construction: its own checks never saw these values."""
    sp = SamplingParams(max_new_tokens=4, temperature=0.0)
    for k, v in fields.items():
        setattr(sp, k, v)
    return sp


def _check_good_request_after(h: WorkerHarness, pids: list[int], rid: str = "good") -> None:
    h.add(rid, PROMPT, GREEDY)
    out = h.run(rid)
    assert out.finish_reason == "length" and out.token_ids == hf_greedy(h.path, PROMPT, GREEDY.max_new_tokens)
    assert h.alive() and h.pids == pids


def test_bad_add_requests_fail_alone_and_the_worker_serves_on():
    with WorkerHarness() as h:
        pids = list(h.pids)
        vocab = int(h.cfg.hf_config["vocab_size"])
        bad = {
            "neg-max-new": encoder.encode(AddRequest("neg-max-new", PROMPT, _mutated(max_new_tokens=-5))),
            "hot": encoder.encode(AddRequest("hot", PROMPT, _mutated(temperature="hot"))),
            "top-p": encoder.encode(AddRequest("top-p", PROMPT, _mutated(top_p=7.0))),
            "empty": encoder.encode(AddRequest("empty", [], GREEDY)),
            "vocab": encoder.encode(AddRequest("vocab", [1, vocab + 5], GREEDY)),
            "negative-id": encoder.encode(AddRequest("negative-id", [1, -3], GREEDY)),
            "output-vocab": encoder.encode(AddRequest("output-vocab", [1, 2], GREEDY, output_ids=[vocab])),
            "rid-type": encoder.encode({"type": "AddRequest", "rid": 17, "prompt_ids": [1], "sampling": {}}),
        }
        h.send_raw(b"\xc1 garbage")  # not even msgpack: dropped
        for frame in bad.values():
            h.send_raw(frame)
        errors = {}
        for rid in [r for r in bad if r != "rid-type"]:  # a rid that is not a str cannot be answered
            out = h.run(rid)
            errors[rid] = out.error
            assert out.finish_reason == "error" and out.token_ids == [] and out.error, (rid, out)
        assert "max_new_tokens" in errors["neg-max-new"]
        assert "temperature" in errors["hot"] and "top_p" in errors["top-p"]
        assert "prompt_ids" in errors["empty"] and "prompt_ids" in errors["vocab"]
        assert "prompt_ids" in errors["negative-id"] and "output_ids" in errors["output-vocab"]
        _check_good_request_after(h, pids)


def test_duplicate_rid_fails_and_ends_the_running_copy():
    with WorkerHarness() as h:
        pids = list(h.pids)
        h.add("dup", PROMPT, SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True))
        h.wait_for(lambda m: any(o.rid == "dup" and o.token_ids for o in getattr(m, "outputs", [])))
        h.add("dup", PROMPT, GREEDY)
        out = h.run("dup")
        assert out.finish_reason == "error" and "duplicate" in out.error
        h.wait_for(lambda m: getattr(m, "load", None) is not None and m.load.running == 0 and m.load.waiting == 0)
        _check_good_request_after(h, pids)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_sampling_error_fails_that_request_only(monkeypatch, tp_size):
    """A bad parameter that slipped through every check makes the sampler raise for one row of a batch:
    that request fails, its batch-mates finish correctly, and (tp_size=2) the follower rank, which never
    samples, stays in lockstep."""
    monkeypatch.setenv(faults.BAD_SAMPLING_RID, "poisoned")
    with WorkerHarness(tp_size=tp_size) as h:
        pids = list(h.pids)
        assert len(pids) == tp_size
        h.add("mate", PROMPT, GREEDY)
        h.add("poisoned", PROMPT[:5], GREEDY)
        bad = h.run("poisoned")
        assert bad.finish_reason == "error" and "sampling failed" in bad.error
        mate = h.run("mate")
        assert mate.token_ids == hf_greedy(h.path, PROMPT, GREEDY.max_new_tokens)
        _check_good_request_after(h, pids)
