"""A real Prometheus Alertmanager (Debian package ``prometheus-alertmanager``) on loopback for tests.

:func:`start_alertmanager` runs the binary on a free 127.0.0.1 port with a temporary config (one null
receiver) and storage dir, clustering disabled, and returns once ``/-/ready`` answers.  If the binary is
missing and we are root with apt-get, it installs the package first (and stops the service Debian may
start).  :func:`alertmanager_or_skip` is the body of a session fixture: it skips the tests when
Alertmanager cannot start, or fails them under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.child_process import exit_with_parent
from tests.needs import unavailable

PACKAGE = "prometheus-alertmanager"
_CONFIG = """\
route:
  receiver: "null"
  group_wait: 0s
receivers:
  - name: "null"
"""


class AlertmanagerSetupError(RuntimeError):
    """Alertmanager could not be installed or started; the message says why."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _apt_install() -> None:
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", PACKAGE]):  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise AlertmanagerSetupError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    # The package may start its own service on :9093; the tests run their own instance.
    for stop in (["systemctl", "stop", PACKAGE], ["service", PACKAGE, "stop"]):
        if shutil.which(stop[0]):
            subprocess.run(stop, capture_output=True, timeout=60)


def find_alertmanager(install: bool = True) -> str:
    """Path of the Alertmanager binary; installs the Debian package when missing (root + apt-get only)."""
    for name in (PACKAGE, "alertmanager"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install()
        return find_alertmanager(install=False)
    raise AlertmanagerSetupError(f"{PACKAGE} not found; install it with: sudo apt-get install {PACKAGE}")


@dataclass
class AlertmanagerServer:
    """A running Alertmanager started by :func:`start_alertmanager`."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "alertmanager.log"

    def alerts(self) -> list[dict]:
        """``GET /api/v2/alerts``: the alerts Alertmanager currently holds (resolved ones are omitted)."""
        with urllib.request.urlopen(self.url + "/api/v2/alerts", timeout=10) as response:
            return json.loads(response.read())

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def start_alertmanager(timeout_s: float = 30.0, attempts: int = 2) -> AlertmanagerServer:
    """Start Alertmanager on a free loopback port and wait (at most ``timeout_s``) until it is ready."""
    binary = find_alertmanager()
    last = ""
    for _ in range(attempts):  # a second try covers losing the free port to someone else
        workdir = Path(tempfile.mkdtemp(prefix="anomalyd-alertmanager-"))
        (workdir / "alertmanager.yml").write_text(_CONFIG)
        port = _free_port()
        args = [
            binary,
            f"--config.file={workdir / 'alertmanager.yml'}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ]
        with open(workdir / "alertmanager.log", "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=exit_with_parent())
        server = AlertmanagerServer(f"http://127.0.0.1:{port}", process, workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _ready(server.url):
                return server
            time.sleep(0.1)
        last = f"exit code {process.poll()}, log: {server.log_tail()}"
        server.stop()
    raise AlertmanagerSetupError(f"Alertmanager did not become ready within {timeout_s:g}s ({last})")


def alertmanager_or_skip() -> Iterator[AlertmanagerServer]:
    """Yield a running Alertmanager and stop it afterwards; skip (fail under CI=true) if it cannot start."""
    try:
        server = start_alertmanager()
    except (AlertmanagerSetupError, OSError, subprocess.SubprocessError) as exc:
        unavailable(f"Alertmanager could not start: {exc}")
    try:
        yield server
    finally:
        server.stop()
