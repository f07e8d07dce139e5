"""Pause/resume, memory release and the op round trip to the leaders: the front end's control plane.

Weight updates are ``flotilla/weights/``'s (docs/weight_updates.md): the plane builds a ``WeightUpdater``
with itself as its ``ControlPort`` (the lock, ``run_op``, ``held``, ``memory_released``, ``probe_store``)
and the fleet as its ``FleetView``, and its public update methods delegate to it.

Only one control operation runs at a time (``ControlPlane.lock``).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from typing import TYPE_CHECKING

from flotilla.ipc.messages import ControlDone, Pause, ReleaseMemory, Resume, ResumeMemory
from flotilla.frontend.request import wake_all
from flotilla.frontend.timeouts import MAX_TIMEOUT_S, check_timeout  # noqa: F401  (check_timeout: imported from here too)
from flotilla.weights.adapters import AdapterUpdater
from flotilla.weights.updater import DEFAULT_TIMEOUT_S, WeightUpdater

if TYPE_CHECKING:
    from flotilla.config import EngineConfig
    from flotilla.launch.base import WeightStager
    from flotilla.router.controller import DPController
    from flotilla.router.fleet import ReplicaFleet

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")
CONTROL_SEND_TIMEOUT_MS = 2000  # a control op waits this long for a replica just started to connect

class _PendingOp:
    def __init__(self, name: str, targets: set[int]):
        self.name = name
        self.pending = set(targets)
        self.errors: dict[int, str] = {}


class ControlPlane:
    """Public: ``pause``, ``resume``, ``update_weights``, ``update_weights_from_disk``,
    ``update_weights_staged``, ``release_memory``, ``resume_memory``, ``weight_version``.

    ``fleet`` says which replicas are up and sends to them; ``controller`` holds and releases requests while
    paused; ``stager`` (the launcher's, or None) stages tensors in the rank processes; ``files_shared``:
    whether a file in ``private_dir`` is readable by every rank (all ranks on this node)."""

    def __init__(self, config: "EngineConfig", controller: "DPController", fleet: "ReplicaFleet",
                 private_dir: str, stager: "WeightStager | None", files_shared: bool):
        self.config, self.controller, self.fleet = config, controller, fleet
        self.dispatcher = getattr(fleet, "dispatcher", None)  # holds requests while paused, retracts them
        self.private_dir, self.stager, self.files_shared = private_dir, stager, files_shared
        self.lock = threading.RLock()
        self._cv = threading.Condition()
        self._op_ids = itertools.count(1)
        self._ops: dict[int, _PendingOp] = {}
        self._paused = False
        self._paused_for_memory = False
        self._memory_released = False
        self._op: tuple[str, bool, float] | None = None  # (name, on the ranks, since): what /health reports
        # weight updates, their version ledger and weight-sync groups (flotilla/weights/)
        self.weights = WeightUpdater(config, self, fleet, private_dir, stager, files_shared)
        # LoRA adapters: loaded, replaced and unloaded through the same op round trip (flotilla/weights/adapters.py)
        self.adapters = AdapterUpdater(config, self, private_dir, files_shared,
                                       inflight=lambda name: self.dispatcher.using_adapter(name)
                                       if self.dispatcher is not None else 0)

    # ------------------------------------------------------------------------------------------ public
    @property
    def weight_version(self) -> int:
        """The version of the weights every replica serves (0: the checkpoint the engine started with)."""
        return self.weights.version

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = 60.0) -> None:
        """Stop dispatching and scheduling. Requests submitted while paused wait in the front end; running
        requests keep their KV and continue after ``resume()``. Returns once every replica has stopped."""
        if isinstance(timeout, str):  # pause("abort"): a mode given where the time-out goes
            raise ValueError(f"timeout: pause() takes a time-out in seconds, got {timeout!r}; to pause with a mode "
                             f"call pause_generation(mode) with mode one of {list(PAUSE_MODES)}")
        check_timeout("timeout", timeout)
        with self.lock:
            if self._paused:
                return
            self.dispatcher.pause()
            self._paused = True
            try:
                self._control(Pause, "pause", timeout)
            except BaseException:
                self._unpause_after_failure(timeout)
                raise

    def _unpause_after_failure(self, timeout: float) -> None:
        """A pause that failed half-way is undone whatever else fails: the front end's flag and the
        controller's agree (not paused), the replicas are told to resume (best effort), held requests go out."""
        self._paused = self._paused_for_memory = False
        try:
            self._control(Resume, "resume", timeout, check=False)
        except Exception:
            log.exception("pause: telling the replicas to resume after a failed pause failed")
        finally:
            self._release_held()

    def resume(self, timeout: float = 60.0) -> None:
        """Undo ``pause()``: replicas schedule again and the requests held meanwhile are dispatched."""
        check_timeout("timeout", timeout)
        with self.lock:
            if not self._paused:
                return
            if self._memory_released:
                raise RuntimeError("resume: memory is released; call resume_memory() first")
            try:
                self._control(Resume, "resume", timeout)
            finally:
                self._paused = self._paused_for_memory = False
                self._release_held()

    def pause_generation(self, mode: str = "abort", timeout: float = 60.0) -> int:
        """``pause`` with what happens to the requests in flight (sglang's modes): ``"in_place"`` keeps them on
        their replicas with their KV; ``"retract"`` takes them back to the front end (their KV is freed, their
        tokens so far kept) to resume as continuations after ``resume()``; ``"abort"`` ends every request in
        flight or held (finish_reason "abort"). Returns how many requests were retracted or aborted."""
        if not isinstance(mode, str) or mode not in PAUSE_MODES:
            raise ValueError(f"mode: must be one of {list(PAUSE_MODES)}, got {mode!r}")
        check_timeout("timeout", timeout)
        with self.lock:
            self.pause(timeout)
            if mode == "in_place":
                return 0
            if mode == "abort":
                states = self.dispatcher.abort_all()
                wake_all([s for s in states if s.finished])
                return len(states)
            moved, ended = self.dispatcher.retract(self.fleet.ready_replicas())  # paused: held until resume
            wake_all(ended)
            return moved

    def update_weights(self, named_tensors: Any, *, version: int | None = None, flush_cache: bool = True,
                       timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Load new weights into every replica and TP rank without a restart, all or nothing.

        ``named_tensors``: (Hugging Face parameter name, tensor) pairs or a dict, any subset of the model's
        parameters, any float dtype (converted to the engine's), on any device. Everything is checked before
        anything is written: an unknown name or a wrong shape raises ``ValueError`` naming the parameter and
        the old weights keep serving. Every rank stages its shard first and the live weights change only once
        every rank of every replica staged; a failure anywhere leaves the old weights everywhere. Requests are
        paused around the update; with ``flush_cache`` no KV computed with the old weights is reused (running
        requests recompute theirs). Returns the new weight version (``version`` if given, else the previous
        one + 1).
        """
        return self.weights.update_weights(named_tensors, version=version, flush_cache=flush_cache,
                                           timeout=timeout)

    def update_weights_from_disk(self, path: str | os.PathLike, *, version: int | None = None,
                                 flush_cache: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` from a safetensors file or a checkpoint folder that every rank can read
        (on several nodes: a shared filesystem). Headers are checked first; the folder must stay in place
        while a later-started replica may need to replay it."""
        return self.weights.update_weights_from_disk(path, version=version, flush_cache=flush_cache,
                                                     timeout=timeout)

    def update_weights_staged(self, payload: Any, *, version: int | None = None, flush_cache: bool = True,
                              timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` with the tensors staged by the launcher's ``WeightStager`` from
        ``payload`` (Ray: object refs, each holding a dict {name: tensor} or (name, tensor) pairs). Every rank
        fetches them itself while requests keep running, the front end checks the names and shapes the ranks
        report, and only then are requests paused and the weights staged and committed. A replica started
        later cannot replay such an update: it comes back with the checkpoint's weights (weight_version 0 in
        stats) until the next update."""
        return self.weights.update_weights_staged(payload, version=version, flush_cache=flush_cache,
                                                  timeout=timeout)

    def release_memory(self, weights: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Free every replica's KV cache (and, with ``weights``, move the weights to host memory) so a
        trainer can use the GPU. Pauses the engine first; running requests will recompute their KV."""
        check_timeout("timeout", timeout)
        with self.lock:
            if self._memory_released:
                return
            if not self._paused:
                self.pause(timeout)
                self._paused_for_memory = True
            self._control(lambda i: ReleaseMemory(i, weights), "release_memory", timeout)
            self._memory_released = True

    def resume_memory(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Re-take the memory ``release_memory`` freed (the same number of KV blocks) and, if that call
        paused the engine, resume it."""
        check_timeout("timeout", timeout)
        with self.lock:
            if not self._memory_released:
                return
            self._control(ResumeMemory, "resume_memory", timeout)
            self._memory_released = False
            if self._paused_for_memory:
                self.resume(timeout)

    def current_op(self) -> dict[str, Any] | None:
        """The control operation under way, if any: its name, whether the ranks are in it (then they do not
        step: generation waits), and for how long it has run."""
        op = self._op
        if op is None:
            return None
        name, on_ranks, since = op
        return {"name": name, "on_ranks": on_ranks, "running_s": round(time.monotonic() - since, 3)}

    @property
    def memory_released(self) -> bool:
        return self._memory_released

    def run_op(self, name: str, timeout: float, *, make: Callable[[int], Any] | None = None,
               make_for: Callable[[int, int], Any] | None = None, check: bool = True,
               targets: set[int] | None = None) -> None:
        """Send one control op to every ready leader (or ``targets``) and wait for every answer (a replica
        that dies meanwhile answers no more); with ``check``, raise naming each replica that failed.
        ``make(op_id)`` builds the message, or ``make_for(op_id, replica)`` one for each replica."""
        self._control(make, name, timeout, check, make_for=make_for, targets=targets)

    @contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        """The engine paused for the block (unless it already was: then it stays paused), resumed after.
        Refused while memory is released."""
        with self.lock:
            if self._memory_released:
                raise RuntimeError("update_weights: memory is released; call resume_memory() first")
            was_paused = self._paused
            if not was_paused:
                self.pause(timeout)
            try:
                yield
            finally:
                if not was_paused:
                    self.resume(timeout)

    def probe_store(self, host: str, port: int, timeout_s: float) -> None:
        """Wait (reported as the join under way, no rank involved) until a trainer's store accepts a
        connection; a RuntimeError naming the address after ``timeout_s``."""
        from flotilla.weights.groups import wait_reachable

        with self.reporting("init_weights_update_group", on_ranks=False):
            wait_reachable(host, port, timeout_s)

    @contextmanager
    def reporting(self, name: str, on_ranks: bool) -> Iterator[None]:
        """Report ``name`` as the operation under way while the block runs (the outer one again after)."""
        outer = self._op
        self._op = (name, on_ranks, time.monotonic() if outer is None else outer[2])
        try:
            yield
        finally:
            self._op = outer

    # ------------------------------------------------------------------------------------------ engine hooks
    def on_control_done(self, msg: ControlDone) -> None:
        """Engine loop: a leader answered a control operation."""
        with self._cv:
            op = self._ops.get(msg.op_id)
            if op is not None:
                op.pending.discard(msg.replica)
                if msg.error:
                    op.errors[msg.replica] = msg.error
            self._cv.notify_all()

    def replay_args(self) -> dict[str, Any]:
        """WorkerArgs fields for a replica that starts now: the updates to replay, their version, the adapters."""
        return {**self.weights.replay_args(), **self.adapters.registry.replay_args()}

    # ------------------------------------------------------------------------------------------ internals
    def _control(self, make: Callable[[int], Any] | None, name: str, timeout: float, check: bool = True, *,
                 make_for: Callable[[int, int], Any] | None = None, targets: set[int] | None = None) -> None:
        """Send one control op to every ready leader (or to ``targets``) and wait until each answered (or
        died). ``make(op_id)`` builds the message, or ``make_for(op_id, replica)`` one for each replica."""
        targets = self.fleet.ready_replicas() if targets is None else set(targets)
        if not targets:
            if not check:
                return
            raise RuntimeError(f"{name}: no replica is up")
        op_id = next(self._op_ids)
        op = _PendingOp(name, targets)
        with self._cv:
            self._ops[op_id] = op
        try:
            with self.reporting(name, on_ranks=True):
                self._send_and_wait(op, op_id, make, make_for, targets, name, timeout, check)
        finally:
            with self._cv:
                self._ops.pop(op_id, None)
        if op.errors and check:
            detail = "; ".join(f"replica {t}: {e}" for t, e in sorted(op.errors.items()))
            raise RuntimeError(f"{name} failed: {detail}")

    def _send_and_wait(self, op: _PendingOp, op_id: int, make: Callable[[int], Any] | None,
                       make_for: Callable[[int, int], Any] | None, targets: set[int], name: str, timeout: float,
                       check: bool) -> None:
        msg = make(op_id) if make is not None else None
        for t in sorted(targets):
            if not self.controller.send(t, msg if make_for is None else make_for(op_id, t),
                                        timeout_ms=CONTROL_SEND_TIMEOUT_MS):  # gone: failover handles it
                log.warning("%s: replica %d unreachable", name, t)
                with self._cv:
                    op.pending.discard(t)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                ready = self.fleet.ready_replicas()
                waiting = {t for t in op.pending if t in ready}  # a replica that died answers no more
                if not waiting:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    if not check:
                        return
                    raise TimeoutError(f"{name}: replica(s) {sorted(waiting)} did not answer within {timeout}s")
                self._cv.wait(min(left, 0.2))

    def _release_held(self) -> None:
        wake_all(self.dispatcher.resume())
