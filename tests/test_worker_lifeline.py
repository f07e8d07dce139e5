"""Workers die with their front end (flotilla/worker/lifeline.py): a SIGKILLed parent leaves no rank
process and no private directory behind, while a parent that lives on keeps its workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import shutil

import psutil
import pytest

from flotilla.worker import lifeline

pytestmark = pytest.mark.timeout(180)

GONE_WITHIN_S = 20.0

# The child: ties itself to PARENT, says so, then idles.
CHILD = textwrap.dedent("""
    import sys, time
    from flotilla.worker import lifeline
    lifeline.install(int(sys.argv[1]), sys.argv[2] or None, pdeathsig=sys.argv[3] == "1")
    print("installed", flush=True)
    time.sleep(600)
""")

# The middle process (stands for the front end): starts CHILD, from its main thread or from a short-lived
# thread, prints the child's pid, then idles until killed.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    child_src, private_dir, pdeathsig, from_thread = sys.argv[1:5]
    box = {}
    def start():
        p = subprocess.Popen([sys.executable, "-c", child_src, str(os.getpid()), private_dir, pdeathsig],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "installed"
        box["p"] = p
    if from_thread == "1":
        t = threading.Thread(target=start)
        t.start()
        t.join()  # the thread that started the child is gone now
    else:
        start()
    print(box["p"].pid, flush=True)
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    """The pids still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not _gone(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def _start_parent(private_dir: str, pdeathsig: bool, from_thread: bool) -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, private_dir, str(int(pdeathsig)),
                               str(int(from_thread))], stdout=subprocess.PIPE, text=True)
    line = parent.stdout.readline().strip()
    assert line.isdigit(), f"parent printed {line!r}"
    return parent, int(line)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("pdeathsig", [False, True], ids=["poll", "pdeathsig"])
def test_child_exits_and_removes_private_dir_when_parent_is_killed(pdeathsig):
    private_dir = tempfile.mkdtemp(prefix="flotilla-lifeline-")
    open(os.path.join(private_dir, "f"), "w").close()
    parent, child = _start_parent(private_dir, pdeathsig, from_thread=False)
    try:
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone([child]) == []
        if not pdeathsig:  # SIGKILLed by the kernel, the child cannot remove anything
            assert not os.path.exists(private_dir)
    finally:
        _kill(parent)
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_child_started_from_a_finished_thread_lives_while_its_parent_does():
    """Without pdeathsig the watch is on the parent *process*: the end of the thread that started the
    child (which would fire PR_SET_PDEATHSIG) does not kill it; the parent's death still does."""
    private_dir = tempfile.mkdtemp(prefix="flotilla-lifeline-")
    parent, child = _start_parent(private_dir, pdeathsig=False, from_thread=True)
    try:
        time.sleep(4 * lifeline.POLL_S)  # several polls after the starting thread ended
        assert not _gone(child) and os.path.isdir(private_dir)
        parent.kill()
        parent.wait(10)
        assert _wait_gone([child]) == []
        assert not os.path.exists(private_dir)
    finally:
        _kill(parent)
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_parent_already_gone_at_install_exits_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    private_dir = tempfile.mkdtemp(prefix="flotilla-lifeline-")
    r = subprocess.run([sys.executable, "-c", CHILD, str(dead.pid), private_dir, "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == lifeline.EXIT_CODE and "installed" not in r.stdout, r
    assert not os.path.exists(private_dir)


def test_no_parent_pid_installs_nothing():
    assert lifeline.install(None, "/nonexistent") is None


def test_parent_alive_checks():
    assert lifeline.parent_alive(os.getppid(), direct=True)
    assert not lifeline.parent_alive(os.getpid(), direct=True)  # we are not our own parent
    assert lifeline.parent_alive(os.getpid(), direct=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    assert not lifeline.parent_alive(dead.pid, direct=False)


# An Engine with dp=2 whose process is then SIGKILLed. Until the launcher passes parent_pid and private_dir
# itself, the script sets them by wrapping MpLauncher.start_group (what the launcher is to do: see
# WorkerArgs); once the launcher does, the wrapper leaves its values alone.
ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from flotilla.launch.mp import MpLauncher
    _start = MpLauncher.start_group
    def start_group(self, spec, ranks):
        for wa in ranks:
            if wa.parent_pid is None:
                wa.parent_pid = os.getpid()
                wa.private_dir = self._dir
                wa.pdeathsig = sys.argv[2] == "1" and threading.current_thread() is threading.main_thread()
        return _start(self, spec, ranks)
    MpLauncher.start_group = start_group
    from flotilla import Engine
    engine = Engine(model=sys.argv[1], dp_size=2, device="cpu", dtype="float32")
    pids = [p for r in engine.stats()["replicas"] for p in r["pids"]]
    print(json.dumps({"pids": pids, "private_dir": engine._private_dir}), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("pdeathsig", [False, True], ids=["poll", "pdeathsig"])
def test_engine_workers_and_private_dir_go_when_the_front_end_is_killed(pdeathsig):
    """With pdeathsig the kernel SIGKILLs the ranks at once, so none of them can remove the private
    directory: only the polling lifeline (pdeathsig=False) does both."""
    from conftest import tiny

    proc = subprocess.Popen([sys.executable, "-c", ENGINE_SCRIPT, tiny("llama"), str(int(pdeathsig))],
                            stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        info = json.loads(proc.stdout.readline())
        pids, private_dir = info["pids"], info["private_dir"]
        assert len(pids) == 2 and all(not _gone(p) for p in pids) and os.path.isdir(private_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _wait_gone(pids) == []
        if pdeathsig:
            shutil.rmtree(private_dir, ignore_errors=True)
            return
        deadline = time.monotonic() + GONE_WITHIN_S
        while os.path.exists(private_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(private_dir)
    finally:
        _kill(proc)
        for p in pids:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
