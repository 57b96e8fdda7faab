"""Real-Prometheus helpers for integration tests.

- :func:`start_prometheus` runs the ``prometheus`` binary on a free loopback port with a temporary config
  (scrape targets at a 1s interval, optional rule files) and temporary storage, waits for ``/-/ready``;
  the ``prometheus_server`` fixture (import it into a test module) wraps it with cleanup.
- :func:`query` / :func:`wait_for` evaluate PromQL through the HTTP API.
- :func:`dashboard_queries` extracts every panel query of a Grafana dashboard with its template variables
  substituted, so the queries can be run against a real Prometheus.

Without a ``prometheus`` binary the tests are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.child_process import exit_with_parent
from tests.needs import unavailable

READY_DEADLINE_S = 60.0
GRAFANA_DEFAULTS = {  # Grafana's built-in variables, with values that suit a 1s-scrape test Prometheus
    "__rate_interval": "15s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}


@dataclass
class Prometheus:
    """A running Prometheus server started by :func:`start_prometheus`."""

    base_url: str
    config_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(path: Path, targets: Sequence[str], rule_files: Sequence[Path], job: str) -> None:
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [],
    }
    if targets:
        config["scrape_configs"].append({"job_name": job, "static_configs": [{"targets": list(targets)}]})
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _is_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def start_prometheus(targets: Sequence[str] = (), rule_files: Sequence[Path] = (), job: str = "anomalyd",
                     workdir: Path | None = None) -> Iterator[Prometheus]:
    """Run a real Prometheus scraping ``targets`` (``host:port``) every second, with ``rule_files`` loaded.

    Yields once ``/-/ready`` answers; stops and cleans up on exit. Skips (fails under CI) if the binary is
    missing; raises ``RuntimeError`` with the server's log if it exits or is not ready within the deadline.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        unavailable("prometheus binary not found (apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="anomalyd-prom-", dir=workdir) as tmp:
        root = Path(tmp)
        config = root / "prometheus.yml"
        _write_config(config, targets, rule_files, job)
        log_path = root / "prometheus.log"
        server: Prometheus | None = None
        for _attempt in range(3):  # the free port can be taken between picking it and Prometheus binding it
            port = _free_port()
            base_url = f"http://127.0.0.1:{port}"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=exit_with_parent())
            server = Prometheus(base_url, config, proc, log_path)
            deadline = time.monotonic() + READY_DEADLINE_S
            while proc.poll() is None and time.monotonic() < deadline and not _is_ready(base_url):
                time.sleep(0.2)
            if proc.poll() is None and _is_ready(base_url):
                break
            _stop(proc)
            if "address already in use" not in server.log_tail():
                raise RuntimeError(f"prometheus did not become ready at {base_url}:\n{server.log_tail()}")
        else:
            raise RuntimeError(f"prometheus found no free port:\n{server.log_tail() if server else ''}")
        try:
            yield server
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Factory fixture: ``prometheus_server(targets=[...], rule_files=[...])`` starts a server; all are
    stopped at teardown."""
    with ExitStack() as stack:

        def start(targets: Sequence[str] = (), rule_files: Sequence[Path] = (),
                  job: str = "anomalyd") -> Prometheus:
            return stack.enter_context(start_prometheus(targets, rule_files, job, workdir=tmp_path))

        yield start


def api_get(base_url: str, path: str, **params: str) -> Any:
    """GET ``/api/v1/<path>`` and return its ``data``; raises ``RuntimeError`` on an API error."""
    url = f"{base_url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as err:  # 4xx/5xx carry the error in the JSON body
        body = json.load(err)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus API {path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base_url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; returns the result list (``[{"metric": {...}, "value": [t, "v"]}, ...]`` for vectors).
    Raises ``RuntimeError`` with Prometheus' message if the expression is invalid."""
    data = api_get(base_url, "query", query=expr)
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    return list(data["result"])


def wait_for(base_url: str, expr: str, deadline_s: float = 30.0) -> list[dict[str, Any]]:
    """Poll ``expr`` until it returns a non-empty result; raises ``TimeoutError`` after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = query(base_url, expr)
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result for {expr!r} within {deadline_s}s")
        time.sleep(0.5)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace Grafana template variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) in a query; raises
    ``ValueError`` naming any variable left without a value."""
    values = {**GRAFANA_DEFAULTS, **variables}
    pattern = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise ValueError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return pattern.sub(repl, expr)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_queries(path: str | Path, variables: dict[str, str]) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every query target of the dashboard at ``path``, with ``variables``
    (e.g. ``{"datasource": "prom", "model": ".*", "instance": ".*"}``) and Grafana's built-ins substituted."""
    dashboard = json.loads(Path(path).read_text())
    return [(panel.get("title", ""), substitute(target["expr"], variables))
            for panel in _panels(dashboard.get("panels", []))
            for target in panel.get("targets", []) if target.get("expr") and not target.get("hide")]
