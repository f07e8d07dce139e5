"""Weight updates in place (issue 9): every replica and TP rank takes its shard of new weights without a
restart; bad updates are refused before anything is touched; pause/resume and memory release."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

N = 12
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ckpt():
    """Two tiny checkpoints of the same shapes (and tokenizer), different weights, and their greedy tokens."""
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    exp = {p: [hf_greedy(p, hf_tokenize(p, x), N) for x in PROMPTS] for p in (a, b)}
    assert exp[a] != exp[b]
    return a, b, exp


def weights(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def tokens(engine) -> list[list[int]]:
    return [o["token_ids"] for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def versions(engine) -> tuple[int, list[int]]:
    stats = engine.stats()
    return stats["weight_version"], [r["weight_version"] for r in stats["replicas"]]


def run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


@pytest.fixture(scope="module")
def dp_engine(ckpt):
    # overlap scheduling on: an update must wait for the step in flight (test_sharded_layouts runs without)
    with Engine(model=ckpt[0], dp_size=2, enable_overlap_schedule=True, **OPTS) as engine:
        yield engine


def test_update_while_a_step_is_in_flight(dp_engine, ckpt):
    """Not paused: the update lands between two steps of a running stream, which finishes whole."""
    a, b, exp = ckpt
    long = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    stream = dp_engine.stream(PROMPTS[0], long)
    first = next(stream)
    dp_engine.update_weights(weights(b))
    rest = list(stream)
    assert len(first["token_ids"]) + sum(len(d["token_ids"]) for d in rest) == 200
    assert tokens(dp_engine) == exp[b]
    assert dp_engine.stats()["num_requests_inflight"] == 0
    dp_engine.update_weights_from_disk(a)
    assert tokens(dp_engine) == exp[a]
    assert all(r["num_overlapped_steps"] > 0 for r in dp_engine.stats()["replicas"])


def test_update_to_b_and_back_to_a(dp_engine, ckpt):
    a, b, exp = ckpt
    assert tokens(dp_engine) == exp[a]
    v0, _ = versions(dp_engine)
    assert dp_engine.update_weights(weights(b)) == v0 + 1
    assert tokens(dp_engine) == exp[b]
    assert versions(dp_engine) == (v0 + 1, [v0 + 1, v0 + 1])
    assert all(r["num_steps"] > 0 for r in dp_engine.stats()["replicas"])  # both replicas served
    # an iterable of pairs in another dtype (converted to the engine's), then the checkpoint folder on disk
    assert dp_engine.update_weights((n, t.to(torch.float64)) for n, t in weights(a).items()) == v0 + 2
    assert tokens(dp_engine) == exp[a]
    assert dp_engine.update_weights_from_disk(b) == v0 + 3
    assert tokens(dp_engine) == exp[b]
    assert dp_engine.update_weights_from_disk(a, version=100) == 100
    assert tokens(dp_engine) == exp[a]
    assert versions(dp_engine) == (100, [100, 100])
    assert not dp_engine.stats()["paused"]


def test_bad_updates_are_refused_and_a_keeps_serving(dp_engine, ckpt, tmp_path):
    a, b, exp = ckpt
    good = weights(b)
    version = dp_engine.weight_version
    q = "model.layers.1.self_attn.q_proj.weight"
    bad_shape = dict(good, **{q: good[q][:32]})
    with pytest.raises(ValueError, match="q_proj"):
        dp_engine.update_weights(bad_shape)
    gate = "model.layers.2.mlp.gate_proj.weight"  # too big: a narrow alone would have taken a slice of it
    with pytest.raises(ValueError, match="gate_proj"):
        dp_engine.update_weights(dict(good, **{gate: torch.cat([good[gate], good[gate]])}))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.nope.weight"):
        dp_engine.update_weights(dict(good, **{"model.layers.0.self_attn.nope.weight": torch.zeros(4)}))
    with pytest.raises(ValueError, match="model.norm.weight"):
        dp_engine.update_weights(dict(good, **{"model.norm.weight": torch.ones(64, dtype=torch.int64)}))
    with pytest.raises(ValueError, match="model.norm.weight"):
        dp_engine.update_weights([("model.norm.weight", [1.0] * 64)])
    save_file(bad_shape, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="q_proj"):
        dp_engine.update_weights_from_disk(tmp_path)
    assert dp_engine.weight_version == version
    assert tokens(dp_engine) == exp[a]
    assert not dp_engine.stats()["paused"]
    assert not list(glob.glob(os.path.join(dp_engine._private_dir, "weights-*")))  # no stray update files


def test_pause_holds_new_requests_and_keeps_running_ones(dp_engine, ckpt):
    a, b, exp = ckpt
    long = SamplingParams(max_new_tokens=150, temperature=0.0, ignore_eos=True)
    stream = dp_engine.stream(PROMPTS[0], long)
    first = next(stream)
    dp_engine.pause()
    assert dp_engine.stats()["paused"]
    th, box = run_in_thread(lambda: tokens(dp_engine))
    th_held, held = run_in_thread(lambda: list(dp_engine.stream(PROMPTS[1], GREEDY, request_id="held-1")))
    time.sleep(0.5)
    steps = [r["num_steps"] for r in dp_engine.stats()["replicas"]]
    time.sleep(0.5)
    assert th.is_alive() and [r["num_steps"] for r in dp_engine.stats()["replicas"]] == steps
    # an update while paused stays paused; the held requests then run on the new weights
    dp_engine.update_weights(weights(b))
    assert dp_engine.stats()["paused"] and th.is_alive()
    assert dp_engine.abort("held-1")  # a held request ends in the front end, never reaching a replica
    th_held.join(10)
    assert held["result"][-1]["finish_reason"] == "abort" and not held["result"][-1]["token_ids"]
    dp_engine.resume()
    th.join(60)
    assert box.get("result") == exp[b], box
    rest = [d for d in stream]
    assert rest[-1]["finished"] and rest[-1]["result"]["completion_tokens"] == 150
    assert len(first["token_ids"]) + sum(len(d["token_ids"]) for d in rest) == 150
    assert dp_engine.stats()["num_requests_inflight"] == 0
    dp_engine.update_weights_from_disk(a)
    assert tokens(dp_engine) == exp[a]


def test_release_and_resume_memory(dp_engine, ckpt):
    a, _, exp = ckpt
    for offload_weights in (True, False):
        dp_engine.release_memory(weights=offload_weights)
        assert dp_engine.stats()["paused"]
        th, box = run_in_thread(lambda: tokens(dp_engine))
        time.sleep(0.3)
        assert th.is_alive()
        with pytest.raises(RuntimeError, match="resume_memory"):
            dp_engine.update_weights(weights(a))
        dp_engine.resume_memory()
        th.join(60)
        assert box.get("result") == exp[a], box
        assert not dp_engine.stats()["paused"]


@pytest.mark.parametrize("layout", [dict(tp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)],
                         ids=["tp2", "dp_attention"])
def test_sharded_layouts(ckpt, layout):
    """tp=2: fused q/k/v and gate/up sharded on every rank. DP attention: every rank of the one TP world
    applies the update in the same step, whichever leader got its message first."""
    a, b, exp = ckpt
    with Engine(model=a, **OPTS, **layout) as engine:
        assert tokens(engine) == exp[a]
        assert engine.update_weights(weights(b)) == 1
        assert tokens(engine) == exp[b]
        assert engine.update_weights_from_disk(a) == 2
        assert tokens(engine) == exp[a]
        engine.release_memory(weights=True)
        engine.resume_memory()
        assert tokens(engine) == exp[a]
        stats = engine.stats()
        assert [r["weight_version"] for r in stats["replicas"]] == [2] * layout.get("dp_size", 1)


def test_restarted_replica_replays_the_updates(ckpt):
    a, b, exp = ckpt
    with Engine(model=a, **OPTS) as engine:
        head = {k: v for k, v in weights(b).items() if ".layers." not in k}
        engine.update_weights(weights(b))
        engine.update_weights(head)  # partial: replayed after the full one
        pid = engine.stats()["replicas"][0]["pids"][0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reps = engine.stats()["replicas"]
            if engine.healthy() and reps and reps[0]["pids"] and reps[0]["pids"][0] != pid:
                break
            time.sleep(0.2)
        assert tokens(engine) == exp[b]
        assert versions(engine) == (2, [2])


# ---------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_updates_from_object_refs(ray_cluster, ckpt):
    from flotilla.frontend.ray_engine import RayEngine

    ray = ray_cluster
    a, b, exp = ckpt
    with RayEngine(model=a, dp_size=2, **OPTS) as engine:
        assert tokens(engine) == exp[a]
        q = "model.layers.0.self_attn.q_proj.weight"
        bad = dict(weights(b))
        bad[q] = bad[q][:, :32]
        with pytest.raises(ValueError, match="q_proj"):
            engine.update_weights_from_refs([ray.put(bad)])
        assert tokens(engine) == exp[a] and engine.weight_version == 0
        # tensors split over two refs: a dict and a list of pairs
        items = list(weights(b).items())
        refs = [ray.put(dict(items[:10])), ray.put(items[10:])]
        assert engine.update_weights_from_refs(refs) == 1
        assert tokens(engine) == exp[b]
        assert versions(engine) == (1, [1, 1])
        assert engine.update_weights(weights(a)) == 2
        assert tokens(engine) == exp[a]
