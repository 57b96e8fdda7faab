"""pipelines.child_process: a child started with ``exit_with_parent()`` goes when its parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from pipelines.child_process import exit_with_parent
    preexec = exit_with_parent() if sys.argv[1] == "yes" else None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                             preexec_fn=preexec)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _child_after_parent_killed(preexec: str, wait_s: float) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, preexec], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup of its own runs
    parent.wait()
    deadline = time.monotonic() + wait_s
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, _alive(child)


def test_a_child_started_with_exit_with_parent_goes_when_its_parent_is_killed():
    _, alive = _child_after_parent_killed("yes", wait_s=20.0)
    assert not alive


def test_without_it_the_child_outlives_its_parent():  # what the helper is for, and that the check above can fail
    child, alive = _child_after_parent_killed("no", wait_s=1.0)
    try:
        assert alive
    finally:
        os.kill(child, signal.SIGKILL)
