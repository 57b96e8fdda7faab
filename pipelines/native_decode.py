"""The native fast path of :func:`pipelines.decode.decode_batch` (``_decode_fast.cpp``), built once per machine.

The Python decoder spends about 2.3 us per message, of which ``orjson.loads`` is 0.65 us and the rest is
per-message Python (type checks, lookups, list appends). The extension parses a whole poll batch of messages of
the common shapes ``{"stream": ..., "ts": <int>, "values": [numbers]}`` and ``"values": {name: number}`` into
arrays without the GIL, and hands every other message back to the Python decoder, which accepts or rejects it as
before (so results do not depend on whether the extension is present; ``tests/test_native_decode.py`` checks that
on generated and hand-written messages, and ``tests/test_decode.py`` runs with and without it). The same
extension's ``message_columns`` turns a confluent-kafka poll into its columns in one pass
(``pipelines.source_confluent.ConfluentSource``).

Built like the fused kernels (``detector.native_build.compile_cached``): on first use, into
``$ANOMALYD_CACHE/torch_extensions``, keyed by source, flags, torch and Python; portable code (no ``-march``), so
a build made ahead of time (``python -m pipelines.native_decode build``, as the container image does) is loaded
where there is no compiler. ``ANOMALYD_NATIVE_DECODE``: ``0``/``off`` never uses it, ``1``/``on`` requires it
(an error when it cannot be built), unset/``auto`` uses it when it can be built.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["NativeDecodeUnavailable", "load", "mode", "decode_common", "MAX_FEATURES"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_decode_fast.cpp")
# the baseline instruction set, named: a compiler configured for a higher default (RHEL 9: x86-64-v2, RHEL 10: v3)
# would otherwise make an image's prebuilt decoder die of SIGILL on older CPUs
CFLAGS = ["-O2", *(["-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else [])]
MAX_FEATURES = 256
"""Messages with more values than this go to the Python decoder (models are far narrower)."""
_STATE: dict[str, object] = {}  # "module" or "error", once per process


class NativeDecodeUnavailable(RuntimeError):
    """The native decoder was required (``ANOMALYD_NATIVE_DECODE=on``) but cannot be built or loaded."""


def mode() -> str:
    """``auto`` | ``on`` | ``off`` from ``ANOMALYD_NATIVE_DECODE``."""
    from detector.fastpath import env_mode

    return env_mode("ANOMALYD_NATIVE_DECODE")


def _name() -> str:
    import torch  # its pybind11 headers and ABI are part of the build

    key = "\n".join([SOURCE.read_text(), " ".join(CFLAGS), torch.__version__, sys.version])
    return "anomalyd_decode_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def load() -> ModuleType | None:
    """The extension, built first if needed; None when it is off or cannot be had (then the Python decoder runs).
    Raises :class:`NativeDecodeUnavailable` when ``ANOMALYD_NATIVE_DECODE=on`` and it cannot be had."""
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    required = mode()
    if required == "off":
        return None
    if "error" not in _STATE:
        from detector.native_build import compile_cached, import_built

        name = _name()
        try:
            try:
                module = compile_cached(name, [SOURCE], CFLAGS, [])  # under its lock: never a half-written build
            except RuntimeError as exc:
                module = import_built(name)  # no compiler (the image's runtime): a build made ahead of time
                if module is None:
                    raise RuntimeError(f"{exc}, and no build of this version made ahead of time (python -m "
                                       "pipelines.native_decode build)") from None
        except Exception as exc:  # no compiler and no build, build error, import error: the Python decoder
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("native JSON decoder unavailable, decoding in Python: %s", _STATE["error"])
        else:
            log.info("native JSON decoder: %s", module.__file__)
            _STATE["module"] = module
            return module
    if required == "on":
        raise NativeDecodeUnavailable(f"ANOMALYD_NATIVE_DECODE=on but the decoder is unavailable: {_STATE['error']}")
    return None


Rows = tuple[np.ndarray, list[str], np.ndarray, np.ndarray]
"""A group's positions (N,) int64, streams (N), ts (N,) int64 epoch ms and values (N, F) float32, in input order."""


