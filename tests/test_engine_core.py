"""Engine core on CPU: greedy tokens equal transformers' for every architecture and scheduler regime."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

N = 32
GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True)


def expected(path: str, prompts=PROMPTS, n=N) -> list[list[int]]:
    return [hf_greedy(path, hf_tokenize(path, p), n) for p in prompts]


@pytest.fixture(scope="module")
def llama_engine(llama_path, llama_dp1_engine):
    yield llama_path, llama_dp1_engine  # Engine(tiny llama, cpu, float32), shared by the session (tests/conftest.py)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    # GQA down to one KV head, head_dim != hidden/heads, tied embeddings, llama3 rope scaling
    ("llama", {"num_key_value_heads": 1, "head_dim": 24, "tie_word_embeddings": True,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
])
def test_greedy_matches_transformers(arch, overrides):
    path = tiny(arch, **overrides)
    with Engine(model=path, device="cpu", dtype="float32") as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected(path)
    for o, p in zip(outs, PROMPTS):
        assert o["finish_reason"] == "length"
        assert o["completion_tokens"] == N
        assert o["prompt_tokens"] == len(hf_tokenize(path, p))


def test_sharded_checkpoint_matches():
    path = tiny("qwen3", max_shard_size="60KB")
    with Engine(model=path, device="cpu", dtype="float32") as engine:
        outs = engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected(path, PROMPTS[:2])


def test_prefix_cache_hit_skips_prefill_and_matches(llama_engine):
    path, engine = llama_engine
    long = PROMPTS[2]
    first = engine.generate([long], GREEDY, use_tqdm=False)[0]
    again = engine.generate([long + " and then", long], GREEDY, use_tqdm=False)
    assert again[1]["cached_tokens"] > 0
    assert again[1]["cached_tokens"] % engine.config.block_size == 0
    assert again[1]["token_ids"] == first["token_ids"] == expected(path, [long])[0]
    assert again[0]["token_ids"] == expected(path, [long + " and then"])[0]


def test_tiny_chunked_prefill_budget_matches():
    path = tiny("llama")
    with Engine(model=path, device="cpu", dtype="float32", max_num_batched_tokens=8) as engine:
        outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected(path)


def test_preemption_by_recompute_matches():
    path = tiny("llama")
    # 128 KV slots cannot hold the four requests at once: the scheduler must preempt and recompute.
    with Engine(model=path, device="cpu", dtype="float32", kv_cache_tokens=128, block_size=4,
                enable_prefix_caching=False) as engine:
        outs = engine.generate(PROMPTS * 2, GREEDY, use_tqdm=False)
        preemptions = sum(r["num_preemptions"] for r in engine.stats()["replicas"])
    assert preemptions > 0
    assert [o["token_ids"] for o in outs] == expected(path) * 2


def test_input_ids_and_dict_params(llama_engine):
    path, engine = llama_engine
    ids = hf_tokenize(path, PROMPTS[0])
    out = engine.generate(input_ids=[ids], sampling_params={"max_new_tokens": 8, "temperature": 0.0,
                                                            "ignore_eos": True}, use_tqdm=False)[0]
    assert out["token_ids"] == expected(path, PROMPTS[:1], 8)[0]


def test_stream_deltas_add_up(llama_engine):
    path, engine = llama_engine
    deltas = list(engine.stream(PROMPTS[0], GREEDY))
    full = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert deltas[-1]["finished"] and deltas[-1]["finish_reason"] == "length"
    assert [t for d in deltas for t in d["token_ids"]] == full["token_ids"]
    assert "".join(d["text"] for d in deltas) == full["text"]
    assert full["text"] == engine.tokenizer.decode(full["token_ids"], skip_special_tokens=True)


def test_stream_async_acknowledges_admission_first_and_a_consumer_that_leaves_then_aborts(llama_engine):
    import asyncio

    path, engine = llama_engine

    async def main():
        deltas = [d async for d in engine.stream_async(PROMPTS[0], GREEDY, accepted=True)]
        gen = engine.stream_async(PROMPTS[1], {"max_new_tokens": 1000, "ignore_eos": True}, accepted=True,
                                  request_id="left-after-ack")
        first = await gen.__anext__()
        inflight = engine.stats().num_requests_inflight
        await gen.aclose()  # the consumer leaves right after the acknowledgement
        for _ in range(100):
            if engine.stats().num_requests_inflight < inflight:
                break
            await asyncio.sleep(0.05)
        return deltas, first, inflight

    deltas, first, inflight = asyncio.run(main())
    assert deltas[0] == {"text": "", "token_ids": [], "finished": False, "accepted": True}
    assert not any(d.get("accepted") for d in deltas[1:]) and deltas[-1]["finished"]
    full = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert [t for d in deltas for t in d["token_ids"]] == full["token_ids"]
    assert first.get("accepted") and inflight >= 1
    assert engine.stats().num_requests_inflight == inflight - 1  # aborted: not left generating 1000 tokens


def test_seeded_sampling_is_reproducible(llama_engine):
    _, engine = llama_engine
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[1]], sp, use_tqdm=False)[0]["token_ids"]
    other = SamplingParams(max_new_tokens=24, temperature=0.7, seed=7, ignore_eos=True)
    mixed = engine.generate([PROMPTS[2], PROMPTS[1]], [other, sp], use_tqdm=False)[1]["token_ids"]
    assert alone == mixed
    differ = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=24, temperature=1.0, seed=99,
                                                          ignore_eos=True), use_tqdm=False)[0]["token_ids"]
    assert differ != alone


def test_stop_strings_and_stop_ids(llama_engine):
    _, engine = llama_engine
    base = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    text = base["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the greedy text should have a usable middle"
    cut = text.find(stop)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True,
                                                       stop=[stop]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:cut]
    assert stop not in out["text"]
    stop_id = base["token_ids"][5]
    first = base["token_ids"].index(stop_id)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=N, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == base["token_ids"][: first + 1]


def test_stream_never_shows_a_stop_string(llama_engine):
    _, engine = llama_engine
    text = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]["text"]
    stop = text[10:16]
    streamed = "".join(d["text"] for d in engine.stream(PROMPTS[0], SamplingParams(
        max_new_tokens=N, temperature=0.0, ignore_eos=True, stop=[stop])))
    assert streamed == text[: text.find(stop)]


def test_logprobs(llama_engine):
    _, engine = llama_engine
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True,
                                                       logprobs=True, top_logprobs=3), use_tqdm=False)[0]
    assert len(out["logprobs"]) == len(out["top_logprobs"]) == 6
    for tok, lp, top in zip(out["token_ids"], out["logprobs"], out["top_logprobs"]):
        assert lp <= 0.0
        assert top[0][0] == tok and top[0][1] == pytest.approx(lp, abs=1e-5)
        assert [t[1] for t in top] == sorted((t[1] for t in top), reverse=True)


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompts=[""]), "prompt"),
    (dict(input_ids=[[]]), "input_ids"),
    (dict(input_ids=[[1, 10**7]]), "input_ids"),
    (dict(input_ids=[[-1]]), "input_ids"),
    (dict(prompts=["hi"], sampling_params={"max_new_tokens": 10**6}), "max_new_tokens"),
    (dict(prompts=["hi"], sampling_params={"temperature": -0.5}), "temperature"),
    (dict(prompts=["hi"], sampling_params={"top_p": 0.0}), "top_p"),
    (dict(prompts=["hi"], sampling_params={"top_p": 1.5}), "top_p"),
    (dict(prompts=["hi"], sampling_params={"top_k": -2}), "top_k"),
    (dict(prompts=["hi"], sampling_params={"max_new_tokens": 0}), "max_new_tokens"),
    (dict(prompts=["hi"], sampling_params={"bogus": 1}), "bogus"),
])
def test_bad_input_is_refused_and_engine_keeps_serving(llama_engine, kwargs, field):
    path, engine = llama_engine
    with pytest.raises(ValueError, match=field):
        engine.generate(use_tqdm=False, **kwargs)
    assert engine.stats()["num_requests_inflight"] == 0
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out["token_ids"] == expected(path, PROMPTS[:1], 8)[0]


def test_bad_model_folders(tmp_path):
    with pytest.raises(ValueError, match="model"):
        Engine(model=str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model"):
        Engine(model=str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="architectures"):
        Engine(model=str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match="safetensors"):
        Engine(model=str(tmp_path))


def test_bad_engine_options():
    path = tiny("llama")
    for kwargs, field in [({"tp_size": 0}, "tp_size"), ({"dtype": "int3"}, "dtype"), ({"block_size": 3}, "block_size"),
                          ({"load_balance": "random"}, "load_balance"), ({"host": "0.0.0.0"}, "host"),
                          ({"no_such_option": 1}, "no_such_option")]:
        with pytest.raises(ValueError, match=field):
            Engine(model=path, **kwargs)


def test_more_ranks_per_replica_than_gpus_is_refused_before_any_process_starts(monkeypatch):
    """NCCL cannot put two ranks of one TP group on one device: whole replicas may share GPUs, ranks may not."""
    import tempfile

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(ValueError, match=r"tp_size: one replica's 2 ranks .* 1 are visible"):
        Engine(model=tiny("llama"), device="cuda", tp_size=2, dp_size=2)
    with pytest.raises(ValueError, match=r"tp_size: one replica's 4 ranks \(tp_size=2 x pp_size=2\)"):
        Engine(model=tiny("llama"), device="cuda", tp_size=2, pp_size=2)
    assert not {d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("flotilla-")}


def test_dummy_weights_and_shutdown_leaves_no_children():
    path = tiny("llama")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = Engine(model=path, device="cpu", dtype="float32", load_format="dummy")
    out = engine.generate(["Hello"], SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out["completion_tokens"] == 4
    pids = {pid for r in engine.stats()["replicas"] for pid in r["pids"]}
    assert pids
    engine.shutdown()
    alive = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not (alive & pids)
