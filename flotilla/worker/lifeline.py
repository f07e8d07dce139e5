"""A worker process dies with the front end that started it.

Why: when the front end is SIGKILLed (or crashes hard) nothing runs its shutdown, and its rank processes
would live on as orphans holding GPU memory and the engine's private directory. Two mechanisms, because
neither covers every case alone:

* ``PR_SET_PDEATHSIG`` (Linux, via ``prctl``): the kernel SIGKILLs this process the moment its parent
  dies, even while this process is wedged in C code holding the GIL. Caveat: the kernel's "parent" is the
  *thread* that started this process, not the process; if that thread ends while the parent process
  lives on (a launcher called from a short-lived thread, e.g. a restart thread), the signal fires all
  the same and kills a healthy worker. And a SIGKILLed rank removes nothing. So it is opt-in
  (``pdeathsig=True``), for launchers that start workers from the parent's main thread and can leave
  the private directory behind.
* A daemon thread polling every ``POLL_S`` whether the parent process is still there: works whatever
  thread started us, and off Linux. On noticing, it removes the engine's private directory (the first
  worker to notice does; errors ignored: another worker may be removing it too) and ends the process
  with ``os._exit``, which runs no clean-up that could hang on the dead front end.

A stopped worker (SIGSTOP, a debugger, a job-control stop) runs no thread, so the poll alone would leave it
behind forever when the front end dies. So by default the parent-death signal is SIGCONT: it wakes a stopped
worker, whose poll then sees the parent gone and exits as above; a running worker ignores it, so a
short-lived starting thread that ends is harmless (the kernel sends it again, to the same end, when the
process finally dies). ``pdeathsig=True`` asks for SIGKILL instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import sys
import threading

log = logging.getLogger(__name__)

POLL_S = 0.5
PR_SET_PDEATHSIG = 1
EXIT_CODE = 3  # what an orphaned worker exits with (the front end is gone: nobody reads it but tests)


def parent_alive(parent_pid: int, direct: bool) -> bool:
    """Whether ``parent_pid`` still runs. ``direct``: it is our parent, so being reparented (a new
    ``getppid()``) means it died -- immune to the pid being reused by another process."""
    if direct:
        return os.getppid() == parent_pid
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else (its pid was reused)
        return True
    return True


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent thread dies. False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as e:
        log.warning("prctl unavailable: %s", e)
        return False
    return True


def _orphaned(parent_pid: int, private_dir: str | None) -> None:
    """The front end is gone: remove its private directory and end this process now."""
    try:
        sys.stderr.write(f"flotilla worker {os.getpid()}: parent {parent_pid} is gone; exiting\n")
        sys.stderr.flush()
    except Exception:
        pass
    if private_dir:
        shutil.rmtree(private_dir, ignore_errors=True)
    os._exit(EXIT_CODE)


def install(parent_pid: int | None, private_dir: str | None = None, *, pdeathsig: bool = False,
            via_fork_server: bool = False, poll_s: float = POLL_S) -> threading.Thread | None:
    """Tie this process's life to ``parent_pid``'s (nothing happens when it is None).

    ``via_fork_server``: our parent is not the front end but the fork server it started (multiprocessing's
    forkserver), which exits when the front end does; the parent-death signal then comes from its exit.

    Call it first thing in the worker process. If the parent is already gone (it died while we started),
    this does not return. Returns the watching thread.
    """
    if parent_pid is None:
        return None
    direct = os.getppid() == parent_pid
    if direct or via_fork_server:
        set_pdeathsig(signal.SIGKILL if pdeathsig else signal.SIGCONT)
    # Re-check after prctl: a parent that died before it took effect sent no signal, and we were reparented.
    if not parent_alive(parent_pid, direct):
        _orphaned(parent_pid, private_dir)

    def watch() -> None:
        while parent_alive(parent_pid, direct):
            stop.wait(poll_s)
        _orphaned(parent_pid, private_dir)

    stop = threading.Event()  # never set: the watch ends with the process
    t = threading.Thread(target=watch, name="flotilla-lifeline", daemon=True)
    t.start()
    return t
