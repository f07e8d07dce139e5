"""Request bodies, validated at the edge (pydantic), in OpenAI's names plus vLLM's extras.

Unknown fields are accepted and ignored (``extra="allow"``; ``app.py`` logs each new name once), as vLLM does:
OpenAI keeps adding fields (``reasoning_effort``, ``prompt_cache_key``, ``safety_identifier``...) that clients
send by default, and refusing them would break those clients against an otherwise working server. Fields we
know but cannot honour (``logit_bias``, ``suffix``, legacy ``functions``) are declared here and refused with a
400 naming them (``completions.py``, ``chat.py``), so nobody silently gets something else.

Types are strict, as OpenAI's API takes them: ``"max_tokens": "10"``, ``"stream": "yes"`` and ``"n": true`` are
400s naming the field, never coerced (an int is still a valid float).

Text that will be tokenized is a ``Text``: a lone UTF-16 surrogate (``"\\ud800"``, legal in a JSON string but not
encodable to UTF-8) is a 400 naming the field rather than a 500 from deep in the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}; "
                         "send UTF-8 text (surrogate pairs must be complete)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenIds = list[int]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Lenient):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far
    continuous_usage_stats: bool = False


class SamplingFields(_Lenient):
    """Fields common to both endpoints. The last group is vLLM's extras (``extra_body`` in openai)."""

    model: Text | None = None  # echoed in a 404: it must be encodable too
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # structured output (server/structured.py; vLLM's and sglang's extra-body names are read from the extras)
    response_format: dict[str, Any] | None = None
    # extras
    ignore_eos: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    # the LoRA adapter by name, besides ``model`` naming it (server/lora.py); sglang calls it lora_path
    lora_name: str | None = None
    lora_path: str | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | TokenIds | list[Text] | list[TokenIds]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(_Lenient):
    type: str
    text: Text | None = None


class ChatMessage(_Lenient):
    # extras (tool_call_id, tool_calls, reasoning_content...) reach the chat template as they are
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    # known and ignored: they change nothing about generation
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class TokenizeRequest(_Lenient):
    """vLLM's ``/tokenize``: either ``prompt`` (completion style) or ``messages`` (chat style), not both."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    # vLLM's defaults: True for a prompt, False for messages (the chat template writes its own BOS)
    add_special_tokens: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    model: Text | None = None
    tokens: list[int]


from flotilla.launch.topology import MAX_DP_SIZE, MAX_DRAIN_TIMEOUT_S  # noqa: E402  (the engine's bounds)


class ScaleRequest(BaseModel):
    # an admin typo must not scale to a default; strict: {"dp_size": true} is not 1
    model_config = ConfigDict(extra="forbid", strict=True)
    dp_size: int = Field(ge=1, le=MAX_DP_SIZE)
    drain_timeout_s: float = Field(default=60.0, ge=0.0, le=MAX_DRAIN_TIMEOUT_S, allow_inf_nan=False)
