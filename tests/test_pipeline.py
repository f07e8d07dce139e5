"""Pipeline parallelism: layer partition and validation, the scheduler's in-flight exclusion, greedy tokens equal
to transformers' for pp alone and composed with TP and DP (mp launcher and Ray), and every stage kept busy
by micro-batches."""

from __future__ import annotations

import pytest

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams
from flotilla.config import EngineConfig
from flotilla.distributed.pipeline import partition_layers
from flotilla.launch.topology import layout, world_size

N = 12
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


def expected(path, n=N):
    return [hf_greedy(path, hf_tokenize(path, p), n) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------- pure functions
def test_partition_layers():
    assert partition_layers(4, 2) == [(0, 2), (2, 4)]
    assert partition_layers(5, 2) == [(0, 3), (3, 5)]
    assert partition_layers(4, 2, [3, 1]) == [(0, 3), (3, 4)]
    assert partition_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="pp_size"):
        partition_layers(2, 3)
    with pytest.raises(ValueError, match="pp_layer_partition"):
        partition_layers(4, 2, [2, 1])


def test_layout_with_pp():
    specs = layout(tp_size=2, dp_size=2, enable_dp_attention=False, pp_size=2)
    got = [(s.world_size, s.attn_tp_size, s.first_global_rank, s.pp_size) for s in specs]
    assert got == [(4, 2, 0, 2), (4, 2, 4, 2)]
    assert [specs[1].replica_of_rank(r) for r in range(4)] == [1, 1, 1, 1]
    assert world_size(2, 2, False, 2) == 8
    with pytest.raises(ValueError, match="pp_size"):
        layout(2, 2, True, 2)


def test_validation_names_the_field():
    path = tiny("llama")  # 4 decoder layers
    with pytest.raises(ValueError, match="pp_size"):
        EngineConfig(model=path, pp_size=5, **OPTS).resolve()
    with pytest.raises(ValueError, match="pp_layer_partition"):
        EngineConfig(model=path, pp_size=2, pp_layer_partition=[2, 1], **OPTS).resolve()
    with pytest.raises(ValueError, match="pp_layer_partition"):
        EngineConfig(model=path, pp_size=2, pp_layer_partition=[4], **OPTS)
    with pytest.raises(ValueError, match="pp_layer_partition"):
        EngineConfig(model=path, pp_size=2, pp_layer_partition=[4, 0], **OPTS)
    with pytest.raises(ValueError, match="pp_size"):
        EngineConfig(model=path, pp_size=2, tp_size=2, dp_size=2, enable_dp_attention=True, **OPTS)
    with pytest.raises(ValueError, match="pp_size"):
        EngineConfig(model=path, pp_size=0, **OPTS)


def test_scheduler_excludes_sequences_in_flight():
    from flotilla.sampling import SamplingParams as SP
    from flotilla.worker.kv_cache import KVBlockManager
    from flotilla.worker.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(16, 1024, 256, (0,)), KVBlockManager(64, 4))
    for i in range(4):
        sched.add(f"r{i}", [1, 2, 3], SP(max_new_tokens=4))
    first = sched.schedule(max_seqs=2)
    assert [s.rid for s in first.seqs] == ["r0", "r1"]
    second = sched.schedule(exclude={"r0", "r1"}, max_seqs=2)
    assert [s.rid for s in second.seqs] == ["r2", "r3"]
    assert sched.schedule(exclude={"r0", "r1", "r2", "r3"}) is None
    sched.abort("r1")  # aborted while in flight: the other rows still get their own tokens
    outs = sched.process(first, [7, 8])
    assert [(o.rid, o.token_ids) for o in outs if o.token_ids] == [("r0", [7])]


# ---------------------------------------------------------------------------------------------- engines
@pytest.mark.parametrize("arch,overrides,parallel", [
    ("llama", {}, dict(pp_size=2)),
    ("qwen3_moe", {}, dict(pp_size=2, tp_size=2)),
    ("llama", {}, dict(pp_size=2, dp_size=2, load_balance="shortest_queue")),
    # tied embeddings: the last stage's LM head loads the embedding matrix; an uneven partition
    ("llama", {"tie_word_embeddings": True}, dict(pp_size=2, pp_layer_partition=[3, 1])),
])
def test_pipeline_matches_transformers(arch, overrides, parallel):
    path = tiny(arch, **overrides)
    with Engine(model=path, **OPTS, **parallel) as engine:
        outs = engine.generate(PROMPTS * 2, GREEDY, use_tqdm=False)
        stats = engine.stats()
    assert [o["token_ids"] for o in outs] == expected(path) * 2
    dp = parallel.get("dp_size", 1)
    assert len(stats["replicas"]) == dp
    ranks = dp * parallel["pp_size"] * parallel.get("tp_size", 1)
    assert len({pid for r in stats["replicas"] for pid in r["pids"]}) == ranks
    for r in stats["replicas"]:
        assert len(r["stage_forwards"]) == parallel["pp_size"] and min(r["stage_forwards"]) > 0


def test_micro_batches_keep_every_stage_busy():
    path = tiny("llama")
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]  # 12 sequences: several per micro-batch
    with Engine(model=path, pp_size=2, **OPTS) as engine:
        outs = engine.generate(prompts, GREEDY, use_tqdm=False)
        rep = engine.stats()["replicas"][0]
    assert [o["token_ids"] for o in outs] == [hf_greedy(path, hf_tokenize(path, p), N) for p in prompts]
    assert rep["max_in_flight"] == 2
    # each stage ran several forwards, and more than N (one token per forward would need only N with one
    # micro-batch of everything): the batch was split into micro-batches in flight together
    assert all(f > N for f in rep["stage_forwards"]), rep["stage_forwards"]


def test_weight_update_flows_down_the_pipeline():
    a, b = tiny("llama"), tiny("llama", seed=1)
    with Engine(model=a, pp_size=2, **OPTS) as engine:
        assert engine.update_weights_from_disk(b) == 1
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected(b)


# ---------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_pipeline(ray_cluster):
    from flotilla.frontend.ray_engine import RayEngine

    path = tiny("llama")
    with RayEngine(model=path, pp_size=2, **OPTS) as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        rep = engine.stats()["replicas"][0]
    assert [o["token_ids"] for o in outs] == expected(path)
    assert len(rep["stage_forwards"]) == 2 and min(rep["stage_forwards"]) > 0