def decode_common(module: ModuleType, values: Sequence[bytes | None], max_bytes: int,
                  spec_of: Callable[[str], Hashable | None], columns: Callable[[Hashable], Mapping[str, int]],
                  ) -> tuple[dict[Hashable, Rows], list[tuple[int, str]], list[int]]:
    """The messages of the common shapes, decoded natively and grouped by ``spec_of(stream)`` (None = unrouted;
    ``columns(spec)`` = its feature name -> column): ``(groups, unrouted (position, stream), positions left to
    the Python decoder, sorted)``. A message whose values do not fit its spec (a values array of another length;
    a values object with an unknown or repeated name) is left to the Python decoder too."""
    pos, streams, ts, counts, flat, layout, layouts, slow = module.decode(
        values if type(values) is list else list(values), max_bytes, MAX_FEATURES)
    k = len(streams)
    groups: dict[Hashable, Rows] = {}
    unrouted: list[tuple[int, str]] = []
    if not k:
        return groups, unrouted, slow
    specs = list(map(spec_of, streams))
    first = specs[0]
    members: dict[Hashable, list[int] | None] = {}
    if specs.count(first) == k:  # the common case: every stream goes to models with the same features
        members[first] = None
    else:
        for j, spec in enumerate(specs):
            members.setdefault(spec, []).append(j)
    for spec, rows in members.items():
        idx = np.arange(k) if rows is None else np.array(rows, dtype=np.int64)  # (M,) rows of this spec
        if spec is None:  # counted, not decoded further; but a values name that is not UTF-8 is a dead letter
            bad = np.array([lay >= 0 and layouts[lay] is None for lay in layout[idx].tolist()], dtype=bool)
            if bad.any():
                slow.extend(pos[idx[bad]].tolist())
                idx = idx[~bad]
            unrouted.extend(zip(pos[idx].tolist(), [streams[j] for j in idx.tolist()], strict=True))
            continue
        index = columns(spec)
        f = len(index)
        lay = layout[idx]  # (M,) -1: an array of values, else the object layout's id
        lo, hi = int(lay.min()), int(lay.max())
        shapes = [lo] if lo == hi else np.unique(lay).tolist()  # one shape (the usual case) without a sort
        if rows is None and shapes == [-1] and (counts == f).all():  # arrays, all complete: the (K, F) block
            groups[spec] = (pos, streams, ts, flat.reshape(k, f))
            continue
        one_layout = rows is None and len(shapes) == 1 and shapes[0] >= 0  # every row a values object, one layout
        if one_layout and (perm := _columns_of(layouts[shapes[0]], index)) is not None:
            block = np.full((k, f), np.nan, dtype=np.float32)  # (K, F): one values layout, features absent = NaN
            block[:, perm] = flat.reshape(k, len(perm))
            groups[spec] = (pos, streams, ts, block)
            continue
        block, ok = _rows(idx, counts, flat, layout, layouts, shapes, index)
        if not ok.all():
            slow.extend(pos[idx[~ok]].tolist())
            idx, block = idx[ok], block[ok]
        if len(idx):
            groups[spec] = (pos[idx], [streams[j] for j in idx.tolist()], ts[idx], block)
    slow.sort()
    return groups, unrouted, slow


def _columns_of(names: tuple[str, ...] | None, index: Mapping[str, int]) -> np.ndarray | None:
    """The columns of a values object's names (message order), or None where a name is unknown or repeated."""
    if names is None:
        return None
    cols = [index.get(name) for name in names]
    if None in cols or len(set(cols)) != len(cols):
        return None
    return np.array(cols, dtype=np.int64)


def _rows(idx: np.ndarray, counts: np.ndarray, flat: np.ndarray, layout: np.ndarray, layouts: list,
          shapes: list[int], index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(M, F) values of rows ``idx`` in column order, and (M,) which rows fit (the others go to Python)."""
    f = len(index)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[idx]  # (M,) each row's first value in flat
    lay, cnt = layout[idx], counts[idx]
    block = np.full((len(idx), f), np.nan, dtype=np.float32)  # (M, F)
    ok = np.ones(len(idx), dtype=bool)
    for shape in shapes:
        sel = np.flatnonzero(lay == shape)
        if shape < 0:  # arrays: as long as the spec, in its order
            bad = cnt[sel] != f
            ok[sel[bad]] = False
            sel = sel[~bad]
            block[sel] = flat[starts[sel][:, None] + np.arange(f)]
        elif (perm := _columns_of(layouts[shape], index)) is None:
            ok[sel] = False
        else:
            sub = np.full((len(sel), f), np.nan, dtype=np.float32)
            sub[:, perm] = flat[starts[sel][:, None] + np.arange(len(perm))]
            block[sel] = sub
    return block, ok


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.native_decode build``: build (or find) the extension; exit 1 when it cannot be had."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipelines.native_decode", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build"])
    p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    os.environ["ANOMALYD_NATIVE_DECODE"] = "auto"
    module = load()
    if module is None:
        print(f"native JSON decoder unavailable: {_STATE.get('error')}", file=sys.stderr)
        return 1
    print(f"native JSON decoder ready: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
