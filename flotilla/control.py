"""Weight updates, pause/resume and memory release: the front end's control plane.

The flow of an update (see docs/weight_updates.md):

1. Validate every (name, tensor) against a copy of the model built on the ``meta`` device (tp=1, so the
   full Hugging Face shapes): unknown names, wrong shapes and non-float tensors are refused here, naming
   the parameter, before any rank is told anything.
2. Make the tensors readable by every rank: ``update_weights`` writes them into one safetensors file in
   the engine's private 0700 folder; ``update_weights_from_disk`` passes the caller's file or folder; a
   launcher with a ``WeightStager`` (Ray: the object store) stages tensors in each rank's process
   (``staged:<key>``), which is also how tensors reach ranks on other nodes.
3. Pause (stop dispatching, leaders stop scheduling), send ``UpdateWeights`` to every leader, wait for
   every ``ControlDone``, resume. Each leader hands the op to all its ranks inside the batch plan, and all
   ranks copy their shard into the live parameters in place in one step.

Only one control operation runs at a time (``ControlPlane.lock``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from typing import TYPE_CHECKING

from flotilla.control_sync import WeightSync
from flotilla.ipc.messages import ControlDone, Pause, ReleaseMemory, Resume, ResumeMemory, UpdateWeights
from flotilla.request import wake_all

if TYPE_CHECKING:
    from flotilla.config import EngineConfig
    from flotilla.launch.base import WeightStager
    from flotilla.router.controller import DPController
    from flotilla.router.fleet import ReplicaFleet

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
PAUSE_MODES = ("abort", "retract", "in_place")
CONTROL_SEND_TIMEOUT_MS = 2000  # a control op waits this long for a replica just started to connect

# safetensors header dtype codes of float types (anything else is refused as not floating point)
_SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ENGINE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a mistake (and time.monotonic() + 1e308 is inf)


def check_timeout(name: str, value: Any, allow_zero: bool = False) -> float:
    """A time-out in seconds: a finite number > 0 (>= 0 with ``allow_zero``), at most a week."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or value < 0 or value > MAX_TIMEOUT_S or not math.isfinite(value) or \
            (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number of seconds {bound} and <= {MAX_TIMEOUT_S:.0f}, "
                         f"got {value!r}")
    return float(value)


class _PendingOp:
    def __init__(self, name: str, targets: set[int]):
        self.name = name
        self.pending = set(targets)
        self.errors: dict[int, str] = {}


def meta_tensor(name: str, shape: Any, dtype: str) -> torch.Tensor:
    """A shape-only stand-in for a tensor described by metadata (object refs, a safetensors header)."""
    if shape is None:
        raise ValueError(f"weights: {name!r}: expected a tensor, got {dtype}")
    torch_dtype = getattr(torch, _SAFETENSORS_FLOATS.get(dtype, dtype.removeprefix("torch.")), None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"weights: {name!r}: dtype {dtype} is not a floating-point type")
    return torch.empty(tuple(shape), dtype=torch_dtype, device="meta")


