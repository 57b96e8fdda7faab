"""Routing: stream id -> route (a set of models) by glob or regex; first match wins."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RouteSpec", "Router"]


@dataclass(frozen=True)
class RouteSpec:
    models: tuple[str, ...]
    combine: str = "max"  # max | mean of the models' normalised scores
    match: str | None = None  # glob
    regex: str | None = None

    @property
    def label(self) -> str:
        """The route's model label in alerts and metrics: ``gru`` or ``gru+lstm``."""
        return "+".join(self.models)


class Router:
    """The first route whose glob or regex takes a stream id. It keeps no per-stream cache: the intake keeps the
    decision per stream (``pipelines.intake``, a :class:`pipelines.decode.SpecCache`) and asks once per stream."""

    def __init__(self, routes: Sequence[RouteSpec], default_models: Sequence[str] = ()) -> None:
        self.routes = list(routes)
        if default_models:
            self.routes.append(RouteSpec(tuple(default_models), "max", match="*"))
        # globs match the whole id; regexes search, so operators anchor them (^...$) as they like
        self._tests = [re.compile(r.regex).search if r.regex else re.compile(fnmatch.translate(r.match or "*")).match
                       for r in self.routes]

    def route_of(self, stream: str) -> int:
        """Index into ``routes``, or -1 when no route matches (the stream is counted and ignored)."""
        return next((i for i, test in enumerate(self._tests) if test(stream)), -1)
