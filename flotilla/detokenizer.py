"""Incremental detokenization and stop strings, done in the front end so workers deal in token ids only."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so tokenizers that merge leading spaces behave


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    Decodes the window ``ids[prefix:]`` and compares it with ``ids[prefix:read]``; the difference is new
    text, held back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back, at the end of the request."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(prefix_text):] if len(full) > len(prefix_text) else ""


class StopStringMatcher:
    """Finds the first stop string in the text produced so far, looking only at the new tail each time."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_chars: int) -> int | None:
        """Index where the text must be cut, or None."""
        if not self.stops:
            return None
        start = max(0, len(text) - new_chars - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    @property
    def holdback(self) -> int:
        """Characters a stream must hold back: a stop string could still start inside them."""
        return max(0, self.longest - 1)
