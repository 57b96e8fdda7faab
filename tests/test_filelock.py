"""detector.filelock.exclusive_lock, the lock a native build runs under ("never a half-written build"), with real
processes: one holder at a time, a waiter gets in once the holder leaves, and a holder killed inside leaves nothing
stuck (the kernel drops an flock with its process; the lock file stays, and its existence means nothing).

Whether a process waits for the lock is read from the kernel's list of locks and waiters (/proc/locks), not
guessed from how long it has not got in."""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detector.filelock import exclusive_lock
from tests.needs import unavailable

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30.0  # generous: only a broken lock waits this long

HOLDER = """
import sys
from pathlib import Path
from detector.filelock import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("in", flush=True)
    sys.stdin.readline()  # holds the lock until told to leave, or killed
print("out", flush=True)
"""

# A "build" under the lock: the previous one must be whole (count, writer, end mark), then the next is written
# in three steps with the CPU given away between them, as a compiler writes its output in pieces.
BUILDER = """
import os, sys
from pathlib import Path
from detector.filelock import exclusive_lock
lock, build, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torn = 0
for _ in range(rounds):
    with exclusive_lock(lock):
        lines = build.read_text().split("\\n") if build.exists() else ["0", "", "end", ""]
        if len(lines) != 4 or lines[2] != "end":
            torn += 1
            continue
        with open(build, "w") as fh:
            fh.write(str(int(lines[0]) + 1) + "\\n")
            fh.flush()
            os.sched_yield()
            fh.write(str(os.getpid()) + "\\n")
            fh.flush()
            os.sched_yield()
            fh.write("end\\n")
print(torn, flush=True)
"""


class Child:
    """A Python process running ``script`` with ``args`` from the repository root; its stdout lines are queued."""

    def __init__(self, script: str, *args: object) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def said(self, timeout_s: float = DEADLINE_S) -> str | None:
        """Its next line, or None if none came within ``timeout_s``."""
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def leave(self) -> None:
        """Tell a HOLDER to leave the lock."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def wait(self) -> int:
        return self.proc.wait(timeout=DEADLINE_S)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """``spawn(script, *args)`` starts a :class:`Child`; any still running at the end is killed."""
    children: list[Child] = []

    def start(script: str, *args: object) -> Child:
        children.append(Child(script, *args))
        return children[-1]

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(timeout=DEADLINE_S)


def flocks(path: Path) -> tuple[set[int], set[int]]:
    """(pids holding, pids waiting for) an flock on ``path``'s inode, as the kernel lists them in /proc/locks."""
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        unavailable("no /proc/locks (Linux) to see who holds and who waits for a lock")
    ino = path.stat().st_ino
    held: set[int] = set()
    waiting: set[int] = set()
    for line in table.splitlines():  # "3: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF", a waiter "3: -> FLOCK ..."
        fields = line.split()
        blocked = fields[1] == "->"
        kind, pid, where = fields[1 + blocked], fields[4 + blocked], fields[5 + blocked]
        if kind == "FLOCK" and int(where.rsplit(":", 1)[1]) == ino:
            (waiting if blocked else held).add(int(pid))
    return held, waiting


def until(condition: Callable[[], object], timeout_s: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_lock_is_held_for_the_block_and_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.lock"
    with exclusive_lock(path):
        assert flocks(path)[0] == {os.getpid()}
        with open(path) as other, pytest.raises(BlockingIOError):  # another open file: the kernel refuses it
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert flocks(path) == (set(), set())
    with open(path) as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_a_second_process_waits_for_the_holder_and_gets_in_when_it_leaves(tmp_path: Path, spawn) -> None:
    path = tmp_path / "build.lock"
    a = spawn(HOLDER, path)
    assert a.said() == "in"
    b = spawn(HOLDER, path)
    assert until(lambda: b.pid in flocks(path)[1] or not b.lines.empty()), "B neither waits nor got in"
    assert b.lines.empty(), "B got in while A held the lock"
    assert flocks(path) == ({a.pid}, {b.pid})  # A holds it, B waits in the kernel
    a.leave()
    assert a.said() == "out" and a.wait() == 0
    assert b.said() == "in"  # once A left
    assert flocks(path) == ({b.pid}, set())
    b.leave()
    assert b.said() == "out" and b.wait() == 0


def test_a_holder_killed_inside_leaves_nothing_stuck(tmp_path: Path, spawn) -> None:
    """The module's point against a lock *file* (torch's builder): a builder killed mid-build (OOM killer, ^C of a
    parent) must not make every later build wait for ever, nor one that already waits."""
    path = tmp_path / "build.lock"
    a = spawn(HOLDER, path)
    assert a.said() == "in"
    a.proc.send_signal(signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    assert path.exists()  # the lock file stays behind ...
    b = spawn(HOLDER, path)
    assert b.said() == "in"  # ... and stops nobody
    c = spawn(HOLDER, path)
    assert until(lambda: c.pid in flocks(path)[1]), "C does not wait for B"
    b.proc.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    assert c.said() == "in"  # a process waiting when the holder died gets in too
    c.leave()
    assert c.said() == "out" and c.wait() == 0


def test_concurrent_builders_each_see_a_whole_build_and_none_is_lost(tmp_path: Path, spawn) -> None:
    lock, build = tmp_path / "build.lock", tmp_path / "build.txt"
    workers, rounds = 4, 150
    builders = [spawn(BUILDER, lock, build, rounds) for _ in range(workers)]
    torn = [b.said() for b in builders]
    assert [b.wait() for b in builders] == [0] * workers
    assert torn == ["0"] * workers  # no builder found a build half-written
    count, _, end, _ = build.read_text().split("\n")
    assert (int(count), end) == (workers * rounds, "end")  # no build lost to one running at the same time
