"""A real single-node Apache Kafka 4.x broker on 127.0.0.1 for tests, the demo and CI (no Docker).

KRaft mode, one process as broker and controller. The jars (``org.apache.kafka:kafka_2.13``, runtime deps and
a log4j2 binding, listed in scripts/kafka/pom.xml) come from Maven Central through the installed Maven, once,
into ``<cache>/kafka-<version>/libs`` (``<cache>``: ``$ANOMALYD_CACHE`` or ``~/.cache/anomalyd``). Each start
formats a fresh temp data dir (unless one is given) with ``kafka.tools.StorageTool``, launches ``java
kafka.Kafka server.properties`` detached and returns once the broker answers. Run state (pid, ports, data
dir, log file) lives in ``<cache>/kafka-run/kafka-<port>.json``. CLI: ``python -m pipelines.kafka_local
start|stop|status|jars [--port N] [--sasl-port M] [--sasl-ssl-port K] [--ssl-port J] [--mtls-port L]
[--sasl-user NAME=PASSWORD]``, wrapped by scripts/kafka.sh. ``sasl_port`` / ``sasl_ssl_port`` / ``ssl_port`` /
``mtls_port`` add SASL_PLAINTEXT / SASL_SSL / SSL / mutual-TLS listeners (pipelines/kafka_local_security.py);
SCRAM users are created when the data dir is formatted, so a kept data dir keeps its first users.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template

from detector.filelock import exclusive_lock

from .child_process import exit_with_parent, pid_alive, terminate
from .kafka_local_security import make_certificates, scram_format_args, with_listeners
from .kafka_local_setup import KafkaSetupError, find_java, find_maven

KAFKA_VERSION = "4.1.2"  # also the default in scripts/kafka/pom.xml
SCALA_VERSION = "2.13"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MVN_TIMEOUT_S = 900  # a stalled jar download must not hold the lock every broker start waits on for ever
DEFAULT_PORT = 19092
HOST = "127.0.0.1"
_Path = str | os.PathLike[str] | None
FILES_DIR = Path(__file__).resolve().parent.parent / "scripts" / "kafka"  # pom.xml and config templates


@dataclass(frozen=True)
class KafkaStatus:
    """What ``LocalKafka.status`` found: 'running', 'starting' (process up, not answering) or 'stopped'."""

    state: str
    bootstrap: str
    pid: int | None = None
    data_dir: str | None = None
    log_file: str | None = None

    def __str__(self) -> str:
        extra = f" pid={self.pid} data_dir={self.data_dir} log={self.log_file}" if self.pid else ""
        return f"kafka {self.state} at {self.bootstrap}{extra}"


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; tiny race until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def cache_root() -> Path:
    """The project cache folder: ``$ANOMALYD_CACHE`` or ``~/.cache/anomalyd``."""
    return Path(os.environ.get("ANOMALYD_CACHE") or Path.home() / ".cache" / "anomalyd").expanduser()


def api_versions_ok(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when a Kafka broker answers an ApiVersions (v0) request on host:port with no error."""
    client_id, correlation_id = b"anomalyd-probe", 0x5EED
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = sock.recv(10, socket.MSG_WAITALL)  # size:int32, correlation_id:int32, error_code:int16
    except OSError:
        return False
    return len(header) == 10 and struct.unpack(">iih", header)[1:] == (correlation_id, 0)


def create_topic(bootstrap: str, name: str, partitions: int = 1,
                 config: Mapping[str, str] | None = None) -> None:
    """Create topic ``name`` (replication factor 1) with kafka-python's admin; waits for its leaders."""
    from kafka import KafkaAdminClient  # kafka-python >= 3.0

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="anomalyd-admin")
    try:
        spec = {name: {"num_partitions": partitions, "replication_factor": 1, "configs": dict(config or {})}}
        admin.create_topics(spec, wait_for_metadata=True)
    finally:
        admin.close()


