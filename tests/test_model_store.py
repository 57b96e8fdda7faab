"""The model store and the served models: versions, atomic saves, reloads that fail or are refused, starting on the
newest version that loads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch
import yaml

from pipelines.model_store import ModelStore, new_version_name


def test_model_store_newest_version_and_pinning(trained, tmp_path):
    store = ModelStore(tmp_path)
    v1 = store.save("m", trained["gru"], version="v2").name
    v2 = store.save("m", trained["gru"], version="v10").name
    (tmp_path / "m" / ".v99.tmp").mkdir()  # incomplete writes are ignored
    (tmp_path / "m" / "v98").mkdir()
    (tmp_path / "m" / "v98" / "model.json").write_text("{}")  # copied in by hand, weights not there yet
    assert store.versions("m") == [v1, v2] and store.resolve("m") == "v10"
    assert store.load("m", "v2").version == "v2"
    with pytest.raises(FileNotFoundError, match="version 'v3' not found"):
        store.resolve("m", "v3")
    with pytest.raises(FileExistsError):
        store.save("m", trained["gru"], version="v10")
    from pipelines.model_store import _umask

    assert (tmp_path / "m" / "v10").stat().st_mode & 0o777 == 0o777 & ~_umask()  # as mkdir: another uid reads it
    for name in ("model.json", "model.safetensors"):  # and its files, as open() makes them (safetensors: 0600)
        assert (tmp_path / "m" / "v10" / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
    early = new_version_name(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
    late = new_version_name(datetime(2026, 1, 2, 3, 4, 5, 7000, tzinfo=UTC))
    assert early == "20260102T030405006Z" and early < late


def test_versions_named_by_time_sort_by_time_whatever_their_precision():
    """train's versions (milliseconds) beside hand-named ones (minutes, seconds): read as numbers, T100000000
    (10:00) came after T2000 (20:00), and the daemon served the older model as the newest."""
    from pipelines.model_store import _version_key

    names = ["20261126T100000000Z", "20261126T200000Z", "20261126T2000Z", "20261126T0930Z", "20261125T235959999Z",
             "20261126T2001Z", "v2", "v10", "20261126T100000000000Z", "v20261126T10", "v20261126T1"]
    assert sorted(names, key=_version_key) == [
        "20261125T235959999Z", "20261126T0930Z", "20261126T100000000000Z", "20261126T100000000Z", "20261126T200000Z",
        "20261126T2000Z", "20261126T2001Z", "v2", "v10", "v20261126T1", "v20261126T10"]


def test_a_model_version_that_fails_to_load_leaves_the_old_one_served(trained, tmp_path):
    import shutil

    from pipelines.config import load_config
    from pipelines.daemon import Daemon

    store = ModelStore(tmp_path / "models")
    old = store.save("gru", trained["gru"], version="v1")
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [], "default_models": ["gru"], "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["t"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    new = tmp_path / "models" / "gru" / "v2"
    new.mkdir()
    shutil.copy(old / "model.json", new / "model.json")
    (new / "model.safetensors").write_bytes((old / "model.safetensors").read_bytes()[:100])  # still being copied
    daemon.request_reload()  # SIGHUP
    daemon._maybe_reload()
    refused = lambda: daemon.registry.get_sample_value("anomalyd_model_versions_refused")  # noqa: E731
    assert daemon.models.loaded["gru"].version == "v1" and daemon.routes[0].version == "v1"
    assert daemon.registry.get_sample_value("anomalyd_model_reload_failures_total") == 1 and refused() == 1
    daemon._last_reload_check -= 3600  # the watch interval passed: the same files are not tried (and counted) again
    daemon._maybe_reload()
    assert daemon.registry.get_sample_value("anomalyd_model_reload_failures_total") == 1
    assert refused() == 1  # the counter moved once; the gauge stays up while v2 is refused
    shutil.copy(old / "model.safetensors", new / "model.safetensors")  # the copy completes: tried at the next check
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.loaded["gru"].version == "v2" and daemon.routes[0].version == "v2" and refused() == 0
    # a version with other features: every message would be dead-lettered; a reload refuses it (a restart serves it)
    import copy

    renamed = copy.deepcopy(trained["gru"])
    renamed.feature_names = list(reversed(renamed.feature_names))
    store.save("gru", renamed, version="v3")
    daemon.request_reload()
    daemon._maybe_reload()
    assert daemon.models.loaded["gru"].version == "v2"
    assert daemon.registry.get_sample_value("anomalyd_model_reload_failures_total") == 2 and refused() == 1
    shutil.rmtree(tmp_path / "models" / "gru" / "v3")  # taken away: v2 is the newest again
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.loaded["gru"].version == "v2" and refused() == 0
    # a swap that fails (CUDA out of memory while both versions are on the device) leaves v2 served, counted
    store.save("gru", trained["gru"], version="v4")

    def out_of_memory(_models):
        raise torch.OutOfMemoryError("CUDA out of memory")

    real_swap, daemon.engine.swap = daemon.engine.swap, out_of_memory
    daemon.request_reload()
    daemon._maybe_reload()  # raised out of the loop: the daemon stopped
    assert daemon.models.loaded["gru"].version == "v2" and daemon.routes[0].version == "v2"
    assert daemon.registry.get_sample_value("anomalyd_model_reload_failures_total") == 3 and refused() == 1
    daemon._last_reload_check -= 3600  # not swapped again at every watch interval (loading v4 onto a full device)
    daemon._maybe_reload()
    assert daemon.registry.get_sample_value("anomalyd_model_reload_failures_total") == 3 and refused() == 1
    daemon.engine.swap = real_swap
    daemon.request_reload()
    daemon._maybe_reload()
    assert daemon.models.loaded["gru"].version == "v4" and daemon.routes[0].version == "v4" and refused() == 0

    def swap_while_training(models):  # a version saved while a reload swaps in v5: newer, not refused
        store.save("gru", trained["gru"], version="v6")
        real_swap(models)

    store.save("gru", trained["gru"], version="v5")
    daemon.engine.swap = swap_while_training
    daemon.request_reload()
    daemon._maybe_reload()
    assert daemon.models.loaded["gru"].version == "v5" and refused() == 0


def test_a_daemon_starts_on_the_newest_version_that_loads(trained, tmp_path, caplog):
    """A corrupt newest version (a restart after a bad copy) no longer stops every start while a good older one is
    there; pinned, it still does. And a save that fails leaves no hidden half-written directory behind."""
    from pipelines.config import load_config
    from pipelines.daemon import Daemon

    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"], version="v1")
    bad = store.save("gru", trained["gru"], version="v2")
    (bad / "model.safetensors").write_bytes(b"not weights")
    cfg = {"models": {"dir": str(tmp_path / "models"), "served": [{"name": "gru"}], "device": "cpu"},
           "routes": [], "default_models": ["gru"], "sinks": {"kafka": {"enabled": False}}, "kafka": {"topics": ["t"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(tmp_path / "c.yaml"))
    assert daemon.models.loaded["gru"].version == "v1"
    assert "model gru version v2 does not load" in caplog.text
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 1
    cfg["models"]["served"] = [{"name": "gru", "version": "v2"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="safetensors"):
        Daemon(load_config(tmp_path / "c.yaml"))
    (bad / "model.safetensors").unlink()  # pinned, and its weights not there (yet): said so, not "not found"
    with pytest.raises(FileNotFoundError, match="version 'v2' has no model.safetensors"):
        store.resolve("gru", "v2")
    with pytest.raises(FileNotFoundError, match="version 'v9' not found"):
        store.resolve("gru", "v9")
    with pytest.raises(AttributeError):
        store.save("gru", object(), version="v3")  # not a detector: the checkpoint cannot be written
    assert sorted(p.name for p in (tmp_path / "models" / "gru").iterdir()) == ["v1", "v2"]


def _daemon(tmp_path, served, routes, default, stride=1):
    from pipelines.config import load_config
    from pipelines.daemon import Daemon

    cfg = {"models": {"dir": str(tmp_path / "models"), "served": served, "device": "cpu"}, "routes": routes,
           "default_models": default, "processing": {"stride": stride}, "sinks": {"kafka": {"enabled": False}},
           "kafka": {"topics": ["t"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return Daemon(load_config(tmp_path / "c.yaml"))


def test_each_model_reloads_on_its_own(trained, tmp_path, caplog):
    """One model's bad version kept every other model on its old version until it was fixed; a model whose versions
    were all taken away failed every reload (counted at each watch interval) and hid the other's refusal."""
    import copy
    import shutil

    store = ModelStore(tmp_path / "models")
    for name, kind in (("a", "gru"), ("b", "lstm")):
        store.save(name, trained[kind], version="v1")
    daemon = _daemon(tmp_path, [{"name": "a"}, {"name": "b"}], [{"match": "a-*", "models": ["a"]}], ["b"], stride=2)
    failures = lambda: daemon.registry.get_sample_value("anomalyd_model_reload_failures_total")  # noqa: E731
    refused = lambda: daemon.registry.get_sample_value("anomalyd_model_versions_refused")  # noqa: E731
    bad = store.save("a", trained["gru"], version="v2")
    (bad / "model.safetensors").write_bytes(b"not weights")
    store.save("b", trained["lstm"], version="v2")
    daemon.request_reload()
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v1", "b": "v2"} and failures() == 1 and refused() == 1
    assert {r.spec.models: r.version for r in daemon.routes} == {("a",): "v1", ("b",): "v2"}
    assert "a: " in caplog.text and "safetensors" in caplog.text
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert failures() == 1 and refused() == 1  # a's v2 is not tried again until its files change
    for v in ("v1", "v2"):
        shutil.rmtree(tmp_path / "models" / "b" / v)  # all of b's versions taken away: b v2 still served
    for _ in range(2):
        daemon._last_reload_check -= 3600
        daemon._maybe_reload()
        assert daemon.models.versions() == {"a": "v1", "b": "v2"} and failures() == 2 and refused() == 1
    store.save("b", trained["lstm"], version="v3")
    short = copy.deepcopy(trained["gru"])
    short.score_last_k = 1  # stride 2 would leave every other event unscored: its route refuses it, b reloads
    store.save("a", short, version="v3")
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v1", "b": "v3"} and failures() == 3 and refused() == 1
    assert "processing.stride: 2 is larger than the 1 last steps" in caplog.text
    store.save("a", trained["gru"], version="v4")
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v4", "b": "v3"} and failures() == 3 and refused() == 0


