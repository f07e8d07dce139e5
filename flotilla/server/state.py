"""What one app holds: the engine (``None`` while it loads), the served name, metrics, and the set of
ignored request fields already logged. Kept on ``app.state``, never in module globals, so two apps in one
process (the tests) share nothing."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from pydantic import BaseModel

from flotilla.server.engine_client import EngineClient
from flotilla.server.errors import unavailable
from flotilla.server.lora import Choice, choose, model_adapter
from flotilla.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class IgnoredFields:
    """Logs each unknown request field name once (a client sending ``reasoning_effort`` on every request must
    not flood the log), so an operator still learns what clients expect."""

    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, endpoint: str, body: BaseModel) -> None:
        from flotilla.server.structured import EXTRA_FIELDS

        extra = body.model_extra or {}
        with self.lock:
            new = sorted(k for k in extra if k not in self.seen and k not in EXTRA_FIELDS)
            self.seen.update(new)
        for name in new:
            log.warning("%s: ignoring the unknown request field %r (logged once)", endpoint, name)


@dataclass
class ServerState:
    engine: EngineClient | None
    model_name: str
    api_key: str | None
    metrics: ServerMetrics = field(init=False)
    ignored: IgnoredFields = field(default_factory=IgnoredFields)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine)

    def ready_engine(self) -> EngineClient:
        if self.engine is None:
            raise unavailable("the engine is still loading")
        return self.engine

    def check_model(self, name: str | None) -> str | None:
        """The base model's name (or none): None; a loaded LoRA adapter's name: that adapter (``lora.py``);
        anything else: a 404 naming it."""
        return model_adapter(self.model_name, self.engine, name)

    def accept(self, endpoint: str, body: BaseModel) -> EngineClient:
        """The checks every endpoint that takes a ``model`` starts with: the model name (the base model or one
        of its adapters), ignored fields, a ready engine."""
        self.check_model(getattr(body, "model", None))
        self.ignored.note(endpoint, body)
        return self.ready_engine()

    def accept_generation(self, endpoint: str, body: BaseModel) -> tuple[EngineClient, Choice]:
        """``accept`` for the generation endpoints, plus the LoRA adapter the request runs with."""
        engine = self.accept(endpoint, body)
        return engine, choose(self.model_name, engine, body)
