"""What a test needs that a machine may lack (a service, a tool, a compiler): skipped on a developer's machine
without it, a failure under ``CI=true``, where the project's own setup must have installed everything."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

__all__ = ["on_ci", "unavailable", "need_cxx"]


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI=true; never returns."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: every test dependency must be installed)", pytrace=False)
    pytest.skip(reason)


def need_cxx() -> None:
    """The C++ compiler that builds the native extensions (the fused kernels, the decoder): ``$CXX`` or ``c++``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        unavailable(f"no C++ compiler ({cxx}) to build the native extensions")
