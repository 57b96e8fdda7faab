"""Child processes: whether one is alive, stopping one, and starting one that does not outlive its parent. The
services tests and benchmarks start (a Kafka broker, Prometheus, Alertmanager) stop when the process that started
them is killed, even by SIGKILL or a CI timeout, instead of holding their ports and memory on a shared machine.

Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere :func:`exit_with_parent` returns None and children are
started as before. The signal follows the *thread* that started the child: start such children from a thread
that lives as long as they should (the main thread, in tests and benchmarks).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["exit_with_parent", "pid_alive", "terminate"]

_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when its parent exits; None where the
    platform has no such thing."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists and is not a zombie (reaps it if it is our own exited child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def terminate(pid: int, grace_s: float) -> None:
    """SIGTERM ``pid``, wait up to ``grace_s`` seconds for it to exit, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        until = time.monotonic() + wait_s
        while time.monotonic() < until:
            if not pid_alive(pid):
                return
            time.sleep(0.1)
