"""The front end of weight updates: the one flow every transport goes through.

1. The transport describes the update; ``WeightChecker`` checks every name, shape and dtype against the meta
   model before any rank is told (a refused update changes nothing, anywhere).
2. The version ledger picks the version; the transport makes the tensors readable by the ranks.
3. With the engine held paused (``ControlPort.held``), every leader gets ``UpdateWeights`` (its replica's
   ``WeightSource``): every rank stages its shard into scratch buffers and the replica group agrees.
4. Once every replica staged, ``CommitWeights`` goes to all of them and the live weights change; if any
   replica failed or timed out, ``DiscardWeights`` goes to all and the old weights serve on everywhere.
5. The ledger records the version (and what a replica started later replays); the engine resumes.

Only one update runs at a time (the control plane's lock, held throughout).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flotilla.ipc.messages import (
    CommitWeights,
    DiscardWeights,
    IpcTensor,
    UpdateWeights,
)
from flotilla.frontend.timeouts import check_timeout
from flotilla.weights.broadcast import BroadcastTransport, check_lists
from flotilla.weights.check import WeightChecker, collect_named_tensors
from flotilla.weights.file import FileTransport, prune_update_files
from flotilla.weights.groups import JOIN_MARGIN_S, SyncRank, WeightSyncGroups, by_group
from flotilla.weights.ipc import IpcTransport, per_rank_lists
from flotilla.weights.ledger import VersionLedger
from flotilla.weights.ports import ControlPort, FleetView
from flotilla.weights.staged import StagedTransport
from flotilla.weights.transport import WeightTransport

if TYPE_CHECKING:
    from flotilla.config import EngineConfig
    from flotilla.launch.base import WeightStager

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
DISCARD_TIMEOUT_S = 30.0  # telling the replicas to drop a staged update (best effort)


class WeightUpdater:
    """Every weight update of one engine. ``port``: the control plane's lock and op round trip; ``fleet``:
    which replicas are up; ``stager``: the launcher's (or None); ``files_shared``: whether a file in
    ``private_dir`` is readable by every rank (all ranks on this node)."""

    def __init__(self, config: EngineConfig, port: ControlPort, fleet: FleetView, private_dir: str,
                 stager: WeightStager | None, files_shared: bool, checker: WeightChecker | None = None):
        self.config, self.port, self.fleet = config, port, fleet
        self.private_dir, self.stager, self.files_shared = private_dir, stager, files_shared
        self.checker = checker or WeightChecker(config)
        self.ledger = VersionLedger()
        self.groups = WeightSyncGroups(port, fleet, config.device)

    # ------------------------------------------------------------------------------------------ state
    @property
    def version(self) -> int:
        return self.ledger.version

    def replay_args(self) -> dict[str, Any]:
        return self.ledger.replay_args()

    def layout(self) -> list[SyncRank]:
        return self.groups.layout()

    def ipc_by_itself(self) -> bool:
        """Whether plain CUDA tensors of this process reach every rank through IPC handles by themselves:
        every rank on this node and able to see every GPU (the mp launcher: no stager)."""
        return self.stager is None and self.files_shared and self.config.device == "cuda"

    # ------------------------------------------------------------------------------------------ updates
    def update_weights(self, named_tensors: Any, *, version: int | None = None, flush_cache: bool = True,
                       timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Tensors of this process: through a file in the private folder, or (ranks on other nodes) staged."""
        check_timeout("timeout", timeout)
        items = collect_named_tensors(named_tensors)
        with self.port.lock:
            if self.files_shared:
                transport: WeightTransport = FileTransport.from_tensors(items, self.private_dir, self.config.dtype)
            elif self.stager is None:  # ranks on other nodes cannot read the private folder
                raise RuntimeError("update_weights: ranks on other nodes and no weight stager")
            else:
                self.checker.check(items)  # before the tensors travel to every rank
                transport = StagedTransport.from_tensors(self.stager, items)
            return self.run(transport, version=version, flush_cache=flush_cache, timeout=timeout)

    def update_weights_from_disk(self, path: Any, *, version: int | None = None, flush_cache: bool = True,
                                 timeout: float = DEFAULT_TIMEOUT_S) -> int:
        check_timeout("timeout", timeout)
        return self.run(FileTransport.from_path(path), version=version, flush_cache=flush_cache, timeout=timeout)

    def update_weights_staged(self, payload: Any, *, version: int | None = None, flush_cache: bool = True,
                              timeout: float = DEFAULT_TIMEOUT_S) -> int:
        check_timeout("timeout", timeout)
        if self.stager is None:
            raise RuntimeError("update_weights_staged: this launcher has no weight stager")
        return self.run(StagedTransport.from_payload(self.stager, payload), version=version,
                        flush_cache=flush_cache, timeout=timeout)

    def check_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                          group_name: str = "weight_update_group") -> None:
        """Raise what ``update_from_distributed`` would refuse, touching nothing (a trainer checks before it
        broadcasts: a broadcast the ranks never receive leaves the group out of step)."""
        names, dtypes, shapes = check_lists(names, dtypes, shapes)
        self.groups.group(group_name)
        self.checker.check(BroadcastTransport(group_name, names, dtypes, shapes).describe(0))

    def update_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                group_name: str = "weight_update_group", flush_cache: bool = True,
                                version: int | None = None, timeout: float = 600.0) -> int:
        """Receive ``names`` broadcast from the trainer (group rank 0) in order; returns the new version."""
        names, dtypes, shapes = check_lists(names, dtypes, shapes)
        with self.port.lock:
            self.groups.group(group_name)
            return self.run(BroadcastTransport(group_name, names, dtypes, shapes), version=version,
                            flush_cache=flush_cache, timeout=timeout + JOIN_MARGIN_S)

    def update_from_ipc(self, tensors: list[IpcTensor] | list[list[IpcTensor]], flush_cache: bool = True,
                        version: int | None = None, timeout: float = 600.0) -> int:
        """``tensors``: one list of handles every rank reads, or one list per engine rank in weight-sync order
        (each rank reads the copy on its own GPU)."""
        if self.config.device != "cuda":
            raise ValueError("load_format: CUDA IPC handles need an engine on device='cuda'")
        if not self.files_shared:
            raise ValueError("load_format: CUDA IPC handles only reach ranks on the producer's node, and some ranks "
                             "run on other nodes")
        per_rank = per_rank_lists(tensors)
        with self.port.lock:
            if len(per_rank) == 1:
                transport = IpcTransport(per_rank, lambda replica: per_rank)
            else:
                ranks = self.layout()
                if len(per_rank) != len(ranks):
                    raise ValueError(f"named_tensors: {len(per_rank)} per-rank lists for {len(ranks)} engine ranks")
                for_group = by_group(ranks, lambda s: per_rank[s.index])
                group_of = {s.replica: s.group_id for s in ranks}
                transport = IpcTransport(per_rank, lambda replica: for_group[group_of[replica]])
            return self.run(transport, version=version, flush_cache=flush_cache, timeout=timeout)

    # ------------------------------------------------------------------------------------------ the flow
    def run(self, transport: WeightTransport, *, version: int | None, flush_cache: bool, timeout: float) -> int:
        """Check, then stage on every rank, then commit on every rank (or discard on every rank)."""
        with self.port.lock:
            try:
                self._require_resident()
                full = self.checker.check(transport.describe(timeout))
                version = self.ledger.next_version(version)
                transport.prepare(version)
                with self.port.held(timeout):
                    self._stage_then_commit(transport, version, flush_cache, timeout)
                self.ledger.commit(version, transport.name, transport.replay, full)
                return version
            finally:
                transport.release()
                prune_update_files(self.private_dir, self.ledger.replay_files())

    def _stage_then_commit(self, transport: WeightTransport, version: int, flush_cache: bool,
                           timeout: float) -> None:
        targets = self.fleet.ready_replicas()
        stage_ids: list[int] = []

        def stage(op_id: int, replica: int) -> UpdateWeights:
            if not stage_ids:
                stage_ids.append(op_id)
            return UpdateWeights(op_id, transport.source_for(replica), version, flush_cache)

        try:
            self.port.run_op("update_weights", timeout, make_for=stage, targets=targets)
        except BaseException:
            if stage_ids:  # every replica drops what it staged: the old weights serve on everywhere
                self.port.run_op("update_weights", DISCARD_TIMEOUT_S, make=lambda i: DiscardWeights(i, stage_ids[0]),
                                 check=False, targets=targets)
            raise
        live = targets & self.fleet.ready_replicas()  # a replica that died meanwhile comes back replaying
        self.port.run_op("update_weights", timeout,
                         make=lambda i: CommitWeights(i, stage_ids[0], version, flush_cache), targets=live)

    def _require_resident(self) -> None:
        if self.port.memory_released:
            raise RuntimeError("update_weights: memory is released; call resume_memory() first")
