"""Shared fixtures of the integration tests: a real local Kafka broker and unique topic names.

Everything collected under tests/integration/ is marked ``integration``. A service that cannot start skips
its tests locally and fails them under ``CI=true``. Other services' fixtures live in their own modules here.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.kafka_local import KafkaSetupError, LocalKafka, free_port
from tests.needs import unavailable

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from this folder with ``pytest.mark.integration``."""
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


service_unavailable = unavailable  # a missing service fails under CI=true (a broken CI), is skipped elsewhere


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalKafka]:
    """A real single-node Kafka broker for the whole session, on $ANOMALYD_TEST_KAFKA_PORT or a free port."""
    port = int(os.environ.get("ANOMALYD_TEST_KAFKA_PORT") or free_port())
    broker = LocalKafka(port=port, exit_with_parent=True)  # not left running by a killed pytest
    try:
        broker.start(timeout_s=120)
    except KafkaSetupError as exc:
        service_unavailable(f"local Kafka broker could not start: {exc}")
    yield broker
    if broker.launched:  # leave a broker someone else started on that port alone
        broker.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    """A broker of the test's own (on free ports, data under tmp_path) that it may stop, restart or freeze; resumed
    and stopped afterwards."""
    broker = LocalKafka(free_port(), controller_port=free_port(), data_dir=tmp_path / "own-kafka",
                        exit_with_parent=True)
    try:
        broker.start(timeout_s=120)
    except KafkaSetupError as exc:
        service_unavailable(f"local Kafka broker could not start: {exc}")
    try:
        yield broker
    finally:
        thaw(broker)
        broker.stop()


def freeze(broker: LocalKafka) -> None:
    """SIGSTOP the broker: it keeps its connections open and answers nothing (a hung broker, a network that drops
    packets)."""
    os.kill(broker.status().pid, signal.SIGSTOP)


def thaw(broker: LocalKafka) -> None:
    """SIGCONT a frozen broker (nothing when it is not running)."""
    pid = broker.status().pid
    if pid:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: LocalKafka) -> str:
    """The bootstrap servers string ("127.0.0.1:PORT") of the session's Kafka broker."""
    return kafka_broker.bootstrap


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to this test run: the test's name plus a random suffix."""
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name).strip("-")[:180]
    return f"{stem}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def daemon_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(models dir, [GRU name, LSTM name]): tiny autoencoders trained once per session for the daemon tests."""
    from tests.integration.daemon_support import train_models

    d = tmp_path_factory.mktemp("models")
    return d, train_models(d)


@pytest.fixture(scope="session")
def alertmanager():
    """A real Alertmanager for the whole session (skipped locally, failed under CI=true, when it cannot start)."""
    from tests.integration.alertmanager import alertmanager_or_skip

    yield from alertmanager_or_skip()
