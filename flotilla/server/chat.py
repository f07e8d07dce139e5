"""``POST /v1/chat/completions``: the tokenizer's chat template, then the same engine run as completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from flotilla.server.engine_client import Delta, Tokenizer
from flotilla.server.errors import bad_param
from flotilla.server.protocol import ChatCompletionRequest, ChatMessage
from flotilla.server.runs import Job, Run, collect_or_error, start_or_error
from flotilla.server.sampling import check_common, default_max_tokens, delta_tops, sampling_params
from flotilla.server.state import ServerState
from flotilla.server.streaming import ChunkTemplate, FastFrame, SSEResponse, UsageMode, stream_frames
from flotilla.server.tokens import TokenStrings, encode, off_loop, render_chat
from flotilla.server.usage import usage


def add_chat_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = state.accept("/v1/chat/completions", body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        check_chat(body)
        ids = await off_loop(chat_prompt_ids, body.messages, engine.tokenizer)
        job, aliases = chat_job(body, ids, engine.max_model_len, rid)
        run = Run(engine, state.metrics, [job])
        await start_or_error(request, run, aliases)
        strings = TokenStrings(engine.tokenizer)
        base = {"id": rid, "created": int(time.time()), "model": state.model_name, "system_fingerprint": None}
        if body.stream:
            return SSEResponse(_stream(run, body, base, strings))
        (res,) = await collect_or_error(request, run)
        logprobs = None
        if body.logprobs:
            tops = res.get("top_logprobs") if body.top_logprobs else None
            logprobs = await off_loop(logprobs_block, strings, res["token_ids"], res.get("logprobs"), tops)
        choice = {"index": 0, "message": {"role": "assistant", "content": res["text"]}, "logprobs": logprobs,
                  "finish_reason": res["finish_reason"]}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": usage([res])})


def check_chat(body: ChatCompletionRequest) -> None:
    """Known fields the engine cannot honour yet are refused with a 400 naming them."""
    check_common(body)
    if body.tools:
        raise bad_param("tools", "tool calling is not supported")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_param("tool_choice", "tool calling is not supported")
    if body.functions:
        raise bad_param("functions", "function calling is not supported")
    if body.function_call not in (None, "none", "auto"):
        raise bad_param("function_call", "function calling is not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_param("response_format", "only {\"type\": \"text\"} is supported")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_param("top_logprobs", "requires logprobs to be true")


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; text content parts are joined."""
    out = []
    for i, m in enumerate(messages):
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise bad_param(f"messages.{i}.content", f"content part type {part.type!r} is not supported "
                                                             "(text only)")
                texts.append(part.text)
            msg["content"] = "".join(texts)
        out.append(msg)
    return out


def chat_prompt_ids(messages: list[ChatMessage], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                    add_special_tokens: bool = False) -> list[int]:
    """The rendered template's token ids. Blocking: call it through ``off_loop``. By default no special tokens
    are added, since the template already writes any BOS it wants."""
    try:
        text = render_chat(tokenizer, message_dicts(messages), add_generation_prompt)
    except LookupError as e:
        raise bad_param("messages", f"{e}; use /v1/completions") from None
    except ValueError as e:
        raise bad_param("messages", str(e)) from None
    ids = encode(tokenizer, text, add_special_tokens=add_special_tokens)
    if not ids:
        raise bad_param("messages", "the chat template produced an empty prompt")
    return ids


def chat_job(body: ChatCompletionRequest, ids: list[int], max_model_len: int, rid: str) -> tuple[Job, dict[str, str]]:
    limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is None:  # OpenAI's chat default: as much as the context allows
        limit = default_max_tokens(len(ids), max_model_len, "messages")
    params = sampling_params(body, limit)
    if body.logprobs:
        params["logprobs"], params["top_logprobs"] = True, body.top_logprobs or 0
    aliases = {"max_new_tokens": limit_name, "input_ids": "messages", "prompt": "messages",
               "sampling_params": "body"}
    return Job(0, rid, ids, params), aliases


def logprobs_block(strings: TokenStrings, ids: list[int], lps: list[float] | None,
                   tops: list[Any] | None) -> dict[str, Any]:
    """Chat logprobs: one entry per token, each with exactly the engine's top-k candidates (a list, so tokens
    that decode to the same text are all kept)."""
    def entry(tid: int, lp: float | None) -> dict[str, Any]:
        return {"token": strings.text(int(tid)), "logprob": None if lp is None else float(lp),
                "bytes": list(strings.bytes(int(tid)))}

    lps = list(lps or [])
    content = []
    for j, tid in enumerate(ids):  # one entry per token, even if the engine sent no logprob for it
        item = entry(tid, lps[j] if j < len(lps) else None)
        item["top_logprobs"] = [entry(t, v) for t, v in tops[j]] if tops is not None and j < len(tops) else []
        content.append(item)
    return {"content": content}


def _stream(run: Run, body: ChatCompletionRequest, base: dict[str, Any], strings: TokenStrings) -> AsyncIterator[bytes]:
    base = {**base, "object": "chat.completion.chunk"}

    def frame(i: int, delta: Delta, seen: int) -> dict[str, Any] | None:
        ids = delta.get("token_ids") or []
        if not ids and not delta["text"] and not delta["finished"]:
            return None
        logprobs = None
        if body.logprobs:
            logprobs = logprobs_block(strings, ids, delta.get("logprobs"), delta_tops(delta, run.jobs[i], seen))
        choice = {"index": i, "delta": {"content": delta["text"]} if delta["text"] or ids else {},
                  "logprobs": logprobs, "finish_reason": delta["finish_reason"]}
        return {**base, "choices": [choice]}

    role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
    mode = UsageMode.of(body.stream_options)
    fast: FastFrame | None = None
    if not body.logprobs and not mode.continuous:
        tail = {"usage": None} if mode.final else {}
        template = ChunkTemplate(lambda text, fin: {
            **base, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": fin}],
            **tail})

        def templated(i: int, delta: Delta) -> bytes | None:
            if not delta["token_ids"] and not delta["text"]:
                return None  # a finish-only chunk has an empty delta: the slow path
            return template.render(delta["text"], delta["finish_reason"])

        fast = templated

    return stream_frames(run, frame, base, mode, head=[role], offload=bool(body.logprobs), fast=fast)
