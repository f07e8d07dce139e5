"""pause_generation's modes with requests in flight (issue 20), the sglang-named memory and abort calls,
and update_weights_from_tensor with plain tensors."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

LONG = SamplingParams(max_new_tokens=120, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine():
    with Engine(model=tiny("llama", seed=0), dp_size=2, **OPTS) as e:
        yield e


@pytest.fixture(scope="module")
def reference(engine):
    """Uninterrupted greedy tokens of every prompt (what a retracted request must end with)."""
    return [o["token_ids"] for o in engine.generate(PROMPTS, LONG, use_tqdm=False)]


class Streams:
    """One stream per prompt, each drained by a thread; ``started`` once every one has its first token."""

    def __init__(self, engine, prefix: str):
        self.deltas: list[list[dict]] = [[] for _ in PROMPTS]
        self.errors: list[BaseException] = []
        self.first = [threading.Event() for _ in PROMPTS]
        self.threads = [threading.Thread(target=self._run, args=(engine, i, f"{prefix}-{i}"), daemon=True)
                        for i in range(len(PROMPTS))]
        for t in self.threads:
            t.start()
        for ev in self.first:
            assert ev.wait(30)

    def _run(self, engine, i: int, rid: str) -> None:
        try:
            for d in engine.stream(PROMPTS[i], LONG, request_id=rid):
                self.deltas[i].append(d)
                self.first[i].set()
        except BaseException as e:  # noqa: BLE001 - checked by the test
            self.errors.append(e)
            self.first[i].set()

    def join(self, timeout: float = 60) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not self.errors, self.errors

    def tokens(self, i: int) -> list[int]:
        return [t for d in self.deltas[i] for t in d["token_ids"]]

    def final(self, i: int) -> dict:
        return self.deltas[i][-1]


def steps(engine) -> list[int]:
    return [r["num_steps"] for r in engine.stats()["replicas"]]


def test_reference_matches_transformers(reference):
    path = tiny("llama", seed=0)
    assert reference[:2] == [hf_greedy(path, hf_tokenize(path, p), 120) for p in PROMPTS[:2]]


def test_in_place_holds_running_requests_with_their_kv(engine, reference):
    streams = Streams(engine, "inplace")
    engine.pause_generation(mode="in_place")
    assert engine.stats()["paused"] and engine.stats()["num_requests_inflight"] == len(PROMPTS)
    before = steps(engine)
    time.sleep(0.6)
    assert steps(engine) == before and all(t.is_alive() for t in streams.threads)
    held = [len(streams.tokens(i)) for i in range(len(PROMPTS))]
    assert all(0 < n < 120 for n in held)
    engine.continue_generation()
    streams.join()
    assert [streams.tokens(i) for i in range(len(PROMPTS))] == reference
    assert not engine.stats()["paused"]


def test_retract_frees_the_replicas_and_resumes_with_the_same_tokens(engine, reference):
    streams = Streams(engine, "retract")
    preempted = sum(r["num_preemptions"] for r in engine.stats()["replicas"])
    engine.pause_generation(mode="retract")
    # every request is back in the front end: the replicas hold nothing (their next report says so)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reps = engine.stats()["replicas"]
        if all(r["running"] == 0 and r["waiting"] == 0 for r in reps):
            break
        time.sleep(0.1)
    assert all(r["running"] == 0 and r["waiting"] == 0 for r in engine.stats()["replicas"])
    assert len(engine.dispatcher.held()) == len(PROMPTS)
    assert all(v.inflight == 0 for v in engine.controller.views.values())  # routing no longer counts them there
    assert all(t.is_alive() for t in streams.threads)
    engine.continue_generation()
    streams.join()
    assert [streams.tokens(i) for i in range(len(PROMPTS))] == reference  # no token lost, none repeated
    assert all(streams.final(i)["result"]["completion_tokens"] == 120 for i in range(len(PROMPTS)))
    assert sum(r["num_preemptions"] for r in engine.stats()["replicas"]) == preempted  # moved, not preempted


def test_abort_ends_every_request_in_flight(engine, reference):
    streams = Streams(engine, "abort")
    engine.pause_generation()  # sglang's default mode: abort
    streams.join(30)
    assert all(streams.final(i)["finished"] and streams.final(i)["result"]["finish_reason"] == "abort"
               for i in range(len(PROMPTS)))
    assert engine.stats()["num_requests_inflight"] == 0 and engine.stats()["paused"]
    engine.continue_generation()
    assert [o["token_ids"] for o in engine.generate(PROMPTS, LONG, use_tqdm=False)] == reference


def test_bad_mode_is_refused_and_nothing_pauses(engine):
    with pytest.raises(ValueError, match="mode: must be one of"):
        engine.pause_generation(mode="sleep")
    assert not engine.stats()["paused"]


def test_abort_request(engine):
    streams = Streams(engine, "one")
    assert engine.abort_request("one-0") == 1
    assert engine.abort_request("no-such-request") == 0
    assert engine.abort_request(abort_all=True) >= len(PROMPTS) - 1
    streams.join(30)
    assert all(streams.final(i)["result"]["finish_reason"] == "abort" for i in range(len(PROMPTS)))
    with pytest.raises(ValueError, match="rid"):
        engine.abort_request()


def test_memory_occupation_tags(engine, reference):
    with pytest.raises(ValueError, match="tags"):
        engine.release_memory_occupation(["optimizer"])
    with pytest.raises(ValueError, match="tags"):
        engine.release_memory_occupation("weights")
    for tags in (["kv_cache"], ["weights", "kv_cache"], None):
        engine.release_memory_occupation(tags)
        assert engine.stats()["paused"] and engine.control._memory_released
        engine.resume_memory_occupation(tags)
        assert not engine.stats()["paused"]
    assert [o["token_ids"] for o in engine.generate(PROMPTS[:1], LONG, use_tqdm=False)] == reference[:1]


def test_memory_tags_map_onto_release_memory():
    from flotilla.rl.api import memory_tags

    assert memory_tags(None) and memory_tags(["weights"]) and memory_tags(["kv_cache", "weights"])
    assert not memory_tags(["kv_cache"]) and not memory_tags(["cuda_graph", "kv_cache"])
    for bad in ([], ["kv"], "kv_cache", 3):
        with pytest.raises(ValueError, match="tags"):
            memory_tags(bad)


def test_update_weights_from_tensor_plain(engine, reference):
    from test_weight_update import weights

    b = tiny("llama", seed=1)
    v = engine.get_weight_version()
    assert engine.update_weights_from_tensor(list(weights(b).items())) == v + 1
    expect_b = [hf_greedy(b, hf_tokenize(b, PROMPTS[0]), 12)]
    short = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o["token_ids"] for o in engine.generate(PROMPTS[:1], short, use_tqdm=False)] == expect_b
    with pytest.raises(ValueError, match="load_format"):
        engine.update_weights_from_tensor(list(weights(b).items()), load_format="flattened_bucket")
    with pytest.raises(ValueError, match="CUDA IPC"):  # handles on a CPU engine
        from flotilla.ipc.messages import IpcTensor

        engine.update_weights_from_tensor([IpcTensor("model.norm.weight", "float32", [64], [1], 0, 0, b"", 256, 0,
                                                     b"", 0, b"", False)], load_format="ipc")
    assert engine.update_weights_from_tensor(weights(tiny("llama", seed=0)), weight_version=v + 10) == v + 10
    assert engine.get_weight_version() == v + 10
    assert [o["token_ids"] for o in engine.generate(PROMPTS, LONG, use_tqdm=False)] == reference
