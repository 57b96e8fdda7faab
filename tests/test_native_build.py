"""detector.native_build: where native code is loaded from."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_native_code_is_not_loaded_from_a_cache_other_users_can_write(tmp_path: Path, monkeypatch) -> None:
    """A shared, world-writable ANOMALYD_CACHE let anyone plant the .so a daemon imports under a predictable name."""
    from detector import native_build

    monkeypatch.setenv("ANOMALYD_CACHE", str(tmp_path / "cache"))
    built = tmp_path / "cache" / "torch_extensions" / "ext" / "ext.so"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"not a shared object")
    (tmp_path / "cache").chmod(0o777)
    with pytest.raises(RuntimeError, match="cache is writable by every user"):
        native_build.import_built("ext")
    (tmp_path / "cache").chmod(0o755)
    built.chmod(0o666)
    with pytest.raises(RuntimeError, match="ext.so is writable by every user"):
        native_build.import_built("ext")
    built.chmod(0o644)
    with pytest.raises(ImportError):  # trusted: imported (and this one is no extension)
        native_build.import_built("ext")
