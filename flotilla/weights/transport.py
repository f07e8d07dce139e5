"""The one interface every weight transport implements, front-end side and rank side.

A transport is how the tensors of one update reach the ranks (the shape of vLLM's ``WeightTransferEngine``):

front end (one instance per update, built by ``WeightUpdater``)
    ``describe(timeout)``  what the update holds, as (name, tensor or meta tensor) pairs, for the one check
                           against the meta model (``WeightChecker``) before any rank is told; may do I/O
                           (read headers, have the ranks fetch a staged payload and report it)
    ``prepare(version)``   after the check: make the tensors readable by the ranks (write an update file)
    ``source_for(r)``      the ``WeightSource`` (a tagged struct of ``flotilla.ipc.messages``) replica ``r``
                           gets inside its ``UpdateWeights``
    ``replay``             the file a replica started later replays, or None (the update cannot be replayed)
    ``release()``          always called at the end, whatever happened (drop staged payloads)

rank side (a static method, looked up by the source's type: no isinstance order)
    ``receive(source, ctx)``  (Hugging Face name, full tensor) pairs, one at a time; every rank narrows them to
                              its shard into scratch buffers (``flotilla.weights.rank``), never into the live
                              weights
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from flotilla.ipc.messages import WeightSource

Progress = Callable[[], None] | None


@dataclass(frozen=True)
class RankContext:
    """What a rank-side ``receive`` knows of the rank it runs on."""

    group_rank: int            # this rank's rank in its replica group
    progress: Progress = None  # call now and then during a long receive (keeps the leader's reports fresh)


class WeightTransport(ABC):
    """One update's way to the ranks; subclasses: file, staged, broadcast, IPC."""

    #: the name an update is recorded under in the version ledger
    name: ClassVar[str]
    #: the message struct this transport's ranks receive
    source_type: ClassVar[type]
    #: the file a replica started later replays on top of the checkpoint, or None
    replay: str | None = None

    # ---------------------------------------------------------------------------------------- front end
    @abstractmethod
    def describe(self, timeout: float) -> list[tuple[str, Any]]:
        """(name, tensor) pairs of the update for the check (tensors may be shape-only, on ``meta``)."""

    def prepare(self, version: int) -> None:
        """After the check, before any rank is told: make the tensors readable by the ranks."""

    @abstractmethod
    def source_for(self, replica: int) -> WeightSource:
        """The source replica ``replica``'s ranks read."""

    def release(self) -> None:
        """The update is over (done, refused or failed)."""

    # ---------------------------------------------------------------------------------------- rank side
    @staticmethod
    @abstractmethod
    def receive(source: Any, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) pairs of ``source`` on this rank, one at a time."""


def transports() -> dict[type, type[WeightTransport]]:
    """Every transport, by the source struct its ranks receive."""
    from flotilla.weights.broadcast import BroadcastTransport
    from flotilla.weights.file import FileTransport
    from flotilla.weights.ipc import IpcTransport
    from flotilla.weights.staged import StagedTransport

    return {t.source_type: t for t in (FileTransport, StagedTransport, BroadcastTransport, IpcTransport)}


def receive(source: WeightSource, ctx: RankContext) -> Iterator[tuple[str, torch.Tensor]]:
    """The rank side of ``source``'s transport."""
    transport = transports().get(type(source))
    if transport is None:
        raise TypeError(f"weights: no transport for a {type(source).__name__}")
    return transport.receive(source, ctx)
