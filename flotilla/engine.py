"""The front end: tokenizer, request table, streams, and the launcher that runs the rank workers.

One background thread (the engine loop) receives every replica's step outputs, applies them to the
request table and wakes whoever waits; it also watches the launcher for dead workers. User threads and
asyncio tasks only validate, submit, abort and wait.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from flotilla.config import EngineConfig
from flotilla.control import ControlMixin
from flotilla.detokenizer import IncrementalDetokenizer
from flotilla.ipc.channel import ChannelHub
from flotilla.ipc.messages import (ControlDone, FlushCache, Shutdown, StepOutput, WorkerFailed, WorkerReady,
                                   from_worker_decoder)
from flotilla.launch.topology import GroupSpec, group_world_size, layout, world_size
from flotilla.request import RequestFailed, RequestState, wake_all
from flotilla.router.controller import DPController
from flotilla.router.policies import NoReplicaAvailable
from flotilla.sampling import SamplingParams
from flotilla.launch.worker_args import WorkerArgs

log = logging.getLogger(__name__)

SamplingLike = SamplingParams | dict[str, Any] | None


class Engine(ControlMixin):
    """Offline and online generation over one or more replicas.

    ``Engine(model=path, tp_size=2, dp_size=2)`` runs dp x tp rank processes on this machine; the
    launcher is the only part a subclass (``RayEngine``) swaps.
    """

    def __init__(self, model: str, **kwargs: Any):
        self.config = EngineConfig.from_kwargs(model, **kwargs).resolve()
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer)
        except Exception as e:
            raise ValueError(f"tokenizer: cannot load a tokenizer from {self.config.tokenizer!r}: {e}") from None
        self.vocab_size = int(self.config.hf_config.get("vocab_size") or len(self.tokenizer))
        self.controller = DPController(self.config.load_balance)
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._closed = False
        self._ready: dict[int, WorkerReady] = {}
        self._groups: dict[int, GroupSpec] = {}
        self._group_of_target: dict[int, int] = {}
        self._in_ch: dict[int, Any] = {}
        self._in_addr: dict[int, str] = {}
        self._failures: dict[int, str] = {}
        # failover and scaling state (guarded by _topo)
        self._topo = threading.RLock()
        self._scale_lock = threading.Lock()
        self._down: dict[int, str] = {}          # target -> why, until its replacement is ready
        self._replaces: dict[int, list[int]] = {}  # new target -> the targets it replaces
        self._restarts: dict[int, int] = {}      # restarts per slot (a group's first global rank)
        self._retiring: set[int] = set()         # groups being scaled away: their exit is not a death
        self._starting: set[int] = set()         # groups started but not ready yet
        self._last_seen: dict[int, float] = {}
        self._pending: list[tuple[RequestState, float]] = []  # waiting for any replica to come back
        self._next_gid = itertools.count()
        self._next_target = itertools.count()
        self._init_control()  # weight updates, pause/resume, memory release (flotilla/control.py)
        self._private_dir = tempfile.mkdtemp(prefix="flotilla-")
        try:
            self._launcher = self._make_launcher()
        except BaseException:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            raise
        # Sockets bind on the front end's node: ipc:// when every rank is on it, tcp:// + CURVE otherwise.
        tcp = self._launcher.multi_node
        self._hub = ChannelHub(host=(self.config.host or self._launcher.bind_host) if tcp else None, use_tcp=tcp,
                               allow_wildcard=self.config.allow_wildcard_host)
        self._finalizer = weakref.finalize(self, _cleanup, self._launcher, self._hub, self._private_dir)
        self._out_ch, self._out_addr = self._hub.bind("pull", "out", from_worker_decoder)
        try:
            for spec in layout(self.config.tp_size, self.config.dp_size, self.config.enable_dp_attention,
                              self.config.pp_size):
                self._start_group(self._renumber(spec))
            self._wait_ready(list(self._groups))
        except BaseException:
            self._finalizer()
            raise
        self.max_model_len = min(r.max_model_len for r in self._ready.values())
        self._thread = threading.Thread(target=self._loop, name="flotilla-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ launching
    def _make_launcher(self):
        """The one thing RayEngine changes: how rank processes start and how their death is noticed."""
        from flotilla.launch.mp import MpLauncher

        cfg = self.config
        num_devices = 0
        if cfg.device == "cuda":
            import torch

            num_devices = torch.cuda.device_count()
            ranks = world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size)
            per_group = group_world_size(cfg)
            if per_group > num_devices:  # NCCL cannot put two ranks of one group on one device
                raise ValueError(f"tp_size: one replica's {per_group} ranks (tp_size={cfg.tp_size} x "
                                 f"pp_size={cfg.pp_size}) need a GPU each, and {num_devices} are visible; "
                                 "only whole replicas share GPUs")
            if ranks > num_devices:  # ranks share GPUs: each takes its fraction of the memory budget
                cfg.gpu_memory_utilization /= -(-ranks // num_devices)
        return MpLauncher(self._private_dir, num_devices)

    def _worker_args(self, spec: GroupSpec) -> list[WorkerArgs]:
        from flotilla.launch.mp import cpu_threads_per_rank

        leaders = {r: t for t, r in spec.leaders}
        cfg = self.config
        threads = cpu_threads_per_rank(world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention, cfg.pp_size))
        keys = self._hub.keys.for_client() if self._hub.keys else None
        return [WorkerArgs(config=cfg.to_dict(), replica_id=spec.target_of_rank(r), rank=r,
                           world_size=spec.world_size, dist_init_method=None,
                           in_addr=self._in_addr[leaders[r]] if r in leaders else "", out_addr=self._out_addr,
                           keys=keys, num_threads=threads, **self._replay_args())
                for r in range(spec.world_size)]

    def _renumber(self, spec: GroupSpec) -> GroupSpec:
        """A fresh group id and fresh target ids: a restarted or added replica never reuses an id, so a late
        message from a dead incarnation can never be mistaken for its successor's."""
        targets = {t: next(self._next_target) for t in spec.targets}
        return GroupSpec(next(self._next_gid), spec.world_size, spec.attn_tp_size,
                         tuple((targets[t], r) for t, r in spec.leaders), spec.first_global_rank, spec.pp_size)

    def _start_group(self, spec: GroupSpec) -> None:
        with self._topo:
            for t in spec.targets:
                ch, addr = self._hub.bind("push", f"in{t}", None)
                self._in_ch[t], self._in_addr[t] = ch, addr
                self._group_of_target[t] = spec.group_id
            self._groups[spec.group_id] = spec
            self._starting.add(spec.group_id)
        self._launcher.start_group(spec, self._worker_args(spec))

    def _wait_ready(self, gids: list[int]) -> None:
        """Block until the groups are ready (at start-up, before the engine loop runs)."""
        timeout = self.config.worker_start_timeout
        deadline = time.monotonic() + timeout
        while any(g in self._starting for g in gids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker_start_timeout: workers were not ready after {timeout}s")
            msg = self._out_ch.recv(200)
            if isinstance(msg, WorkerReady):
                self._on_ready(msg)
            elif isinstance(msg, WorkerFailed):
                raise RuntimeError(f"a worker failed to start: {msg.message}")
            dead = self._launcher.dead_groups()
            if dead:
                time.sleep(0.2)  # its WorkerFailed report may still be in flight
                msg = self._out_ch.recv(0)
                detail = msg.message if isinstance(msg, WorkerFailed) else dead
                raise RuntimeError(f"a worker exited during start-up: {detail}")

    def _on_ready(self, msg: WorkerReady) -> list[RequestState]:
        """A target's leader is up: route to it, retire what it replaces, and hand it waiting requests."""
        with self._topo:
            t = msg.replica
            gid = self._group_of_target.get(t)
            if gid is None or gid not in self._groups:
                return []
            self._ready[t] = msg
            self._last_seen[t] = time.monotonic()
            self.controller.add_target(t, self._in_ch[t].send)
            for old in self._replaces.pop(t, []):
                self._down.pop(old, None)
            if all(x in self._ready for x in self._groups[gid].targets):
                self._starting.discard(gid)
            pending, self._pending = self._pending, []
        return [s for s, _ in pending if not self._redispatch(s)]

    def _stop_routing(self, gid: int) -> list[RequestState]:
        """Forget a group's targets; returns their unfinished requests."""
        states: list[RequestState] = []
        for t in self._groups[gid].targets:
            states.extend(self.controller.remove_target(t))
            self._ready.pop(t, None)
            self._last_seen.pop(t, None)
        return states

    def _close_group_channels(self, gid: int) -> None:
        for t in self._groups[gid].targets:
            ch = self._in_ch.pop(t, None)
            if ch is not None:
                ch.close()
        del self._groups[gid]
        self._starting.discard(gid)
        self._retiring.discard(gid)

    # ------------------------------------------------------------------------------------------ engine loop
    def _loop(self) -> None:
        last_check = 0.0
        while not self._closed:
            try:
                msgs = self._out_ch.recv_many(50)
            except Exception:
                if self._closed:
                    return
                raise
            woken: list[RequestState] = []
            now = time.monotonic()
            for msg in msgs:
                if isinstance(msg, StepOutput):
                    self._last_seen[msg.replica] = now
                    woken.extend(state for state, _ in self.controller.on_step(msg))
                elif isinstance(msg, WorkerReady):
                    woken.extend(self._on_ready(msg))
                elif isinstance(msg, ControlDone):
                    self._on_control_done(msg)
                elif isinstance(msg, WorkerFailed):
                    log.error("worker failed: %s", msg.message)
                    self._failures[self._group_of_target.get(msg.replica, -1)] = msg.message.splitlines()[0]
            if now - last_check > 0.2:
                last_check = now
                woken.extend(self._check_liveness(now))
            if woken:
                wake_all(woken)
                with self._cv:
                    self._cv.notify_all()

    def _check_liveness(self, now: float) -> list[RequestState]:
        """Dead ranks (process exit, actor death) or silent leaders fail their group over."""
        with self._topo:
            dead = {g: r for g, r in self._launcher.dead_groups().items() if g in self._groups and g not in self._retiring}
            limit = self.config.heartbeat_timeout_s
            for t, seen in list(self._last_seen.items()):
                gid = self._group_of_target.get(t)
                if gid in self._groups and gid not in dead and gid not in self._retiring and now - seen > limit:
                    dead[gid] = f"no heartbeat from replica {t} for {now - seen:.0f}s"
            woken: list[RequestState] = []
            for gid, reason in dead.items():
                woken.extend(self._on_group_dead(gid, self._failures.pop(gid, reason)))
            expired = [(s, d) for s, d in self._pending if now > d]
            if expired:
                self._pending = [(s, d) for s, d in self._pending if now <= d]
                for s, _ in expired:
                    self.controller.fail(s, f"no replica came back within failover_timeout_s "
                                            f"({self.config.failover_timeout_s}s)")
                    woken.append(s)
        return woken

    def _on_group_dead(self, gid: int, reason: str) -> list[RequestState]:
        """Kill what is left of the group, resume its requests elsewhere, and restart it in the background."""
        log.warning("replica group %d is down: %s", gid, reason)
        self._launcher.kill_group(gid)
        spec = self._groups[gid]
        for t in spec.targets:
            self._down[t] = reason
        states = self._stop_routing(gid)
        self._close_group_channels(gid)
        slot = spec.first_global_rank
        if self._restarts.get(slot, 0) < self.config.max_replica_restarts and not self._closed:
            self._restarts[slot] = self._restarts.get(slot, 0) + 1
            new = self._renumber(spec)
            for t_new, t_old in zip(new.targets, spec.targets):
                self._replaces[t_new] = [t_old]
            self._starting.add(new.group_id)  # so requests wait for it rather than fail
            threading.Thread(target=self._restart, args=(new,), name=f"flotilla-restart-{gid}", daemon=True).start()
        return [s for s in states if not self._redispatch(s, f"replica died: {reason}")]

    def _restart(self, spec: GroupSpec) -> None:
        try:
            self._start_group(spec)
        except Exception as e:  # the launcher could not start it: leave it down
            log.error("restarting replica group failed: %s", e)
            with self._topo:
                self._starting.discard(spec.group_id)
                self._groups.pop(spec.group_id, None)

    def _redispatch(self, state: RequestState, why: str = "") -> bool:
        """Resume a request on a live target as a continuation (prompt + tokens so far). Returns False when it
        finished or failed instead (the caller wakes its waiters)."""
        if state.finished:
            return False
        if len(state.output_ids) >= state.sampling.max_new_tokens:
            state.finish_locally("length")
            return False
        try:
            self.controller.dispatch(state)
            return True
        except NoReplicaAvailable:
            if self._starting and not self._closed:
                self._pending.append((state, time.monotonic() + self.config.failover_timeout_s))
                return True
            self.controller.fail(state, why or "no replica is available")
            return False

    # ------------------------------------------------------------------------------------------ requests
    def _new_state(self, prompt: str | None, input_ids: Sequence[int] | None, sampling: SamplingLike,
                   request_id: str | None = None) -> RequestState:
        sp = SamplingParams.from_any(sampling)
        if input_ids is None:
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("prompt: must be a non-empty string (or pass input_ids)")
            ids = list(self.tokenizer(prompt)["input_ids"])
            if not ids:
                raise ValueError("prompt: tokenizes to no tokens")
        else:
            ids = list(input_ids)
            if not ids:
                raise ValueError("input_ids: must not be empty")
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                    raise ValueError(f"input_ids: token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) + sp.max_new_tokens > self.max_model_len:
            raise ValueError(f"max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens ({sp.max_new_tokens}) "
                             f"must be <= the context length {self.max_model_len}")
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        return RequestState(rid, ids, sp, IncrementalDetokenizer(self.tokenizer, ids))

    def _submit(self, state: RequestState) -> None:
        if self._closed:
            raise RequestFailed("the engine is shut down")
        with self._topo:
            try:
                self.controller.dispatch(state)
                return
            except NoReplicaAvailable as e:
                if not self._starting:
                    raise RequestFailed(f"no replica can take the request: {e}") from None
                # every replica is down but one is restarting: wait for it (bounded)
                self._pending.append((state, time.monotonic() + self.config.failover_timeout_s))

    def _wait(self, states: list[RequestState], on_finish=None, timeout: float | None = None) -> None:
        pending = list(states)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while pending:
                done = [s for s in pending if s.finished]
                if done:
                    pending = [s for s in pending if not s.finished]
                    if on_finish:
                        on_finish(len(done))
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("requests did not finish in time")
                self._cv.wait(0.5)

    @staticmethod
    def _raise_if_failed(state: RequestState) -> None:
        if state.finish_reason == "error":
            raise RequestFailed(f"request {state.rid} failed: {state.error}")

    def generate(self, prompts: str | list[str] | None = None, sampling_params: SamplingLike | list[SamplingLike] = None,
                 *, input_ids: list[list[int]] | None = None, use_tqdm: bool = True) -> list[dict[str, Any]]:
        """Generate for every prompt; returns one dict per prompt, in order. Every input is validated
        before any request is queued, so a bad one leaves the engine untouched."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("prompts: pass exactly one of prompts or input_ids")
        if input_ids is not None:
            if not isinstance(input_ids, list) or (input_ids and isinstance(input_ids[0], int)):
                raise ValueError("input_ids: must be a list of token-id lists")
            items: list[tuple[str | None, list[int] | None]] = [(None, ids) for ids in input_ids]
        else:
            items = [(p, None) for p in ([prompts] if isinstance(prompts, str) else list(prompts))]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(f"sampling_params: got {len(sampling_params)} for {len(items)} prompts")
            params = sampling_params
        else:
            params = [sampling_params] * len(items)
        states = [self._new_state(p, ids, sp) for (p, ids), sp in zip(items, params)]
        bar = None
        if use_tqdm and len(states) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(states), desc="generate", unit="req")
        try:
            for s in states:
                self._submit(s)
            self._wait(states, on_finish=bar.update if bar else None)
        except BaseException:
            for s in states:
                if not s.finished:
                    self.abort(s.rid)
            raise
        finally:
            if bar:
                bar.close()
        for s in states:
            self._raise_if_failed(s)
        return [s.result() for s in states]

    def stream(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
               input_ids: list[int] | None = None, request_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield deltas ({text, token_ids, finished, ...}) as tokens arrive; closing the iterator aborts."""
        state = self._new_state(prompt, input_ids, sampling_params, request_id)
        self._submit(state)
        cursor = _Cursor()
        try:
            while True:
                with self._cv:
                    while not cursor.has_news(state):
                        self._cv.wait(0.5)
                delta = cursor.take(state)
                if delta is not None:
                    yield delta
                if delta is not None and delta["finished"]:
                    return
        finally:
            if not state.finished:
                self.abort(state.rid)

    async def stream_async(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
                           input_ids: list[int] | None = None,
                           request_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Async deltas for servers; cancelling the consumer aborts the request in its replica."""
        state = self._new_state(prompt, input_ids, sampling_params, request_id)
        ev = state.add_async_waiter()
        self._submit(state)
        cursor = _Cursor()
        try:
            while True:
                await ev.wait()
                ev.clear()
                delta = cursor.take(state)
                if delta is not None:
                    yield delta
                    if delta["finished"]:
                        return
        finally:
            state.remove_async_waiter(ev)
            if not state.finished:
                self.abort(state.rid)

    async def generate_async(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
                             input_ids: list[int] | None = None, request_id: str | None = None) -> dict[str, Any]:
        final = None
        async for delta in self.stream_async(prompt, sampling_params, input_ids=input_ids, request_id=request_id):
            final = delta
        assert final is not None
        return final["result"]

    def abort(self, request_id: str) -> bool:
        """Stop a request; it finishes with finish_reason "abort". False if it is not in flight."""
        state = self.controller.abort(request_id)
        if state is not None and state.finished:  # it was held while paused: it ended in the front end
            state.wake()
            with self._cv:
                self._cv.notify_all()
        return state is not None

    def flush_cache(self) -> None:
        for ch in self._in_ch.values():
            ch.send(FlushCache())

    # ------------------------------------------------------------------------------------------ scaling
    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        """Grow or shrink the number of data-parallel replicas while requests keep flowing.

        New replicas start and join the routing once ready. Removed replicas (the newest first) stop getting
        requests, finish what they hold for up to ``drain_timeout_s``, hand the rest to the others as
        continuations, then stop.
        """
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size: must be an int >= 1, got {dp_size!r}")
        if self.config.enable_dp_attention:
            raise ValueError("dp_size: with enable_dp_attention the attention-DP groups live in one TP group; "
                             "scaling them means restarting the engine with a new layout")
        with self._scale_lock:
            live = sorted(g for g in self._groups if g not in self._retiring)
            if dp_size > len(live):
                self._grow(dp_size - len(live))
            for gid in live[dp_size:][::-1]:
                self._retire(gid, drain_timeout_s)
            self.config.dp_size = dp_size

    def _grow(self, count: int) -> None:
        from flotilla.launch.topology import replica_group

        tp, pp = self.config.tp_size, self.config.pp_size
        with self._topo:
            used = {spec.first_global_rank for spec in self._groups.values()}
            slots = list(itertools.islice((s for s in itertools.count(0, tp * pp) if s not in used), count))
            specs = [replica_group(next(self._next_gid), next(self._next_target), tp, slot, pp) for slot in slots]
        ensure = getattr(self._launcher, "ensure_capacity", None)
        if ensure is not None:
            ensure(max(slots) + tp * pp)
        for spec in specs:
            self._start_group(spec)
        deadline = time.monotonic() + self.config.worker_start_timeout
        while any(spec.group_id in self._starting for spec in specs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker_start_timeout: new replicas not ready after "
                                   f"{self.config.worker_start_timeout}s")
            if any(spec.group_id not in self._groups for spec in specs):
                raise RuntimeError("a new replica died while starting")
            time.sleep(0.05)

    def _retire(self, gid: int, drain_timeout_s: float) -> None:
        with self._topo:
            self._retiring.add(gid)
            targets = list(self._groups[gid].targets)
            for t in targets:
                self.controller.set_accepting(t, False)
        deadline = time.monotonic() + drain_timeout_s
        while any(self.controller.requests_on(t) for t in targets) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._topo:
            moved = [s for t in targets for s in self.controller.requests_on(t)]
            for state in moved:
                old = state.target
                if self._redispatch(state):
                    self.controller.abort_on(old, state.rid)
                else:
                    state.wake()
            for t in targets:
                self._in_ch[t].send(Shutdown(), timeout_ms=1000)
        self._launcher.stop_group(gid, timeout=30)
        with self._topo:
            for state in self._stop_routing(gid):
                if not self._redispatch(state):
                    state.wake()
            self._close_group_channels(gid)
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        replicas = []
        with self._topo, self.controller.lock:
            for t, view in sorted(self.controller.views.items()):
                gid = self._group_of_target[t]
                replicas.append({
                    "id": t, "group": gid, "pids": self._launcher.pids(gid), "alive": view.alive,
                    "accepting": view.accepting, "running": view.running, "waiting": view.waiting,
                    "kv_used": view.kv_used, "cached_tokens": view.cached_tokens,
                    "outstanding_tokens": view.outstanding_tokens, "num_steps": view.last_report.num_steps,
                    "num_preemptions": view.last_report.num_preemptions,
                    "weight_version": view.last_report.weight_version,
                    "stage_forwards": list(view.last_report.stage_forwards),
                    "max_in_flight": view.last_report.max_in_flight,
                })
            for t, reason in sorted(self._down.items()):
                replicas.append({"id": t, "group": None, "pids": [], "alive": False, "accepting": False,
                                 "running": 0, "waiting": 0, "kv_used": 0.0, "cached_tokens": 0,
                                 "outstanding_tokens": 0, "num_steps": 0, "num_preemptions": 0, "weight_version": None,
                                 "down_reason": reason, "restarting": any(t in old for old in self._replaces.values())})
            inflight = self.controller.inflight() + len(self._pending)
            restarts = sum(self._restarts.values())
        return {"replicas": replicas, "num_requests_inflight": inflight, "max_model_len": self.max_model_len,
                "load_balance": self.config.load_balance, "dp_size": self.config.dp_size,
                "replica_restarts": restarts, "weight_version": self._weight_version, "paused": self._paused}

    def healthy(self) -> bool:
        """Every replica slot has a live, ready replica (what /health reports)."""
        with self._topo:
            return not self._closed and not self._down and not self._starting

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ch in list(self._in_ch.values()):
            try:
                ch.send(Shutdown(), timeout_ms=200)
            except Exception:
                pass
        self._launcher.shutdown()
        self._thread.join(timeout=5)
        with self._topo, self.controller.lock:
            leftovers = list(self.controller.requests.values()) + [s for s, _ in self._pending]
            self._pending = []
        for state in leftovers:
            self.controller.fail(state, "the engine shut down")
        wake_all(leftovers)
        with self._cv:
            self._cv.notify_all()
        self._finalizer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Cursor:
    """How much of a request a stream consumer has seen; deltas are cut from the cumulative state, so a
    wake-up that arrives late or twice loses and repeats nothing."""

    def __init__(self) -> None:
        self.tokens = 0
        self.chars = 0
        self.done = False

    def has_news(self, s: RequestState) -> bool:
        return (s.finished and not self.done) or len(s.output_ids) > self.tokens or \
            len(s.streamable_text()) > self.chars

    def take(self, s: RequestState) -> dict[str, Any] | None:
        if self.done:
            return None
        finished = s.finished
        text = s.streamable_text()
        ids = s.output_ids[self.tokens:]
        if not ids and len(text) <= self.chars and not finished:
            return None
        if finished and s.finish_reason == "error":
            self.done = True
            raise RequestFailed(f"request {s.rid} failed: {s.error}")
        delta: dict[str, Any] = {"request_id": s.rid, "text": text[self.chars:], "token_ids": list(ids),
                                 "finished": finished, "finish_reason": s.finish_reason if finished else None}
        if s.sampling.logprobs:
            delta["logprobs"] = s.logprobs[self.tokens:self.tokens + len(ids)]
            if s.sampling.top_logprobs:
                delta["top_logprobs"] = [list(t) for t in s.top_logprobs[self.tokens:self.tokens + len(ids)]]
        self.tokens += len(ids)
        self.chars = len(text)
        if finished:
            self.done = True
            delta["result"] = s.result()
        return delta


def _cleanup(launcher, hub, private_dir: str) -> None:
    """Last-resort teardown (also run when an Engine is garbage-collected without shutdown())."""
    try:
        launcher.shutdown(timeout=2.0)
    finally:
        hub.close()
        shutil.rmtree(private_dir, ignore_errors=True)
