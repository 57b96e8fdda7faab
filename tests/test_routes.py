"""RouteState: a route's models combined (max / mean), the models named over threshold, and stride > 1."""

from __future__ import annotations

import numpy as np
import pytest

from detector.engine import InferenceEngine
from detector.synthetic import SensorModel
from pipelines.model_store import ModelStore
from pipelines.routes import RouteState
from pipelines.routing import RouteSpec

T0 = 1_700_000_000_000


def _route(trained, tmp_path, kinds, combine="max", stride=1, alerts=None) -> RouteState:
    store = ModelStore(tmp_path)
    for kind in kinds:
        store.save(kind, trained[kind])
    return RouteState(RouteSpec(tuple(kinds), combine=combine), [store.load(kind) for kind in kinds], stride,
                      alerts or {"k": 1, "n": 1, "m": 1000})


def _feed(route: RouteState, X: np.ndarray, first_offset: int = 0) -> int:
    """One stream's events (N, F) at 1 s steps, offsets from ``first_offset``; returns the windows queued."""
    n = len(X)
    offset = first_offset + np.arange(n, dtype=np.int64)
    stream = np.repeat(route.stream_ids(["pump-1"]), n)
    _late, queued = route.add(stream, T0 + offset * 1000, X.astype(np.float32), np.zeros(n, np.int64), offset,
                              ["t"] * n, np.zeros(n, np.int32), np.ones(n, bool))
    return queued


@pytest.mark.parametrize("combine", ["max", "mean"])
def test_a_route_of_two_models_combines_their_scores_and_names_exactly_the_models_over(trained, tmp_path, combine):
    """The combined score is the max (or mean) of the models' normalised scores; the alert fires at the first
    window whose combined score is over 1 and names exactly the models over threshold there."""
    route = _route(trained, tmp_path, ("gru", "lstm"), combine)
    X = SensorModel(4, seed=1).normal(np.arange(400, dtype=np.float64))
    X[300:340, 2] += X[:, 2].std()  # a level shift of one spread: some windows are over for one model only
    _feed(route, X)
    engine = InferenceEngine("cpu")
    engine.swap({m.name: m.detector for m in route.models})
    handed = []  # what the route hands the alert tracker: the models over threshold, per window over
    observe = route.tracker.observe
    route.tracker.observe = lambda *a, **kw: handed.append(kw["models_over"]) or observe(*a, **kw)
    out = route.score(route.take_pending(), engine, {})
    norm = np.stack([out.per_model_normalised["gru"], out.per_model_normalised["lstm"]])  # (2, M)
    expected = norm.max(axis=0) if combine == "max" else norm.mean(axis=0)
    np.testing.assert_allclose(out.combined, expected, rtol=1e-6)
    over = {j: [name for k, name in enumerate(("gru", "lstm")) if norm[k, j] > 1.0]
            for j in np.flatnonzero(out.combined > 1.0).tolist()}
    assert handed == [over]
    assert any(len(names) == 1 for names in over.values())  # windows where one model only is over
    first = min(over)
    firing = [a for a in out.alerts if a.status == "firing"]
    assert firing and firing[0].started_at == out.ts[first] and firing[0].models_over == over[first]
    assert firing[0].model == "gru+lstm" and firing[0].threshold == 1.0


def test_with_stride_every_kth_window_is_queued_and_the_rebuild_floor_still_covers_the_window(trained, tmp_path):
    route = _route(trained, tmp_path, ("gru",), stride=4)
    w = route.buffer.window  # 32
    X = SensorModel(4, seed=2).normal(np.arange(3 * w + 7, dtype=np.float64))
    queued = _feed(route, X[:50]) + _feed(route, X[50:], first_offset=50)  # two polls: the phase is kept
    counts = np.arange(1, len(X) + 1)  # each event's count in its stream
    assert queued == np.count_nonzero((counts >= w) & ((counts - w) % 4 == 0))
    parts = route.take_pending()
    ts = np.concatenate([p[2] for p in parts])
    np.testing.assert_array_equal(ts, T0 + (np.flatnonzero((counts >= w) & ((counts - w) % 4 == 0))) * 1000)
    floor = route.rebuild_floor(1)[0]
    assert len(X) - (2 * w - 1) <= floor <= len(X) - w  # the window's oldest event, at most W - 1 more


def test_a_stream_whose_clock_stepped_back_goes_silent_and_its_incident_resolves(trained, tmp_path):
    """Every event late (a producer's clock set back): nothing is scored, so the incident never saw its m normal
    windows, and each late event kept the stream 'seen', so it was never forgotten either: open for ever."""
    route = _route(trained, tmp_path, ("gru",), alerts={"k": 1, "n": 1, "m": 5})
    X = SensorModel(4, seed=1).normal(np.arange(200, dtype=np.float64))
    X[150:, 2] += 10 * X[:, 2].std()  # anomalous from row 150 to the end
    _feed(route, X)
    engine = InferenceEngine("cpu")
    engine.swap({m.name: m.detector for m in route.models})
    route.score(route.take_pending(), engine, {})
    assert route.tracker.open_incidents == 1
    seen = float(route.last_seen[0])
    n = 50  # normal readings stamped an hour before the last: all late
    stream = np.repeat(route.stream_ids(["pump-1"]), n)
    offset = 200 + np.arange(n, dtype=np.int64)
    late, queued = route.add(stream, T0 - 3_600_000 + offset * 1000, X[:n].astype(np.float32),
                             np.zeros(n, np.int64), offset, ["t"] * n, np.zeros(n, np.int32), np.ones(n, bool))
    assert (late, queued) == (n, 0)
    assert route.last_seen[0] == seen  # not news of the stream: no reading of it was taken
    gone, alerts = route.forget_idle(60.0, now=seen + 61.0)
    assert gone == ["pump-1"] and [a.status for a in alerts] == ["resolved"]


