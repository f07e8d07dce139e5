"""A request as the worker sees it: its tokens, how many of them are in the KV cache, and its pages."""

from __future__ import annotations

from dataclasses import dataclass, field

from flotilla.sampling import SamplingParams


@dataclass(eq=False)  # identity: the scheduler's list removals must not compare token lists
class Sequence:
    rid: str
    tokens: list[int]              # prompt followed by every generated token
    prompt_len: int                # tokens[:prompt_len] is the user's prompt
    sampling: SamplingParams
    arrival: int                   # admission order, for LIFO preemption
    num_outputs_at_start: int = 0  # outputs already produced elsewhere (a resumed request)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose KV is in the cache
    cached_tokens: int = -1        # prefix-cache hit at first admission (-1: not admitted yet)
    reported_cached: bool = False
    announced: bool = False        # reported to the front end in a StepStarted (it ran in a batch here)
    finished: bool = False
    finish_reason: str | None = None
    # Overlap scheduling: the last ``pending`` entries of ``tokens`` are placeholders for tokens a launched step
    # sampled on the device whose values the host has not read yet; ``feed_row`` is this sequence's row among
    # the sampled rows of the last launched step (where the next step takes its input token from).
    pending: int = 0
    feed_row: int = -1
    # LoRA: the adapter (None: the base model), the device slot it holds while this sequence runs, and the
    # prefix-cache space its KV lives in (0: the base model's; each adapter load has its own)
    lora: str | None = None
    lora_slot: int = -1
    cache_id: int = 0

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def num_outputs(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining_prefill(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def outstanding_tokens(self) -> int:
        return self.remaining_prefill + max(0, self.sampling.max_new_tokens - self.num_outputs)
