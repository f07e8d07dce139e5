"""The DP controller: the front end's table of in-flight requests and the view of every target it routes to.

It is plain, thread-safe bookkeeping with no I/O of its own beyond the per-target send callables it is
given, so it can be unit-tested without processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flotilla.ipc.messages import AbortRequest, AddRequest, StepOutput
from flotilla.request import RequestState
from flotilla.router.policies import NoReplicaAvailable, ReplicaView, make_policy


class DPController:
    def __init__(self, load_balance: str, **policy_kwargs):
        self.policy = make_policy(load_balance, **policy_kwargs)
        self.lock = threading.RLock()
        self.requests: dict[str, RequestState] = {}
        self.views: dict[int, ReplicaView] = {}
        self.senders: dict[int, Callable[[object], None]] = {}
        # paused (weight updates, memory release): new requests wait here, in order, for resume()
        self.paused = False
        self.held: dict[str, RequestState] = {}

    # ------------------------------------------------------------------------------------------ targets
    def add_target(self, target: int, send: Callable[[object], None]) -> None:
        with self.lock:
            self.views[target] = ReplicaView(target)
            self.senders[target] = send

    def remove_target(self, target: int) -> list[RequestState]:
        """Forget a target; returns the requests it still held (the caller fails or moves them)."""
        with self.lock:
            self.views.pop(target, None)
            self.senders.pop(target, None)
            self.policy.forget_replica(target)
            return [s for s in self.requests.values() if s.target == target and not s.finished]

    def set_accepting(self, target: int, accepting: bool) -> None:
        """A draining target keeps its requests but gets no new ones."""
        with self.lock:
            if target in self.views:
                self.views[target].accepting = accepting

    def requests_on(self, target: int) -> list[RequestState]:
        with self.lock:
            return [s for s in self.requests.values() if s.target == target and not s.finished]

    # ------------------------------------------------------------------------------------------ requests
    def dispatch(self, state: RequestState, target: int | None = None) -> int:
        """Pick a target (unless given) and send the request there; raises NoReplicaAvailable. While paused a
        request without a given target is held (returns -1) until resume()."""
        with self.lock:
            if target is None and self.paused:
                state.target = -1
                self.requests[state.rid] = state
                self.held[state.rid] = state
                return -1
            if target is None:
                target = self.policy.select(list(self.views.values()), state.prompt_ids,
                                            state.sampling.max_new_tokens)
            state.target = target
            self.requests[state.rid] = state
            self.views[target].on_dispatch(len(state.prompt_ids), state.sampling.max_new_tokens)
            self.policy.on_dispatch(target, state.prompt_ids)
            self.senders[target](AddRequest(state.rid, state.prompt_ids, state.sampling, list(state.output_ids)))
            return target

    def abort(self, rid: str, reason: str = "abort") -> RequestState | None:
        with self.lock:
            state = self.requests.get(rid)
            if state is None:
                return None
            if self.held.pop(rid, None) is not None:  # never sent anywhere: it ends here
                state.finish_locally(reason)
                self._retire(state)
                return state
            send = self.senders.get(state.target)
            if send is not None:
                send(AbortRequest(rid, reason))
            return state

    def pause(self) -> None:
        with self.lock:
            self.paused = True

    def resume(self) -> list[RequestState]:
        """Stop holding; returns the held requests, oldest first, for the caller to dispatch again."""
        with self.lock:
            self.paused = False
            held = list(self.held.values())
            self.held.clear()
            for state in held:
                self.requests.pop(state.rid, None)
            return held

    def abort_on(self, target: int, rid: str) -> None:
        """Tell one target to drop a request that has moved elsewhere (its late output is ignored)."""
        with self.lock:
            send = self.senders.get(target)
            if send is not None:
                send(AbortRequest(rid, "moved"))

    def on_step(self, step: StepOutput) -> list[tuple[RequestState, bool]]:
        """Apply a step's outputs: (state, hit_stop_string) for each request that changed."""
        changed = []
        with self.lock:
            view = self.views.get(step.replica)
            if view is not None:
                view.on_report(step.load)
            for out in step.outputs:
                state = self.requests.get(out.rid)
                if state is None or state.target != step.replica:
                    continue  # finished, or moved elsewhere after a failure: late tokens are not its own
                was_finished = state.finished
                hit_stop = state.apply(out)
                if hit_stop:
                    send = self.senders.get(state.target)
                    if send is not None:
                        send(AbortRequest(state.rid, "stop"))
                if state.finished and not was_finished:
                    self._retire(state)
                changed.append((state, hit_stop))
        return changed

    def fail(self, state: RequestState, message: str) -> None:
        with self.lock:
            state.fail(message)
            self._retire(state)

    def _retire(self, state: RequestState) -> None:
        self.requests.pop(state.rid, None)
        view = self.views.get(state.target)
        if view is not None:
            view.on_finish()

    def inflight(self) -> int:
        with self.lock:
            return len(self.requests)


__all__ = ["DPController", "NoReplicaAvailable"]
