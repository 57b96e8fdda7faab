"""``models.wait_for_models_s``: at start, wait for the served models' first versions instead of exiting.

A Deployment installed before its models were trained into the volume would otherwise exit 2 and restart in a
crash loop (whose back-off then delays the start once they are there). While waiting, and on until the daemon is
built (the models loaded), the HTTP port serves ``/healthz`` (alive), ``/readyz`` (not ready) and ``/metrics``
(``anomalyd_up 1``, ``anomalyd_ready 0``: the ``AnomalydNotReady`` alert), and the log says every minute what is
missing; the daemon's own server then takes the same port.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry
from safetensors import safe_open

from detector.checkpoint import WEIGHTS_FILE, load_checkpoint, read_metadata

from .config import Config, ConfigError, check_model_files
from .httpserver import HealthServer
from .metrics import Metrics
from .model_store import ModelStore

__all__ = ["models_awaited"]

log = logging.getLogger("anomalyd")

_LOG_EVERY_S = 60.0


def _missing(cfg: Config, load: bool) -> ConfigError | None:
    """What keeps the daemon from loading its models: no version directory with a model.json, a version without
    its weights yet, or none of a model's versions whose files are whole (model.json read, the weights' header and
    length; ``load``: the version loads), as when they are still being written; None when every served model has
    one. At start (not ``load``) a version whose files are whole but whose model does not load (wrong shapes, NaN
    weights) passes: the daemon then names it (exit 2)."""
    try:
        check_model_files(cfg)
    except ConfigError as exc:
        return exc
    store = ModelStore(cfg.models.dir)
    errors = []
    for i, served in enumerate(cfg.models.served):
        key = f"models.served[{i}]"
        try:  # newest first, as the daemon falls back at start; on the CPU, quietly (every poll)
            store.first_usable(served.name, served.version, True, load_checkpoint if load else _whole, say=False)
        except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
            errors.append(f"{cfg.where(key)}: {key}: model {served.name!r}: {exc}")
    return ConfigError(errors) if errors else None


def _whole(version_dir: Path) -> None:
    """model.json whole, and the weights' header and the length it promises (a copy in progress falls short)."""
    read_metadata(version_dir)
    path = version_dir / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as exc:  # safetensors' SafetensorError: neither an OSError nor a ValueError
        raise ValueError(f"{path}: {exc}") from exc


@contextmanager
def models_awaited(cfg: Config, stop: threading.Event, poll_s: float = 2.0) -> Iterator[Config | None]:
    """Yields the config to build the daemon with once every served model has a whole version (one that loads,
    once it has waited; at once when they have, or when ``models.wait_for_models_s`` is 0: the daemon then names
    what is missing or does not load), None when
    ``stop`` is set first. Raises :class:`ConfigError` naming what is missing once the wait has passed, and
    :class:`pipelines.httpserver.BindError` when the HTTP port cannot be had. A waiting server answers until the
    body (building the daemon, loading its models) is done; with ``http.port`` 0 the config yielded names the
    port it had, for the daemon's server."""
    # at once: whole files (the daemon then loads them); once it has waited, a version must load
    missing = _missing(cfg, load=False) if cfg.models.wait_for_models_s > 0 else None
    if missing is None:
        yield cfg
        return
    metrics = Metrics(CollectorRegistry())
    metrics.set_state(up=True, ready=False)
    server = HealthServer(metrics.registry, cfg.http.bind, cfg.http.port, is_ready=lambda: False).start()
    try:
        if _wait(cfg, missing, stop, poll_s):
            yield dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, port=server.port))
        else:
            yield None
    finally:
        server.stop()  # the daemon's own server takes the port next


def _wait(cfg: Config, missing: ConfigError, stop: threading.Event, poll_s: float) -> bool:
    deadline = time.monotonic() + cfg.models.wait_for_models_s
    said = -float("inf")
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise missing
        if now - said >= _LOG_EVERY_S:
            said = now
            log.warning("waiting for models (models.wait_for_models_s, %.0f s left; not ready meanwhile): %s",
                        deadline - now, "; ".join(missing.errors))
        if stop.wait(min(poll_s, deadline - now)):
            return False
        found = _missing(cfg, load=True)
        if found is None:
            log.info("models found under %s: starting", cfg.models.dir)
            return True
        missing = found
