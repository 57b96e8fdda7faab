"""``models.wait_for_models_s``: at start, wait for the served models' first versions instead of exiting.

A Deployment installed before its models were trained into the volume would otherwise exit 2 and restart in a
crash loop (whose back-off then delays the start once they are there). While waiting, the HTTP port serves
``/healthz`` (alive), ``/readyz`` (not ready) and ``/metrics`` (``anomalyd_up 1``, ``anomalyd_ready 0``: the
``AnomalydNotReady`` alert), and the log says every minute what is missing.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from .config import Config, ConfigError, check_model_files
from .httpserver import HealthServer
from .metrics import Metrics
from .model_store import ModelStore

__all__ = ["wait_for_model_files"]

log = logging.getLogger("anomalyd")

_LOG_EVERY_S = 60.0


def _missing(cfg: Config) -> ConfigError | None:
    """What keeps the daemon from loading its models: a version directory without its model.json, or with it but
    not yet its weights (a copy in progress); None when every served model has a complete version."""
    try:
        check_model_files(cfg)
    except ConfigError as exc:
        return exc
    store = ModelStore(cfg.models.dir)
    errors = []
    for i, served in enumerate(cfg.models.served):
        try:
            store.resolve(served.name, served.version)
        except FileNotFoundError as exc:
            errors.append(f"{cfg.where(f'models.served[{i}]')}: models.served[{i}]: {exc}")
    return ConfigError(errors) if errors else None


def wait_for_model_files(cfg: Config, stop: threading.Event, poll_s: float = 2.0) -> bool:
    """True once every served model has a version under ``models.dir`` (at once when it has); False when ``stop``
    is set first. Raises :class:`ConfigError` naming what is missing when ``models.wait_for_models_s`` is 0 or has
    passed, and :class:`pipelines.httpserver.BindError` when the HTTP port cannot be had."""
    missing = _missing(cfg)
    if missing is None:
        return True
    if cfg.models.wait_for_models_s <= 0:
        raise missing
    metrics = Metrics(CollectorRegistry())
    metrics.set_state(up=True, ready=False)
    server = HealthServer(metrics.registry, cfg.http.bind, cfg.http.port, is_ready=lambda: False).start()
    deadline = time.monotonic() + cfg.models.wait_for_models_s
    said = -float("inf")
    try:
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
            missing = _missing(cfg)
            if missing is None:
                log.info("models found under %s: starting", cfg.models.dir)
                return True
    finally:
        server.stop()  # the daemon's own server takes the port next
