"""Forwarding a collaborator's public methods from the object that owns it, by composition.

``Engine`` offers the control plane's and the RL control calls under its own name (users call
``engine.pause()``, RL frameworks ``engine.update_weights_from_distributed(...)``), while the code lives in
objects that are built with what they need. The forwarders keep each method's name, docstring and signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any


def delegates(attr: str, source: type, names: Iterable[str]) -> Callable[[type], type]:
    """Class decorator: each of ``names`` (a method or property of ``source``) becomes a method or property of
    the decorated class that forwards to ``self.<attr>``."""

    def add(host: type) -> type:
        for name in names:
            target = getattr(source, name)
            if isinstance(target, property):
                setattr(host, name, property(lambda self, n=name: getattr(getattr(self, attr), n), doc=target.__doc__))
                continue

            def forward(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
                return getattr(getattr(self, attr), _name)(*args, **kwargs)

            setattr(host, name, functools.update_wrapper(forward, target))
        return host

    return add
