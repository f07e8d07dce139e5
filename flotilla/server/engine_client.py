"""What the HTTP server uses of an engine, and nothing more.

``Engine`` and ``RayEngine`` satisfy these protocols structurally; so does any stand-in a test writes. Typing the
server against them (rather than ``Any``) keeps the dependency explicit: a change to the engine that breaks the
server shows up here, and the server cannot quietly grow a dependency on an engine internal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

Delta = dict[str, Any]
"""One step of a request: ``{text, token_ids, finished, finish_reason, logprobs?, top_logprobs?, result?}``;
``result`` (the final dict: ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``...) is on the last."""


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the server calls."""

    chat_template: str | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, Any]: ...

    def __len__(self) -> int: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any) -> Any: ...


class EngineClient(Protocol):
    """An engine as the server sees it.

    ``stream_async`` must validate when first advanced (a bad parameter raises ``InvalidParameter``, a
    ``ValueError`` naming the field, before any token, which becomes a 400 with that ``param``), raise
    ``RequestFailed`` when no replica can run the request (a 503), and abort the request when the iterator is
    closed (the client left).
    """

    tokenizer: Tokenizer
    max_model_len: int

    def stream_async(self, prompt: str | None = None, sampling_params: Mapping[str, Any] | None = None, *,
                     input_ids: list[int] | None = None, request_id: str | None = None,
                     accepted: bool = False) -> AsyncIterator[Delta]:
        """With ``"n"`` > 1 in ``sampling_params``: the prompt's n choices (the engine seeds choice i with seed + i
        and keeps them on one replica), their deltas interleaved, each with ``"index"``, the choice; the stream
        ends once every choice has finished. Without it (n == 1), one request whose deltas have no index.
        ``accepted``: the first delta is ``{"accepted": True, "text": "", "token_ids": [], "finished": False}``,
        yielded once the requests are queued (validation passed), so a streaming response's status goes out then."""
        ...

    def stats(self) -> Mapping[str, Any]:
        """``{"replicas": [{"id", "alive", "running", "waiting", "kv_used", "cached_tokens"}, ...],
        "num_requests_inflight", "dp_size"}`` (``Engine`` gives an ``EngineStats``, which reads as that mapping);
        called by /health, /metrics and /admin/scale."""
        ...

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        """Blocking; the server calls it in a worker thread."""
        ...

    # LoRA adapters (flotilla/server/lora.py). An engine without them (enable_lora off, or a stand-in that lacks
    # these methods) lists none: the server reads the list through ``lora.adapters`` and treats a RuntimeError
    # or a missing method as "no adapters".
    def load_lora_adapter(self, name: str, path: str) -> None:
        """Blocking (the server calls it in a worker thread); ``InvalidParameter`` naming ``lora_name`` or
        ``lora_path`` for bad input, ``RuntimeError`` when the engine was started without LoRA."""
        ...

    def unload_lora_adapter(self, name: str) -> None:
        """Blocking; ``InvalidParameter("lora_name", ...)`` for an adapter that is not loaded."""
        ...

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        """``[{"name", "path", "version", "rank", "id"}, ...]``; cheap (read on the event loop by /v1/models and
        by every request whose ``model`` is not the base model's name)."""
        ...
