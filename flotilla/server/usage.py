"""OpenAI's ``usage`` block, for finished requests and (vLLM's continuous usage) for streams in progress."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def usage(results: Iterable[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """Totals over the finished choices' results (``n`` choices per prompt: each prompt counts once, every
    choice's tokens count); ``cached_tokens`` are prompt tokens found in the prefix cache."""
    results = list(results)
    prompt = sum(r.get("prompt_tokens", 0) for r in results) // max(1, n)
    completion = sum(r.get("completion_tokens", 0) for r in results)
    cached = sum(r.get("cached_tokens", 0) or 0 for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def usage_so_far(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """One choice's usage while it streams (cached tokens are known only at the end, so they are left out)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
