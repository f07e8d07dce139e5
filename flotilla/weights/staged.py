"""Staged transport: tensors a launcher hands to every rank's process beforehand (Ray: the object store).

Front end: the launcher's ``WeightStager`` stages the payload in each rank's process under a fresh key, while
requests keep running, and returns what each rank staged; the check reads that. The ranks then get a
``StagedSource(key)``. A replica started later cannot replay such an update.

Rank side: ``stage(key, items)`` is the launcher's Ray-free hook (the Ray rank actor calls it from a side
thread); ``receive`` takes (and forgets) what was staged under the key.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from flotilla.ipc.messages import StagedSource
from flotilla.weights.check import meta_tensor
from flotilla.weights.transport import RankContext, WeightTransport

_lock = threading.Lock()
_staged: dict[str, list[tuple[str, torch.Tensor]]] = {}


# ---------------------------------------------------------------------------------------------- rank side
def stage(key: str, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Keep ``items`` in this process until an update with ``StagedSource(key)`` reads them."""
    items = list(items)
    with _lock:
        _staged[key] = items


def unstage(key: str) -> bool:
    """Drop staged tensors nobody read (an update that was refused or timed out)."""
    with _lock:
        return _staged.pop(key, None) is not None


def staged_keys() -> list[str]:
    with _lock:
        return sorted(_staged)


# ---------------------------------------------------------------------------------------------- transport
class StagedTransport(WeightTransport):
    name = "staged"
    source_type = StagedSource

    def __init__(self, stager: Any, stage_with: Callable[[Any, str, float], list]):
        """``stage_with(stager, key, timeout)`` stages the payload and returns, per live rank, its
        (name, shape, dtype) list."""
        self.stager, self.stage_with = stager, stage_with
        self.key = f"staged-{uuid.uuid4().hex}"
        self._staged = False

    @classmethod
    def from_payload(cls, stager: Any, payload: Any) -> StagedTransport:
        return cls(stager, lambda s, key, timeout: s.stage(key, payload, timeout))

    @classmethod
    def from_tensors(cls, stager: Any, items: list[tuple[str, Any]]) -> StagedTransport:
        return cls(stager, lambda s, key, timeout: s.stage_tensors(key, items, timeout))

    def describe(self, timeout: float) -> list[tuple[str, Any]]:
        self._staged = True
        staged = self.stage_with(self.stager, self.key, timeout)
        if not staged:
            raise RuntimeError("update_weights: no replica is up")
        if any(s != staged[0] for s in staged[1:]):
            raise RuntimeError("update_weights: the ranks staged different contents")
        return [(n, meta_tensor(n, shape, dtype)) for n, shape, dtype in staged[0]]

    def source_for(self, replica: int) -> StagedSource:
        return StagedSource(self.key)

    def release(self) -> None:
        if self._staged:
            self.stager.unstage(self.key)

    @staticmethod
    def receive(source: StagedSource, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
        with _lock:
            items = _staged.pop(source.key, None)
        if items is None:
            raise ValueError(f"weights: nothing was staged in this process under {source.key!r}")
        return iter(items)
