"""``POST /v1/completions``: OpenAI's legacy text completions (``text_completion`` objects)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from flotilla.server.engine_client import Delta, Tokenizer
from flotilla.server.errors import bad_param
from flotilla.server.protocol import CompletionRequest
from flotilla.server.runs import Job, Run, collect_or_error, start_or_error
from flotilla.server.sampling import (MAX_JOBS, MAX_N, MAX_PROMPTS, check_common, check_text_size, choice_jobs,
                                     delta_tops, sampling_params)
from flotilla.server.state import ServerState
from flotilla.server.streaming import ChunkTemplate, FastFrame, SSEResponse, UsageMode, stream_frames
from flotilla.server.tokens import TokenStrings, encode, off_loop
from flotilla.server.usage import usage

# the engine's field names -> the API's, so a 400 names what the client sent
ALIASES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs", "input_ids": "prompt",
           "sampling_params": "body"}
_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def add_completion_route(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine, lora = state.accept_generation("/v1/completions", body)
        rid = f"cmpl-{uuid.uuid4().hex}"
        check_completion(body)
        check_prompt_sizes(body, engine.max_model_len)
        prompts = await off_loop(prompt_ids, body, engine.tokenizer)
        best_of = body.best_of or body.n
        jobs = choice_jobs(rid, prompts, lora.apply(completion_params(body, ranked=best_of > body.n)), best_of)
        heads = await off_loop(prompt_texts, body, prompts, engine.tokenizer) if body.echo else []
        run = Run(engine, state.metrics, jobs, accepted=bool(body.stream))
        await start_or_error(request, run, lora.aliases(ALIASES))
        strings = TokenStrings(engine.tokenizer)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": lora.model}
        if body.stream:
            return SSEResponse(_stream(run, body, base, strings, heads))
        results = await collect_or_error(request, run)
        choices = await off_loop(_choices, jobs, results, body, strings, prompts, heads)
        if body.max_tokens == 0:
            results = [{**r, "completion_tokens": 0} for r in results]
        return JSONResponse({**base, "choices": choices, "usage": usage(results, best_of),
                             "system_fingerprint": None})


def check_completion(body: CompletionRequest) -> None:
    check_common(body)
    if body.suffix:
        raise bad_param("suffix", "is not supported")
    if body.best_of is not None:
        if isinstance(body.best_of, bool) or not body.n <= body.best_of <= MAX_N:
            raise bad_param("best_of", f"must be in [n, {MAX_N}] (n={body.n}), got {body.best_of}")
        if body.stream and body.best_of > body.n:
            raise bad_param("best_of", "cannot be larger than n when streaming")
    if body.max_tokens == 0 and (not body.echo or body.stream):
        raise bad_param("max_tokens", "0 is only allowed with echo and without stream (the prompt alone, e.g. for "
                                      "its logprobs)")
    if body.echo and body.stream and body.logprobs is not None:
        raise bad_param("echo", "with logprobs is only supported without stream")


def check_prompt_sizes(body: CompletionRequest, max_model_len: int) -> None:
    """How many prompts, and how long each text is, checked before anything is tokenized."""
    prompt: Any = body.prompt
    if isinstance(prompt, str):
        check_text_size(len(prompt), max_model_len, "prompt")
        return
    if not prompt or isinstance(prompt[0], int):
        return
    if len(prompt) > MAX_PROMPTS:
        raise bad_param("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
    per_prompt = body.best_of or body.n
    if len(prompt) * per_prompt > MAX_JOBS:
        raise bad_param("prompt", f"{len(prompt)} prompts x {per_prompt} choices each is more than the "
                                  f"{MAX_JOBS} completions one request may ask for")
    for p in prompt:
        if isinstance(p, str):
            check_text_size(len(p), max_model_len, "prompt")


def prompt_ids(body: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids for every prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    prompt: Any = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise bad_param("prompt", "must not be empty")
    out = []
    for p in prompt:
        ids = encode(tokenizer, p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_param("prompt", "must not be empty (it tokenizes to no tokens)")
        out.append(ids)
    return out


def completion_params(body: CompletionRequest, ranked: bool = False) -> dict[str, Any]:
    """``ranked``: best_of > n, so the sampled tokens' logprobs are needed to pick the best choices. With echo
    and logprobs the prompt's own logprobs come from the forward pass; max_tokens=0 asks for one token, which
    the response leaves out."""
    limit = body.max_tokens if body.max_tokens is not None else _DEFAULT_MAX_TOKENS
    params = sampling_params(body, 1 if limit == 0 else limit)
    if body.logprobs is not None or ranked:
        params["logprobs"] = True
    if body.logprobs is not None:
        # candidates are keyed by TokenStrings.label, which tells every token apart: k of them are k entries
        params["top_logprobs"] = body.logprobs
        if body.echo:
            params["prompt_logprobs"] = body.logprobs
    return params


def top_by_text(strings: TokenStrings, row: list[Any], k: int) -> dict[str, float]:
    """The ``k`` most likely candidates of one position, keyed by ``TokenStrings.label`` (pieces of a character
    are ``bytes:...``, so they never collide); should two tokens still share a label (an added token spelling
    a vocabulary entry), the more likely wins and the row holds one entry fewer."""
    out: dict[str, float] = {}
    for tid, lp in sorted(row, key=lambda c: -float(c[1])):
        text = strings.label(int(tid))
        if text not in out:
            out[text] = float(lp)
            if len(out) == k:
                break
    return out


def logprobs_block(strings: TokenStrings, ids: list[int], lps: list[float] | None, tops: list[Any] | None, k: int,
                   offset: int) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs block for some tokens; offsets are into the completion text."""
    tokens = [strings.label(t) for t in ids]
    offsets = []
    for t in ids:
        offsets.append(offset)
        offset += strings.num_chars(t)
    lps = list(lps or [])
    block: dict[str, Any] = {"tokens": tokens,
                             "token_logprobs": [lps[j] if j < len(lps) else None for j in range(len(tokens))],
                             "text_offset": offsets, "top_logprobs": None}
    if tops is not None:  # a prompt's first token has no candidates (None)
        rows: list[dict[str, float] | None] = []
        for j, row in enumerate(tops):
            top = None if row is None else top_by_text(strings, row, k)
            if top is not None and j < len(tokens) and j < len(lps) and lps[j] is not None:
                top.setdefault(tokens[j], float(lps[j]))  # OpenAI: the chosen token too, so up to k + 1
            rows.append(top)
        block["top_logprobs"] = rows
    return block, offset


