"""A model-free engine for measuring the HTTP server's own cost per token (``flotilla bench-serve --synthetic``).

On a GPU the server's ceiling hides behind the model; on a CPU the model hides the server. This engine has no
model: a background thread plays every replica, advancing each running request one token per "step" every
``step_ms`` (as fast as a large GPU batch would), and pushes the steps through exactly the front end's real
per-token path: msgpack-encoded ``StepOutput`` frames decoded again, ``Dispatcher.on_step`` (incremental
detokenization and stop strings in ``RequestState.apply``), and one batched ``wake_all`` per step. What the
HTTP server adds on top of that is what a profile of this process attributes to the server.

It satisfies ``EngineClient`` (``stream_async``, ``stats``, ``scale``, ``tokenizer``, ``max_model_len``, and the LoRA
methods) plus ``abort``, ``shutdown`` and ``update_lora_weights``. Adapters are bookkeeping only (a dict: name,
folder, rank from its ``adapter_config.json``, version): tokens do not depend on them, but an unknown
``lora_name`` is refused at submit with ``InvalidParameter("lora_name", ...)``, as the real engine refuses it, and
``lora_requests`` records which adapter each request asked for (the tests read it). Token ids are random (seeded
per request id), so texts are plausible but meaningless; ``ignore_eos`` is implied (a request ends at
``max_new_tokens`` or on a stop string).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import shutil
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from flotilla.frontend.choices import follow_choices
from flotilla.errors import InvalidParameter
from flotilla.frontend.inputs import InputProcessor, SamplingLike
from flotilla.ipc.messages import AbortRequest, AddRequest, ReplicaLoad, StepOutput, TokenOutput, encoder, \
    from_worker_decoder
from flotilla.frontend.request import ACCEPTED, RequestFailed, follow, wake_all
from flotilla.router.controller import DPController
from flotilla.router.dispatch import Dispatcher
from flotilla.worker.texts import ReplicaTexts


@dataclass
class _Running:
    rid: str
    left: int
    rng: random.Random


@dataclass
class _Replica:
    rid: int
    running: dict[str, _Running] = field(default_factory=dict)
    steps: int = 0


class SyntheticEngine:
    """``dp_size`` simulated replicas of at most ``max_num_seqs`` requests, stepping every ``step_ms``.

    ``step_ms=0`` steps as fast as the front end absorbs (the server's ceiling); a step that takes longer than
    ``step_ms`` of front-end work simply delays the next, as a real engine's output would queue.
    """

    def __init__(self, tokenizer: Any, dp_size: int = 1, step_ms: float = 5.0, max_num_seqs: int = 256,
                 max_model_len: int = 32768, lora_modules: dict[str, str] | None = None, max_lora_rank: int = 16,
                 detokenize_in_replicas: bool = True, stream_interval: int = 1):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        vocab = len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._ids = [i for i in range(vocab) if i not in special]
        self.vocab_size = vocab
        self.inputs = InputProcessor(tokenizer, vocab, max_model_len, check_adapter=self._check_adapter)
        self.dispatcher = Dispatcher(DPController("round_robin"))
        self.step_s = step_ms / 1e3
        self.max_num_seqs = max_num_seqs
        self._inbox: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()
        self._replicas = [_Replica(r) for r in range(dp_size)]
        for r in range(dp_size):
            self.dispatcher.replica_up(r, self._sender(r))
        self._aborted: list[tuple[int, str, str]] = []  # (replica, rid, reason): reported in its next step
        self._closed = False
        self.tokens_emitted = 0
        self.stream_interval = stream_interval
        # the replicas' leaders' text work (flotilla/worker/texts.py), run here; its CPU time is counted apart
        # (``replica_cpu_s``): a real replica does it in a process of its own, off the front end's GIL
        self._texts = ReplicaTexts("", tokenizer) if detokenize_in_replicas else None
        self.replica_cpu_s = 0.0
        self.max_lora_rank = max_lora_rank
        self._adapters: dict[str, dict[str, Any]] = {}
        self._lora_lock = threading.Lock()
        self._lora_ids = 0
        self.lora_requests: deque[tuple[str, str | None]] = deque(maxlen=4096)  # (request id, lora_name)
        self.last_lora_update: tuple[str, list[str]] | None = None
        for name, path in (lora_modules or {}).items():
            self.load_lora_adapter(name, path)
        self._thread = threading.Thread(target=self._loop, name="synthetic-engine", daemon=True)
        self._thread.start()

    @classmethod
    def for_shape(cls, shape: str = "qwen3-0.6b", **kwargs: Any) -> "SyntheticEngine":
        """With the tokenizer of a built-in shape (``flotilla.model.shapes``)."""
        from transformers import AutoTokenizer

        from flotilla.model.shapes import write_shape

        folder = write_shape(shape)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return cls(tok, **kwargs)

    @property
    def thread_id(self) -> int | None:
        """The stepping thread's native id (for per-thread CPU accounting)."""
        return self._thread.native_id

    def _sender(self, replica: int):
        def send(msg: object, timeout_ms: int = 0) -> None:
            self._inbox.put((replica, msg))
        return send

    # ------------------------------------------------------------------------------------------ the "replicas"
    def _loop(self) -> None:
        next_t = time.perf_counter()
        while not self._closed:
            self._drain_inbox()
            woken = []
            for rep in self._replicas:
                if rep.running or self._aborted:
                    raw = encoder.encode(self._step(rep))
                    step = from_worker_decoder.decode(raw)
                    assert isinstance(step, StepOutput)  # (what _step built, round-tripped through the codec)
                    woken.extend(self.dispatcher.on_step(step))
            if woken:
                wake_all(woken)
            next_t += self.step_s
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.perf_counter()
                if not woken:
                    time.sleep(0.0005)

    def _drain_inbox(self) -> None:
        while True:
            try:
                replica, msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            rep = self._replicas[replica]
            if isinstance(msg, AddRequest):
                if self._texts is not None:
                    t0 = time.thread_time()
                    self._texts.add(msg.rid, msg.prompt_ids, msg.output_ids, msg.sampling.stop, msg.held,
                                    msg.text_tail, msg.text_len)
                    self.replica_cpu_s += time.thread_time() - t0
                seed = zlib.crc32(msg.rid.encode())
                rep.running[msg.rid] = _Running(msg.rid, msg.sampling.max_new_tokens - len(msg.output_ids),
                                                random.Random(seed))
            elif isinstance(msg, AbortRequest):
                run = rep.running.pop(msg.rid, None)
                if run is not None:
                    self._aborted.append((replica, msg.rid, msg.reason))

    def _step(self, rep: _Replica) -> StepOutput:
        outs = []
        for run in list(rep.running.values())[: self.max_num_seqs]:
            run.left -= 1
            done = run.left <= 0
            outs.append(TokenOutput(run.rid, [run.rng.choice(self._ids)], finished=done,
                                    finish_reason="length" if done else None))
            if done:
                del rep.running[run.rid]
        aborted = [a for a in self._aborted if a[0] == rep.rid]
        for _, rid, reason in aborted:
            outs.append(TokenOutput(rid, [], finished=True, finish_reason=reason))
        self._aborted = [a for a in self._aborted if a[0] != rep.rid]
        if self._texts is not None:
            t0 = time.thread_time()
            for rid in self._texts.apply(outs):  # a stop string ended it in the "replica"
                rep.running.pop(rid, None)
            self.replica_cpu_s += time.thread_time() - t0
        rep.steps += 1
        self.tokens_emitted += len(outs)
        return StepOutput(rep.rid, outs, ReplicaLoad(running=len(rep.running), num_steps=rep.steps))

    # ------------------------------------------------------------------------------------------ EngineClient
    async def stream_async(self, prompt: str | None = None, sampling_params: SamplingLike = None, *,
                           input_ids: list[int] | None = None, request_id: str | None = None,
                           affinity: str | None = None, accepted: bool = False) -> AsyncIterator[dict[str, Any]]:
        """As ``Engine.stream_async`` (``n`` choices and ``accepted`` included): validate, submit, yield deltas cut
        from the requests' states; closing the iterator aborts."""
        states = self.inputs.make_choices(prompt, input_ids, sampling_params, request_id, affinity)
        lora = states[0].sampling.lora_name
        self.lora_requests.extend((s.rid, lora) for s in states)
        if self._closed:
            raise RequestFailed("the engine is shut down")
        ev = asyncio.Event()
        for state in states:
            state.wake_every = self.stream_interval
            state.add_async_waiter(ev)
            self.dispatcher.submit(state)
        follower = follow(states[0], ev, self.abort) if len(states) == 1 else \
            follow_choices(states, ev, self.abort)
        try:
            if accepted:
                yield dict(ACCEPTED)
            async for delta in follower:
                yield delta
        finally:
            for state in states:
                if not state.finished:
                    state.remove_async_waiter(ev)
                    self.abort(state.rid)

    def abort(self, request_id: str) -> bool:
        state = self.dispatcher.abort(request_id)
        if state is not None and state.finished:
            state.wake()
        return state is not None

    def stats(self) -> dict[str, Any]:
        rows = [{"id": r.rid, "alive": True, "running": len(r.running), "waiting": 0, "kv_used": 0.0,
                 "cached_tokens": 0, "num_steps": r.steps} for r in self._replicas]
        return {"replicas": rows, "num_requests_inflight": self.dispatcher.inflight(),
                "dp_size": len(self._replicas), "max_model_len": self.max_model_len}

    def scale(self, dp_size: int, drain_timeout_s: float = 60.0) -> None:
        raise InvalidParameter("dp_size", "the synthetic engine cannot scale")

    # ------------------------------------------------------------------------------------------ LoRA adapters
    def _check_adapter(self, lora: str) -> None:
        """Refused at submit as the real engine refuses it (InputProcessor calls this)."""
        with self._lora_lock:
            if lora not in self._adapters:
                raise InvalidParameter("lora_name", f"unknown LoRA adapter {lora!r}; loaded: {sorted(self._adapters)}")

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Checks what the real engine checks that needs no model: the name, the folder and its rank."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise InvalidParameter("lora_name", f"must be a non-empty str of at most 256 characters, got {name!r}")
        config = os.path.join(str(path), "adapter_config.json")
        if not os.path.isfile(config):
            raise InvalidParameter("lora_path", f"{path!r} is not a PEFT adapter folder (no adapter_config.json)")
        try:
            with open(config) as f:
                rank = json.load(f).get("r")
        except (OSError, ValueError, AttributeError) as e:
            raise InvalidParameter("lora_path", f"cannot read {config}: {e}") from None
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidParameter("lora_path", f"{config}: r must be an int >= 1, got {rank!r}")
        if rank > self.max_lora_rank:
            raise InvalidParameter("lora_path", f"rank {rank} is above max_lora_rank {self.max_lora_rank}")
        with self._lora_lock:
            if name in self._adapters:
                raise InvalidParameter("lora_name", f"LoRA adapter {name!r} is already loaded")
            self._lora_ids += 1
            self._adapters[name] = {"name": name, "path": str(path), "version": 0, "rank": rank,
                                    "id": self._lora_ids}

    def unload_lora_adapter(self, name: str) -> None:
        with self._lora_lock:
            if self._adapters.pop(name, None) is None:
                raise InvalidParameter("lora_name", f"unknown LoRA adapter {name!r}; loaded: {sorted(self._adapters)}")

    def list_lora_adapters(self) -> list[dict[str, Any]]:
        with self._lora_lock:
            return [dict(a) for a in self._adapters.values()]

    def update_lora_weights(self, name: str, named_tensors: Any, *, version: int | None = None) -> int:
        """Counts the tensors (``last_lora_update``: (name, tensor names)) and bumps the adapter's version."""
        tensors = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        if not tensors:
            raise InvalidParameter("named_tensors", "must hold at least one (name, tensor) pair")
        with self._lora_lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise InvalidParameter("lora_name", f"unknown LoRA adapter {name!r}; loaded: {sorted(self._adapters)}")
            adapter["version"] = adapter["version"] + 1 if version is None else version
            self.last_lora_update = (name, [n for n, _ in tensors])
            return int(adapter["version"])

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        wake_all(self.dispatcher.fail_all("the engine shut down"))
