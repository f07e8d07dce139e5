"""Serving: a pre-bound socket, uvicorn in a background thread, and ``flotilla serve``'s life cycle."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from flotilla.launch.factory import make_engine, model_of
from flotilla.server.app import build_app, set_engine
from flotilla.server.errors import ASGIApp


KEEP_ALIVE_S = 30


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound now, so that port 0 yields a real port before the server starts."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn on a pre-bound socket in a background thread: used by ``serve`` (the main thread loads the
    engine meanwhile, so Ctrl-C and Ray's signal handling stay where they belong) and by the tests."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 access_log: bool = False, http: str = "auto", loop: str = "auto"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        # "auto" takes httptools and uvloop when installed (the server extra installs them): h11's pure-Python
        # parser and asyncio's loop cost several times more per SSE chunk
        # keep-alive 30 s, not uvicorn's 5 s: clients keep idle connections for 5 s (httpx's default), and a
        # request sent on a connection the server is closing at that moment fails in the client as a read
        # error; with the server holding on longer, the client always lets go first
        config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5,
                                lifespan="off", http=http, loop=loop, timeout_keep_alive=KEEP_ALIVE_S)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="flotilla-http", daemon=True)
        self.error: BaseException | None = None

    @property
    def thread_id(self) -> int | None:
        """The server thread's native id, once started (for per-thread CPU accounting)."""
        return self._thread.native_id

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # reported by start()/wait(), not lost in a thread
            self.error = e

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start: {self.error!r}")
            time.sleep(0.02)
        return self

    def wait(self) -> None:
        """Block until the server stops (joins in slices so that Ctrl-C reaches the main thread)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.sock.close()


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a process manager stopping us) shuts down as gracefully as Ctrl-C does."""
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    """``flotilla serve``: listen first (so /health answers 503 while the model loads), then load the engine in
    the main thread, then serve until Ctrl-C or SIGTERM; the engine is always shut down."""
    api_key = args.api_key or os.environ.get("FLOTILLA_API_KEY") or None
    try:
        model = model_of(args)
    except ValueError as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or model
    count = getattr(args, "api_server_count", 1)
    if count != 1:
        return _serve_processes(args, model, name, api_key, count)
    app = build_app(None, name, api_key)
    server = ServerThread(app, args.host, args.port, log_level=getattr(args, "log_level", "info"), access_log=True)
    if not api_key and not _is_loopback(args.host):
        print(f"flotilla: warning: listening on {args.host} without an API key (pass --api-key or set "
              "FLOTILLA_API_KEY)", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    engine = None
    try:
        server.start()
        print(f"flotilla: loading {model}; {server.url}/health answers 503 until it is ready",
              file=sys.stderr, flush=True)
        try:
            engine = make_engine(args)
        except ValueError as e:  # a bad option, named by the engine's validation
            print(f"flotilla: error: {e}", file=sys.stderr)
            return 2
        set_engine(app, engine)
        print(f"flotilla: serving {name} on {server.url}", flush=True)
        server.wait()
        return 1 if server.error else 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        if engine is not None:
            engine.shutdown()
        signal.signal(signal.SIGTERM, previous)


def _serve_processes(args: argparse.Namespace, model: str, name: str, api_key: str | None, count: int) -> int:
    """``serve --api-server-count N`` (N > 1): N HTTP processes start first (503 while loading), the engine loads
    here, then they serve until Ctrl-C or SIGTERM; everything is stopped on the way out."""
    from flotilla.errors import InvalidParameter
    from flotilla.server.http_processes import ApiServers, check_api_server_count

    try:
        check_api_server_count(count)
    except InvalidParameter as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 2
    if not api_key and not _is_loopback(args.host):
        print(f"flotilla: warning: listening on {args.host} without an API key (pass --api-key or set "
              "FLOTILLA_API_KEY)", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    servers = None
    engine = None
    try:
        servers = ApiServers(count, tokenizer=getattr(args, "tokenizer", None) or model, model_name=name,
                             host=args.host, port=args.port, api_key=api_key,
                             log_level=getattr(args, "log_level", "info"), access_log=True).start()
        print(f"flotilla: loading {model}; {count} HTTP processes on {servers.url}; /health answers 503 until it "
              "is ready", file=sys.stderr, flush=True)
        try:
            engine = make_engine(args)
        except ValueError as e:
            print(f"flotilla: error: {e}", file=sys.stderr)
            return 2
        servers.set_engine(engine)
        print(f"flotilla: serving {name} on {servers.url} ({count} HTTP processes)", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        if servers is not None:
            servers.stop()
        if engine is not None:
            engine.shutdown()
        signal.signal(signal.SIGTERM, previous)
