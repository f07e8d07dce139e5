"""Shared fixtures: tiny checkpoints (built once, cached on disk) and transformers' greedy tokens on them."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a little fox who lived in a deep green forest near the river, and every "
    "morning it walked down to the water to drink and to watch the fish swim by in the cold clear current",
    "A",
]


def tiny(arch: str = "llama", **overrides) -> str:
    from flotilla.testing.tiny import tiny_model_path

    return str(tiny_model_path(arch, **overrides))


@functools.lru_cache(maxsize=None)
def _hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy tokens (eos ignored, so every comparison has max_new_tokens tokens)."""
    model = _hf_model(path)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=None, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_tokenize(path: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(path)(text)["input_ids"])


@pytest.fixture(scope="session")
def llama_path() -> str:
    return tiny("llama")