def prompt_texts(body: CompletionRequest, prompts: list[list[int]], tokenizer: Tokenizer) -> list[str]:
    """What echo puts first, per prompt: the prompt as sent (a string), or its decoded ids without special
    tokens (as generated text is decoded, and as a string prompt's BOS is not in its text: text_offset
    counts no characters for them)."""
    given = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) \
        else [body.prompt]
    return [g if isinstance(g, str) else tokenizer.decode(list(ids), skip_special_tokens=True)
            for g, ids in zip(given, prompts)]


def best_choices(jobs: list[Job], results: list[dict[str, Any]], n: int, best_of: int) -> list[tuple[Job, dict]]:
    """The ``n`` of each prompt's ``best_of`` candidates with the highest total logprob, re-indexed."""
    out = []
    for p in range(len(jobs) // best_of):
        group = list(zip(jobs[p * best_of:(p + 1) * best_of], results[p * best_of:(p + 1) * best_of]))
        group.sort(key=lambda jr: -sum(jr[1].get("logprobs") or [0.0]))
        for c, (job, res) in enumerate(group[:n]):
            out.append((Job(p * n + c, job.request_id, job.input_ids, job.params), res))
    return out


def _choices(jobs: list[Job], results: list[dict[str, Any]], body: CompletionRequest, strings: TokenStrings,
             prompts: list[list[int]], heads: list[str]) -> list[dict[str, Any]]:
    best_of = body.best_of or body.n
    pairs = best_choices(jobs, results, body.n, best_of) if best_of > body.n else list(zip(jobs, results))
    choices = []
    for job, res in pairs:
        p = job.index // body.n
        generated = body.max_tokens != 0  # max_tokens=0 (echo only): the one token asked for is left out
        head = heads[p] if body.echo else ""
        text = head + (res["text"] if generated else "")
        logprobs = None
        if body.logprobs is not None:
            ids = res["token_ids"] if generated else []
            tops = res.get("top_logprobs") if body.logprobs else None
            logprobs, _ = logprobs_block(strings, ids, res.get("logprobs"), tops, body.logprobs, len(head))
            if body.echo:
                ptops = res.get("prompt_top_logprobs") if body.logprobs else None
                echo, _ = logprobs_block(strings, prompts[p], res.get("prompt_logprobs"), ptops, body.logprobs, 0)
                logprobs = {k: None if echo[k] is None else echo[k] + logprobs[k] for k in logprobs}
        choices.append({"index": job.index, "text": text, "logprobs": logprobs,
                        "finish_reason": res["finish_reason"] if generated else "length"})
    return choices


def _stream(run: Run, body: CompletionRequest, base: dict[str, Any], strings: TokenStrings,
            heads: list[str]) -> AsyncIterator[bytes]:
    offsets = [0] * len(run.jobs)

    def frame(i: int, delta: Delta, seen: int) -> dict[str, Any] | None:
        ids = delta.get("token_ids") or []
        if not ids and not delta["text"] and not delta["finished"]:
            return None
        logprobs = None
        if body.logprobs is not None:
            tops = delta_tops(delta, run.jobs[i], seen)
            logprobs, offsets[i] = logprobs_block(strings, ids, delta.get("logprobs"), tops, body.logprobs,
                                                  offsets[i])
        choice = {"index": i, "text": delta["text"], "logprobs": logprobs, "finish_reason": delta["finish_reason"]}
        return {**base, "choices": [choice]}

    mode = UsageMode.of(body.stream_options)
    fast: FastFrame | None = None
    if body.logprobs is None and not mode.continuous:
        tail = {"usage": None} if mode.final else {}
        templates: dict[int, ChunkTemplate] = {}

        def templated(i: int, delta: Delta) -> bytes | None:
            if not delta["token_ids"] and not delta["text"] and not delta["finished"]:
                return None
            t = templates.get(i)
            if t is None:
                t = templates[i] = ChunkTemplate(lambda text, fin: {
                    **base, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": fin}], **tail})
            return t.render(delta["text"], delta["finish_reason"])

        fast = templated

    head = [{**base, "choices": [{"index": job.index, "text": heads[job.index // body.n], "logprobs": None,
                                  "finish_reason": None}]} for job in run.jobs] if body.echo else []
    return stream_frames(run, frame, base, mode, head=head, offload=body.logprobs is not None, fast=fast)
