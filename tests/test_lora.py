"""LoRA adapters end to end (issue 30; docs/lora.md): random PEFT adapters built with ``peft`` on the tiny
checkpoints, the engine's greedy tokens against transformers on PEFT's merged model, mixed batches against
each request alone, TP=2 x dp=2 against TP=1, updates and unloads under load, and bad input."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla.errors import InvalidParameter

pytest.importorskip("peft")

N = 10
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (seed, rank, targets, use_rslora): one on every projection, one on q/v only, one rsLoRA of rank 16
ADAPTERS = {"full": (1, 8, ALL, False), "qv": (2, 4, ["q_proj", "v_proj"], False),
            "rs": (3, 16, ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], True)}


def _peft_model(path: str, seed: int, rank: int, targets: list[str], rslora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0,
                                          use_rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_parameters():
        if "lora_" in name:  # B starts at zero in PEFT: random A and B make the adapter change the output
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return pm


@functools.lru_cache(maxsize=None)
def adapter(arch: str, name: str) -> str:
    """The adapter's PEFT folder (built once per session)."""
    import tempfile

    path = tiny(arch)
    seed, rank, targets, rslora = ADAPTERS[name]
    out = Path(tempfile.mkdtemp(prefix=f"lora-{arch}-{name}-"))
    _peft_model(path, seed, rank, targets, rslora).save_pretrained(str(out))
    return str(out)


@functools.lru_cache(maxsize=None)
def _merged(arch: str, name: str):
    seed, rank, targets, rslora = ADAPTERS[name]
    return _peft_model(tiny(arch), seed, rank, targets, rslora).merge_and_unload().eval()


@functools.lru_cache(maxsize=None)
def merged_greedy(arch: str, name: str, prompt: tuple[int, ...], n: int) -> list[int]:
    """transformers' greedy tokens on the adapter merged into the base weights (PEFT's merge_and_unload)."""
    model = _merged(arch, name)
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _sp(lora: str | None, n: int = N) -> dict:
    return {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True, "lora_name": lora}


def _prompts(arch: str) -> list[list[int]]:
    return [hf_tokenize(tiny(arch), p) for p in PROMPTS[:3]]


def _expected(arch: str, lora: str | None, ids: list[int], n: int = N) -> list[int]:
    return hf_greedy(tiny(arch), ids, n) if lora is None else merged_greedy(arch, lora, tuple(ids), n)


@pytest.fixture(scope="module")
def engine():
    """One replica, two LoRA slots for three adapters (requests of the third wait for a slot)."""
    from flotilla import Engine

    with Engine(model=tiny("llama"), device="cpu", dtype="float32", enable_lora=True, max_loras=2,
                max_lora_rank=16) as e:
        for name in ADAPTERS:
            e.load_lora_adapter(name, adapter("llama", name))
        yield e


def test_each_adapter_equals_transformers_on_the_merged_model(engine):
    ids = _prompts("llama")[0]
    for name in ADAPTERS:
        out = engine.generate(input_ids=[ids], sampling_params=_sp(name), use_tqdm=False)[0]
        assert out["token_ids"] == _expected("llama", name, ids), name
    # and an adapter does change the output (the comparison above could not pass with the base model's tokens)
    assert merged_greedy("llama", "full", tuple(ids), N) != hf_greedy(tiny("llama"), ids, N)


def test_a_mixed_batch_of_base_and_three_adapters_equals_each_alone(engine):
    prompts = _prompts("llama")
    loras = [None, "full", "qv", "rs"]
    items = [(ids, lora) for ids in prompts for lora in loras]  # 12 requests in one call, three adapters > 2 slots
    outs = engine.generate(input_ids=[i for i, _ in items], sampling_params=[_sp(lo) for _, lo in items],
                           use_tqdm=False)
    for (ids, lora), out in zip(items, outs):
        assert out["token_ids"] == _expected("llama", lora, ids), lora
    rows = engine.list_lora_adapters()
    assert [r["name"] for r in rows] == list(ADAPTERS) and {r["rank"] for r in rows} == {8, 4, 16}
    assert [r["name"] for r in engine.stats().lora_adapters] == list(ADAPTERS)


