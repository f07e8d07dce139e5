"""The error every check at the edge raises: a parameter that is invalid, named.

``InvalidParameter`` is a ``ValueError`` (callers that catch ``ValueError`` keep working, and its text is the
familiar ``"field: message"``), and it carries the field apart from the message so that whoever reports it (the
HTTP server's 400, with ``param``) reads the field by type instead of parsing the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class InvalidParameter(ValueError):
    """``field`` (a parameter name, dotted for a nested one: ``structured_output.json``) is invalid; ``message``
    says why; ``allowed``, where the values form a short list, names them. ``str()`` is ``"field: message"``."""

    def __init__(self, field: str, message: str, allowed: Sequence[Any] | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
        self.allowed = list(allowed) if allowed is not None else None

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its parts (Ray hands it across processes)
        return type(self), (self.field, self.message, self.allowed)

    def renamed(self, field: str) -> "InvalidParameter":
        """The same complaint about ``field`` (the caller's name for the parameter)."""
        return InvalidParameter(field, self.message, self.allowed)


def type_name(e: BaseException) -> str:
    """The name an error is reported under in text (``"ValueError: temperature: ..."``): an ``InvalidParameter``
    reads as the ``ValueError`` it is, so messages that name the type read as they always have."""
    return "ValueError" if isinstance(e, InvalidParameter) else type(e).__name__
