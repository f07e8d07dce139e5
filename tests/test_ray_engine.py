"""RayEngine on CPU: the same tokens as Engine, placement groups created or borrowed, and clean teardown."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny  # noqa: E402
from flotilla import SamplingParams  # noqa: E402
from flotilla.launch.ray import check_bundle_indices, plan_slots  # noqa: E402
from flotilla.frontend.ray_engine import RayEngine  # noqa: E402

N = 16
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)
OPTS = dict(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def expected(path):
    return [hf_greedy(path, hf_tokenize(path, p), N) for p in PROMPTS]


def _check_lora(engine) -> None:
    """Base + two adapters mixed, against transformers on PEFT's merged models (tests/test_lora.py)."""
    from test_lora import _expected, _prompts, _sp, adapter

    engine.load_lora_adapter("qv", adapter("llama", "qv"))
    items = [(ids, lo) for ids in _prompts("llama") for lo in (None, "full", "qv")]
    outs = engine.generate(input_ids=[i for i, _ in items], sampling_params=[_sp(lo) for _, lo in items],
                           use_tqdm=False)
    assert [r["name"] for r in engine.list_lora_adapters()] == ["full", "qv"]
    for (ids, lo), out in zip(items, outs):
        assert out["token_ids"] == _expected("llama", lo, ids), lo


def _no_leftovers():
    """Named actors of any Flotilla engine still alive, and placement groups not removed."""
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("flotilla-")]
    pgs = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
    return alive, pgs


@pytest.mark.parametrize("layout", [dict(dp_size=2), dict(tp_size=2), dict(tp_size=2, dp_size=2, enable_lora=True),
                                    dict(tp_size=2, dp_size=2, enable_dp_attention=True),
                                    dict(tp_size=2, enable_overlap_schedule=True)])
def test_driver_created_group_matches_transformers(ray_cluster, layout):
    path = tiny("llama")
    lora = {}
    if layout.get("enable_lora"):  # every rank actor holds the adapters (one from lora_modules, one loaded after)
        pytest.importorskip("peft")
        from test_lora import adapter

        lora = dict(max_lora_rank=16, lora_modules={"full": adapter("llama", "full")})
    with RayEngine(model=path, **OPTS, **layout, **lora) as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = engine.stats()
        if lora:
            _check_lora(engine)
    assert [o["token_ids"] for o in outs] == expected(path)
    assert len(stats["replicas"]) == layout.get("dp_size", 1)
    if layout.get("enable_overlap_schedule"):  # the rank actors fed each step from the one before
        assert all(r["num_overlapped_steps"] > 0 for r in stats["replicas"])
    alive, pgs = _no_leftovers()
    assert not alive and not pgs


@pytest.mark.parametrize("layout", [dict(dp_size=2, tp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)],
                         ids=["dp2xtp2", "dp_attention"])
def test_engine_inside_an_actor_on_callers_group(ray_cluster, layout):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    path = tiny("llama")
    pg = placement_group([{"CPU": 3}, {"CPU": 2}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)

    @ray.remote(num_cpus=1)
    class Trainer:
        def generate(self, path, prompts, layout):
            from flotilla.frontend.ray_engine import RayEngine as RE

            with RE(model=path, device="cpu", dtype="float32", **layout) as eng:
                return [o["token_ids"] for o in eng.generate(prompts, GREEDY, use_tqdm=False)], \
                    eng._launcher.pg.id.hex()

    trainer = Trainer.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
    tokens, used_pg = ray.get(trainer.generate.remote(path, PROMPTS, layout), timeout=240)
    assert tokens == expected(path)
    assert used_pg == pg.id.hex()
    ray.kill(trainer)
    remove_placement_group(pg)


def test_bundle_indices_validation_and_infeasible_group(ray_cluster):
    from ray.util.placement_group import placement_group, remove_placement_group

    path = tiny("llama")
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)
    with pytest.raises(ValueError, match="bundle_indices"):
        RayEngine(model=path, dp_size=2, placement_group=pg, bundle_indices=[0, 0], **OPTS)
    with pytest.raises(ValueError, match="bundle_indices"):
        RayEngine(model=path, dp_size=2, placement_group=pg, bundle_indices=[0, 5], **OPTS)
    with pytest.raises(ValueError, match="placement_group"):
        RayEngine(model=path, dp_size=2, placement_group=pg, bundle_indices=[1], **OPTS)
    with RayEngine(model=path, dp_size=2, placement_group=pg, bundle_indices=[1, 0], **OPTS) as engine:
        assert engine.generate(["Hello"], GREEDY, use_tqdm=False)[0]["completion_tokens"] == N
    assert ray.util.placement_group_table(pg)["state"] == "CREATED"  # the caller's group is never removed
    remove_placement_group(pg)
    with pytest.raises(RuntimeError, match="placement_group"):
        RayEngine(model=path, dp_size=64, placement_timeout_s=3, **OPTS)
    alive, pgs = _no_leftovers()
    assert not alive and not pgs


def test_gpus_per_rank_is_validated_before_anything_starts():
    path = tiny("llama")
    for bad in (0, -0.5, 1.5, True, "half"):
        with pytest.raises(ValueError, match="gpus_per_rank"):
            RayEngine(model=path, gpus_per_rank=bad, **OPTS)
    # a fraction of a GPU is for one-rank replicas: NCCL cannot run two ranks of one TP group on one device
    for layout in (dict(tp_size=2), dict(pp_size=2), dict(tp_size=2, dp_size=2, enable_dp_attention=True)):
        with pytest.raises(ValueError, match="gpus_per_rank: 0.5 puts ranks of one TP/PP group on one GPU"):
            RayEngine(model=path, device="cuda", gpus_per_rank=0.5, **layout)
    assert not ray.is_initialized() or not _no_leftovers()[0]


def test_actor_death_fails_requests_quickly(ray_cluster):
    import time

    from flotilla import RequestFailed

    path = tiny("llama")
    with RayEngine(model=path, dp_size=1, max_replica_restarts=0, **OPTS) as engine:  # no failover to hide it
        stream = engine.stream("Hello", SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True))
        next(stream)
        ray.kill(engine._launcher._groups[0]["actors"][0])
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match="died"):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 10


def test_plan_slots_packs_in_order():
    bundles = [{"CPU": 2}, {"CPU": 1, "GPU": 2}, {"CPU": 4, "GPU": 1}]
    assert plan_slots(bundles, [0, 2], 5, use_gpu=False, gpus_per_rank=1, held={0: 1}) == [0, 2, 2, 2, 2]
    assert plan_slots(bundles, [1, 2], 3, use_gpu=True, gpus_per_rank=1, held={}) == [1, 1, 2]
    assert plan_slots(bundles, [2], 2, use_gpu=True, gpus_per_rank=0.5, held={}) == [2, 2]
    with pytest.raises(ValueError, match="placement_group"):
        plan_slots(bundles, [1], 3, use_gpu=True, gpus_per_rank=1, held={})
    assert check_bundle_indices(None, 3) == [0, 1, 2]
    for bad in ([0, 0], [3], [-1], "0"):
        with pytest.raises(ValueError, match="bundle_indices"):
            check_bundle_indices(bad, 3)

