"""Detokenization and stop strings in the replica's leader, so the front end's one thread only cuts deltas.

Why here: the front end turned every token of every request into text on one thread, under the same GIL as the
HTTP server (6-10 us per token), which capped what all replicas together could stream. Each leader now does it for
its own requests, in parallel with the others, and sends the text with the ids (``TokenOutput.text``).

Stop strings act on text, so they move with it: a stop string found here ends the request in this replica at once
(no round trip through the front end) and the output says where the request's text ends (``text_end``, an absolute
position: the stop may begin in text sent with an earlier step, which the front end still holds back from its
streams). A request resumed here after a failover carries its detokenizer state (``AddRequest.held``: output ids
whose text was not out yet; ``text_tail``/``text_len``: the end of its text so far), so no character is repeated or
lost. ``detokenize_in_replicas=False`` keeps the old path: the front end detokenizes (the reference the tests compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flotilla.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from flotilla.ipc.messages import TokenOutput


@dataclass
class _Text:
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    chars: int            # the request's text length so far (what the front end holds)
    tail: str             # its last stops.holdback characters (a stop string may start in them)
    pending: str = ""     # text of re-fed held ids not sent yet


class ReplicaTexts:
    """The text state of every request on this replica; the tokenizer is loaded on the first request."""

    def __init__(self, tokenizer_path: str, tokenizer: Any = None):
        self._path = tokenizer_path
        self._tok = tokenizer
        self._reqs: dict[str, _Text] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self._path)
        return self._tok

    def add(self, rid: str, prompt_ids: list[int], output_ids: list[int], stops: list[str], held: int = 0,
            text_tail: str = "", text_len: int = 0) -> None:
        held = max(0, min(held, len(output_ids)))
        done = len(output_ids) - held
        detok = IncrementalDetokenizer(self.tokenizer, list(prompt_ids) + list(output_ids[:done]))
        pending = detok.add(list(output_ids[done:])) if held else ""
        matcher = StopStringMatcher(stops)
        tail = text_tail[-matcher.holdback:] if matcher.holdback else ""
        self._reqs[rid] = _Text(detok, matcher, text_len, tail, pending)

    def __len__(self) -> int:
        return len(self._reqs)

    def apply(self, outputs: list[TokenOutput]) -> list[str]:
        """Fill in the text of a step's outputs; returns the requests a stop string ended here (not finished
        before), which the caller ends in its scheduler."""
        stopped = []
        for out in outputs:
            st = self._reqs.get(out.rid)
            if st is None:
                continue
            if out.token_ids:
                text = st.pending + st.detok.add(out.token_ids)
                st.pending = ""
                if out.finished:
                    text += st.detok.flush()
                out.text, out.held = text, st.detok.held
                if st.stops.stops:
                    tail = st.tail + text
                    cut = st.stops.find(tail, len(text))
                    if cut is not None:
                        out.text_end = st.chars - len(st.tail) + cut
                        if not out.finished:
                            stopped.append(out.rid)
                        out.finished, out.finish_reason = True, "stop"
                    st.tail = tail[-st.stops.holdback:] if st.stops.holdback else ""
                st.chars += len(text)
            if out.finished:
                del self._reqs[out.rid]
        return stopped
