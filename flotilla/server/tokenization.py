"""vLLM's ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``: the server's own tokenizer, so a
client can count tokens (or render a chat prompt) exactly as generation will, without loading the tokenizer
itself (lm-evaluation-harness's ``tokenizer_backend=remote`` uses all three)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from flotilla.server.chat import chat_prompt_ids
from flotilla.server.engine_client import Tokenizer
from flotilla.server.errors import APIError, bad_param
from flotilla.server.protocol import DetokenizeRequest, TokenizeRequest
from flotilla.server.state import ServerState
from flotilla.server.tokens import decode, encode, off_loop


def add_tokenization_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """``{prompt}`` or ``{messages, add_generation_prompt}``, with ``add_special_tokens``, to
        ``{count, max_model_len, tokens, token_strs}``."""
        engine = state.accept("/tokenize", body)
        ids = await off_loop(tokenize_ids, body, engine.tokenizer)
        strs = await off_loop(engine.tokenizer.convert_ids_to_tokens, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """``{tokens}`` to ``{prompt}``: the text they decode to, special tokens included."""
        engine = state.accept("/detokenize", body)
        check_token_ids(body.tokens, len(engine.tokenizer))
        return {"prompt": await off_loop(decode, engine.tokenizer, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """The tokenizer's special tokens, class, context length and chat template."""
        engine = state.ready_engine()
        return tokenizer_card(engine.tokenizer, engine.max_model_len)


def tokenizer_card(tokenizer: Tokenizer, max_model_len: int) -> dict[str, Any]:
    def token(name: str) -> str | None:
        value = getattr(tokenizer, name, None)
        return None if value is None else str(value)

    return {"tokenizer_class": type(tokenizer).__name__, "bos_token": token("bos_token"),
            "eos_token": token("eos_token"), "pad_token": token("pad_token"), "unk_token": token("unk_token"),
            "model_max_length": max_model_len, "vocab_size": len(tokenizer),
            "chat_template": getattr(tokenizer, "chat_template", None)}


def tokenize_ids(body: TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    """Blocking: call it through ``off_loop``."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: pass exactly one of prompt or messages", param="prompt",
                       code="invalid_parameter")
    if body.messages is not None:
        if not body.messages:
            raise bad_param("messages", "must not be empty")
        special = False if body.add_special_tokens is None else body.add_special_tokens
        return chat_prompt_ids(body.messages, tokenizer, body.add_generation_prompt, special)
    special = True if body.add_special_tokens is None else body.add_special_tokens
    return encode(tokenizer, body.prompt or "", add_special_tokens=special)


def check_token_ids(ids: list[int], vocab: int) -> None:
    for j, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise bad_param("tokens", f"tokens[{j}] = {t} is outside the tokenizer's vocabulary [0, {vocab})")
