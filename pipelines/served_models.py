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
        self._refused: dict[str, tuple] = {}  # name -> _fingerprint of its newest version refused in a reload
        # (with _peers, its route mates' newest versions and files, when its route refused it): not read again
        # until that changes
        self._changing: dict[str, tuple] = {}  # name -> _fingerprint of the versions the last newer() returned
        self._wanted: dict[str, str] = {}  # the newest versions as the last read found them
        if not self.router.routes:
            log.warning("no routes and no default_models: every event is counted unrouted, nothing is scored")

    def read(self, fallback: bool = False) -> dict[str, LoadedModel]:
        """The served models, loaded and checked against their routes (at start); raises :class:`ConfigError`
        naming the key before anything is swapped. ``fallback``: a newest version that does not load gives way to
        the newest older one that does."""
        dev = str(self.engine.device)
        self._wanted, loaded = {}, {}
        for i, s in enumerate(self.cfg.models.served):
            key = f"models.served[{i}]"
            try:  # the newest and the model from one listing: a version saved meanwhile is not counted as refused
                self._wanted[s.name], loaded[s.name] = self.store.load_newest(s.name, s.version, dev, fallback)
            except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
                raise ConfigError([f"{self.cfg.where(key)}: {key}: model {s.name!r}: {exc}"]) from exc
        problems = [why for i, spec in enumerate(self.router.routes) if (why := self._route_problem(i, spec, loaded))]
        if problems:
            raise ConfigError(problems)
        return loaded

    def _route_problem(self, i: int, spec: RouteSpec, loaded: dict[str, LoadedModel]) -> str | None:
        """Why the route's models in ``loaded`` cannot serve it together (window, features, stride), naming the
        key that set it; None when they can."""
        models = [loaded[name] for name in spec.models]
        key = f"routes[{i}].models" if i < len(self.cfg.routes) else "default_models"
        try:
            RouteState.check_models(models, spec.label)
        except ValueError as exc:
            return f"{self.cfg.where(key)}: {key}: {exc}"
        if problem := RouteState.stride_problem(models, spec.label, self.cfg.processing.stride):
            return f"{self.cfg.where('processing.stride')}: {problem}"
        return None

    def newer(self, forced: bool) -> dict[str, LoadedModel] | None:
        """The served models with each one's newest version where it changed (``forced``, SIGHUP: each read
        again), or None when none changed. Each model on its own: a version that does not load, has other
        features, or does not fit its route beside the other models keeps that model on its version (logged,
        counted in anomalyd_model_reload_failures_total and anomalyd_model_versions_refused) and the others
        reload. A refused version is tried again on SIGHUP or once its files change, not at every watch interval;
        one refused by its route also when the newest version of another model of the route changes (the route's
        models may be retrained one after the other, to a new window)."""
        failed: dict[str, str] = {}
        wanted: dict[str, str] = {}
        for s in self.cfg.models.served:
            try:
                wanted[s.name] = self.store.resolve(s.name, s.version)
            except OSError as exc:  # versions taken away: the loaded one is still served
                self._refuse(s.name, ("", "unresolved"), exc, failed, forced)  # (once: not each copy's progress)
        candidate, changed = dict(self.loaded), {}
        for name, newest in wanted.items():
            if newest == self.loaded[name].version and not forced:
                self._refused.pop(name, None)  # a refused version is gone: the newest is the one served
                continue
            seen = self._fingerprint(name, newest)  # before the load: a copy that completes meanwhile changes it
            if self._refused.get(name) in (seen, (seen, self._peers(name, wanted))) and not forced:
                continue
            try:
                lm = self.store.load(name, newest, device=str(self.engine.device))
                self._check_same_features(lm)
            except (OSError, ValueError, RuntimeError) as exc:  # CheckpointError is a ValueError; CUDA OOM
                self._refuse(name, seen, exc, failed, forced)
                continue
            candidate[name], changed[name] = lm, seen
        self._fit_routes(candidate, changed, wanted, failed, forced)
        self._wanted = wanted
        if failed:
            self.metrics.model_reload_failures.inc()
            log.error("model reload refused (tried again on SIGHUP or when its files change): %s; serving %s",
                      "; ".join(f"{name}: {why}" for name, why in failed.items()),
                      {n: lm.version for n, lm in candidate.items()})
        self._changing = changed
        if not changed:
            self._count_refused()
            return None
        for name in changed:
            self._refused.pop(name, None)
        return candidate

    def _fit_routes(self, candidate: dict[str, LoadedModel], changed: dict[str, tuple], wanted: dict[str, str],
                    failed: dict[str, str], forced: bool) -> None:
        """Keep on their versions the fewest changed models that make every route fit (window, features, stride):
        one when putting that one back is enough, else the route's changed ones."""
        for _ in range(len(changed) + 1):
            bad = next(((i, spec, why) for i, spec in enumerate(self.router.routes)
                        if (why := self._route_problem(i, spec, candidate))), None)
            if bad is None:
                return
            i, spec, why = bad
            here = [n for n in spec.models if n in changed]
            if not here:
                return  # the served models fit (checked at start): not reached
            one = next((n for n in here if self._route_problem(i, spec, {**candidate, n: self.loaded[n]}) is None),
                       None)
            for name in [one] if one is not None else here:
                candidate[name] = self.loaded[name]
                seen = changed.pop(name)
                if seen[0] != self.loaded[name].version:  # SIGHUP reads the served versions again: not refused
                    self._refuse(name, (seen, self._peers(name, wanted)), ConfigError([why]), failed, forced)

    def _peers(self, name: str, wanted: dict[str, str]) -> tuple:
        """The newest versions, with their files, of the models that ``name``'s routes reach (through routes that
        share models: a+b and b+c put a's refusal on c too, as b may have gone back for c): a version its route
        refused is tried again when one of them changes (a copy completing too), not for an unconnected route's."""
        group, grown = {name}, True
        while grown:
            more = {n for spec in self.router.routes if group & set(spec.models) for n in spec.models} - group
            group, grown = group | more, bool(more)
        return tuple(sorted((n, self._fingerprint(n, wanted[n])) for n in group - {name} if n in wanted))

    def _refuse(self, name: str, key: tuple, exc: Exception, failed: dict, forced: bool) -> None:
        """Note ``name``'s newest version as refused under ``key`` (its files, and for a route's refusal its
        :meth:`_peers`; ``failed``: logged and counted once) unless it was refused before under the same
        key and this is no SIGHUP."""
        if self._refused.get(name) != key or forced:
            failed[name] = "; ".join(exc.errors) if isinstance(exc, ConfigError) else str(exc)  # one line
        self._refused[name] = key

    def _fingerprint(self, name: str, version: str) -> tuple:
        """The version with its files' sizes and times: one still being copied when it failed is tried again once
        its files change."""
        stats = []
        for f in (META_FILE, WEIGHTS_FILE):
            try:
                st = (self.store.root / name / version / f).stat()
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        return version, tuple(stats)

    def _check_same_features(self, lm: LoadedModel) -> None:
        """A reload keeps each model's features: a version with others would dead-letter every message the
        producers send now (and the windows held are in the old columns). Serving it takes a restart."""
        old = self.loaded.get(lm.name)
        if old is not None and list(lm.detector.feature_names) != list(old.detector.feature_names):
            raise ValueError(f"version {lm.version} has features {list(lm.detector.feature_names)}, version "
                             f"{old.version} {list(old.detector.feature_names)}; a reload does not change features "
                             f"(restart the daemon to serve it, once the producers send them)")

    def install_or_keep(self, loaded: dict[str, LoadedModel]) -> list[RouteState] | None:
        """:meth:`install`, or None when the swap fails (e.g. CUDA out of memory while both versions are on the
        device): logged and counted as a failed reload, the old models still served (the swap changes nothing
        until it succeeds), and the new versions refused until SIGHUP or their files change."""
        try:
            return self.install(loaded)
        except (OSError, ValueError, RuntimeError) as exc:
            self.metrics.model_reload_failures.inc()
            log.error("model reload failed while installing, still serving %s: %s", self.versions(), exc)
            self._refused.update(self._changing)
            self._count_refused()
            return None

    def behind(self) -> dict[str, tuple[str, str]]:
        """Served models not on their newest version, as it did not load or was refused (other features, its
        route): name -> (newest, served), the newest as the last read found it (one saved since is not refused
        yet)."""
        return {name: (self._wanted[name], lm.version) for name, lm in self.loaded.items()
                if name in self._wanted and self._wanted[name] != lm.version}

    def _count_refused(self) -> None:
        """``anomalyd_model_versions_refused``: a lasting signal where the failures counter moves once."""
        self.metrics.model_versions_refused.set(len(self.behind()))

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
        self._count_refused()  # at start, the newest of a model may have given way to an older one
        return routes
