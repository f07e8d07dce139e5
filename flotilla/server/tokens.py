"""Tokenizer work for the server: off the event loop, and token ids to the strings and bytes logprobs show.

Tokenizing a long prompt or rendering a chat template can take a good fraction of a second (a 10 MB prompt,
seconds). Run on the event loop, that would stall every stream and /health with it, so every call here that
touches the tokenizer for a request goes through ``asyncio.to_thread``.

Logprobs name each token twice: ``token``, the text it decodes to alone (what OpenAI shows; a piece of a
multi-byte character decodes to U+FFFD), and ``bytes``, the token's own bytes. The bytes come from the token's
vocabulary string, not from its decoded text, so that the bytes of consecutive tokens concatenate to the UTF-8
of the text even when a character is split across tokens.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flotilla.server.engine_client import Tokenizer

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, so the event loop keeps serving other requests."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is one printable character. Bytes that are printable
    Latin-1 stand for themselves; the others (controls, space, soft hyphen...) are shifted, in byte order, to
    the characters from U+0100 up. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    out = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


_BYTE_LEVEL = _byte_level_alphabet()  # a constant, never mutated


def _decoder_kind(tokenizer: Tokenizer) -> str:
    """"byte_level" (GPT-2/Llama 3/Qwen), "sentencepiece" (``▁`` for spaces, ``<0xNN>`` byte fallback), or
    "text" (unknown: fall back to the decoded text's UTF-8)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = repr(getattr(backend, "decoder", None))
    if "ByteLevel(" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "Metaspace(" in decoder or '"▁"' in decoder:
        return "sentencepiece"
    return "text"


class TokenStrings:
    """Token id -> (text it decodes to alone, its own bytes), memoised per id for the life of one response."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._kind = _decoder_kind(tokenizer)
        added = (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        self._added = {int(i): str(getattr(t, "content", t)) for i, t in added}
        self._special = {int(i) for i, t in added if getattr(t, "special", False)}
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._tok.decode([token_id])
            self._text[token_id] = text
        return text

    def label(self, token_id: int) -> str:
        """The token as the legacy completions API names it: its text, or for a token whose own bytes are not
        UTF-8 on their own (a piece of a character) OpenAI's ``bytes:\\xNN...`` form, so that no two tokens
        share a name (``top_logprobs`` is keyed by it) and the name says which piece it is."""
        raw = self.bytes(token_id)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self.text(token_id)

    def num_chars(self, token_id: int) -> int:
        """Characters of the text that begin in this token (its UTF-8 lead bytes): a character split over
        tokens is counted once, at its first piece, so these add up to text offsets. A special token adds
        none: the text a response carries is decoded without them."""
        if token_id in self._special:
            return 0
        return sum(1 for b in self.bytes(token_id) if b & 0xC0 != 0x80)

    def bytes(self, token_id: int) -> bytes:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes(token_id)
            self._bytes[token_id] = raw
        return raw

    def _token_bytes(self, token_id: int) -> builtins.bytes:  # (the class's own ``bytes`` shadows the type)
        if token_id in self._added:  # special and added tokens are literal text, not byte-encoded
            return self._added[token_id].encode("utf-8")
        piece = self._tok.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._kind == "byte_level" and all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            if self._kind == "sentencepiece":
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    try:
                        return bytes([int(piece[3:5], 16)])
                    except ValueError:
                        pass
                return piece.replace("▁", " ").encode("utf-8")
        return self.text(token_id).encode("utf-8")


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The chat template's text; raises ValueError (with the template's own message) when it refuses them."""
    if not getattr(tokenizer, "chat_template", None):
        raise LookupError("this model's tokenizer has no chat template")
    kw = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **kw)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and friends
        raise ValueError(f"the chat template rejected them: {e}") from None


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))