def test_the_prefix_cache_never_shares_kv_across_adapters(engine):
    ids = hf_tokenize(tiny("llama"), " ".join(PROMPTS) * 2)  # several full pages
    first = engine.generate(input_ids=[ids], sampling_params=_sp("full"), use_tqdm=False)[0]
    other = engine.generate(input_ids=[ids], sampling_params=_sp("qv"), use_tqdm=False)[0]
    again = engine.generate(input_ids=[ids], sampling_params=_sp("full"), use_tqdm=False)[0]
    base = engine.generate(input_ids=[ids], sampling_params=_sp(None), use_tqdm=False)[0]
    assert other["cached_tokens"] == 0 and base["cached_tokens"] == 0  # another adapter's KV is never matched
    assert again["cached_tokens"] >= 16  # the same adapter's is
    assert first["token_ids"] == again["token_ids"] == _expected("llama", "full", ids)
    assert other["token_ids"] == _expected("llama", "qv", ids)
    assert base["token_ids"] == _expected("llama", None, ids)


def test_bad_input_names_the_field_and_disturbs_nothing(engine, tmp_path):
    ids = _prompts("llama")[0]
    with pytest.raises(InvalidParameter, match="lora_name") as info:
        engine.generate(input_ids=[ids], sampling_params=_sp("nope"), use_tqdm=False)
    assert "full" in str(info.value)  # the loaded adapters are named
    with pytest.raises(InvalidParameter, match="lora_name"):
        engine.load_lora_adapter("full", adapter("llama", "qv"))  # a name taken
    with pytest.raises(InvalidParameter, match="lora_path.*max_lora_rank"):
        engine.load_lora_adapter("big", _with_config(tmp_path / "big", adapter("llama", "full"), r=32))
    with pytest.raises(InvalidParameter, match="lora_path.*embed_tokens"):
        engine.load_lora_adapter("emb", _with_config(tmp_path / "emb", adapter("llama", "full"),
                                                     target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(InvalidParameter, match="lora_path.*use_dora"):
        engine.load_lora_adapter("dora", _with_config(tmp_path / "dora", adapter("llama", "full"), use_dora=True))
    with pytest.raises(InvalidParameter, match="lora_path"):
        engine.load_lora_adapter("missing", str(tmp_path / "no-such-folder"))
    with pytest.raises(InvalidParameter, match="lora_name"):
        engine.unload_lora_adapter("nope")
    with pytest.raises(InvalidParameter, match="named_tensors.*missing"):
        engine.update_lora_weights("full", {})
    assert [r["name"] for r in engine.list_lora_adapters()] == list(ADAPTERS)
    out = engine.generate(input_ids=[ids], sampling_params=_sp("full"), use_tqdm=False)[0]
    assert out["token_ids"] == _expected("llama", "full", ids) and engine.healthy()


def _with_config(dst: Path, src: str, **changes) -> str:
    """A copy of adapter ``src`` with its config changed."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return str(dst)


def _adapter_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_update_and_unload_under_load(engine, tmp_path):
    """Requests of the base model and of two adapters run throughout; one adapter's weights are replaced (its
    version goes up; its later requests run the new weights), another is unloaded once its requests are done.
    Every request completes, each with the tokens of the weights it ran with."""
    from peft import LoraConfig, get_peft_model  # noqa: F401  (built by _peft_model)

    prompts = _prompts("llama")
    # new weights for "qv": another seed, same rank and targets
    seed, rank, targets, rslora = ADAPTERS["qv"]
    new = _peft_model(tiny("llama"), 99, rank, targets, rslora)
    new.save_pretrained(str(tmp_path / "qv2"))
    new_tensors = _adapter_tensors(str(tmp_path / "qv2"))
    merged = new.merge_and_unload().eval()
    errors: list[BaseException] = []
    results: list[tuple[str | None, list[int], list[int]]] = []
    stop = threading.Event()

    def load(lora: str | None) -> None:
        try:
            while not stop.is_set():
                for ids in prompts:
                    out = engine.generate(input_ids=[ids], sampling_params=_sp(lora, 6), use_tqdm=False)[0]
                    results.append((lora, ids, out["token_ids"]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load, args=(lora,)) for lora in (None, "full")]
    for t in threads:
        t.start()
    try:
        version = engine.update_lora_weights("qv", new_tensors)
        assert version == 2
        row = next(r for r in engine.list_lora_adapters() if r["name"] == "qv")
        assert row["version"] == 2 and row["path"] == adapter("llama", "qv")
        ids = prompts[0]
        out = engine.generate(input_ids=[ids], sampling_params=_sp("qv"), use_tqdm=False)[0]
        t_ids = torch.tensor([ids])
        with torch.no_grad():
            want = merged.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=N, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out["token_ids"] == want and want != _expected("llama", "qv", ids)
        engine.unload_lora_adapter("rs")
        assert "rs" not in [r["name"] for r in engine.list_lora_adapters()]
        with pytest.raises(InvalidParameter, match="lora_name"):
            engine.generate(input_ids=[ids], sampling_params=_sp("rs"), use_tqdm=False)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    assert {lo for lo, _, _ in results} == {None, "full"} and len(results) >= 6
    for lora, ids, toks in results:  # the base weights and "full" were never touched
        assert toks == _expected("llama", lora, ids, 6), lora
    # put the module's engine back as the other tests found it
    engine.load_lora_adapter("rs", adapter("llama", "rs"))
    engine.update_lora_weights("qv", _adapter_tensors(adapter("llama", "qv")))
    out = engine.generate(input_ids=[prompts[1]], sampling_params=_sp("qv"), use_tqdm=False)[0]
    assert out["token_ids"] == _expected("llama", "qv", prompts[1])


def test_tp2_dp2_equals_tp1_with_adapters_loaded_at_start_and_at_run_time():
    """Every rank of every replica holds the adapters: two from ``lora_modules`` (loaded as the ranks start),
    one loaded while serving; TP shards A and B like the base layers (Qwen3: q/k norms, its own head layout)."""
    from flotilla import Engine

    arch = "qwen3"
    prompts = _prompts(arch)
    with Engine(model=tiny(arch), device="cpu", dtype="float32", tp_size=2, dp_size=2, enable_lora=True,
                max_lora_rank=16, lora_modules={"full": adapter(arch, "full"), "qv": adapter(arch, "qv")}) as e:
        e.load_lora_adapter("rs", adapter(arch, "rs"))
        items = [(ids, lora) for ids in prompts for lora in (None, "full", "qv", "rs")]
        outs = e.generate(input_ids=[i for i, _ in items], sampling_params=[_sp(lo) for _, lo in items],
                          use_tqdm=False)
        for (ids, lora), out in zip(items, outs):
            assert out["token_ids"] == _expected(arch, lora, ids), lora


def test_an_engine_without_lora_refuses_adapters_naming_the_field(llama_dp1_engine):
    ids = _prompts("llama")[0]
    with pytest.raises(InvalidParameter, match="lora_name"):
        llama_dp1_engine.generate(input_ids=[ids], sampling_params=_sp("full"), use_tqdm=False)
    with pytest.raises(InvalidParameter, match="enable_lora"):
        llama_dp1_engine.load_lora_adapter("full", adapter("llama", "full"))
    assert llama_dp1_engine.list_lora_adapters() == []


def test_pipeline_stages_each_hold_their_layers_of_the_adapters():
    """pp_size=2: each stage reads and serves the adapter's tensors of its own layers only."""
    from flotilla import Engine

    prompts = _prompts("llama")
    with Engine(model=tiny("llama"), device="cpu", dtype="float32", pp_size=2, enable_lora=True, max_lora_rank=16,
                lora_modules={"full": adapter("llama", "full")}) as e:
        e.load_lora_adapter("rs", adapter("llama", "rs"))
        items = [(ids, lora) for ids in prompts for lora in (None, "full", "rs")]
        outs = e.generate(input_ids=[i for i, _ in items], sampling_params=[_sp(lo) for _, lo in items],
                          use_tqdm=False)
        for (ids, lora), out in zip(items, outs):
            assert out["token_ids"] == _expected("llama", lora, ids), lora


def test_a_replica_started_later_replays_every_adapter_at_its_latest_weights(tmp_path):
    """dp 1 -> 2 after a load and an update: the new replica serves both adapters (the updated one with its new
    weights) exactly as the first one does."""
    from flotilla import Engine

    prompts = _prompts("llama")
    with Engine(model=tiny("llama"), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=16) as e:
        e.load_lora_adapter("full", adapter("llama", "full"))
        e.load_lora_adapter("qv", adapter("llama", "qv"))
        assert e.update_lora_weights("qv", _adapter_tensors(adapter("llama", "qv")), version=5) == 5
        e.scale(2)
        assert len(e.stats().replicas) == 2
        items = [(ids, lora) for ids in prompts for lora in ("full", "qv", None)] * 2  # round robin: both replicas
        outs = e.generate(input_ids=[i for i, _ in items], sampling_params=[_sp(lo) for _, lo in items],
                          use_tqdm=False)
        assert {r["num_steps"] > 0 for r in e.stats().to_dict()["replicas"]} == {True}
    for (ids, lora), out in zip(items, outs):
        assert out["token_ids"] == _expected("llama", lora, ids), lora
