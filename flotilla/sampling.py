"""Per-request sampling parameters, validated at construction so bad input never reaches a worker."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from flotilla.errors import InvalidParameter

INT64_MAX = 2**63 - 1  # every count and id travels to the workers as a msgpack int64; larger ones cannot
MAX_STOP_STRINGS = 64  # stop strings and stop token ids per request (each is checked on every token)
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class StructuredOutput:
    """A constraint on what a request may generate (exactly one field set), enforced token by token with a
    grammar mask in the sampler (``flotilla/structured.py``). vLLM's names: ``json`` (a JSON schema, a dict
    or its text), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of these strings), ``grammar``
    (a Lark grammar, llguidance's dialect)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_fields = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if self.json_object is True:
            set_fields.append("json_object")
        elif self.json_object is not False:
            raise InvalidParameter("structured_output.json_object", f"must be a bool, got {self.json_object!r}")
        if len(set_fields) != 1:
            raise InvalidParameter("structured_output",
                                   "set exactly one of json, json_object, regex, choice, grammar; got "
                                                        f"{set_fields or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidParameter("structured_output.json",
                                   f"must be a JSON schema (dict or str), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameter(f"structured_output.{name}", f"must be a non-empty str, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidParameter("structured_output.choice", "must be a non-empty list of non-empty str, "
                                                                   f"got {self.choice!r}")
            self.choice = list(self.choice)

    @classmethod
    def from_any(cls, value: "StructuredOutput | dict[str, Any]") -> "StructuredOutput":
        return _from_any(cls, value, "structured_output")


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature == 0`` means greedy. ``top_k == -1`` (or 0) disables top-k. ``seed`` makes a request's
    random draws reproducible regardless of what else is batched with it: each token's draw depends only on
    (seed, index of the token in the output).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # log-probabilities of the prompt's own tokens (vLLM's name): None = off; k >= 0 also gives the top k at
    # each prompt position. The first prompt token has none.
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None
    # several completions of one prompt (``generate`` returns them under "outputs"); they run on one replica,
    # share the prompt's KV through the prefix cache, and choice i draws with seed + i when a seed is set
    n: int = 1
    # the LoRA adapter this request runs with (its name as loaded: ``Engine.load_lora_adapter``); None = the base
    # model. The engine checks the name against its adapters when the request is submitted.
    lora_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list("stop", self.stop, "a str or a list of str")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, "a list of token ids (int)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParameter("stop_token_ids",
                                   f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        _check_int("max_new_tokens", self.max_new_tokens, lo=1, hi=INT64_MAX)
        _check_num("temperature", self.temperature, lo=0.0, hint=">= 0")
        _check_num("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True, hint="in (0, 1]")
        _check_int("top_k", self.top_k, lo=-1, hi=INT64_MAX, hint="in [-1, 2**63 - 1] (-1 or 0 disables it)")
        _check_num("min_p", self.min_p, lo=0.0, hi=1.0, hint="in [0, 1]")
        _check_num("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True, hint="> 0")
        _check_num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0, hint="in [-2, 2]")
        _check_num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0, hint="in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0, hi=INT64_MAX, hint="in [0, 2**63 - 1]")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameter("stop", f"every stop string must be a non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, hi=INT64_MAX, hint="token ids in [0, vocab size)")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.logprobs, bool):
            raise InvalidParameter("logprobs", f"must be a bool, got {self.logprobs!r}")
        _check_int("top_logprobs", self.top_logprobs, lo=0, hi=20, hint="in [0, 20]")
        if self.top_logprobs and not self.logprobs:
            self.logprobs = True
        _check_int("n", self.n, lo=1, hi=128, hint="in [1, 128]")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=20, hint="in [0, 20] (or None)")
        if self.lora_name is not None and (not isinstance(self.lora_name, str) or not self.lora_name
                                           or len(self.lora_name) > 256):
            raise InvalidParameter("lora_name", f"must be a non-empty str of at most 256 characters (an adapter's "
                                                f"name) or None, got {self.lora_name!r}")
        if self.structured_output is not None:
            self.structured_output = StructuredOutput.from_any(self.structured_output)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_any(cls, value: "SamplingParams | dict[str, Any] | None") -> "SamplingParams":
        """Accept a SamplingParams, a plain dict (unknown keys are an error naming them) or None.

        A SamplingParams is copied and validated again: fields set after it was built are checked here, at
        submit, and later changes by the caller do not reach a request in flight."""
        return cls() if value is None else _from_any(cls, value, "sampling_params")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_list(name: str, value: Any, what: str) -> list[Any]:
    """None or a list/tuple as a list; anything else (``stop=5``) is a ValueError naming the field."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidParameter(name, f"must be {what}, got {type(value).__name__} {value!r}")


def _from_any(cls: type[Any], value: Any, name: str) -> Any:
    """A validated copy of an instance, or an instance from a dict (unknown keys are an error naming them)."""
    if isinstance(value, cls):
        return replace(value)
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidParameter(name, f"unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**value)
    raise InvalidParameter(name, f"expected {cls.__name__} or dict, got {type(value).__name__}")


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"must be an int{' ' + hint if hint else ''}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = hint or (f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
        raise InvalidParameter(name, f"must be {rng}, got {value}")


def _check_num(name: str, value: Any, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hint: str = "") -> None:
    # NaN and +-inf are rejected too: an infinite temperature or penalty turns logits into NaNs on the worker
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number {hint}, got {value!r}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and value > hi
    if bad_lo or bad_hi:
        raise InvalidParameter(name, f"must be {hint}, got {value}")
