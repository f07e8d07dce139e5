"""Tiny checkpoints: they load with transformers' own Auto classes, tokenize faithfully, and are cached safely.

Everything else in the test suite compares Flotilla with transformers on these checkpoints, so these tests pin down
the properties those comparisons rely on (clear logit margins, deterministic weights, one consistent tokenizer).
"""

from __future__ import annotations

import json
import pathlib
import random
import unicodedata

import pytest
import torch
from safetensors.torch import load_file

from flotilla.tools import tiny

pytestmark = pytest.mark.timeout(60)

ROUND_TRIP_TEXTS = [
    "The capital of France is",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\r\nnewlines\n\n\n",
    "naïve café, Ω≈ç√∫, 日本語のテキスト, 한국어, العربية, עברית",
    "emoji 🤖👍🏽👨‍👩‍👧 flags 🇫🇷",
    "decomposed e\u0301 vs composed \u00e9",
    "control \x00\x01\x7f and replacement \ufffd and max \U0010ffff",
    "<|im_start|>user\nliteral special tokens<|im_end|>",
    "numbers 1234567890 3.14159 -42",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over the whole code point range (surrogates excluded: they cannot be encoded as UTF-8)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
            chars.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    """One default checkpoint per arch, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.build_tiny_model(root / arch, arch) for arch in tiny.ARCHS}


def _load(path: pathlib.Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_builds_and_loads_with_auto_classes(built, arch):
    model, tok = _load(built[arch])
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (tiny.VOCAB_SIZE, 64, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.max_position_embeddings == 1024 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is False
    assert cfg.rope_parameters["rope_type"] == "default"
    assert len(tok) == cfg.vocab_size == tiny.VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids([tiny.IM_START_TOKEN, tiny.IM_END_TOKEN]) == [3, 4]
    assert model.generation_config.eos_token_id == cfg.eos_token_id
    assert next(model.parameters()).dtype == torch.float32

    ids = tok("Hello")["input_ids"]
    assert (ids[0] == tiny.BOS_TOKEN_ID) == (arch == "llama")  # llama prepends BOS, qwen does not
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape[-1] == tiny.VOCAB_SIZE and torch.isfinite(logits).all()


def test_arch_specific_weights(built):
    """qwen2's q/k/v biases and every norm weight are nonzero/non-one, so a loader that drops them is caught."""
    llama = load_file(built["llama"] / "model.safetensors")
    assert not any(k.endswith("bias") for k in llama)
    assert not torch.allclose(llama["model.norm.weight"], torch.ones(64))

    qwen2 = load_file(built["qwen2"] / "model.safetensors")
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert qwen2[f"model.layers.0.self_attn.{proj}.bias"].abs().sum() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2

    qwen3 = load_file(built["qwen3"] / "model.safetensors")
    assert not torch.allclose(qwen3["model.layers.0.self_attn.q_norm.weight"], torch.ones(16))

    moe = load_file(built["qwen3_moe"] / "model.safetensors")
    assert moe["model.layers.0.mlp.gate.weight"].shape == (8, 64)
    assert moe["model.layers.3.mlp.experts.7.gate_proj.weight"].shape == (32, 64)
    assert moe["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    cfg = json.loads((built["qwen3_moe"] / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 2, 32)
    assert cfg["norm_topk_prob"] is True and cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []


def test_weights_are_deterministic_in_seed(built, tmp_path):
    same = load_file(tiny.build_tiny_model(tmp_path / "a", "llama", seed=0) / "model.safetensors")
    other = load_file(tiny.build_tiny_model(tmp_path / "b", "llama", seed=1) / "model.safetensors")
    ref = load_file(built["llama"] / "model.safetensors")
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["lm_head.weight"], other["lm_head.weight"])


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_greedy_decoding_has_clear_margins_and_variety(built, arch):
    """The reason for the scaled init: greedy tokens must not hinge on near-ties, and must not be one token."""
    model, tok = _load(built[arch])
    gaps = []
    for prompt in ["The capital of France is", "Hello", "Once upon a time", "The quick brown fox"]:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        assert len(set(new)) >= 10, f"{prompt!r}: greedy output loops {new}"
        assert len(set(new[:8])) >= 3, f"{prompt!r}: near-constant from the first step {new}"
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            gaps.append((top2[0] - top2[1]).item())
    gaps_t = torch.tensor(gaps)
    assert gaps_t.median() > 0.1
    assert (gaps_t < 1e-3).float().mean() < 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tokenizer_round_trips_unicode(built, arch):
    """Byte-level BPE encodes anything. llama decodes it back exactly; the Qwen family NFC-normalizes first,
    as real Qwen tokenizers (and transformers' Qwen2Tokenizer) do."""
    from tokenizers import Tokenizer

    _, tok = _load(built[arch])
    raw = Tokenizer.from_file(str(built[arch] / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS + _random_texts(50):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want = text if arch == "llama" else unicodedata.normalize("NFC", text)
        assert tok.decode(ids) == want
        # tokenizer.json alone (what a fast-path tokenizer would use) agrees with AutoTokenizer
        assert raw.encode(text).ids == tok(text)["input_ids"]
        assert all(0 <= i < tiny.VOCAB_SIZE for i in ids)


def test_vocabulary_covers_the_corpus_phrases(built):
    _, tok = _load(built["llama"])
    for phrase in ["The capital of France is", "Hello", "Once upon a time"]:
        ids = tok(phrase, add_special_tokens=False)["input_ids"]
        assert len(ids) <= len(phrase.split()) + 1, (phrase, tok.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chat_template(built, arch):
    _, tok = _load(built[arch])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    bos = tiny.BOS_TOKEN if arch == "llama" else ""
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == bos + body
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == bos + body + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny.BOS_TOKEN_ID) == (arch == "llama")
    assert ids.count(tiny.IM_START_TOKEN_ID) == 3 and ids.count(tiny.IM_END_TOKEN_ID) == 2


def test_sharded_checkpoint(built, tmp_path):
    path = tiny.build_tiny_model(tmp_path / "sharded", "qwen3_moe", max_shard_size="50KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    assert not (path / "model.safetensors").exists()
    sharded_model, _ = _load(path)
    ref = load_file(built["qwen3_moe"] / "model.safetensors")
    merged = {}
    for s in shards:
        merged.update(load_file(path / s))
    assert merged.keys() == ref.keys() and all(torch.equal(ref[k], merged[k]) for k in ref)
    assert sharded_model.config.num_experts == 8


def test_unknown_arch_and_override_raise(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        tiny.build_tiny_model(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="arch"):
        tiny.tiny_model_path("mixtral")
    with pytest.raises(ValueError, match="num_layers"):
        tiny.build_tiny_model(tmp_path / "y", "llama", num_layers=2)
    with pytest.raises(ValueError, match="rope_parameters"):
        tiny.make_config("llama", rope_parameters="no-such-preset")


def test_config_overrides(tmp_path):
    path = tiny.build_tiny_model(tmp_path / "o", "llama", num_key_value_heads=1, head_dim=24,
                                 tie_word_embeddings=True, num_hidden_layers=2)
    model, _ = _load(path)
    cfg = model.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (1, 24, 2, True)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(path / "model.safetensors")


def test_llama3_rope_scaling(tmp_path):
    """The preset name, the full dict and the v4 ``rope_scaling`` spelling all give the same config."""
    preset = tiny.make_config("llama", rope_parameters="llama3").rope_parameters
    full = tiny.make_config("llama", rope_parameters=dict(tiny.ROPE_PRESETS["llama3"])).rope_parameters
    scaling = {k: v for k, v in tiny.ROPE_PRESETS["llama3"].items() if k != "rope_theta"}
    legacy = tiny.make_config("llama", rope_scaling=scaling).rope_parameters
    assert preset == full == legacy == tiny.ROPE_PRESETS["llama3"]

    model, _ = _load(tiny.build_tiny_model(tmp_path / "rope", "llama", rope_parameters="llama3"))
    rotary = model.model.rotary_emb
    assert rotary.rope_type == "llama3"
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.allclose(rotary.inv_freq[:3], default[:3])  # high frequencies are kept ...
    assert torch.allclose(rotary.inv_freq[-3:], default[-3:] / 8.0)  # ... low ones divided by `factor`
    with torch.no_grad():  # past original_max_position_embeddings
        assert torch.isfinite(model(torch.randint(5, 512, (1, 600))).logits).all()


def test_cache_reuses_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOTILLA_TINY_CACHE", str(tmp_path / "cache"))
    first = tiny.tiny_model_path("qwen3", num_hidden_layers=2)
    assert first.parent == tmp_path / "cache" and (first / "config.json").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert tiny.tiny_model_path("qwen3", num_hidden_layers=2) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary folders left

    monkeypatch.undo()
    monkeypatch.setenv("FLOTILLA_TINY_CACHE", str(tmp_path / "cache"))
    assert tiny.tiny_model_path("qwen3", num_hidden_layers=2, seed=1) != first
    assert tiny.tiny_model_path("qwen3", num_hidden_layers=3) != first


def test_cache_survives_a_lost_race(tmp_path, monkeypatch):
    """When another process finishes the same entry first, its copy wins and ours is thrown away."""
    monkeypatch.setenv("FLOTILLA_TINY_CACHE", str(tmp_path / "cache"))
    real_build = tiny.build_tiny_model
    winner: list[pathlib.Path] = []

    def build_and_lose(out_dir, arch, **kwargs):
        path = real_build(out_dir, arch, **kwargs)
        final = tmp_path / "cache" / f"{arch}-{tiny.cache_key(arch, 0, None, {'num_hidden_layers': 1})}"
        real_build(final, arch, **kwargs)  # the other process renames its copy into place first
        winner.append(final)
        return path

    monkeypatch.setattr(tiny, "build_tiny_model", build_and_lose)
    assert tiny.tiny_model_path("llama", num_hidden_layers=1) == winner[0]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [winner[0].name]


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert tiny.cli_main([str(out), "--arch", "qwen2", "--seed", "3", "--shard-size", "100KB"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(SystemExit):
        tiny.cli_main([str(out), "--arch", "gpt2"])
