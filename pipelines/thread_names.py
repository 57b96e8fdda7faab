"""The daemon's Python thread names as the kernel's thread names, so that ``top -H``, ``ps -L``, py-spy and
``python -m benchmarks.cpu_sampler`` tell its threads apart (before Python 3.14 every thread keeps the process's
name). Linux only; elsewhere nothing happens."""

from __future__ import annotations

import ctypes
import sys
import threading

__all__ = ["name_this_thread"]

_PR_SET_NAME = 15  # linux/prctl.h
_prctl = None


def name_this_thread(name: str | None = None) -> bool:
    """Give the calling thread the kernel name ``name`` (default: its Python name), cut to the kernel's 15 bytes;
    True when the kernel took it."""
    global _prctl
    if not sys.platform.startswith("linux"):
        return False
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return False
    raw = (name or threading.current_thread().name).encode()[:15]
    return _prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
