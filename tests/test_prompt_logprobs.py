"""Prompt logprobs computed in the engine's forward equal transformers' log_softmax (float32), with chunked
prefill, with a cached prefix in the pool, and with top-k candidates."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, _hf_model, hf_tokenize, tiny
from flotilla import Engine, SamplingParams

OPTS = dict(device="cpu", dtype="float32")


def hf_prompt_logprobs(path: str, ids: list[int]):
    """transformers' log_softmax at every prompt position, and each next prompt token's value."""
    with torch.no_grad():
        logp = _hf_model(path)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [None] + [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)], logp


@pytest.mark.parametrize("chunk", [8192, 16])
def test_prompt_logprobs_equal_transformers(chunk):
    path = tiny("llama")
    with Engine(model=path, max_num_batched_tokens=chunk, **OPTS) as engine:
        sp = SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=3)
        # plain requests first put the prompts' pages in the prefix cache; then the same prompts with prompt
        # logprobs twice: the values must come from a full computation every time
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2), use_tqdm=False)
        for _ in range(2):
            outs = engine.generate(PROMPTS, sp, use_tqdm=False)
            for prompt, out in zip(PROMPTS, outs):
                ids = hf_tokenize(path, prompt)
                own, logp = hf_prompt_logprobs(path, ids)
                got = out["prompt_logprobs"]
                assert len(got) == len(ids) and got[0] is None
                assert got[1:] == pytest.approx(own[1:], abs=1e-4)
                tops = out["prompt_top_logprobs"]
                for i in range(1, len(ids)):
                    want = logp[i - 1].topk(3)
                    assert [t for t, _ in tops[i]] == want.indices.tolist()
                    assert [v for _, v in tops[i]] == pytest.approx(want.values.tolist(), abs=1e-4)


def test_prompt_logprobs_field_is_validated():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
