"""An FP8 KV cache (``kv_cache_dtype="fp8"``): K/V are stored as float8 and read back in the model's dtype.

The reference is the same math with the rounding made explicit: the torch backend over an fp32 pool holding
the FP8-rounded values must give the very same output, and transformers with its K (after rotary) and V
rounded to FP8 must give the engine's greedy tokens. The Triton kernels read the same pools on the GPU
(scripts/gpu_check.py attention, against this torch backend)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, hf_greedy, hf_tokenize, tiny
from flotilla.config import EngineConfig
from flotilla.errors import InvalidParameter
from flotilla.model.attention import AttentionMetadata, TorchAttention, write_kv

FP8 = torch.float8_e4m3fn


def _batch(gen: torch.Generator):
    """Two sequences in one paged pool: a 5-token prefill with a 20-token cached prefix, and one decode row."""
    bs, kvh, h, d = 4, 2, 4, 16
    q_lens, ctx = [5, 1], [25, 9]
    tables = torch.tensor([[3, 0, 5, 1, 7, 9, 11], [2, 6, 10, 0, 0, 0, 0]], dtype=torch.int32)
    pos = [p for q, c in zip(q_lens, ctx) for p in range(c - q, c)]
    seq = [i for i, q in enumerate(q_lens) for _ in range(q)]
    slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for s, p in zip(seq, pos)])
    meta = AttentionMetadata(slots, torch.tensor([0, 5, 6], dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32),
                             tables, q_lens, ctx, bs, max(q_lens), max(ctx), False)
    pool = torch.randn(12, bs, kvh, d, generator=gen) * 3
    q, k, v = (torch.randn(6, n, d, generator=gen) * 3 for n in (h, kvh, kvh))
    return meta, pool, q, k, v


def test_fp8_pool_equals_the_fp32_pool_of_rounded_values():
    meta, pool, q, k, v = _batch(torch.Generator().manual_seed(0))
    kc8, vc8 = pool.to(FP8), pool.flip(0).to(FP8)
    write_kv(kc8, vc8, k, v, meta.slot_mapping)
    assert kc8.dtype == FP8  # stored as FP8, written through the byte view
    kc, vc = pool.to(FP8).float(), pool.flip(0).to(FP8).float()
    write_kv(kc, vc, k.to(FP8).float(), v.to(FP8).float(), meta.slot_mapping)
    assert torch.equal(kc8.float(), kc) and torch.equal(vc8.float(), vc)
    out8 = TorchAttention().forward(q, kc8, vc8, meta, 0.25)
    assert out8.dtype == q.dtype
    assert torch.equal(out8, TorchAttention().forward(q, kc, vc, meta, 0.25))
    # and it is a rounding, not another computation: close to the full-precision pool, not equal to it
    kf, vf = pool.clone(), pool.flip(0).clone()
    write_kv(kf, vf, k, v, meta.slot_mapping)
    full = TorchAttention().forward(q, kf, vf, meta, 0.25)
    err = ((out8 - full).norm() / full.norm()).item()
    assert 0 < err < 0.1, err


def test_e4m3_saturates_instead_of_overflowing():
    meta, pool, q, k, v = _batch(torch.Generator().manual_seed(1))
    kc8, vc8 = torch.zeros_like(pool, dtype=FP8), torch.zeros_like(pool, dtype=FP8)
    write_kv(kc8, vc8, k * 1000, v * 1000, meta.slot_mapping)
    assert torch.isfinite(kc8.float()).all() and kc8.float().abs().max() == 448
    assert torch.isfinite(TorchAttention().forward(q, kc8, vc8, meta, 0.25)).all()


@pytest.mark.parametrize("value", ["int4", "FP8", "", None, 8])
def test_kv_cache_dtype_is_validated_naming_the_field(value):
    with pytest.raises(InvalidParameter, match="kv_cache_dtype") as info:
        EngineConfig(model="/m", kv_cache_dtype=value)
    assert "fp8_e4m3" in str(info.value)  # the allowed values are named


def _hf_greedy_fp8_kv(path: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy tokens with K (after rotary, as the cache holds it) and V rounded through FP8: one
    model, patched once, for every prompt."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb

    def rounded_rotary(q, k, cos, sin, *args, **kwargs):
        q, k = rotary(q, k, cos, sin, *args, **kwargs)
        return q, k.to(FP8).to(k.dtype)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: out.to(FP8).to(out.dtype))
             for layer in model.model.layers]
    modeling_llama.apply_rotary_pos_emb = rounded_rotary
    try:
        tokens = []
        for ids in prompts:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=None,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            tokens.append(out[0, len(ids):].tolist())
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        for hook in hooks:
            hook.remove()
    return tokens


def test_engine_with_an_fp8_cache_gives_transformers_tokens_with_fp8_rounded_kv():
    from flotilla import Engine

    path = tiny("llama")
    prompts = [hf_tokenize(path, p) for p in PROMPTS]
    n = 12
    with Engine(model=path, device="cpu", dtype="float32", kv_cache_dtype="fp8") as engine:
        got = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n, "temperature": 0.0,
                                                                  "ignore_eos": True}, use_tqdm=False)
    want = _hf_greedy_fp8_kv(path, prompts, n)
    assert [out["token_ids"] for out in got] == want
    # the rounding shows (random weights leave near-ties): the engine did not keep a full-precision cache
    assert any(w != hf_greedy(path, ids, n) for w, ids in zip(want, prompts))


def test_an_fp8_pool_holds_twice_the_tokens_of_bf16_in_the_same_bytes():
    from types import SimpleNamespace

    from flotilla.worker.model_runner import ModelRunner

    layers = [SimpleNamespace(num_kv_heads=8, head_dim=128)] * 4
    per_block = {dt: ModelRunner._kv_bytes_per_block(SimpleNamespace(  # type: ignore[arg-type]
        model=SimpleNamespace(attention_layers=lambda: layers), block_size=16, kv_dtype=dt))
        for dt in (torch.bfloat16, FP8, torch.float8_e5m2, torch.float32)}
    assert per_block[torch.bfloat16] == 2 * 4 * 16 * 8 * 128 * 2
    assert per_block[FP8] == per_block[torch.float8_e5m2] == per_block[torch.bfloat16] // 2
    assert per_block[torch.float32] == 2 * per_block[torch.bfloat16]
