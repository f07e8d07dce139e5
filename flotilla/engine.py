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
from flotilla.detokenizer import IncrementalDetokenizer
from flotilla.ipc.channel import ChannelHub
from flotilla.ipc.messages import FlushCache, Shutdown, StepOutput, WorkerFailed, WorkerReady, from_worker_decoder
from flotilla.launch.topology import GroupSpec, layout, world_size
from flotilla.request import RequestFailed, RequestState
from flotilla.router.controller import DPController
from flotilla.router.policies import NoReplicaAvailable
from flotilla.sampling import SamplingParams
from flotilla.worker.worker import WorkerArgs

log = logging.getLogger(__name__)

SamplingLike = SamplingParams | dict[str, Any] | None


class Engine:
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
        self._dead_groups: dict[int, str] = {}
        self._private_dir = tempfile.mkdtemp(prefix="flotilla-")
        self._launcher = self._make_launcher()
        # Sockets bind on the front end's node: ipc:// when every rank is on it, tcp:// + CURVE otherwise.
        tcp = self._launcher.multi_node
        self._hub = ChannelHub(host=(self.config.host or self._launcher.bind_host) if tcp else None, use_tcp=tcp,
                               allow_wildcard=self.config.allow_wildcard_host)
        self._finalizer = weakref.finalize(self, _cleanup, self._launcher, self._hub, self._private_dir)
        self._out_ch, self._out_addr = self._hub.bind("pull", "out", from_worker_decoder)
        try:
            for spec in layout(self.config.tp_size, self.config.dp_size, self.config.enable_dp_attention):
                self._start_group(spec)
            self._wait_ready()
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
            ranks = world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention)
            if ranks > num_devices:  # ranks share GPUs: each takes its fraction of the memory budget
                cfg.gpu_memory_utilization /= -(-ranks // num_devices)
        return MpLauncher(self._private_dir, num_devices)

    def _worker_args(self, spec: GroupSpec) -> list[WorkerArgs]:
        from flotilla.launch.mp import cpu_threads_per_rank

        leaders = {r: t for t, r in spec.leaders}
        cfg = self.config
        threads = cpu_threads_per_rank(world_size(cfg.tp_size, cfg.dp_size, cfg.enable_dp_attention))
        keys = self._hub.keys.for_client() if self._hub.keys else None
        return [WorkerArgs(config=cfg.to_dict(), replica_id=spec.targets[r // spec.attn_tp_size], rank=r,
                           world_size=spec.world_size, dist_init_method=None,
                           in_addr=self._in_addr[leaders[r]] if r in leaders else "", out_addr=self._out_addr,
                           keys=keys, num_threads=threads)
                for r in range(spec.world_size)]

    def _start_group(self, spec: GroupSpec) -> None:
        for t in spec.targets:
            ch, addr = self._hub.bind("push", f"in{t}", None)
            self._in_ch[t], self._in_addr[t] = ch, addr
            self._group_of_target[t] = spec.group_id
            self.controller.add_target(t, ch.send)
        self._groups[spec.group_id] = spec
        self._launcher.start_group(spec, self._worker_args(spec))

    def _wait_ready(self) -> None:
        timeout = self.config.worker_start_timeout
        deadline = time.monotonic() + timeout
        while set(self._ready) != set(self._group_of_target):
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker_start_timeout: workers were not ready after {timeout}s")
            msg = self._out_ch.recv(200)
            if isinstance(msg, WorkerReady):
                self._ready[msg.replica] = msg
            elif isinstance(msg, WorkerFailed):
                raise RuntimeError(f"a worker failed to start: {msg.message}")
            dead = self._launcher.dead_groups()
            if dead:
                time.sleep(0.2)  # its WorkerFailed report may still be in flight
                msg = self._out_ch.recv(0)
                detail = msg.message if isinstance(msg, WorkerFailed) else dead
                raise RuntimeError(f"a worker exited during start-up: {detail}")

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
            for msg in msgs:
                if isinstance(msg, StepOutput):
                    woken.extend(state for state, _ in self.controller.on_step(msg))
                elif isinstance(msg, WorkerFailed):
                    log.error("worker failed: %s", msg.message)
                    self._failures[self._group_of_target.get(msg.replica, -1)] = msg.message
            now = time.monotonic()
            if now - last_check > 0.2:
                last_check = now
                woken.extend(self._check_liveness())
            if woken:
                for state in woken:
                    state.wake()
                with self._cv:
                    self._cv.notify_all()

    def _check_liveness(self) -> list[RequestState]:
        failed: list[RequestState] = []
        for gid, reason in self._launcher.dead_groups().items():
            reason = self._failures.get(gid, reason)
            self._launcher.kill_group(gid)
            self._dead_groups[gid] = reason
            for t in self._groups[gid].targets:
                for state in self.controller.mark_dead(t):
                    self.controller.fail(state, f"replica {t} died: {reason}")
                    failed.append(state)
        return failed

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
        try:
            self.controller.dispatch(state)
        except NoReplicaAvailable as e:
            raise RequestFailed(f"no replica can take the request: {e}") from None

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
        return self.controller.abort(request_id) is not None

    def flush_cache(self) -> None:
        for ch in self._in_ch.values():
            ch.send(FlushCache())

    # ------------------------------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        replicas = []
        with self.controller.lock:
            for t, view in sorted(self.controller.views.items()):
                gid = self._group_of_target[t]
                replicas.append({
                    "id": t, "group": gid, "pids": self._launcher.pids(gid),
                    "alive": view.alive and gid not in self._dead_groups,
                    "running": view.running, "waiting": view.waiting, "kv_used": view.kv_used,
                    "cached_tokens": view.cached_tokens, "outstanding_tokens": view.outstanding_tokens,
                    "num_steps": view.last_report.num_steps, "num_preemptions": view.last_report.num_preemptions,
                })
            inflight = self.controller.inflight()
        return {"replicas": replicas, "num_requests_inflight": inflight, "max_model_len": self.max_model_len,
                "load_balance": self.config.load_balance}

    # ------------------------------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        if self._closed:
            return
        for ch in self._in_ch.values():
            try:
                ch.send(Shutdown())
            except Exception:
                pass
        self._launcher.shutdown()
        self._closed = True
        self._thread.join(timeout=5)
        with self.controller.lock:
            leftovers = list(self.controller.requests.values())
        for state in leftovers:
            self.controller.fail(state, "the engine shut down")
            state.wake()
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
