"""glibc malloc settings of the daemon (pipelines.allocator): applied by default, never over the operator's."""

import platform

import pytest

from pipelines.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_applied_on_glibc():
    assert keep_freed_memory({}) is True
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is True  # not a malloc tunable


@pytest.mark.parametrize("env", [
    {"ANOMALYD_MALLOC_TUNING": "0"},
    {"ANOMALYD_MALLOC_TUNING": "off"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
])
def test_left_alone_when_the_operator_sets_malloc(env):
    assert keep_freed_memory(env) is False
