"""The pre-encoded chunk templates give exactly the bytes of the dict-and-json.dumps path they replace."""

from __future__ import annotations

import pytest

from flotilla.server.streaming import DONE, ChunkTemplate, sse

BASE = {"id": "cmpl-0123", "object": "text_completion", "created": 1700000000, "model": "mödel \"x\""}


def completion_chunk(text, finish, usage_tail: bool) -> dict:
    out = {**BASE, "choices": [{"index": 3, "text": text, "logprobs": None, "finish_reason": finish}]}
    return {**out, "usage": None} if usage_tail else out


def chat_chunk(text, finish) -> dict:
    base = {"id": "chatcmpl-1", "created": 1, "model": "m", "system_fingerprint": None, "object": "chat.completion.chunk"}
    return {**base, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}]}


# every BMP character but the surrogates (the detokenizer only makes valid Unicode), some astral ones, and the
# characters JSON must escape, in runs, since escaping bugs hide at boundaries
_CHARS = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000] + ["\U0001F600", "\U0010FFFF"]
TEXTS = ["", " ", "\"", "\\", "\n\r\t\b\f", "\x00\x01\x1f\x7f", "\u2028\u2029", "héllo wörld", "日本語",
         "a\"b\\c\nd", *("".join(_CHARS[i:i + 512]) for i in range(0, len(_CHARS), 512))]


@pytest.mark.parametrize("usage_tail", [False, True])
def test_completion_template_matches_json_dumps(usage_tail: bool) -> None:
    t = ChunkTemplate(lambda text, fin: completion_chunk(text, fin, usage_tail))
    for text in TEXTS:
        for finish in (None, "length", "stop", "abort"):
            assert t.render(text, finish) == sse(completion_chunk(text, finish, usage_tail)), (text[:20], finish)


def test_chat_template_matches_json_dumps() -> None:
    t = ChunkTemplate(chat_chunk)
    for text in TEXTS:
        for finish in (None, "length"):
            assert t.render(text, finish) == sse(chat_chunk(text, finish))


def test_sse_frames() -> None:
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"
