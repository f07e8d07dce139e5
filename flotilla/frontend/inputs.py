"""Request inputs checked at the edge: prompts, token ids, sampling parameters and request ids become a
``RequestState``, or a ValueError that names the field (never a crash in a worker)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.frontend.detokenizer import IncrementalDetokenizer
from flotilla.frontend.request import RequestState
from flotilla.sampling import INT64_MAX, SamplingParams
from flotilla.structured import check as check_structured

SamplingLike = SamplingParams | dict[str, Any] | None

# A prompt longer than this many characters per token of the context cannot fit: refused before it is
# tokenized (tokenizing 10 MB takes seconds). Generous: no tokenizer packs more than a few characters into one
# token on average (long runs of one character, say, still split).
MAX_CHARS_PER_TOKEN = 64


def batch_inputs(prompts: str | list[str] | None, input_ids: list[list[int]] | None,
                 sampling_params: SamplingLike | list[SamplingLike],
                 ) -> list[tuple[str | None, list[int] | None, SamplingLike]]:
    """``generate``'s arguments as (prompt, ids, sampling) per request."""
    if (prompts is None) == (input_ids is None):
        raise InvalidParameter("prompts", "pass exactly one of prompts or input_ids")
    if input_ids is not None:
        if not isinstance(input_ids, list) or (input_ids and isinstance(input_ids[0], int)):
            raise InvalidParameter("input_ids", "must be a list of token-id lists")
        items: list[tuple[str | None, list[int] | None]] = [(None, ids) for ids in input_ids]
    elif isinstance(prompts, str):
        items = [(prompts, None)]
    elif isinstance(prompts, (list, tuple)):
        items = [(p, None) for p in prompts]
    else:
        raise InvalidParameter("prompts",
                               f"must be a str or a list of str, got {type(prompts).__name__} {prompts!r:.80}")
    if not items:
        raise InvalidParameter("prompts", "must not be empty")
    if isinstance(sampling_params, list):
        if len(sampling_params) != len(items):
            raise InvalidParameter("sampling_params", f"got {len(sampling_params)} for {len(items)} prompts")
        params = sampling_params
    else:
        params = [sampling_params] * len(items)
    return [(p, ids, sp) for (p, ids), sp in zip(items, params)]


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int,
                 check_adapter: Callable[[str], None] | None = None):
        """``check_adapter(name)``: raises unless a request may run with LoRA adapter ``name`` (the engine's
        adapter registry); None: requests naming an adapter are refused."""
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len
        self.check_adapter = check_adapter
        self._ids = itertools.count()

    def make_choices(self, prompt: str | None, input_ids: Sequence[int] | None, sampling: SamplingLike,
                     request_id: str | None = None, affinity: str | None = None) -> list[RequestState]:
        """One state per choice (``n``), the rule for every caller: the same prompt, choice i seeded with seed + i
        and named ``<request id>-i`` (choice 0 keeps the request id), all under one affinity key (``affinity``,
        else the request id) so the controller puts them on one replica, which shares the prompt's KV among them.
        With n == 1, the one state keeps ``affinity`` as given."""
        first = self.make_state(prompt, input_ids, sampling, request_id, affinity)
        n = first.sampling.n
        if n == 1:
            return [first]
        states = [first]
        for i in range(1, n):
            seed = first.sampling.seed
            sp = replace(first.sampling, seed=None if seed is None else choice_seed(seed, i))
            states.append(RequestState(f"{first.rid}-{i}", list(first.prompt_ids), sp,
                                       IncrementalDetokenizer(self.tokenizer, first.prompt_ids)))
        for s in states:
            s.affinity = affinity or first.rid
        return states

    def make_state(self, prompt: str | None, input_ids: Sequence[int] | None, sampling: SamplingLike,
                   request_id: str | None = None, affinity: str | None = None) -> RequestState:
        sp = SamplingParams.from_any(sampling)  # copied and validated again, whatever was set after it was built
        if sp.structured_output is not None:
            check_structured(sp.structured_output)  # a grammar that cannot compile is refused here, not in a worker
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise InvalidParameter("request_id", f"must be a non-empty str, got {request_id!r}")
        self.check_token_ids(sp)
        if sp.lora_name is not None:
            if self.check_adapter is None:
                raise InvalidParameter("lora_name", "this engine serves no LoRA adapters")
            self.check_adapter(sp.lora_name)
        ids = self.prompt_ids(prompt) if input_ids is None else self.check_ids(input_ids, sp.max_new_tokens)
        self.check_length(len(ids), sp.max_new_tokens)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        state = RequestState(rid, ids, sp, IncrementalDetokenizer(self.tokenizer, ids))
        state.affinity = affinity
        return state

    def check_token_ids(self, sp: SamplingParams) -> None:
        """Fields that hold token ids name ids of this model's vocabulary."""
        for t in sp.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise InvalidParameter("stop_token_ids",
                                       f"token id {t} is outside the vocabulary [0, {self.vocab_size})")

    def check_length(self, prompt_len: int, max_new_tokens: int, field: str = "prompt") -> None:
        """A prompt that alone fills the context is the prompt's fault; one that fits but leaves too little
        room for ``max_new_tokens`` is max_new_tokens'."""
        if prompt_len >= self.max_model_len:
            raise InvalidParameter(field, f"the prompt has {prompt_len} tokens, and max_model_len is "
                                          f"{self.max_model_len} (the prompt plus at least one new token must fit)")
        if prompt_len + max_new_tokens > self.max_model_len:
            raise InvalidParameter("max_new_tokens",
                                   f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
                                   f"must be <= max_model_len {self.max_model_len}; at most "
                                   f"{self.max_model_len - prompt_len} new tokens fit after this prompt")

    def check_chars(self, text: str, field: str = "prompt") -> None:
        """The cheap check before tokenizing: a text too long to fit in any number of tokens the context holds."""
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise InvalidParameter(field, f"{len(text)} characters cannot fit in max_model_len {self.max_model_len} "
                                          f"tokens (refused before tokenizing: the limit is {MAX_CHARS_PER_TOKEN} "
                                          f"characters per token, {limit} characters)")

    def prompt_ids(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidParameter("prompt",
                                   f"must be a non-empty str (or pass input_ids), got {type(prompt).__name__} "
                                             f"{prompt!r:.80}")
        if not prompt:
            raise InvalidParameter("prompt", "must be a non-empty str (or pass input_ids)")
        self.check_chars(prompt)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidParameter("prompt", f"not valid Unicode text ({e.reason} at position {e.start})") from None
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise InvalidParameter("prompt", "tokenizes to no tokens")
        return ids

    def check_ids(self, input_ids: Any, max_new_tokens: int = 0) -> list[int]:
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
            raise InvalidParameter("input_ids", f"must be a list of token ids, got {type(input_ids).__name__}")
        ids = list(input_ids)
        if not ids:
            raise InvalidParameter("input_ids", "must not be empty")
        self.check_length(len(ids), max_new_tokens, "input_ids")  # before the per-id loop: a huge input fails fast
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidParameter("input_ids", f"token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        return ids


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request seeded with ``seed``: seed + index, kept within int64."""
    return (seed + index) & INT64_MAX
