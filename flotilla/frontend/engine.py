"""The front end: tokenizer, request API and the engine loop; a request's life is the dispatcher's, routing
the controller's, replica lifecycle the fleet's, control operations the control plane's, process start-up
the launcher's (docs/architecture.md).

One background thread (the engine loop) receives every replica's messages, hands step outputs to the
dispatcher, ready/failure/liveness events to the fleet and wakes whoever waits. User threads and
asyncio tasks only validate, submit, abort and wait. The loop contains every error (a bad message or a bug
in one handler is logged, never fatal), and ``healthy()`` turns false if it stops turning.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.config import EngineConfig
from flotilla.frontend.choices import choices_of, follow_choices
from flotilla.frontend.control import DEFAULT_TIMEOUT_S, ControlPlane, check_timeout
from flotilla.ipc.channel import ChannelHub
from flotilla.ipc.links import HubLinks
from flotilla.ipc.messages import (ControlDone, FlushCache, Heartbeat, Shutdown, StepOutput, StepStarted,
                                   WorkerFailed, WorkerReady, from_worker_decoder)
from flotilla.launch.base import Launcher
from flotilla.launch.topology import GroupSpec, check_scale, layout
from flotilla.launch.worker_args import WorkerArgs
from flotilla.frontend.inputs import InputProcessor, SamplingLike, batch_inputs
from flotilla.frontend.private_dir import make_private_dir
from flotilla.frontend.request import ACCEPTED, RequestFailed, RequestState, StreamCursor, follow, wake_all
from flotilla.rl.api import RLControl
from flotilla.router.controller import DPController
from flotilla.router.dispatch import Dispatcher
from flotilla.router.fleet import FleetSettings, ReplicaFleet
from flotilla.frontend.stats import EngineStats

log = logging.getLogger(__name__)

LOOP_STALL_S = 5.0  # the engine loop turns every 50 ms; this long without a turn means it is stuck
MAIN_GUARD_HINT = ("workers start with 'spawn' and import your script again: put the code that creates the "
                   "Engine under `if __name__ == \"__main__\":`")


class Engine:
    """Offline and online generation over one or more replicas.

    ``Engine(model=path, tp_size=2, dp_size=2)`` runs dp x tp rank processes on this machine; ``RayEngine``
    is the same engine with the Ray launcher. Every public method is written out here: requests and status in
    this class, control operations (pause, weight updates, memory) forwarded to ``self.control``
    (``flotilla/frontend/control.py``), sglang's names for RL frameworks to ``self.rl`` (``flotilla/rl/api.py``).
    """

    def __init__(self, model: str, **kwargs: Any):
        config = EngineConfig.from_kwargs(model, **kwargs).resolve()

        def mp_launcher(private_dir: str) -> Launcher:
            from flotilla.launch.mp import MpLauncher

            return MpLauncher(config, private_dir)

        self._start(config, mp_launcher)

    def _start(self, config: EngineConfig, make_launcher: Callable[[str], Launcher]) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            raise RuntimeError(f"an Engine was created while a worker process was importing your script; "
                               f"{MAIN_GUARD_HINT}")
        self.config = config
        self.stream_interval = config.stream_interval  # a stream's delta once this many new tokens are there
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        except Exception as e:
            raise InvalidParameter("tokenizer", f"cannot load a tokenizer from {config.tokenizer!r}: {e}") from None
        self.vocab_size = int(config.hf_config.get("vocab_size") or len(self.tokenizer))
        self.controller = DPController(config.load_balance, page_size=config.block_size)
        self.dispatcher = Dispatcher(self.controller, config.failover_timeout_s)
        self._cv = threading.Condition()
        self._closed = False
        self._loop_tick = time.monotonic()
        self._private_dir = make_private_dir()
        try:
            self._launcher = make_launcher(self._private_dir)
        except BaseException:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            raise
        # Sockets bind on the front end's node: ipc:// when every rank is on it, tcp:// + CURVE otherwise.
        tcp = self._launcher.multi_node
        self._hub = ChannelHub(host=(config.host or self._launcher.bind_host) if tcp else None, use_tcp=tcp,
                               allow_wildcard=config.allow_wildcard_host, ipc_parent=self._private_dir)
        self._finalizer = weakref.finalize(self, _cleanup, self._launcher, self._hub, self._private_dir)
        self._out_ch, self._out_addr = self._hub.bind("pull", "out", from_worker_decoder)
        self.fleet = ReplicaFleet(self._launcher, self.dispatcher, HubLinks(self._hub), self._worker_args,
                                  FleetSettings(config.tp_size, config.pp_size, config.max_replica_restarts,
                                                config.heartbeat_timeout_s, config.failover_timeout_s,
                                                config.worker_start_timeout, not config.enable_dp_attention,
                                                restart_window_s=config.restart_window_s,
                                                restart_backoff_s=config.restart_backoff_s,
                                                restart_backoff_max_s=config.restart_backoff_max_s,
                                                step_timeout_s=config.step_timeout_s))
        self.control = ControlPlane(config, self.controller, self.fleet, self._private_dir, self._launcher.stager,
                                    files_shared=not tcp)
        self.rl = RLControl(self.control, self.abort)
        try:
            if config.lora_modules:
                self.control.adapters.preload(config.lora_modules)  # checked here; every rank loads them at start
            self.fleet.start(layout(config.tp_size, config.dp_size, config.enable_dp_attention, config.pp_size))
            self.max_model_len = self._wait_ready()
            self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len,
                                         check_adapter=self.control.adapters.registry.check)
        except BaseException:
            self._finalizer()
            raise
        self._thread = threading.Thread(target=self._loop, name="flotilla-engine-loop", daemon=True)
        self._thread.start()

    def _worker_args(self, spec: GroupSpec, in_addrs: dict[int, str]) -> list[WorkerArgs]:
        leaders = {r: t for t, r in spec.leaders}
        keys = self._hub.keys.for_client() if self._hub.keys else None
        return [WorkerArgs(config=self.config.to_dict(), replica_id=spec.replica_of_rank(r), rank=r,
                           world_size=spec.world_size, dist_init_method=None,
                           in_addr=in_addrs[leaders[r]] if r in leaders else "", out_addr=self._out_addr,
                           keys=keys, **self.control.replay_args())
                for r in range(spec.world_size)]

    def _wait_ready(self) -> int:
        """Block until every group is ready (at start-up, before the engine loop runs); the context length."""
        timeout = self.config.worker_start_timeout
        deadline = time.monotonic() + timeout
        ready: list[WorkerReady] = []
        while self.fleet.starting():
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker_start_timeout: workers were not ready after {timeout}s")
            msg = self._out_ch.recv(50)
            if isinstance(msg, WorkerReady):
                ready.append(msg)
                self.fleet.on_ready(msg)
            elif isinstance(msg, WorkerFailed):
                raise RuntimeError(f"a worker failed to start: {msg.message}")
            self.fleet.connect_links()
            dead = self._launcher.dead_groups()
            if dead:
                time.sleep(0.2)  # its WorkerFailed report may still be in flight
                msg = self._out_ch.recv(0)
                if isinstance(msg, WorkerFailed):
                    raise RuntimeError(f"a worker failed to start: {msg.message}")
                hint = f"; if your script creates the Engine at import time, {MAIN_GUARD_HINT}" \
                    if hasattr(sys.modules.get("__main__"), "__file__") else ""
                raise RuntimeError(f"a worker exited during start-up: {dead}{hint}")
        return min(r.max_model_len for r in ready)

    # ------------------------------------------------------------------------------------------ engine loop
    def _loop(self) -> None:
        last_check = 0.0
        while not self._closed:
            self._loop_tick = now = time.monotonic()
            woken: list[RequestState] = []
            try:
                msgs = self._out_ch.recv_many(50)
            except Exception:
                if self._closed:
                    return
                log.exception("engine loop: receiving failed")
                time.sleep(0.05)
                continue
            for msg in msgs:
                try:
                    woken.extend(self._on_message(msg))
                except Exception:
                    log.exception("engine loop: handling %s failed (contained)", type(msg).__name__)
            if now - last_check > 0.2:
                last_check = now
                try:
                    woken.extend(self.fleet.check())
                except Exception:
                    log.exception("engine loop: the fleet's check failed (contained)")
            if woken:
                wake_all(woken)
                with self._cv:
                    self._cv.notify_all()

    def _on_message(self, msg: object) -> list[RequestState]:
        replica = getattr(msg, "replica", None)
        if isinstance(replica, int):
            self.fleet.on_seen(replica)
        if isinstance(msg, StepOutput):
            return self.dispatcher.on_step(msg)
        if isinstance(msg, StepStarted):
            self.dispatcher.on_started(msg.replica, msg.rids)
        elif isinstance(msg, Heartbeat):
            self.fleet.on_heartbeat(msg.replica, msg.step_age_s)
        elif isinstance(msg, WorkerReady):
            return self.fleet.on_ready(msg)
        if isinstance(msg, ControlDone):
            self.control.on_control_done(msg)
        elif isinstance(msg, WorkerFailed):
            log.error("worker failed: %s", msg.message)
            self.fleet.on_failed(msg.replica, msg.message)
        return []

    # ------------------------------------------------------------------------------------------ requests
    def _new_state(self, prompt: str | None, input_ids: Sequence[int] | None, sampling: SamplingLike,
                   request_id: str | None = None, affinity: str | None = None) -> RequestState:
        state = self.inputs.make_state(prompt, input_ids, sampling, request_id, affinity)
        if state.sampling.n > 1:
            raise InvalidParameter("n", "stream() carries one completion; use generate() or stream_async() for "
                                        "n > 1")
        return state

    def _submit(self, state: RequestState) -> None:
        if self._closed:
            raise RequestFailed("the engine is shut down")
        self.dispatcher.submit(state)  # one call down: a duplicate id or an unencodable request is refused here

    def _wait(self, states: list[RequestState], on_finish: Callable[[int], Any] | None = None,
              timeout: float | None = None) -> None:
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

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingLike | list[SamplingLike] = None, *,
                 input_ids: list[list[int]] | None = None, use_tqdm: bool = True) -> list[dict[str, Any]]:
        """Generate for every prompt; returns one dict per prompt, in order. Every input is validated
        before any request is queued, so a bad one leaves the engine untouched."""
        items = batch_inputs(prompts, input_ids, sampling_params)
        groups = [self.inputs.make_choices(p, ids, sp) for p, ids, sp in items]
        states = [s for g in groups for s in g]
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
            if s.finish_reason == "error":
                raise RequestFailed(f"request {s.rid} failed: {s.error}")
        return [choices_of([s.result() for s in g]) for g in groups]

    def stream(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
               input_ids: list[int] | None = None, request_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield deltas ({text, token_ids, finished, ...}) as tokens arrive; closing the iterator aborts."""
        state = self._new_state(prompt, input_ids, sampling_params, request_id)
        state.wake_every = self.stream_interval
        self._submit(state)
        cursor = StreamCursor()
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
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           affinity: str | None = None, accepted: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Async deltas for servers; cancelling the consumer aborts the request in its replica. Tokenizing
        runs off the event loop (a long prompt must not stall the other requests' streams). Requests with
        the same ``affinity`` key go to one replica.

        With ``n`` > 1 in ``sampling_params`` the prompt's n choices run together (choice i seeded with seed + i,
        named ``<request_id>-i``, all under one affinity key: one replica, which shares the prompt's KV) and their
        deltas come interleaved, each with ``"index"`` (the choice); the stream ends once every choice has
        finished. With n == 1 the deltas have no ``"index"``. Everything is validated before any request is
        queued.

        ``accepted``: first yield ``ACCEPTED`` (no text, no tokens, ``"accepted": True``) as soon as every request is
        queued: a server sends its response status then, not at the first token (a client whose read timeout is
        below the time to first token does not give up)."""
        args = (prompt, input_ids, sampling_params, request_id, affinity)
        if len(prompt or "") > 4096 or len(input_ids or ()) > 4096:
            states = await asyncio.to_thread(self.inputs.make_choices, *args)
        else:
            states = self.inputs.make_choices(*args)
        ev = asyncio.Event()
        for state in states:
            state.wake_every = self.stream_interval
            state.add_async_waiter(ev)
        submitted: list[RequestState] = []
        try:
            for state in states:
                self._submit(state)
                submitted.append(state)
        except BaseException:
            for state in states:
                state.remove_async_waiter(ev)
            for state in submitted:  # only these: a refused one's id may be another request's (a duplicate)
                if not state.finished:
                    self.abort(state.rid)
            raise
        follower = follow(states[0], ev, self.abort) if len(states) == 1 else \
            follow_choices(states, ev, self.abort)
        try:
            if accepted:
                yield dict(ACCEPTED)
            async for delta in follower:
                yield delta
        finally:  # a consumer that left before the follower started (after ACCEPTED): abort here
            for state in states:
                if not state.finished:
                    state.remove_async_waiter(ev)
                    self.abort(state.rid)

    async def generate_async(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
                             input_ids: list[int] | None = None, request_id: str | None = None) -> dict[str, Any]:
        """The final result, as ``generate`` gives it for one prompt (with n > 1: every choice under "outputs")."""
        results: dict[int, dict[str, Any]] = {}
        async for delta in self.stream_async(prompt, sampling_params, input_ids=input_ids, request_id=request_id):
            if delta["finished"]:
                results[delta.get("index", 0)] = delta["result"]
        assert results
        return choices_of([results[i] for i in sorted(results)])

    def abort(self, request_id: str) -> bool:
        """Stop a request; it finishes with finish_reason "abort". False if it is not in flight."""
        state = self.dispatcher.abort(request_id)
        if state is not None and state.finished:  # it never reached a replica: it ended in the front end
            state.wake()
            with self._cv:
                self._cv.notify_all()
        return state is not None

    def flush_cache(self) -> None:
        self.fleet.send_all(FlushCache())

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        """Grow or shrink the number of data-parallel replicas while requests keep flowing.

        New replicas start and join the routing once ready. Removed replicas (down ones first, then the newest)
        stop getting requests, finish what they hold for up to ``drain_timeout_s``, hand the rest to the
        others as continuations, then stop.
        """
        check_scale(dp_size, drain_timeout_s, self.config.tp_size * self.config.pp_size,
                    getattr(self._launcher, "max_ranks", None))
        self.fleet.scale(dp_size, drain_timeout_s)
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------------------------------ status
    def stats(self) -> EngineStats:
        """Every replica, the requests in flight, weights, pause and the front end's health; ``.to_dict()`` for
        a plain dict (the struct also reads as one: ``stats()["paused"]``)."""
        inflight = self.dispatcher.inflight()
        return EngineStats(replicas=self.fleet.rows(), num_requests_inflight=inflight,
                           max_model_len=self.max_model_len, load_balance=self.config.load_balance,
                           dp_size=self.fleet.dp_size(), replica_restarts=self.fleet.restarts(),
                           weight_version=self.control.weight_version, paused=self.control.paused,
                           control_op=self.control.current_op(), engine_loop_alive=self._loop_alive(),
                           dropped_frames=self._out_ch.dropped, lora_adapters=self.list_lora_adapters())

    def _loop_alive(self) -> bool:
        return self._thread.is_alive() and time.monotonic() - self._loop_tick < LOOP_STALL_S

    def healthy(self) -> bool:
        """Every replica group is ready and the engine loop turns (/health: "ok")."""
        return not self._closed and self._loop_alive() and self.fleet.healthy()

    def serving(self) -> bool:
        """Some replica takes requests and the engine loop turns (/health: "degraded" rather than 503)."""
        return not self._closed and self._loop_alive() and self.fleet.serving()

    # ---------------------------------------------------------------------------- control (control.py)
    @property
    def weight_version(self) -> int:
        """The version of the weights every replica serves (0: the checkpoint the engine started with)."""
        return self.control.weight_version

    @property
    def paused(self) -> bool:
        """Whether ``pause()`` (or a pausing control operation) holds the engine."""
        return self.control.paused

    def pause(self, timeout: float = 60.0) -> None:
        """Stop dispatching and scheduling; running requests keep their KV (``ControlPlane.pause``)."""
        self.control.pause(timeout)

    def resume(self, timeout: float = 60.0) -> None:
        """Undo ``pause()``: replicas schedule again, held requests are dispatched (``ControlPlane.resume``)."""
        self.control.resume(timeout)

    def update_weights(self, named_tensors: Any, *, version: int | None = None, flush_cache: bool = True,
                       timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Load (name, tensor) pairs into every replica without a restart; the new weight version
        (``ControlPlane.update_weights``)."""
        return self.control.update_weights(named_tensors, version=version, flush_cache=flush_cache, timeout=timeout)

    def update_weights_from_disk(self, path: str | os.PathLike, *, version: int | None = None,
                                 flush_cache: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """``update_weights`` from a safetensors file or checkpoint folder every rank can read
        (``ControlPlane.update_weights_from_disk``)."""
        return self.control.update_weights_from_disk(path, version=version, flush_cache=flush_cache, timeout=timeout)

    def release_memory(self, weights: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Free every replica's KV cache (and with ``weights`` move the weights to host memory); pauses first
        (``ControlPlane.release_memory``)."""
        self.control.release_memory(weights, timeout)

    def resume_memory(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Re-take what ``release_memory`` freed, and resume if that paused (``ControlPlane.resume_memory``)."""
        self.control.resume_memory(timeout)

    # ---------------------------------------------------------------- LoRA adapters (weights/adapters.py)
    def load_lora_adapter(self, name: str, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Load the PEFT adapter folder ``path`` as ``name`` on every replica and rank (checked first; all or
        none); requests submitted afterwards may name it (``SamplingParams(lora_name=name)``)."""
        check_timeout("timeout", timeout)
        self.control.adapters.load(name, os.fspath(path), timeout)

    def unload_lora_adapter(self, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Stop serving adapter ``name``: new requests naming it are refused at once, the ones in flight finish
        (up to ``timeout``), then every replica drops it."""
        check_timeout("timeout", timeout)
        self.control.adapters.unload(name, timeout)

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        """The loaded adapters: name, path, version, rank, id, target_modules, created."""
        return self.control.adapters.registry.rows()

    def update_lora_weights(self, name: str, named_tensors: Any, *, version: int | None = None,
                            timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Replace every weight of adapter ``name`` ((PEFT name, tensor) pairs or a dict, the names and shapes it
        was loaded with), staged on every rank and committed all or none, the base weights untouched; returns
        the adapter's new version. Its running requests recompute their KV with the new weights."""
        check_timeout("timeout", timeout)
        return self.control.adapters.update(name, named_tensors, version, timeout)

    # ---------------------------------------------------------------------- RL, sglang's names (rl/api.py)
    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl",
                                  timeout: float = 600.0, connect_timeout_s: float = 30.0) -> None:
        """Join every engine rank to one torch.distributed group with the trainer as rank 0
        (``RLControl.init_weights_update_group``)."""
        self.rl.init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                          backend, timeout, connect_timeout_s)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        """Leave and destroy a weight-sync group (``RLControl.destroy_weights_update_group``)."""
        self.rl.destroy_weights_update_group(group_name)

    def weight_sync_ranks(self, rank_offset: int = 1) -> list[dict[str, Any]]:
        """The group rank each engine rank takes for ``rank_offset`` (``RLControl.weight_sync_ranks``)."""
        return self.rl.weight_sync_ranks(rank_offset)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: int | None = None, timeout: float = 600.0) -> int:
        """Receive the trainer's broadcasts into every rank; the new weight version
        (``RLControl.update_weights_from_distributed``)."""
        return self.rl.update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache,
                                                       weight_version, timeout)

    def check_weights_update(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                             group_name: str = "weight_update_group") -> None:
        """Raise for what ``update_weights_from_distributed`` would refuse, touching nothing
        (``RLControl.check_weights_update``)."""
        self.rl.check_weights_update(names, dtypes, shapes, group_name)

    def update_weights_from_tensor(self, named_tensors: Any, load_format: str | None = None,
                                   flush_cache: bool = True, weight_version: int | None = None) -> int:
        """(name, tensor) pairs, or CUDA IPC handles of a colocated trainer
        (``RLControl.update_weights_from_tensor``)."""
        return self.rl.update_weights_from_tensor(named_tensors, load_format, flush_cache, weight_version)

    def pause_generation(self, mode: str = "abort") -> None:
        """Pause with what happens to the requests in flight: "abort", "retract" or "in_place"
        (``RLControl.pause_generation``)."""
        self.rl.pause_generation(mode)

    def continue_generation(self) -> None:
        """Resume after ``pause_generation`` (``RLControl.continue_generation``)."""
        self.rl.continue_generation()

    def abort_request(self, rid: str = "", abort_all: bool = False) -> int:
        """Abort one request or every one in flight; how many were found (``RLControl.abort_request``)."""
        return self.rl.abort_request(rid, abort_all)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free the KV cache and, for ``tags`` None or with "weights", move the weights to host memory
        (``RLControl.release_memory_occupation``)."""
        self.rl.release_memory_occupation(tags)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Undo ``release_memory_occupation`` (``RLControl.resume_memory_occupation``)."""
        self.rl.resume_memory_occupation(tags)

    def get_weight_version(self) -> int:
        """The weight version every replica serves (``RLControl.get_weight_version``)."""
        return self.rl.get_weight_version()

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        leftovers = self.fleet.close()
        for t in self.fleet.ready_replicas():
            self.controller.send(t, Shutdown(), timeout_ms=200)
        self._launcher.shutdown()
        self._thread.join(timeout=5)
        leftovers += self.dispatcher.fail_all("the engine shut down")
        for state in leftovers:
            state.fail("the engine shut down")
        wake_all(leftovers)
        with self._cv:
            self._cv.notify_all()
        self._finalizer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _cleanup(launcher: Launcher, hub: ChannelHub, private_dir: str) -> None:
    """Last-resort teardown (also run when an Engine is garbage-collected without shutdown())."""
    try:
        launcher.shutdown(timeout=2.0)
    finally:
        hub.close()
        shutil.rmtree(private_dir, ignore_errors=True)
