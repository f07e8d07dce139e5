"""Incremental detokenization: both paths (tokenizers' DecodeStream and the windowed Python fallback) stream
exactly ``tokenizer.decode(output)`` in pieces, whatever the chunking, multi-byte characters included."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from flotilla.frontend.detokenizer import IncrementalDetokenizer
from conftest import tiny

TEXTS = [
    "The fox walked down to the river. It was cold, and the water ran clear!",
    "Caf\u00e9 cr\u00e8me, na\u00efve \u00fcber stra\u00dfe \u2014 \u00bfqu\u00e9 tal? \u4f60\u597d\u4e16\u754c \U0001f98a\U0001f332 ok",
    "  leading spaces\n\ttabs and\nnew lines   ",
]


class _Slow:
    """The same tokenizer seen without its Rust backend: forces the Python path."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tok(request):
    return AutoTokenizer.from_pretrained(tiny(request.param))


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> tuple[str, list[str]]:
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return "".join(pieces), pieces


@pytest.mark.parametrize("slow", [False, True], ids=["decode_stream", "python"])
def test_streamed_text_equals_decode(tok, slow):
    rng = random.Random(0)
    prompt = tok("Tell me a story:")["input_ids"]
    for text in TEXTS:
        out = tok(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(_Slow(tok) if slow else tok, prompt)
        assert (detok._stream is None) == slow
        streamed, pieces = _stream(detok, out, rng)
        assert streamed == tok.decode(out, skip_special_tokens=True)
        # nothing half-made is shown before the end: no piece but the last carries a replacement char
        assert not any("\ufffd" in p for p in pieces[:-1])


def test_special_tokens_skipped_and_paths_agree(tok):
    rng = random.Random(1)
    prompt = tok("Hello")["input_ids"]
    specials = [i for i in tok.all_special_ids if i < len(tok)]
    for _ in range(20):
        out = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        out[rng.randrange(len(out))] = rng.choice(specials)
        fast, _ = _stream(IncrementalDetokenizer(tok, prompt), out, random.Random(2))
        slow, _ = _stream(IncrementalDetokenizer(_Slow(tok), prompt), out, random.Random(2))
        assert fast == slow
        assert not any(tok.convert_ids_to_tokens(s) in fast for s in specials)


def test_cleanup_tokenizers_take_the_python_path(tok):
    tok.clean_up_tokenization_spaces = True
    try:
        assert IncrementalDetokenizer(tok, [1, 2])._stream is None
    finally:
        tok.clean_up_tokenization_spaces = False
