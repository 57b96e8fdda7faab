"""The models the daemon serves: loaded from the store, checked against the routes, swapped in between batches.

A new version is read completely, and checked against its routes, before anything changes: one that fails to load
(half copied, corrupt, a route whose models no longer share window and features) leaves the old ones served.
"""

from __future__ import annotations

import logging

from detector.checkpoint import META_FILE, WEIGHTS_FILE
from detector.engine import InferenceEngine

from .config import Config, ConfigError
from .metrics import Metrics
from .model_store import LoadedModel, ModelStore
from .routes import RouteState
from .routing import Router, RouteSpec

__all__ = ["ServedModels"]

log = logging.getLogger("anomalyd")


class ServedModels:
    """``models.served`` of ``cfg`` on ``engine``, and the routes (:class:`RouteState`) that use them."""

    def __init__(self, cfg: Config, engine: InferenceEngine, metrics: Metrics) -> None:
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.store = ModelStore(cfg.models.dir)
        self.router = Router([RouteSpec(tuple(r.models), r.combine, r.match, r.regex) for r in cfg.routes],
                             cfg.default_models)
        self.loaded: dict[str, LoadedModel] = {}
        self.routes: list[RouteState] = []
        self._refused: dict = {}  # _fingerprint of the versions a reload failed on: not read again until it changes
        self._wanted: dict[str, str] = {}  # the newest versions as the last read found them
        if not self.router.routes:
            log.warning("no routes and no default_models: every event is counted unrouted, nothing is scored")

    def read(self, fallback: bool = False) -> dict[str, LoadedModel]:
        """The served models, loaded and checked against their routes; raises before anything is swapped.
        ``fallback`` (at start): a newest version that does not load gives way to the newest older one that does."""
        dev = str(self.engine.device)
        self._wanted = {}
        for s in self.cfg.models.served:
            try:
                self._wanted[s.name] = self.store.resolve(s.name, s.version)
            except OSError:
                pass
        loaded = {}
        for i, s in enumerate(self.cfg.models.served):
            try:
                loaded[s.name] = self.store.load(s.name, s.version, device=dev, fallback=fallback)
            except ValueError as exc:  # CheckpointError: naming what set the key (OSError: the path says enough)
                key = f"models.served[{i}]"
                raise ConfigError([f"{self.cfg.where(key)}: {key}: model {s.name!r}: {exc}"]) from exc
        stride = self.cfg.processing.stride
        for i, spec in enumerate(self.router.routes):
            models = [loaded[name] for name in spec.models]
            key = f"routes[{i}].models" if i < len(self.cfg.routes) else "default_models"
            try:
                RouteState.check_models(models, spec.label)
            except ValueError as exc:  # naming what set the key
                raise ConfigError([f"{self.cfg.where(key)}: {key}: {exc}"]) from exc
            if problem := RouteState.stride_problem(models, spec.label, stride):  # naming what set the key
                raise ConfigError([f"{self.cfg.where('processing.stride')}: {problem}"])
        return loaded

    def newer(self, forced: bool) -> dict[str, LoadedModel] | None:
        """The served models read again if a version changed (or ``forced``: SIGHUP); None when nothing changed
        or the new versions fail to load (logged, counted in anomalyd_model_reload_failures_total). Versions that
        failed are tried again on SIGHUP or when another version appears, not at every watch interval."""
        newest: dict[str, str] = {}
        try:
            newest = {s.name: self.store.resolve(s.name, s.version) for s in self.cfg.models.served}
            if self._refused and self._refused == self._fingerprint(newest) and not forced:
                return None
            if not (forced or any(newest[n] != lm.version for n, lm in self.loaded.items())):
                self._refused = {}  # the refused version is gone: the newest is the one served
                self.metrics.model_versions_refused.set(0)
                return None
            loaded = self.read()
            self._check_same_features(loaded)
            self._refused = {}
            return loaded
        except (OSError, ValueError, RuntimeError) as exc:  # CheckpointError is a ValueError; CUDA out of memory
            self._refused = self._fingerprint(newest)
            self.metrics.model_reload_failures.inc()
            why = "; ".join(exc.errors) if isinstance(exc, ConfigError) else exc  # one line, not a config report
            log.error("model reload failed, still serving %s (tried again on SIGHUP or a newer version): %s",
                      self.versions(), why)
            self._count_refused(newest)
            return None

    def _fingerprint(self, versions: dict[str, str]) -> dict:
        """Each version with its files' sizes and times: a version still being copied when it failed is tried again
        once its files change."""
        out: dict = {}
        for name, version in versions.items():
            stats = []
            for f in (META_FILE, WEIGHTS_FILE):
                try:
                    st = (self.store.root / name / version / f).stat()
                    stats.append((st.st_size, st.st_mtime_ns))
                except OSError:
                    stats.append(None)
            out[name] = (version, tuple(stats))
        return out

    def _check_same_features(self, loaded: dict[str, LoadedModel]) -> None:
        """A reload keeps each model's features: a version with others would dead-letter every message the
        producers send now (and the windows held are in the old columns). Serving it takes a restart."""
        for name, lm in loaded.items():
            old = self.loaded.get(name)
            if old is not None and list(lm.detector.feature_names) != list(old.detector.feature_names):
                raise ValueError(f"{name}: version {lm.version} has features {list(lm.detector.feature_names)}, "
                                 f"version {old.version} {list(old.detector.feature_names)}; a reload does not change "
                                 f"features (restart the daemon to serve it, once the producers send them)")

    def install_or_keep(self, loaded: dict[str, LoadedModel]) -> list[RouteState] | None:
        """:meth:`install`, or None when the swap fails (e.g. CUDA out of memory while both versions are on the
        device): logged and counted as a failed reload, the old models still served (the swap changes nothing
        until it succeeds)."""
        try:
            return self.install(loaded)
        except (OSError, ValueError, RuntimeError) as exc:
            self.metrics.model_reload_failures.inc()
            log.error("model reload failed while installing, still serving %s: %s", self.versions(), exc)
            self._count_refused(self._wanted)
            return None

    def behind(self, wanted: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
        """Served models not on their newest version, as it did not load or was refused (other features): name ->
        (newest, served), the newest as ``wanted`` says (default: as the last read found them; one saved since is
        not refused yet)."""
        wanted = self._wanted if wanted is None else wanted
        return {name: (wanted[name], lm.version) for name, lm in self.loaded.items()
                if name in wanted and wanted[name] != lm.version}

    def _count_refused(self, wanted: dict[str, str]) -> None:
        """``anomalyd_model_versions_refused``: a lasting signal where the failures counter moves once."""
        self.metrics.model_versions_refused.set(len(self.behind(wanted)))

    def versions(self) -> dict[str, str]:
        return {n: lm.version for n, lm in self.loaded.items()}

    def install(self, loaded: dict[str, LoadedModel]) -> list[RouteState]:
        """Swap ``loaded`` into the engine and the routes (a route keeps its windows when the shape is unchanged);
        returns the routes."""
        dev = str(self.engine.device)
        self.engine.swap({name: lm.detector for name, lm in loaded.items()})
        old = {r.spec: r for r in self.routes}
        a, routes = self.cfg.alerts, []
        for spec in self.router.routes:
            models = [loaded[name] for name in spec.models]
            if spec in old:
                old[spec].set_models(models)
                routes.append(old[spec])
            else:
                routes.append(RouteState(spec, models, self.cfg.processing.stride, dict(
                    k=a.k, n=a.n, m=a.m, cooldown_s=a.cooldown_s, top_features=a.top_features)))
        self.routes, self.loaded = routes, loaded
        for name, lm in loaded.items():
            self.metrics.set_model_info(name, lm.version, lm.detector.kind, dev)
            self.metrics.set_threshold(name, 1.0)
        for route in routes:
            self.metrics.init_route(route.spec.label)
        self._count_refused(self._wanted)  # at start, the newest of a model may have given way to an older one
        return routes