def test_a_refused_copy_is_tried_again_once_it_completes(trained, tmp_path, monkeypatch):
    """The refused files were looked at after the failed load: a copy that completed meanwhile was taken as the
    refused one, and never tried again until SIGHUP."""
    import pipelines.model_store as model_store

    store = ModelStore(tmp_path / "models")
    good = store.save("gru", trained["gru"], version="v1")
    daemon = _daemon(tmp_path, [{"name": "gru"}], [], ["gru"])
    new = tmp_path / "models" / "gru" / "v2"
    new.mkdir()
    (new / "model.json").write_bytes((good / "model.json").read_bytes())
    (new / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    real = model_store.load_checkpoint

    def load_while_the_copy_completes(path, **kw):
        try:
            return real(path, **kw)
        finally:
            (new / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())

    monkeypatch.setattr(model_store, "load_checkpoint", load_while_the_copy_completes)
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.versions() == {"gru": "v1"}
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.versions() == {"gru": "v2"}
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 0


def test_a_version_saved_while_starting_is_not_counted_refused(trained, tmp_path, monkeypatch):
    """The newest was listed before the load listed the versions again: a version saved in between was served and
    counted as refused (and `anomalyd check` asked to remove the good older one)."""
    from pipelines.check_cmd import _check_newest_versions

    store = ModelStore(tmp_path / "models")
    store.save("gru", trained["gru"], version="v1")
    real, calls = ModelStore.versions, []

    def versions_then_save(self, name):
        out = real(self, name)
        if not calls:
            calls.append(name)
            store.save("gru", trained["gru"], version="v2")  # a train Job saves right after the first listing
        return out

    monkeypatch.setattr(ModelStore, "versions", versions_then_save)
    daemon = _daemon(tmp_path, [{"name": "gru"}], [], ["gru"])
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 0
    assert daemon.models.behind() == {}
    _check_newest_versions(daemon.cfg, daemon)  # no ConfigError


def test_a_version_without_its_weights_at_start_is_named(trained, tmp_path):
    from pipelines.config import ConfigError

    store = ModelStore(tmp_path / "models")
    only = store.save("gru", trained["gru"], version="v1")
    (only / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"models.served\[0\]: model 'gru': .*v1 has no model.safetensors"):
        _daemon(tmp_path, [{"name": "gru"}], [], ["gru"])


def _rewindowed(det, window: int):
    """``det`` as if trained for ``window`` (an RNN's weights do not depend on the window)."""
    import copy
    import dataclasses

    out = copy.deepcopy(det)
    out.model_cfg = dataclasses.replace(det.model_cfg, window=window)
    out.window = window
    return out


def test_a_route_whose_models_change_window_one_after_the_other_reloads_once_both_are_there(trained, tmp_path):
    """Per-model refusals kept a route's first retrained model refused (its files unchanged) when the second one
    arrived, and refused the second beside the first: both stayed on their old window until SIGHUP."""
    store = ModelStore(tmp_path / "models")
    for name, kind in (("a", "gru"), ("b", "lstm"), ("c", "gru")):
        store.save(name, trained[kind], version="v1")
    daemon = _daemon(tmp_path, [{"name": "a"}, {"name": "b"}, {"name": "c"}], [{"match": "c-*", "models": ["c"]}],
                     ["a", "b"])
    refused = lambda: daemon.registry.get_sample_value("anomalyd_model_versions_refused")  # noqa: E731
    failures = lambda: daemon.registry.get_sample_value("anomalyd_model_reload_failures_total")  # noqa: E731

    def tick() -> dict[str, str]:
        daemon._last_reload_check -= 3600
        daemon._maybe_reload()
        return {n: v for n, v in daemon.models.versions().items() if n != "c"}

    store.save("a", _rewindowed(trained["gru"], 16), version="v2")
    assert tick() == {"a": "v1", "b": "v1"} and refused() == 1
    assert tick() == {"a": "v1", "b": "v1"} and failures() == 1  # not tried again
    store.save("c", trained["gru"], version="v2")  # another route's model: a's v2 is not tried (and counted) again
    assert tick() == {"a": "v1", "b": "v1"} and failures() == 1 and daemon.models.versions()["c"] == "v2"
    new = store.save("b", _rewindowed(trained["lstm"], 16), version="v2")
    whole = (new / "model.safetensors").read_bytes()
    (new / "model.safetensors").write_bytes(whole[:200])  # still being copied: b v2 does not load yet
    assert tick() == {"a": "v1", "b": "v1"}
    (new / "model.safetensors").write_bytes(whole)  # the copy completes: both swap at the next tick
    assert tick() == {"a": "v2", "b": "v2"} and refused() == 0
    assert {r.spec.models: r.models[0].detector.window for r in daemon.routes} == {("c",): 32, ("a", "b"): 16}


def test_a_routes_good_new_version_is_not_held_back_by_a_bad_one(trained, tmp_path):
    """Both of a route's changed models were refused when one did not fit: the good one waited for SIGHUP, even
    after the bad one was taken away."""
    import shutil

    store = ModelStore(tmp_path / "models")
    store.save("a", trained["gru"], version="v1")
    store.save("b", trained["lstm"], version="v1")
    daemon = _daemon(tmp_path, [{"name": "a"}, {"name": "b"}], [], ["a", "b"])
    store.save("a", _rewindowed(trained["gru"], 16), version="v2")
    store.save("b", trained["lstm"], version="v2")
    daemon.request_reload()
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v1", "b": "v2"}
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 1
    shutil.rmtree(tmp_path / "models" / "a" / "v2")
    daemon._last_reload_check -= 3600
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v1", "b": "v2"}
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 0
    store.save("a", _rewindowed(trained["gru"], 16), version="v3")
    daemon.request_reload()  # SIGHUP reads b v2 again too: only a, whose version changes, is named refused
    daemon._maybe_reload()
    assert daemon.models.versions() == {"a": "v1", "b": "v2"} and set(daemon.models._refused) == {"a"}


def test_routes_that_share_a_model_reload_together_once_all_are_retrained(trained, tmp_path):
    """Routes a+b and b+c, retrained to a new window a and b first, then c: a was refused because b went back for
    route b+c, and a's refusal waited for its direct mate b only, so all three stayed on the old window until SIGHUP."""
    store = ModelStore(tmp_path / "models")
    for name in "abc":
        store.save(name, trained["gru"], version="v1")
    daemon = _daemon(tmp_path, [{"name": n} for n in "abc"],
                     [{"match": "x-*", "models": ["a", "b"]}, {"match": "y-*", "models": ["b", "c"]}], [])

    def tick() -> dict[str, str]:
        daemon._last_reload_check -= 3600
        daemon._maybe_reload()
        return daemon.models.versions()

    for name in "ab":
        store.save(name, _rewindowed(trained["gru"], 16), version="v2")
    assert tick() == {"a": "v1", "b": "v1", "c": "v1"}
    store.save("c", _rewindowed(trained["gru"], 16), version="v2")
    assert tick() == {"a": "v2", "b": "v2", "c": "v2"}
    assert daemon.registry.get_sample_value("anomalyd_model_versions_refused") == 0


def test_a_saved_version_is_on_the_disk_after_its_rename(trained, tmp_path, monkeypatch):
    """The version directory's rename is flushed (the model's directory fsynced after it), and so is every
    directory above it, any of which this save or an earlier, failed one may have made, so that a version the
    trainer reported saved is still listed after a power loss."""
    import os

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "models" / "deep"
    ModelStore(root).save("m", trained["gru"], version="v1")
    after = synced[synced.index(str(root / "m")):]  # after the checkpoint's own files: from the rename on
    assert after[:4] == [str(root / "m"), str(root), str(tmp_path / "models"), str(tmp_path)] and after[-1] == "/"
