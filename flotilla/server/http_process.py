"""One HTTP process of ``flotilla serve --api-server-count N`` (``python -m flotilla.server.http_process``).

Started by ``HttpProcesses`` (``http_processes.py``) in the engine process, with the listening socket inherited
as a file descriptor, its spec as JSON on stdin (never on the command line, which other users can read; the API
key comes in the environment) and ``PROMETHEUS_MULTIPROC_DIR`` set, so every process's counters and histograms
land in one folder and any process's ``/metrics`` sums them.

It runs the same app as a single-process server, over a ``RemoteEngine``. Its lifeline: when the engine process
is gone (we were re-parented), every open stream ends with an error event, ``/health`` and new requests answer
503, and after ``LOST_GRACE_S`` the process exits (the process manager restarts ``flotilla serve``); it never
outlives the engine process by more than ``LOST_GRACE_S`` plus uvicorn's graceful shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

#: How long an HTTP process keeps answering 503 after its engine process died, before it exits.
LOST_GRACE_S = 2.0
POLL_S = 0.25


def _watch_parent(parent_pid: int, engine: Any, server: Any) -> None:
    from flotilla.worker.lifeline import parent_alive

    while parent_alive(parent_pid, direct=True):
        time.sleep(POLL_S)
    engine.engine_lost("the engine process exited")
    time.sleep(LOST_GRACE_S)
    server.should_exit = True
    time.sleep(LOST_GRACE_S + 10.0)  # uvicorn's graceful shutdown did not end: leave anyway
    os._exit(3)


def run(spec: dict[str, Any]) -> int:
    import uvicorn
    from transformers import AutoTokenizer

    from flotilla.server.app import build_app, set_engine
    from flotilla.server.launch import KEEP_ALIVE_S
    from flotilla.server.remote_engine import RemoteEngine
    from flotilla.worker.lifeline import set_pdeathsig

    set_pdeathsig(signal.SIGCONT)  # a stopped HTTP process wakes when the engine process dies, and sees it
    sock = socket.socket(fileno=int(spec["fd"]))
    tokenizer: Any = AutoTokenizer.from_pretrained(spec["tokenizer"])
    app = build_app(None, spec["model_name"], os.environ.get("FLOTILLA_API_KEY") or None)
    config = uvicorn.Config(app, log_level=spec.get("log_level", "warning"), access_log=bool(spec.get("access_log")),
                            timeout_graceful_shutdown=5, lifespan="off", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)

    async def main() -> None:
        engine = RemoteEngine(tokenizer, int(spec["proc"]), int(spec["incarnation"]), spec["in_addr"],
                              spec["out_addr"], asyncio.get_running_loop(), on_ready=lambda e: set_engine(app, e))
        threading.Thread(target=_watch_parent, args=(int(spec["parent_pid"]), engine, server),
                         name="flotilla-lifeline", daemon=True).start()
        try:
            await server.serve(sockets=[sock])
        finally:
            engine.close()

    factory = config.get_loop_factory() if hasattr(config, "get_loop_factory") else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return 0


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.stdin.read())))