def build_on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``make()`` with every parameter on the meta device. Under ``torch.device("meta")`` when that works; a
    model that computes a buffer on the CPU while it is built (llama 3's rope scaling) is built on the CPU
    instead, each parameter moved to meta as it is registered (its attributes, e.g. weight_loader, kept), so
    no more than one parameter's memory is ever taken."""
    try:
        with torch.device("meta"):
            return make()
    except NotImplementedError:
        pass
    register = torch.nn.Module.register_parameter

    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            moved = torch.nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            param = moved
        register(module, name, param)

    torch.nn.Module.register_parameter = to_meta  # type: ignore[method-assign]
    try:
        return make()
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def collect_named_tensors(named_tensors: Any) -> list[tuple[str, Any]]:
    """A dict, or an iterable of (name, tensor) pairs, as a list."""
    if isinstance(named_tensors, dict):
        return list(named_tensors.items())
    items = []
    for item in named_tensors:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"weights: expected (name, tensor) pairs, got {type(item).__name__}")
        items.append((item[0], item[1]))
    return items


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
        self._weight_version = 0
        # what a replica started later (failover, scale-up) loads on top of the checkpoint to catch up:
        # sources in order, or None when an update cannot be replayed (it was staged, not a file)
        self._replay: list[str] | None = []
        self._meta = None
        self._op: tuple[str, bool, float] | None = None  # (name, on the ranks, since): what /health reports
        self.sync = WeightSync(self)  # weight-sync groups with a trainer (flotilla/control_sync.py)

    # ------------------------------------------------------------------------------------------ public
    @property
    def weight_version(self) -> int:
        """The version of the weights every replica serves (0: the checkpoint the engine started with)."""
        return self._weight_version

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
        """Load new weights into every replica and TP rank, in place, without a restart.

        ``named_tensors``: (Hugging Face parameter name, tensor) pairs or a dict, any subset of the model's
        parameters, any float dtype (converted to the engine's), on any device. Everything is checked before
        anything is written: an unknown name or a wrong shape raises ``ValueError`` naming the parameter and
        the old weights keep serving. Requests are paused around the update; with ``flush_cache`` no KV
        computed with the old weights is reused (running requests recompute theirs). Returns the new
        weight version (``version`` if given, else the previous one + 1).
        """
        check_timeout("timeout", timeout)
        items = collect_named_tensors(named_tensors)
        with self.lock:
            full = self._check_weights(items)
            if not self.files_shared:  # ranks on other nodes cannot read the private folder
                if self.stager is None:
                    raise RuntimeError("update_weights: ranks on other nodes and no weight stager")
                return self._update_staged(lambda key: self.stager.stage_tensors(key, items, timeout), version,
                                           flush_cache, timeout)
            version = self._next_version(version)
            path = self._write_update_file(items, version)
            return self._apply_update(path, version, flush_cache, timeout, replay=path, full=full)

    def update_weights_from_disk(self, path: str | os.PathLike, *, version: int | None = None,
                                 flush_cache: bool = True, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` from a safetensors file or a checkpoint folder that every rank can read
        (on several nodes: a shared filesystem). Headers are checked first; the folder must stay in place
        while a later-started replica may need to replay it."""
        from safetensors import safe_open

        from flotilla.model.loader import safetensors_files

        check_timeout("timeout", timeout)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path: must be a file or folder path, got {path!r}")
        p = Path(path).resolve()
        if p.is_file():
            files = [p]
        elif p.is_dir():
            try:
                files = safetensors_files(p)
            except ValueError as e:
                raise ValueError(f"path: {e.args[0].removeprefix('model: ')}") from None
        else:
            raise ValueError(f"path: {str(path)!r} is neither a file nor a folder")
        items = []
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        sl = st.get_slice(name)
                        items.append((name, meta_tensor(name, sl.get_shape(), sl.get_dtype())))
            except ValueError:
                raise
            except Exception as e:  # safetensors' own error for a file that is not one (a .bin, a text file)
                raise ValueError(f"path: {str(f)!r} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                 "weights load from safetensors only") from None
        with self.lock:
            full = self._check_weights(items)
            version = self._next_version(version)
            return self._apply_update(str(p), version, flush_cache, timeout, replay=str(p), full=full)

    def update_weights_staged(self, payload: Any, *, version: int | None = None, flush_cache: bool = True,
                              timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Like ``update_weights`` with the tensors staged by the launcher's ``WeightStager`` from
        ``payload`` (Ray: object refs, each holding a dict {name: tensor} or (name, tensor) pairs). Every rank
        fetches them itself while requests keep running, the front end checks the names and shapes the ranks
        report, and only then are requests paused and the weights copied in place. A replica started later
        cannot replay such an update: it comes back with the checkpoint's weights (weight_version 0 in
        stats) until the next update."""
        check_timeout("timeout", timeout)
        if self.stager is None:
            raise RuntimeError("update_weights_staged: this launcher has no weight stager")
        with self.lock:
            return self._update_staged(lambda key: self.stager.stage(key, payload, timeout), version,
                                       flush_cache, timeout)

    def _update_staged(self, stage: Callable[[str], list], version: int | None, flush_cache: bool,
                       timeout: float) -> int:
        key = f"staged-{uuid.uuid4().hex}"
        self._check_resident()
        staged = stage(key)
        try:
            if not staged:
                raise RuntimeError("update_weights: no replica is up")
            if any(s != staged[0] for s in staged[1:]):
                raise RuntimeError("update_weights: the ranks staged different contents")
            full = self._check_weights([(n, meta_tensor(n, shape, dtype)) for n, shape, dtype in staged[0]])
            version = self._next_version(version)
            return self._apply_update(f"staged:{key}", version, flush_cache, timeout, replay=None, full=full)
        finally:
            self.stager.unstage(key)

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

    def probe_store(self, host: str, port: int, timeout_s: float) -> None:
        """Wait (reported as the join under way, no rank involved) until a trainer's store accepts a
        connection; a RuntimeError naming the address after ``timeout_s``."""
        from flotilla.control_sync import wait_reachable

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
        """WorkerArgs fields for a replica that starts now: the updates to replay, and their version."""
        replay, version = self._replay, self._weight_version
        if replay is None:
            log.warning("a replica starts with the checkpoint's weights: update v%d came from object refs and "
                        "cannot be replayed (its stats show weight_version 0 until the next update)", version)
            return {"weights_sources": [], "weight_version": 0}
        return {"weights_sources": list(replay), "weight_version": version}

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

    def _meta_model(self):
        """(router, expected part names) of the model built on the meta device with tp=1 (no memory)."""
        if self._meta is None:
            from transformers import AutoConfig

            from flotilla.model.loader import WeightRouter, _expected_names
            from flotilla.model.models import model_class

            hf = AutoConfig.from_pretrained(self.config.model)
            cls = model_class(self.config.hf_config)
            model = build_on_meta(lambda: cls(hf, max_positions=self.config.max_model_len))
            self._meta = (WeightRouter(model), _expected_names(model))
        return self._meta

    def _check_weights(self, items: Iterable[tuple[Any, Any]]) -> bool:
        """Refuse a bad update before any rank sees it; True when it covers every weight of the model."""
        router, expected = self._meta_model()
        covered: set[str] = set()
        seen: set[str] = set()
        for name, tensor in items:
            if not isinstance(name, str):
                raise ValueError(f"weights: parameter names must be strings, got {name!r}")
            if name in seen:
                raise ValueError(f"weights: {name!r} appears more than once")
            seen.add(name)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"weights: {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            if not tensor.is_floating_point():
                raise ValueError(f"weights: {name!r}: dtype {tensor.dtype} is not a floating-point type")
            router.check(name, tensor)
            hit = router.resolve(name)
            if hit is not None:
                target, _, part = hit
                covered.add(target if part is None else f"{target}:{part}")
        if not seen:
            raise ValueError("weights: the update holds no tensors")
        return covered >= expected

    def _next_version(self, version: int | None) -> int:
        if version is None:
            return self._weight_version + 1
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 2**63 - 1:
            raise ValueError(f"version: must be an int in [0, 2**63 - 1], got {version!r}")
        return version

    def _check_resident(self) -> None:
        if self._memory_released:
            raise RuntimeError("update_weights: memory is released; call resume_memory() first")

    def _apply_update(self, source: str, version: int, flush_cache: bool, timeout: float, *,
                      replay: str | None, full: bool, make: Callable[[int], Any] | None = None,
                      make_for: Callable[[int, int], Any] | None = None) -> int:
        """Pause, send the update (``UpdateWeights`` of ``source``, or what ``make`` / ``make_for`` build), wait
        for every leader, commit the version and what a later replica replays, resume."""
        with self.lock:
            self._check_resident()
            was_paused = self._paused
            if not was_paused:
                self.pause(timeout)
            try:
                if make is None and make_for is None:
                    make = lambda i: UpdateWeights(i, source, version, flush_cache)  # noqa: E731
                self._control(make, "update_weights", timeout, make_for=make_for)
                self._weight_version = version
                if replay is None:
                    self._replay = None
                elif full:
                    self._replay = [replay]
                elif self._replay is not None:
                    self._replay.append(replay)
            finally:
                self._prune_update_files()
                if not was_paused:
                    self.resume(timeout)
            return version

    def _write_update_file(self, items: list[tuple[str, torch.Tensor]], version: int) -> str:
        """One safetensors file in the private folder, in the engine's dtype, that every rank memory-maps."""
        from safetensors.torch import save_file

        dtype = _ENGINE_DTYPES.get(self.config.dtype, torch.float32)
        out: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for name, tensor in items:
            t = tensor.detach().to(dtype=dtype).to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages and t.numel():  # safetensors refuses tensors that share memory
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            out[name] = t
        path = os.path.join(self.private_dir, f"weights-v{version}-{uuid.uuid4().hex[:8]}.safetensors")
        save_file(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        return path

    def _prune_update_files(self) -> None:
        """Keep only the update files a later-started replica would replay."""
        keep = set(self._replay or [])
        for f in Path(self.private_dir).glob("weights-v*.safetensors*"):
            if str(f) not in keep:
                try:
                    f.unlink()
                except OSError:
                    pass
