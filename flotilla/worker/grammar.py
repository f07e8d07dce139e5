"""The leader's grammar matchers: one per constrained request, a token bitmask per step, applied to the
logits before sampling.

The mask of a whole batch is filled on the host by llguidance (in parallel across rows, without the GIL)
and copied to the device once per step; rows without a constraint are left alone. After sampling, each
matcher consumes its row's token; a matcher that reached the end of its grammar stops its request.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from flotilla.sampling import StructuredOutput
from flotilla.structured import grammar_of

log = logging.getLogger(__name__)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V/32)] int32 bit words -> [rows, V] bool (token allowed). Plain tensor ops: llguidance's
    own apply function is torch.compile'd, which would compile on the first constrained request."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab_size]


class Grammars:
    def __init__(self, tokenizer_path: str, vocab_size: int, eos_ids: tuple[int, ...]):
        self.tokenizer_path, self.vocab_size, self.eos_ids = tokenizer_path, vocab_size, eos_ids
        self.matchers: dict[str, Any] = {}
        self._tokenizer = None
        self._executor = None

    def _llg_tokenizer(self):
        if self._tokenizer is None:  # loaded on the first constrained request only
            import llguidance
            import llguidance.hf
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(self.tokenizer_path)
            eos = list(self.eos_ids) or None
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos)
            self._executor = llguidance.LLExecutor()
        return self._tokenizer

    def add(self, rid: str, so: StructuredOutput, output_ids: list[int]) -> None:
        """A matcher for a new request; a resumed one replays the tokens it already has. Raises ValueError
        when the grammar does not compile or the replayed tokens do not fit it."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._llg_tokenizer(), grammar_of(so), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_output: {matcher.get_error()}")
        if output_ids:
            matcher.consume_tokens(list(output_ids))
            if matcher.is_error():
                raise ValueError(f"structured_output: the tokens so far do not fit: {matcher.get_error()}")
        self.matchers[rid] = matcher

    def drop(self, rid: str) -> None:
        self.matchers.pop(rid, None)

    def constrained_rows(self, rids: list[str]) -> list[tuple[int, Any]]:
        return [(r, self.matchers[rid]) for r, rid in enumerate(rids) if rid in self.matchers]

    def mask(self, logits: torch.Tensor, rids: list[str]) -> list[tuple[int, Any]]:
        """Mask the rows of constrained requests in place; returns those (row, matcher) pairs."""
        rows = self.constrained_rows(rids)
        if not rows:
            return rows
        import llguidance.torch as llt

        bitmask = llt.allocate_token_bitmask(len(rows), self.vocab_size)
        llt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, (_, m) in enumerate(rows)], bitmask)
        index = torch.tensor([r for r, _ in rows], device=logits.device)
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        logits.index_put_((index,), logits.index_select(0, index).masked_fill_(~allowed, float("-inf")))
        return rows

    def accept(self, rows: list[tuple[int, Any]], tokens: list[int], rids: list[str]) -> set[str]:
        """Feed each constrained row its sampled token; returns the requests whose grammar is complete."""
        done = set()
        for r, matcher in rows:
            matcher.consume_token(tokens[r])
            if matcher.is_error():
                log.warning("request %r: the grammar matcher failed: %s", rids[r], matcher.get_error())
                done.add(rids[r])
            elif matcher.is_stopped():
                done.add(rids[r])
        return done