@pytest.mark.parametrize("as_default", [False, True], ids=["routes", "default_models"])
def test_models_of_one_route_that_differ_are_a_config_error_naming_the_key_and_the_difference(trained, tmp_path,
                                                                                              as_default):
    """The same features in another order would mix columns: refused at start, naming the file, the key and what
    differs (it named neither file, key nor which of window and features)."""
    import copy

    import yaml

    from pipelines.config import ConfigError, load_config
    from pipelines.daemon import Daemon

    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"])
    reordered = copy.deepcopy(trained["lstm"])
    reordered.feature_names = list(reversed(reordered.feature_names))
    store.save("lstm", reordered)
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}, {"name": "lstm"}],
                      "device": "cpu"}, "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["t"]}}
    if as_default:
        cfg |= {"routes": [{"match": "pump-*", "models": ["gru"]}], "default_models": ["gru", "lstm"]}
    else:
        cfg["routes"] = [{"match": "*", "models": ["gru", "lstm"]}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as err:
        Daemon(load_config(path))
    (line,) = err.value.errors
    key = "default_models" if as_default else "routes[0].models"
    names = trained["gru"].feature_names
    assert line.startswith(f"{path}: {key}: route "), line
    assert f"lstm has features {list(reversed(names))}, gru {list(names)}" in line, line


def _add(route: RouteState, X: np.ndarray, streams: np.ndarray, offsets: np.ndarray, live: bool) -> None:
    n = len(offsets)
    ids = route.stream_ids([f"pump-{i}" for i in streams[offsets].tolist()])
    route.add(ids, T0 + offsets * 1000, X[offsets].astype(np.float32), np.zeros(n, np.int64), offsets, ["t"] * n,
              np.zeros(n, np.int32), np.full(n, live))


@pytest.mark.parametrize("stride", [20, 32])
def test_after_a_handover_with_a_long_stride_every_event_is_still_in_a_scored_window(trained, tmp_path, stride):
    """The new owner replays from the partition's rebuild floor: its stream counts, so its stride's phase, start
    there. With a stride over W / 2, events the old owner had read (and committed) but not yet scored in a window
    could fall in none of the new owner's windows either."""
    w = 32
    X = SensorModel(4, seed=2).normal(np.arange(300, dtype=np.float64))
    # pump-1 sparse: the partition's floor is its block's start, far behind pump-0's window
    streams = (np.random.default_rng(7).random(len(X)) < 0.3).astype(np.int64)
    gaps = {}
    for handover in range(3 * w, 3 * w + 4 * stride, 3):
        old = _route(trained, tmp_path / "old", ("gru",), stride=stride)
        _add(old, X, streams, np.arange(handover), live=True)
        floor = int(old.rebuild_floor(1)[0])
        new = _route(trained, tmp_path / "new", ("gru",), stride=stride)
        _add(new, X, streams, np.arange(floor, handover), live=False)  # read again to rebuild windows: not scored
        _add(new, X, streams, np.arange(handover, len(X)), live=True)
        # (stream, offset of the window's last event) of every window either owner scored
        scored = [(route.stream_names[i], int(o)) for route in (old, new) for part in route.take_pending()
                  for i, o in zip(part[0].tolist(), part[5].tolist(), strict=True)]
        for stream in (0, 1):
            own = np.flatnonzero(streams == stream)  # the stream's offsets, in order
            ends = [int(np.searchsorted(own, o)) for name, o in scored if name == f"pump-{stream}"]
            covered = np.zeros(len(own), dtype=bool)
            for end in ends:
                covered[end - w + 1:end + 1] = True
            missed = np.flatnonzero(~covered[w - 1:max(ends) + 1]) + w - 1
            if missed.size:
                gaps[(handover, stream)] = own[missed].tolist()
    assert gaps == {}


def test_an_alert_reports_the_threshold_in_force_under_the_reduced_precision_margin(trained, tmp_path):
    """With bfloat16 / float16 products the engine compares score / (1 + margin) with the threshold, so the raw
    threshold in force is the model's times 1 + margin; alerts reported the model's own."""
    route = _route(trained, tmp_path, ("gru",))
    X = SensorModel(4, seed=1).normal(np.arange(400, dtype=np.float64))
    X[300:340, 2] += 3 * X[:, 2].std()
    _feed(route, X)
    engine = InferenceEngine("cpu")
    engine.swap({m.name: m.detector for m in route.models})
    engine.margin = 0.01  # as the engine sets it for reduced precision (REDUCED_PRECISION_MARGIN)
    firing = [a for a in route.score(route.take_pending(), engine, {}).alerts if a.status == "firing"]
    assert firing and firing[0].threshold == pytest.approx(route.models[0].detector.threshold.threshold * 1.01)
