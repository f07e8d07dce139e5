"""Ray Data batch inference on a local CPU Ray cluster: 200 rows through two engines keep their input columns
(an id, nested metadata) and give the offline engine's greedy tokens row for row; a failing row fails the dataset with its error, or gets the error column; the config
is validated at the edge, naming the field."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from conftest import PROMPTS, tiny  # noqa: E402
from flotilla.integrations.ray_data import (ERROR_COLUMN, FlotillaProcessorConfig, build_processor,  # noqa: E402
                                            row_input, sampling_of)

N = 6
OPTS = dict(device="cpu", dtype="float32", kv_cache_tokens=4096, max_num_seqs=64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_cluster():
    # the actors import flotilla from this checkout, whatever is installed, and this module (its pre/post functions)
    path = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def _prompt(i: int) -> str:
    return f"{i} {PROMPTS[i % len(PROMPTS)]}"


def _pre(row):
    """Returns only what the engine needs: the input's id and metadata columns are carried without it."""
    return {"prompt": _prompt(row["id"]), "sampling_params": {"max_tokens": N, "temperature": 0.0, "ignore_eos": True}}


def _meta(i: int) -> dict:
    return {"source": f"shard-{i % 3}", "tags": [f"t{i}", "x"], "spans": [[i, i + 1], [0]], "inner": {"k": i}}


def _post(row):
    """Reads columns the input carried (as in ray.data.llm: ``row["id"]``) beside the generated ones."""
    return {"id": row["id"], "metadata": row["metadata"], "tokens": row["generated_token_ids"],
            "text": row["generated_text"], "prompt": row["prompt"], "num_input_tokens": row["num_input_tokens"],
            "n": row["num_generated_tokens"]}


def test_200_rows_two_engines_keep_input_columns_and_match_offline_greedy(ray_cluster):
    from flotilla import Engine, SamplingParams

    path = tiny("llama")
    rows = 200
    config = FlotillaProcessorConfig(model_source=path, engine_kwargs=OPTS, concurrency=2, batch_size=16,
                                     max_concurrent_batches=2)
    processor = build_processor(config, preprocess=_pre, postprocess=_post)
    # "prompt" and "generated_text" clash with preprocess's and the engine's columns: theirs win
    items = [{"id": i, "metadata": _meta(i), "prompt": "stale", "generated_text": "stale"} for i in range(rows)]
    before = _alive()
    out = processor(ray.data.from_items(items)).take_all()
    with Engine(model=path, **OPTS) as engine:
        offline = engine.generate([_prompt(i) for i in range(rows)],
                                  SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True), use_tqdm=False)
    by_id = {r["id"]: r for r in out}
    assert len(out) == rows and sorted(by_id) == list(range(rows))
    for i in range(rows):
        got = by_id[i]
        assert got["metadata"] == _meta(i), i  # nested lists and dicts pass through unchanged
        assert list(got["tokens"]) == offline[i]["token_ids"], i
        assert got["text"] == offline[i]["text"]
        assert got["num_input_tokens"] == offline[i]["prompt_tokens"]
        assert got["n"] == N
        assert got["prompt"] == _prompt(i)
    assert _new_leftovers(before) == set()  # the engines' ranks and groups went with their actors


def test_docs_snippet_carries_id_and_metadata(ray_cluster, monkeypatch):
    """examples/snippets/ray_data_columns.py, as docs/ray.md shows it, run in this module's cluster."""
    import runpy

    monkeypatch.setenv("MODEL", tiny("llama"))
    rows = runpy.run_path(os.path.join(ROOT, "examples", "snippets", "ray_data_columns.py"))["rows"]
    assert sorted(r["id"] for r in rows) == list(range(8))
    for r in rows:
        assert set(r) == {"id", "meta", "answer"} and r["meta"] == {"source": "demo", "tags": [str(r["id"])]}
        assert isinstance(r["answer"], str)


def test_preprocess_output_is_merged_over_the_row():
    from flotilla.integrations.ray_data import KeepColumns

    keep = KeepColumns(lambda row: {"prompt": "p", "id": 7})
    assert keep({"id": 1, "meta": {"a": [1]}}) == {"id": 7, "meta": {"a": [1]}, "prompt": "p"}
    with pytest.raises(ValueError, match="preprocess"):
        KeepColumns(lambda row: "p")({"id": 1})


def _alive() -> set[str]:
    """Named actors of any engine (ranks, group holders) still alive, and placement groups not removed."""
    actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("flotilla-")}
    return actors | {p["placement_group_id"] for p in ray.util.placement_group_table().values()
                     if p["state"] != "REMOVED"}