def _port_in_use(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _tail(path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when unreadable)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalKafka:
    """One local single-node KRaft broker on 127.0.0.1:``port``, started detached and found again by port."""

    def __init__(self, port: int = DEFAULT_PORT, controller_port: int | None = None,
                 cache_dir: _Path = None, data_dir: _Path = None, heap: str = "512m", full_jit: bool = False,
                 sasl_port: int | None = None, sasl_ssl_port: int | None = None, ssl_port: int | None = None,
                 sasl_users: Mapping[str, str] | None = None, mtls_port: int | None = None,
                 exit_with_parent: bool = False, overrides: Mapping[str, str] | None = None) -> None:
        self.port = int(port)
        self.overrides = dict(overrides or {})  # broker settings in place of server.properties' (tests: another one)
        self.exit_with_parent = exit_with_parent  # the broker stops when this process does (tests, benchmarks)
        # more listeners: SASL_PLAINTEXT on sasl_port and SASL_SSL on sasl_ssl_port for these users (name ->
        # password) with PLAIN and SCRAM-SHA-256/512, SSL (no login) on ssl_port, SSL with a required client
        # certificate (client_certificate) on mtls_port; PLAINTEXT on port stays
        self.sasl_port, self.sasl_ssl_port, self.sasl_users = sasl_port, sasl_ssl_port, dict(sasl_users or {})
        self.ssl_port, self.mtls_port = ssl_port, mtls_port
        self.full_jit = full_jit  # C2 as well as C1: slower start, about half the CPU per message once warm
        self.controller_port = controller_port
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root()
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.heap = heap
        self.launched = False  # True once this object started a broker process (rather than reusing one)
        self._run_dir = self.cache_dir / "kafka-run"
        self._state_file = self._run_dir / f"kafka-{self.port}.json"

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string, ``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate that clients of the TLS listeners trust (None: no such listener running)."""
        state = self._read_state()
        tls = state and (state.get("sasl_ssl_port") or state.get("ssl_port") or state.get("mtls_port"))
        path = Path(state["data_dir"]) / "tls" / "ca.pem" if tls else None
        return path if path and path.is_file() else None

    @property
    def client_certificate(self) -> tuple[Path, Path] | None:
        """``(certificate, key)`` PEM files a client of the mutual-TLS listener presents (None: no such listener)."""
        state = self._read_state()
        tls = Path(state["data_dir"]) / "tls" if state and state.get("mtls_port") else None
        pair = (tls / "client.crt", tls / "client.key") if tls else None
        return pair if pair and all(path.is_file() for path in pair) else None

    @property
    def kafka_dir(self) -> Path:
        """``<cache>/kafka-<version>``: the generated pom.xml and the ``libs`` folder."""
        return self.cache_dir / f"kafka-{KAFKA_VERSION}"

    def ensure_jars(self) -> Path:
        """Resolve the broker classpath into ``<kafka_dir>/libs`` with mvn once; later calls return it."""
        pom_text = (FILES_DIR / "pom.xml").read_text()
        digest = hashlib.sha1(f"{KAFKA_VERSION}\n{pom_text}".encode()).hexdigest()
        libs, pom = self.kafka_dir / "libs", self.kafka_dir / "pom.xml"
        marker = libs / ".complete"  # written last, holds the pom's hash: libs are whole and current
        if marker.is_file() and marker.read_text().strip() == digest:
            return libs
        with exclusive_lock(self.kafka_dir / ".lock"):
            if marker.is_file() and marker.read_text().strip() == digest:
                return libs  # another process finished while we waited
            mvn = find_maven()
            pom.write_text(pom_text)
            tmp = Path(tempfile.mkdtemp(prefix="libs-", dir=self.kafka_dir))
            cmd = [mvn, "-q", "-B", "-f", str(pom), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                   "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}", f"-DoutputDirectory={tmp}"]
            print(f"kafka_local: fetching Kafka {KAFKA_VERSION} jars with Maven into {libs}", file=sys.stderr)
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=MVN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                shutil.rmtree(tmp, ignore_errors=True)
                raise KafkaSetupError(f"mvn did not fetch the jars in {MVN_TIMEOUT_S} s; check Maven Central") from None
            if res.returncode != 0 or not (tmp / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                raise KafkaSetupError(f"mvn could not fetch the Kafka jars ({' '.join(cmd)}):\n"
                                      f"{(res.stdout + res.stderr)[-3000:]}")
            shutil.rmtree(libs, ignore_errors=True)
            tmp.rename(libs)
            marker.write_text(digest + "\n")
        return libs

    def start(self, timeout_s: float = 90) -> str:
        """Start the broker, or reuse ours already on this port; returns the bootstrap once it answers. The jars
        (a first run downloads them) and Java are found before ``timeout_s`` starts: it is the broker's."""
        libs, java = self.ensure_jars(), find_java()
        deadline = time.monotonic() + timeout_s
        with exclusive_lock(self._run_dir / ".lock"):
            state = self._read_state()
            if state and self._is_ours(state):
                for key in ("sasl_port", "sasl_ssl_port", "ssl_port", "mtls_port"):
                    if getattr(self, key) and state.get(key) != getattr(self, key):
                        raise KafkaSetupError(f"the broker on port {self.port} has no listener on {key} "
                                              f"{getattr(self, key)}; stop it first (scripts/kafka.sh stop --port "
                                              f"{self.port})")
                self._wait_ready(state, deadline)
                return self.bootstrap
            if state:  # stale: that broker is gone
                self._forget(state)
            for port in (self.port, self.controller_port, self.sasl_port, self.sasl_ssl_port, self.ssl_port,
                         self.mtls_port):
                if port and _port_in_use(port):
                    raise KafkaSetupError(f"port {port} on {HOST} is used by another process (not a broker "
                                          f"started by LocalKafka); pick another, e.g. --port {free_port()}")
            state = self._launch(libs, java)
            try:
                self._wait_ready(state, deadline)
            except KafkaSetupError:
                terminate(state["pid"], grace_s=5)
                self._state_file.unlink(missing_ok=True)  # the data dir stays, for its log
                raise
            return self.bootstrap

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop our broker on this port (SIGTERM, SIGKILL after ``timeout_s``); False if none was running."""
        with exclusive_lock(self._run_dir / ".lock"):
            state = self._read_state()
            if not state:
                return False
            running = self._is_ours(state)
            if running:
                terminate(state["pid"], grace_s=timeout_s)
            self._forget(state)
            return running

    def status(self) -> KafkaStatus:
        """Whether our broker on this port is running, starting or stopped (run state + ApiVersions probe)."""
        state = self._read_state()
        if not state or not self._is_ours(state):
            return KafkaStatus("stopped", self.bootstrap)
        answering = api_versions_ok(HOST, self.port)
        return KafkaStatus("running" if answering else "starting", self.bootstrap, state["pid"],
                           state["data_dir"], state["log_file"])

    def _launch(self, libs: Path, java: str) -> dict:
        """Write the configs, format storage, spawn the detached JVM and record its run state."""
        temp = self.data_dir is None
        data_dir = self.data_dir or Path(tempfile.mkdtemp(prefix=f"anomalyd-kafka-{self.port}-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        cport = self.controller_port or free_port()
        props, log_file = data_dir / "server.properties", data_dir / "kafka.log"
        log4j = data_dir / "log4j2.properties"
        template = Template((FILES_DIR / "server.properties").read_text())
        ca_pem = broker_pem = None
        if self.sasl_ssl_port or self.ssl_port or self.mtls_port:
            try:
                ca_pem, broker_pem = make_certificates(data_dir / "tls", HOST)
            except RuntimeError as exc:
                raise KafkaSetupError(str(exc)) from exc
        text = with_listeners(template.substitute(host=HOST, port=self.port, controller_port=cport,
                                                  log_dirs=data_dir / "kafka-logs"), HOST, self.sasl_users,
                              self.sasl_port, self.sasl_ssl_port, broker_pem, self.ssl_port, self.mtls_port, ca_pem)
        kept = [ln for ln in text.splitlines() if ln.split("=", 1)[0].strip() not in self.overrides]
        props.write_text("\n".join([*kept, *(f"{k}={v}" for k, v in self.overrides.items())]) + "\n")
        shutil.copyfile(FILES_DIR / "log4j2.properties", log4j)
        jit = [] if self.full_jit else ["-XX:TieredStopAtLevel=1"]  # C1 only: a faster start for tests and demos
        base = [java, f"-Xmx{self.heap}", *jit, "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*"]
        if not (data_dir / "kafka-logs" / "meta.properties").is_file():  # a kept data dir: format once
            cluster_id = base64.urlsafe_b64encode(b"\1" + os.urandom(15)).rstrip(b"=").decode()  # never "-..."
            scram = scram_format_args(self.sasl_users) if self.sasl_port or self.sasl_ssl_port else []
            fmt = subprocess.run([*base, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id,
                                  "--config", str(props), *scram], capture_output=True, text=True, timeout=120)
            if fmt.returncode != 0:
                raise KafkaSetupError(f"StorageTool format failed:\n{(fmt.stdout + fmt.stderr)[-3000:]}")
        with open(log_file, "ab") as log:
            proc = subprocess.Popen([*base, "kafka.Kafka", str(props)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir,
                                    preexec_fn=exit_with_parent() if self.exit_with_parent else None)
        self.launched = True
        state = {"pid": proc.pid, "port": self.port, "controller_port": cport, "data_dir": str(data_dir),
                 "temp_data_dir": temp, "log_file": str(log_file), "properties": str(props),
                 "sasl_port": self.sasl_port, "sasl_ssl_port": self.sasl_ssl_port, "ssl_port": self.ssl_port,
                 "mtls_port": self.mtls_port}
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps(state, indent=1))
        (data_dir / "kafka.pid").write_text(f"{proc.pid}\n")
        return state

    def _wait_ready(self, state: dict, deadline: float) -> None:
        """Poll until the broker answers ApiVersions (it serves requests only once unfenced: ready)."""
        pid, log_file = state["pid"], state["log_file"]
        while not api_versions_ok(HOST, self.port):
            if not pid_alive(pid):
                raise KafkaSetupError(f"the Kafka broker (pid {pid}) exited during startup; "
                                      f"log {log_file}:\n{_tail(log_file)}")
            if time.monotonic() > deadline:
                raise KafkaSetupError(f"the Kafka broker (pid {pid}) did not answer on {self.bootstrap} "
                                      f"in time; log {log_file}:\n{_tail(log_file)}")
            time.sleep(0.25)

    def _is_ours(self, state: dict) -> bool:
        """True when the recorded pid is alive and is the kafka.Kafka JVM started with the recorded config."""
        pid = int(state["pid"])
        if not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return sys.platform != "linux"  # no /proc to check elsewhere: trust the pid
        return b"kafka.Kafka" in cmdline and state["properties"].encode() in cmdline

    def _forget(self, state: dict) -> None:
        """Drop a stopped broker's run state and, if it was temporary, its data dir."""
        if state.get("temp_data_dir"):
            shutil.rmtree(state["data_dir"], ignore_errors=True)
        self._state_file.unlink(missing_ok=True)

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return None


def main(argv: list[str] | None = None) -> int:
    """CLI: start|stop|status|jars. Exit 0 on success, 1 on a setup error; status exits 3 when not running."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.kafka_local", description=main.__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "jars"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("ANOMALYD_KAFKA_PORT", DEFAULT_PORT)))
    parser.add_argument("--controller-port", type=int, default=None)
    parser.add_argument("--data-dir", default=None, help="persistent data dir (default: a fresh temp dir)")
    parser.add_argument("--heap", default="512m")
    parser.add_argument("--timeout", type=float, default=90.0, help="start: seconds to wait for the broker")
    parser.add_argument("--sasl-port", type=int, default=None, help="start: also a SASL_PLAINTEXT listener here")
    parser.add_argument("--sasl-ssl-port", type=int, default=None,
                        help="start: also a SASL_SSL listener here (its CA: <data dir>/tls/ca.pem)")
    parser.add_argument("--ssl-port", type=int, default=None, help="start: also an SSL (TLS, no login) listener here")
    parser.add_argument("--mtls-port", type=int, default=None,
                        help="start: also an SSL listener that requires a client certificate (<data dir>/tls/client.*)")
    parser.add_argument("--sasl-user", action="append", default=[], metavar="NAME=PASSWORD",
                        help="start: a user of the SASL listener (PLAIN, SCRAM-SHA-256/512); repeatable")
    args = parser.parse_args(argv)
    users = dict(u.split("=", 1) for u in args.sasl_user if "=" in u)
    kafka = LocalKafka(args.port, args.controller_port, data_dir=args.data_dir, heap=args.heap,
                       sasl_port=args.sasl_port, sasl_ssl_port=args.sasl_ssl_port, ssl_port=args.ssl_port,
                       sasl_users=users, mtls_port=args.mtls_port)
    try:
        if args.command == "start":
            print(kafka.start(timeout_s=args.timeout))
        elif args.command == "stop":
            print(f"kafka {'stopped' if kafka.stop() else 'was not running'} at {kafka.bootstrap}")
        elif args.command == "jars":
            print(kafka.ensure_jars())
        else:
            status = kafka.status()
            print(status)
            return 0 if status.state == "running" else 3
    except KafkaSetupError as exc:
        print(f"kafka_local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
