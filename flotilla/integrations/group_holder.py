"""A placement group that dies with the actor using it, even when that actor is killed.

Ray ties a placement group's life to the job (or to a detached actor) that created it, never to an ordinary
actor. Ray Data ends its actors with ``ray.kill`` once a dataset is consumed, so a group an engine created inside
its actor would keep its CPUs and GPUs reserved until the job ends. Here a small detached actor creates the group
(so the group dies with it) and removes it, then exits, when its user stops sending heartbeats: the user holds
the only handle, and a killed user sends none.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

HEARTBEAT_S = 2.0
DEFAULT_TIMEOUT_S = 15.0


class _Holder:
    """Creates the group in its constructor; removes it and exits on ``release`` or a missed heartbeat."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float, ready_timeout_s: float):
        from ray.util.placement_group import placement_group

        self.pg = placement_group(bundles, strategy=strategy, name=f"flotilla-held-{uuid.uuid4().hex[:8]}")
        self._last = time.monotonic()
        # heartbeats start once the group is handed over; until then the user waits in group(), up to its timeout
        self._limit_s = ready_timeout_s + timeout_s
        self._timeout_s = timeout_s
        threading.Thread(target=self._watch, name="flotilla-group-watch", daemon=True).start()

    def group(self, ready_timeout_s: float) -> Any:
        import ray

        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)  # the caller then ends this actor
            raise RuntimeError(f"placement_group: {self.pg.bundle_specs} could not be scheduled within "
                               f"{ready_timeout_s}s (not enough free resources)") from None
        self._last, self._limit_s = time.monotonic(), self._timeout_s
        return self.pg

    def beat(self) -> None:
        self._last = time.monotonic()

    def release(self) -> None:
        """Remove the group and end this actor (a detached actor lives until told to go)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(self.pg)
        finally:
            ray.actor.exit_actor()

    def _watch(self) -> None:
        import ray

        while time.monotonic() - self._last < self._limit_s:
            time.sleep(HEARTBEAT_S / 2)
        try:  # as an actor call, so that exit_actor ends the actor cleanly
            ray.get_runtime_context().current_actor.release.remote()
        except Exception:
            os._exit(0)


class HeldGroup:
    """``HeldGroup(bundles)``: the group (``.pg``) and the heartbeat thread that keeps it; ``close()`` frees it."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str = "PACK", ready_timeout_s: float = 60.0,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        import ray

        holder_cls = ray.remote(num_cpus=0, max_concurrency=4)(_Holder)  # type: ignore[call-overload]
        self._holder = holder_cls.options(name=f"flotilla-holder-{uuid.uuid4().hex[:8]}", namespace="flotilla",
                                          lifetime="detached").remote(bundles, strategy, timeout_s,
                                                                                      ready_timeout_s)
        self._stop = threading.Event()
        try:
            self.pg = ray.get(self._holder.group.remote(ready_timeout_s))
        except BaseException:
            ray.kill(self._holder)
            raise
        threading.Thread(target=self._beat, name="flotilla-group-beat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._holder.beat.remote()
            except Exception:  # Ray shutting down in this process: the holder's watchdog takes over
                return

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._holder.release.remote()
        except Exception:
            pass


def rank_bundles(ranks: int, on_gpu: bool, gpus_per_rank: float) -> list[dict[str, float]]:
    """One bundle per rank: 1 CPU (the rank actor's), plus its GPU share on CUDA."""
    return [{"CPU": 1.0, "GPU": float(gpus_per_rank)} if on_gpu else {"CPU": 1.0} for _ in range(ranks)]