def _new_leftovers(before: set[str], timeout: float = 60.0) -> set[str]:
    """What this test's engines left behind, once their actors had ``timeout`` seconds to go."""
    import time

    deadline = time.monotonic() + timeout
    while (left := _alive() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _bad_pre(row):
    i = row["id"]
    if i == 3:  # a bad sampling parameter, caught by the engine's validation
        return {"id": i, "prompt": "x", "sampling_params": {"max_tokens": N, "temperature": -1.0}}
    if i == 4:  # messages on input_ids-only rows are fine; two inputs are not
        return {"id": i, "prompt": "x", "input_ids": [1, 2, 3], "sampling_params": {"max_tokens": N}}
    return {"id": i, "input_ids": [1 + i, 2, 3], "sampling_params": {"max_new_tokens": N, "temperature": 0.0}}


def _one_bad_pre(row):
    """Only row 3 is bad (the blocks of range(6) may become several batches: which bad row fails first would
    depend on timing)."""
    return _bad_pre(row) if row["id"] == 3 else _bad_pre({"id": 0})


def test_failed_row_raises_with_its_error(ray_cluster):
    config = FlotillaProcessorConfig(model_source=tiny("llama"), engine_kwargs=OPTS, batch_size=8)
    with pytest.raises(Exception, match="temperature") as info:
        build_processor(config, preprocess=_one_bad_pre)(ray.data.range(6)).take_all()
    assert "of its batch failed: ValueError: temperature" in str(info.value)


def test_continue_on_error_fills_the_error_column(ray_cluster):
    config = FlotillaProcessorConfig(model_source=tiny("llama"), engine_kwargs=OPTS, batch_size=8,
                                     should_continue_on_error=True)
    before = _alive()
    out = {r["id"]: r for r in build_processor(config, preprocess=_bad_pre)(ray.data.range(6)).take_all()}
    assert sorted(out) == list(range(6))
    assert _new_leftovers(before) == set()
    assert "temperature" in out[3][ERROR_COLUMN] and out[3]["generated_token_ids"] is None
    assert "exactly one of prompt, messages or input_ids" in out[4][ERROR_COLUMN]
    for i in (0, 1, 2, 5):
        assert out[i][ERROR_COLUMN] is None
        assert out[i]["num_generated_tokens"] >= 1 and out[i]["num_input_tokens"] == 3


@pytest.mark.parametrize("kwargs, field", [
    (dict(model_source=""), "model_source"),
    (dict(engine_kwargs={"tp_sise": 2}), "engine_kwargs"),
    (dict(engine_kwargs={"dtype": "int3"}), "engine_kwargs"),
    (dict(concurrency=0), "concurrency"),
    (dict(concurrency=(3, 2)), "concurrency"),
    (dict(concurrency=(1, 2, 3)), "concurrency"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_concurrent_batches=True), "max_concurrent_batches"),
    (dict(launcher="slurm"), "launcher"),
    (dict(ray_remote_args={"max_concurrency": 4}), "max_concurrent_batches"),
    (dict(runtime_env="env"), "runtime_env"),
    (dict(ray_remote_args={"runtime_env": {}}), "runtime_env"),
    (dict(should_continue_on_error="yes"), "should_continue_on_error"),
])
def test_config_is_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FlotillaProcessorConfig(**{"model_source": "/m", **kwargs})


def test_actor_resources_and_row_helpers():
    mp = FlotillaProcessorConfig(model_source="/m", engine_kwargs={"device": "cuda", "tp_size": 2, "dp_size": 2},
                                 launcher="mp", max_concurrent_batches=3)
    assert mp.ranks == 4
    assert mp.actor_options(False) == {"num_cpus": 1, "num_gpus": 4}
    pool = mp.compute()
    assert (pool.min_size, pool.max_size, pool.max_concurrent_calls_per_actor) == (1, 1, 3)
    ray_cfg = FlotillaProcessorConfig(model_source="/m", engine_kwargs={"tp_size": 2},
                                      ray_remote_args={"num_cpus": 0.5})
    assert ray_cfg.actor_options(True) == {"num_cpus": 0.5}  # the engine's own placement group holds the GPUs
    assert ray_cfg.resolved(True).engine_kwargs == {"tp_size": 2, "device": "cuda"}  # decided in the driver
    assert mp.resolved(False) is mp
    auto = FlotillaProcessorConfig(model_source="/m", concurrency=[1, 3])
    assert auto.concurrency == (1, 3) and (auto.compute().min_size, auto.compute().max_size) == (1, 3)
    assert sampling_of({"sampling_params": {"max_tokens": 5, "seed": None, "stop": ("a",)}}) == \
        {"max_new_tokens": 5, "stop": ["a"]}
    with pytest.raises(ValueError, match="both set"):
        sampling_of({"sampling_params": {"max_tokens": 5, "max_new_tokens": 6}})
    with pytest.raises(ValueError, match="sampling_params"):
        sampling_of({"sampling_params": "greedy"})
    with pytest.raises(ValueError, match="exactly one"):
        row_input({}, None)
    with pytest.raises(ValueError, match="build_processor|config"):
        build_processor({"model_source": "/m"})
    with pytest.raises(ValueError, match="preprocess"):
        build_processor(ray_cfg, preprocess="lower")


def test_messages_use_the_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny("llama"))
    msgs = [{"role": "user", "content": "Hello"}]
    prompt, ids = row_input({"messages": msgs}, tok)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt is None and ids == list(tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="messages"):
        row_input({"messages": []}, tok)


def test_held_group_goes_when_heartbeats_stop_or_cannot_be_placed(ray_cluster):
    from flotilla.integrations.group_holder import HeldGroup, rank_bundles

    before = _alive()
    with pytest.raises(RuntimeError, match="placement_group"):
        HeldGroup([{"CPU": 64.0}], ready_timeout_s=2)
    held = HeldGroup(rank_bundles(1, False, 1.0), timeout_s=3)
    assert ray.util.placement_group_table(held.pg)["state"] == "CREATED"
    held._stop.set()  # what a killed user looks like to the holder: no more heartbeats, no release
    assert _new_leftovers(before, timeout=30) == set()
    assert rank_bundles(2, True, 0.5) == [{"CPU": 1.0, "GPU": 0.5}] * 2
