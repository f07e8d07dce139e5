"""``--api-server-count N``: N HTTP processes on one listening socket, over the engine in this process.

Why several: one process serves every stream from one event loop under one GIL (a syscall and a task wake-up per
chunk per stream, plus the HTTP parsing), which caps a fast engine's serving near 25-30k chunks/s whatever the
replicas could give. N processes share the listening socket (the kernel hands each accepted connection to one),
each with its own loop and GIL; the engine process keeps the engine and its front end (scheduling, routing,
detokenization and stop strings) and talks to them through ``EngineService``.

``HttpProcesses`` owns the processes: it starts them (``python -m flotilla.server.http_process``, the socket passed
as an inherited descriptor, the spec on stdin), watches them, and restarts one that dies (its streams are aborted
in the engine; its clients' connections were cut with it; the other processes never notice), at most
``max_restarts`` times within any ``restart_window_s`` per slot (the budget refills as old restarts leave the
window). ``stop`` ends them all (SIGTERM, then SIGKILL after a grace), so no process is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flotilla.errors import InvalidParameter
from flotilla.server.engine_service import EngineService

log = logging.getLogger(__name__)

MAX_API_SERVER_COUNT = 64


def check_api_server_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_API_SERVER_COUNT:
        raise InvalidParameter("api_server_count", f"must be an integer in [1, {MAX_API_SERVER_COUNT}], got {n!r}")
    return n


@dataclass
class _Slot:
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    restarts: list[float] = field(default_factory=list)
    given_up: bool = False


class HttpProcesses:
    """``count`` HTTP processes serving ``sock`` for the model ``model_name`` (its tokenizer at ``tokenizer``)."""

    def __init__(self, sock: socket.socket, count: int, service: EngineService, *, tokenizer: str,
                 model_name: str, private_dir: str, api_key: str | None = None, log_level: str = "warning",
                 access_log: bool = False, max_restarts: int = 5, restart_window_s: float = 60.0):
        self.sock, self.count, self.service = sock, check_api_server_count(count), service
        self.metrics_dir = os.path.join(private_dir, "metrics")
        os.makedirs(self.metrics_dir, mode=0o700, exist_ok=True)
        self._base = {"tokenizer": tokenizer, "model_name": model_name, "in_addr": service.in_addr,
                      "fd": sock.fileno(), "parent_pid": os.getpid(), "log_level": log_level,
                      "access_log": access_log}
        self._api_key = api_key
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.slots = [_Slot() for _ in range(count)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="flotilla-http-watch", daemon=True)

    def start(self) -> "HttpProcesses":
        for k in range(self.count):
            self._spawn(k)
        self._watcher.start()
        return self

    def pids(self) -> list[int | None]:
        with self._lock:
            return [s.proc.pid if s.proc is not None and s.proc.poll() is None else None for s in self.slots]

    def _spawn(self, k: int) -> None:
        slot = self.slots[k]
        slot.incarnation += 1
        spec = dict(self._base, proc=k, incarnation=slot.incarnation, out_addr=self.service.out_addrs[k])
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        env.pop("FLOTILLA_API_KEY", None)
        if self._api_key:
            env["FLOTILLA_API_KEY"] = self._api_key
        proc = subprocess.Popen([sys.executable, "-m", "flotilla.server.http_process"], stdin=subprocess.PIPE,
                                pass_fds=(self.sock.fileno(),), env=env)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        slot.proc = proc

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                for k, slot in enumerate(self.slots):
                    if slot.proc is None or slot.proc.poll() is None or self._stopping.is_set():
                        continue
                    code = slot.proc.returncode
                    slot.proc = None
                    self.service.drop(k)
                    now = time.monotonic()
                    slot.restarts = [t for t in slot.restarts if now - t < self.restart_window_s]
                    if len(slot.restarts) >= self.max_restarts:
                        slot.given_up = True
                        log.error("HTTP process %d exited (%s) and stays down: %d restarts within %gs", k, code,
                                  len(slot.restarts), self.restart_window_s)
                        continue
                    slot.restarts.append(now)
                    log.warning("HTTP process %d exited (%s); restarting it", k, code)
                    self._spawn(k)
            self._retry_given_up()

    def _retry_given_up(self) -> None:
        """A slot given up on comes back once its oldest restart left the window (the budget refilled)."""
        with self._lock:
            now = time.monotonic()
            for k, slot in enumerate(self.slots):
                if slot.given_up and all(now - t >= self.restart_window_s for t in slot.restarts[:1]):
                    slot.given_up = False
                    slot.restarts = [t for t in slot.restarts if now - t < self.restart_window_s] + [now]
                    log.warning("HTTP process %d: restart budget refilled; starting it again", k)
                    self._spawn(k)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process (uvicorn ends its streams gracefully), SIGKILL what is left after ``timeout``."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join(2.0)
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5.0)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


class ApiServers:
    """Everything ``--api-server-count N`` adds, in the engine process: the listening socket (bound now, so port 0
    gives a real port before anything starts), the private folder with the ipc sockets, the ``EngineService`` and
    the ``HttpProcesses``. ``set_engine`` once the engine is loaded (until then /health answers 503 loading)."""

    def __init__(self, count: int, *, tokenizer: str, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, log_level: str = "warning", access_log: bool = False,
                 max_restarts: int = 5, restart_window_s: float = 60.0):
        from flotilla.frontend.private_dir import make_private_dir
        from flotilla.ipc.channel import ChannelHub
        from flotilla.server.launch import bind_socket

        check_api_server_count(count)
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.private_dir = make_private_dir()
        self.hub = ChannelHub(ipc_parent=self.private_dir)
        self.service = EngineService(self.hub, count)
        self.processes = HttpProcesses(self.sock, count, self.service, tokenizer=tokenizer, model_name=model_name,
                                       private_dir=self.private_dir, api_key=api_key, log_level=log_level,
                                       access_log=access_log, max_restarts=max_restarts,
                                       restart_window_s=restart_window_s)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ApiServers":
        """Start the processes and wait until each has connected (it then accepts connections); raises at once
        when a slot has spent its restart budget before ever connecting (a process that cannot start: a bad
        tokenizer folder, an import error), rather than at the timeout."""
        self.processes.start()
        deadline = time.monotonic() + timeout
        while self.service.connected() < self.processes.count:
            failed = [k for k, s in enumerate(self.processes.slots) if s.given_up]
            if failed or time.monotonic() > deadline:
                self.stop()
                why = (f"HTTP process(es) {failed} kept exiting at start (see their stderr)" if failed else
                       f"only {self.service.connected()} of {self.processes.count} HTTP processes started within "
                       f"{timeout:g}s")
                raise RuntimeError(why)
            time.sleep(0.05)
        return self

    def set_engine(self, engine: Any) -> None:
        self.service.set_engine(engine)

    def stop(self) -> None:
        self.processes.stop()
        self.service.close()
        self.hub.close()
        self.sock.close()
        shutil.rmtree(self.private_dir, ignore_errors=True)
