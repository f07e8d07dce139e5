"""The engine's SamplingParams from the API's fields, and the checks both endpoints share."""

from __future__ import annotations

from typing import Any

from flotilla.frontend.inputs import MAX_CHARS_PER_TOKEN
from flotilla.server.engine_client import Delta
from flotilla.server.errors import bad_param
from flotilla.server.protocol import SamplingFields
from flotilla.server.runs import Job
from flotilla.server.structured import structured_output

# API fields passed to the engine under the same name when set; the engine validates them (a bad value is a
# ValueError naming the field, which becomes a 400).
_PASSED_AS_IS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "ignore_eos", "stop_token_ids")


MAX_N = 128
MAX_PROMPTS = 4096  # prompts in one completions request (each becomes best_of engine requests)
MAX_JOBS = 4096  # engine requests one HTTP request may start (prompts x best_of, or n)


def sampling_params(body: SamplingFields, max_new_tokens: int) -> dict[str, Any]:
    """Unset fields keep the engine's defaults."""
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for name in _PASSED_AS_IS:
        value = getattr(body, name)
        if value is not None:
            params[name] = value
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    so = structured_output(body)
    if so is not None:
        params["structured_output"] = so
    return params


def choice_jobs(rid: str, prompts: list[list[int]], params: dict[str, Any], n: int) -> list[Job]:
    """``n`` jobs per prompt, choice index ``prompt * n + c`` (OpenAI's order). The choices of one prompt run as
    one engine stream with ``n`` (``Run``): the engine seeds choice c with seed + c and keeps them on one replica;
    the request ids here are the ones it gives them (``<rid>-<prompt>``, then ``-<c>`` for c >= 1)."""
    return [Job(p * n + c, f"{rid}-{p}-{c}" if c else f"{rid}-{p}", ids, params, prompt=p)
            for p, ids in enumerate(prompts) for c in range(n)]


def check_common(body: SamplingFields) -> None:
    """Known fields whose non-default values the engine cannot honour yet: refused, never silently ignored."""
    if isinstance(body.n, bool) or not 1 <= body.n <= MAX_N:
        raise bad_param("n", f"must be in [1, {MAX_N}], got {body.n}")
    if body.logit_bias:
        raise bad_param("logit_bias", "is not supported")
    if body.stream_options is not None and not body.stream:
        raise bad_param("stream_options", "is only allowed when stream is true")


def check_text_size(chars: int, max_model_len: int, param: str) -> None:
    """Refuse text that cannot fit the context in any tokenization, before it is tokenized (cheap)."""
    limit = max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise bad_param(param, f"{chars} characters cannot fit in max_model_len {max_model_len} tokens (refused "
                               f"before tokenizing: at most {limit} characters, {MAX_CHARS_PER_TOKEN} per token)")


def default_max_tokens(prompt_len: int, max_model_len: int, param: str) -> int:
    """What the context length leaves after the prompt (OpenAI's chat default)."""
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_param(param, f"the prompt has {prompt_len} tokens, which leaves no room in the context "
                               f"length {max_model_len}")
    return room


def delta_tops(delta: Delta, job: Job, seen: int) -> list[Any] | None:
    """Top logprobs for a delta's tokens: from the delta if the engine sends them there, else (final delta
    only) from the result."""
    if not job.params.get("top_logprobs"):
        return None
    if "top_logprobs" in delta:
        return delta["top_logprobs"]
    result = delta.get("result")
    if result and "top_logprobs" in result:
        return result["top_logprobs"][seen:seen + len(delta.get("token_ids") or ())]
    return []
