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
from flotilla.server.sampling import (check_common, check_text_size, choice_jobs, default_max_tokens, delta_tops,
                                     sampling_params)
from flotilla.server.state import ServerState
from flotilla.server.streaming import ChunkTemplate, FastFrame, SSEResponse, UsageMode, stream_frames
from flotilla.server.tokens import TokenStrings, encode, off_loop, render_chat
from flotilla.server.tool_stream import ToolCallStream, merge_pieces
from flotilla.server.tools import check_tools, parse_tool_calls, tool_constraint, tool_format
from flotilla.server.usage import usage


def add_chat_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine, lora = state.accept_generation("/v1/chat/completions", body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        forced = check_chat(body)
        check_text_size(message_chars(body.messages), engine.max_model_len, "messages")
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        fmt = tool_format(getattr(engine.tokenizer, "chat_template", None)) if tools else None
        ids = await off_loop(chat_prompt_ids, body.messages, engine.tokenizer, tools=tools)
        jobs, aliases = chat_jobs(body, ids, engine.max_model_len, rid, forced, fmt, lora.lora_name)
        run = Run(engine, state.metrics, jobs, accepted=bool(body.stream))
        await start_or_error(request, run, lora.aliases(aliases))
        strings = TokenStrings(engine.tokenizer)
        base = {"id": rid, "created": int(time.time()), "model": lora.model, "system_fingerprint": None}
        if body.stream:
            return SSEResponse(_stream(run, body, base, strings, fmt))
        results = await collect_or_error(request, run)
        choices = []
        for job, res in zip(jobs, results):
            logprobs = None
            if body.logprobs:
                tops = res.get("top_logprobs") if body.top_logprobs else None
                logprobs = await off_loop(logprobs_block, strings, res["token_ids"], res.get("logprobs"), tops)
            message, finish = assistant_message(res["text"], res["finish_reason"], fmt)
            choices.append({"index": job.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": usage(results, body.n)})


def check_chat(body: ChatCompletionRequest) -> str | None:
    """Known fields the engine cannot honour are refused with a 400 naming them; returns the function a
    tool_choice forces ("*": any), or None."""
    check_common(body)
    if body.functions:
        raise bad_param("functions", "the legacy functions field is not supported; use tools")
    if body.function_call not in (None, "none", "auto"):
        raise bad_param("function_call", "the legacy function_call field is not supported; use tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_param("top_logprobs", "requires logprobs to be true")
    forced = check_tools(body.tools, body.tool_choice)
    if forced is not None and body.response_format and body.response_format.get("type", "text") != "text":
        raise bad_param("response_format", "cannot be combined with a tool_choice that forces a call")
    return forced


def assistant_message(text: str, finish: str | None, fmt: str | None) -> tuple[dict[str, Any], str | None]:
    """The reply as an assistant message: tool calls parsed out of it when tools were offered."""
    if fmt is not None:
        content, calls = parse_tool_calls(text, fmt)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, \
                "tool_calls" if finish == "stop" else finish
    return {"role": "assistant", "content": text}, finish


def message_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in the messages (what the template will wrap; cheap, before rendering)."""
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif isinstance(m.content, list):
            total += sum(len(p.text or "") for p in m.content)
    return total


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
                    add_special_tokens: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The rendered template's token ids (``tools`` passed to the template). Blocking: call it through
    ``off_loop``. By default no special tokens are added, since the template already writes any BOS it wants."""
    try:
        text = render_chat(tokenizer, message_dicts(messages), add_generation_prompt, tools)
    except LookupError as e:
        raise bad_param("messages", f"{e}; use /v1/completions") from None
    except ValueError as e:
        raise bad_param("messages", str(e)) from None
    ids = encode(tokenizer, text, add_special_tokens=add_special_tokens)
    if not ids:
        raise bad_param("messages", "the chat template produced an empty prompt")
    return ids


def chat_jobs(body: ChatCompletionRequest, ids: list[int], max_model_len: int, rid: str, forced: str | None,
              fmt: str, lora_name: str | None = None) -> tuple[list[Job], dict[str, str]]:
    limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is None:  # OpenAI's chat default: as much as the context allows
        limit = default_max_tokens(len(ids), max_model_len, "messages")
    params = sampling_params(body, limit)
    if forced is not None:  # the reply must be a call that parses: constrained by a grammar
        params["structured_output"] = tool_constraint(body.tools, forced, fmt)
    if body.logprobs:
        params["logprobs"], params["top_logprobs"] = True, body.top_logprobs or 0
    if lora_name is not None:
        params["lora_name"] = lora_name
    aliases = {"max_new_tokens": limit_name, "input_ids": "messages", "prompt": "messages",
               "sampling_params": "body"}
    return choice_jobs(rid, [ids], params, body.n), aliases


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


def _stream(run: Run, body: ChatCompletionRequest, base: dict[str, Any], strings: TokenStrings,
            fmt: str | None) -> AsyncIterator[bytes]:
    """Content deltas as they come. With tools offered (``fmt``), each choice's text goes through a
    ``ToolCallStream``: content as it comes, a call as OpenAI streams one (its header once the name is known,
    then its arguments as they are written)."""
    base = {**base, "object": "chat.completion.chunk"}
    calls = [ToolCallStream(fmt) for _ in run.jobs] if fmt is not None else None

    def frame(i: int, delta: Delta, seen: int) -> dict[str, Any] | None:
        ids = delta.get("token_ids") or []
        if not ids and not delta["text"] and not delta["finished"]:
            return None
        finish = delta["finish_reason"]
        out: dict[str, Any] = {"content": delta["text"]} if delta["text"] or ids else {}
        if calls is not None:
            parser = calls[i]
            pieces = parser.feed(delta["text"]) + (parser.finish() if delta["finished"] else [])
            out = merge_pieces(pieces)
            if parser.called and finish == "stop":
                finish = "tool_calls"
            if not out and not delta["finished"] and not (body.logprobs and ids):
                return None
        logprobs = None
        if body.logprobs:
            logprobs = logprobs_block(strings, ids, delta.get("logprobs"), delta_tops(delta, run.jobs[i], seen))
        return {**base, "choices": [{"index": run.jobs[i].index, "delta": out, "logprobs": logprobs,
                                     "finish_reason": finish}]}

    roles = [{**base, "choices": [{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]} for j in run.jobs]
    mode = UsageMode.of(body.stream_options)
    fast: FastFrame | None = None
    if not body.logprobs and not mode.continuous and fmt is None:
        tail = {"usage": None} if mode.final else {}
        templates: dict[int, ChunkTemplate] = {}

        def templated(i: int, delta: Delta) -> bytes | None:
            if not delta["token_ids"] and not delta["text"]:
                return None  # a finish-only chunk has an empty delta: the slow path
            t = templates.get(i)
            if t is None:
                index = run.jobs[i].index
                t = templates[i] = ChunkTemplate(lambda text, fin: {
                    **base, "choices": [{"index": index, "delta": {"content": text}, "logprobs": None,
                                         "finish_reason": fin}], **tail})
            return t.render(delta["text"], delta["finish_reason"])

        fast = templated

    return stream_frames(run, frame, base, mode, head=roles, offload=bool(body.logprobs), fast=fast)
