"""Incremental detokenization and stop strings: in the replicas' leaders (``flotilla/worker/texts.py``), or in the
front end with ``detokenize_in_replicas=False`` (the reference path)."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output so tokenizers that merge leading spaces behave


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything each step.

    The front end runs this for every token of every request on one thread, so its cost bounds what all
    replicas together can stream. With a fast tokenizer whose ``decode`` is the Rust decoder's output as is
    (no ``clean_up_tokenization_spaces``), the work is done by ``tokenizers``' own ``DecodeStream``
    (about 8x cheaper per token than going through ``PreTrainedTokenizer.decode``); otherwise by the same
    windowed algorithm in Python: decode ``ids[prefix:]``, compare with ``ids[prefix:read]``, and hold new
    text back while it ends in an incomplete UTF-8 sequence (U+FFFD). Both give ``tokenizer.decode(output)``
    once flushed (the prompt's last tokens only set the context of the first output token).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
            # ids since the stream last produced text, and the ids of that last piece (for flush)
            self._held: list[int] = []
            self._anchor: list[int] = context
        else:
            self.ids: list[int] = context
            self.prefix = 0
            self.read = len(self.ids)

    @property
    def held(self) -> int:
        """Ids added whose text is not out yet (an incomplete UTF-8 sequence): what a resumed request re-feeds."""
        if self._stream is not None:
            return len(self._held)
        return len(self.ids) - self.read

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int]) -> str:
        if self._stream is not None:
            text = self._stream.step(self._backend, new_ids)
            if text is None:
                self._held.extend(new_ids)
                return ""
            self._anchor = self._held + list(new_ids)
            self._held = []
            return text
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
        if self._stream is not None:
            held, self._held = self._held, []
            if not held:
                return ""
            before = self._backend.decode(self._anchor, skip_special_tokens=self.skip)
            full = self._backend.decode(self._anchor + held, skip_special_tokens=self.skip)
            self._anchor = self._anchor + held
            return full[len(before):] if len(full) > len(before) else ""
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
