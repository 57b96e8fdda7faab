"""Building and caching small C++ extensions (the fused kernels, the native decoder) once per machine.

``compile_cached`` compiles with ``torch.utils.cpp_extension`` into ``$ANOMALYD_CACHE/torch_extensions`` (default
``~/.cache/anomalyd``) under a build name that hashes whatever the build depends on, one process at a time
(a file lock); ``import_built`` loads a build made ahead of time where there is no compiler. A failed build
leaves a marker, so that every process does not pay for it again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

from .filelock import exclusive_lock

__all__ = ["compile_cached", "import_built", "build_dir", "compiler", "FAILED_RETRY_S"]

FAILED_RETRY_S = 24 * 3600  # a failed build is tried again after this long, or at once with another compiler


def build_dir() -> Path:
    """Where extensions are built and cached: ``$ANOMALYD_CACHE/torch_extensions``."""
    root = Path(os.environ.get("ANOMALYD_CACHE") or Path.home() / ".cache" / "anomalyd").expanduser()
    return root / "torch_extensions"


def compiler() -> str | None:
    """The C++ compiler a build uses ($CXX, else c++), resolved to its file; None when there is none."""
    found = shutil.which(os.environ.get("CXX", "c++"))
    return os.path.realpath(found) if found else None


def _earlier_failure(failed: Path, cxx: str) -> str | None:
    """The error of a failed build that still stands: with the same compiler, less than FAILED_RETRY_S ago."""
    try:
        record = json.loads(failed.read_text())
        if record["compiler"] == cxx and time.time() - failed.stat().st_mtime < FAILED_RETRY_S:
            return str(record["error"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no marker, or one this version did not write: build
    return None


def _check_trusted(path: Path) -> None:
    """Refuse to load code from ``path`` (and the folders from the cache root down to it) when another user could
    have put it there: owned by someone other than this user or root, or writable by others (a shared cache).
    RuntimeError naming the path; the callers then run without the extension."""
    root = build_dir().parent
    chain = [p for p in (path, *path.parents) if p == root or root in p.parents]
    for p in chain:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # not built yet: the build creates it
        if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o002:
            who = "writable by every user" if st.st_mode & 0o002 else f"owned by uid {st.st_uid}"
            raise RuntimeError(f"not loading native code from {path}: {p} is {who} (ANOMALYD_CACHE must be this "
                               "user's or root's, and not writable by others)")


def import_built(name: str) -> ModuleType | None:
    """The extension ``name`` built earlier under the cache folder, imported without a compiler; None if absent."""
    path = build_dir() / name / f"{name}.so"
    if not path.exists():
        return None
    _check_trusted(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_cached(name: str, sources: list[Path], cflags: list[str], ldflags: list[str],
                   headers: list[Path] | None = None) -> ModuleType:
    """Compile (or find up to date) and import the C++ extension ``name`` under the cache folder, with
    ``torch.utils.cpp_extension``. ``name`` is the build key: hash into it whatever the build depends on. The
    sources and the ``headers`` they include are copied into the build folder first and compiled from there, so
    that a checkout elsewhere with the same files (a worktree, a reinstall) finds the build up to date instead of
    recompiling it. A failed build leaves ``<name>.failed`` (compiler and error), and is not tried again with the
    same compiler for ``FAILED_RETRY_S``. Raises RuntimeError without a compiler or after a failure."""
    from torch.utils.cpp_extension import load

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or $CXX) on PATH")
    where = build_dir() / name
    failed = where.with_suffix(".failed")
    if error := _earlier_failure(failed, cxx):
        raise RuntimeError(f"a build with {cxx} failed less than {FAILED_RETRY_S // 3600} h ago (delete "
                           f"{failed} to try again now): {error[-500:]}")
    where.mkdir(parents=True, exist_ok=True)
    _check_trusted(where / f"{name}.so")  # torch imports a build it finds up to date, whoever made it
    with exclusive_lock(where.with_suffix(".lock")):
        (where / "lock").unlink(missing_ok=True)  # torch's own lock file, stale if a builder was killed
        staged = [_staged(path, where / "src") for path in sources]
        for header in headers or []:
            _staged(header, where / "src")  # beside the sources, where their #include "..." finds it
        try:
            module = load(name, [str(p) for p in staged], extra_cflags=cflags, extra_ldflags=ldflags,
                          build_directory=str(where), verbose=False)
        except Exception as exc:
            failed.write_text(json.dumps({"compiler": cxx, "error": f"{type(exc).__name__}: {exc}"}))
            raise
        failed.unlink(missing_ok=True)
        return module


def _staged(path: Path, folder: Path) -> Path:
    """``path`` copied into ``folder`` (rewritten only when its bytes differ, so ninja sees no change)."""
    folder.mkdir(exist_ok=True)
    copy, data = folder / path.name, path.read_bytes()
    if not copy.exists() or copy.read_bytes() != data:
        copy.write_bytes(data)
    return copy
