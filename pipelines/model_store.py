"""Model store: ``<dir>/<name>/<version>/`` checkpoint directories; newest version unless pinned."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from detector.autoencoder import AutoencoderDetector
from detector.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint, sync_path

__all__ = ["LoadedModel", "ModelStore", "new_version_name"]

log = logging.getLogger("anomalyd")

T = TypeVar("T")


def _version_key(name: str) -> tuple:
    """Natural sort: ``v2`` < ``v10``, ``20261126T2000Z`` by time. The time after a date's ``T`` is read left to
    right (``T2000`` is 20:00, as ``T200000000``, after ``T100000000``), whatever its precision (up to 30 digits)."""
    timed = re.sub(r"(\d{8}T)(\d+)", lambda m: m.group(1) + m.group(2).ljust(30, "0"), name)
    key = tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", timed) if part)
    return (*key, name)  # the same time at two precisions: ordered by name, not by the directory's listing


def new_version_name(now: datetime | None = None) -> str:
    """A version directory name that sorts after every earlier one: UTC time to the millisecond."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    path: Path
    detector: AutoencoderDetector


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for every thread, until set back)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


class ModelStore:
    """Read-only view of a model directory; ``save`` writes a new version atomically (rename into place)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def versions(self, name: str) -> list[str]:
        """Complete versions of ``name`` (with weights and metadata files), oldest first. A version copied in by
        hand (``cp -r``, ``kubectl cp``) has ``model.json`` before ``model.safetensors``: it counts once both are
        there (a weights file still being written fails to load, and a reload then keeps the old version)."""
        d = self.root / name
        if not d.is_dir():
            return []
        done = [p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                and (p / META_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]
        return sorted(done, key=_version_key)

    def resolve(self, name: str, version: str | None = None) -> str:
        """The version (newest unless pinned); FileNotFoundError naming what is missing."""
        return self._resolve(name, version, self.versions(name))

    def _resolve(self, name: str, version: str | None, listed: list[str]) -> str:
        if version is not None:
            if version not in listed:
                d = self.root / name / version
                missing = self._missing_files(d) if d.is_dir() else None
                what = f"has no {' or '.join(missing)} (still being copied?)" if missing else "not found"
                raise FileNotFoundError(f"model {name!r} version {version!r} {what} under {self.root / name}")
            return version
        if not listed:
            d = self.root / name
            partial = sorted((p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                              and self._missing_files(p)), key=_version_key) if d.is_dir() else []
            why = "; ".join(f"{v} has no {' or '.join(self._missing_files(d / v))}" for v in partial[-3:])
            raise FileNotFoundError(f"model {name!r} has no versions under {d}"
                                    + (f" ({why}: still being copied?)" if why else ""))
        return listed[-1]

    @staticmethod
    def _missing_files(version_dir: Path) -> list[str]:
        return [f for f in (META_FILE, WEIGHTS_FILE) if not (version_dir / f).is_file()]

    def load(self, name: str, version: str | None = None, device: str = "cpu", fallback: bool = False) -> LoadedModel:
        """The version (newest unless pinned). ``fallback``: when the newest fails to load, the newest older one
        that does, each failure logged (a daemon that starts serves the last good model instead of failing until
        someone removes the bad one); the newest's error when none loads."""
        return self.load_newest(name, version, device, fallback)[1]

    def load_newest(self, name: str, version: str | None = None, device: str = "cpu",
                    fallback: bool = False) -> tuple[str, LoadedModel]:
        """(the newest version, or the pinned one; :meth:`load`'s model), both from one listing of the versions:
        the model is that version, or with ``fallback`` an older one when it does not load."""
        newest, v, detector = self.first_usable(name, version, fallback,
                                                lambda path: load_checkpoint(path, device=device))
        return newest, LoadedModel(name, v, self.root / name / v, detector)

    def first_usable(self, name: str, version: str | None, fallback: bool, use: Callable[[Path], T],
                     say: bool = True) -> tuple[str, str, T]:
        """(newest version, version used, ``use`` of its directory) for the version (newest unless pinned);
        ``fallback``: when ``use`` fails on the newest (OSError, ValueError), the newest older one it does not fail
        on, each failure logged unless not ``say``; the newest's error when it fails on all."""
        listed = self.versions(name)
        v = self._resolve(name, version, listed)
        candidates = [v] if version is not None or not fallback else listed[::-1]  # newest first
        first_error: Exception | None = None
        for i, cand in enumerate(candidates):
            try:
                return v, cand, use(self.root / name / cand)
            except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
                first_error = first_error or exc
                if say and i + 1 < len(candidates):
                    log.error("model %s version %s does not load (%s); trying version %s", name, cand, exc,
                              candidates[i + 1])
        assert first_error is not None
        raise first_error

    def save(self, name: str, detector: AutoencoderDetector, version: str | None = None) -> Path:
        v = version or new_version_name()
        final = self.root / name / v
        if final.exists():
            raise FileExistsError(f"{final} already exists")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{v}.", suffix=".tmp", dir=self.root / name))  # one per save
        tmp.chmod(0o777 & ~_umask())  # as mkdir would (mkdtemp's 0700 hid the version from a daemon of another uid)
        try:
            save_checkpoint(detector, tmp)  # its files as open() makes them: readable by a daemon of another uid
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no hidden half-written directory left behind
            raise
        try:
            tmp.rename(final)  # fails if another save of the same version got there first
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists") from exc
        sync_path(final.parent)  # the rename itself survives a power loss: the version is listed after a reboot
        for directory in (self.root, *self.root.absolute().parents):  # and the directories above it, which this
            sync_path(directory)  # save or an earlier, failed one may have made (a few fsyncs; saves are rare)
        return final
