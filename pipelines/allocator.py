"""Process memory: glibc malloc settings for the daemon's short-lived micro-batch arrays, and the pages of the
CUDA libraries that a CPU-only daemon never reads.

Every poll's due windows are a new (M, W, F) float32 array (10 MB for 5,000 windows at W=64, F=8) that lives
until its micro-batch is scored. glibc hands out blocks above its mmap threshold (128 KiB, raised at run time
as such blocks are freed) as new mmap pages, which the kernel faults in and zeroes on first touch, and it gives
freed memory at the top of the heap back to the kernel above its trim threshold. With both in play, gathering a
poll's windows ran 2.6x slower than into reused memory in a scratch loop (0.39 against 0.15 us/window), and
py-spy of ``python -m benchmarks.intake`` shows the gather's share halved (benchmarks/RESULTS.md, item 31).
:func:`keep_freed_memory` serves blocks up to 16 MiB from the heap and keeps up to 128 MiB of freed heap for
the next ones. Larger arrays (the window buffers of more than about 8,000 streams) still get lazily
zeroed mmap pages, so their unused capacity stays out of the resident set.

Operators keep control: nothing is changed when ``ANOMALYD_MALLOC_TUNING=0`` or when glibc's own
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` malloc settings are in the
environment, and nothing where the C library has no ``mallopt`` (or, like musl, ignores it).

PyPI's torch wheel for Linux is the CUDA build, and ``import torch`` loads every CUDA library it ships (cuBLAS,
cuDNN, NVRTC, nvJitLink, ...), touching their pages even when the models run on the CPU (with torch 2.15 and
CUDA 13, the pipeline benchmark's CPU daemons were 0.27-0.3 GiB smaller once they were released).
:func:`release_cuda_library_pages` asks the kernel to reclaim those pages (``MADV_PAGEOUT`` of the libraries'
read-only mappings: clean file pages, dropped, read back from the file should anything run them). The
daemon calls it at start when its models are on the CPU; ``ANOMALYD_RELEASE_CUDA_PAGES=0`` keeps them. The kernel
does this only for files the process owns or may write (a virtualenv of its own user; not the root-owned CUDA
image run as another user) and only for pages no other process maps. The CPU container image has none of these
libraries (it installs the CPU wheel).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path

__all__ = ["keep_freed_memory", "release_cuda_library_pages", "tune_process_memory", "MMAP_THRESHOLD",
           "TRIM_THRESHOLD"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 16 << 20  # bytes: blocks up to this size come from the heap (a poll's windows: ~10 MiB)
TRIM_THRESHOLD = 128 << 20  # bytes: freed heap kept before any is given back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Apply :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` to this process's malloc; True when applied."""
    env = os.environ if environ is None else environ
    if env.get("ANOMALYD_MALLOC_TUNING", "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if any(k in env for k in _GLIBC_ENV) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        log.debug("malloc settings left as the environment sets them")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc: mmap threshold %d MiB, trim threshold %d MiB: %s", MMAP_THRESHOLD >> 20,
              TRIM_THRESHOLD >> 20, "applied" if applied else "not supported")
    return applied


_MADV_PAGEOUT = 21  # Linux 5.4+ (asm-generic/mman-common.h)
_CUDA_LIBRARY = re.compile(r"/nvidia/|/lib(torch_cuda|cudart|cublas|cudnn|nvrtc|nvJitLink|cusparse|cufft|curand|"
                           r"cusolver|cupti|nccl|nvshmem|cufile|nvToolsExt)[^/]*\.so")


def release_cuda_library_pages(environ: dict[str, str] | None = None, maps: Path = Path("/proc/self/maps")) -> int:
    """Advise the kernel to page out the read-only mappings of the CUDA libraries in this process; returns the
    bytes of the mappings advised (0 when turned off, on another OS, or where the kernel refuses the advice)."""
    env = os.environ if environ is None else environ
    if env.get("ANOMALYD_RELEASE_CUDA_PAGES", "").strip().lower() in ("0", "off", "false", "no"):
        return 0
    try:
        lines = maps.read_text().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    advised = 0
    permitted: dict[str, bool] = {}
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "w" in fields[1] or not _CUDA_LIBRARY.search(fields[5]):
            continue
        if fields[5] not in permitted:
            permitted[fields[5]] = _may_page_out(fields[5])
        if not permitted[fields[5]]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, _MADV_PAGEOUT) != 0:  # EINVAL before Linux 5.4: nothing to gain there
            log.debug("madvise(MADV_PAGEOUT) refused for %s: errno %d", fields[5], ctypes.get_errno())
            return advised
        advised += end - start
    if advised:
        log.debug("CUDA libraries' read-only pages released: %d MiB of mappings", advised >> 20)
    elif permitted:
        log.debug("CUDA libraries' pages kept: the kernel pages out only files this process owns or may write")
    return advised


def _may_page_out(path: str) -> bool:
    """The kernel's rule for MADV_PAGEOUT of file pages: the caller owns the file (or is privileged) or could open
    it for writing; otherwise it silently skips them (a root-owned image's libraries under another user)."""
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return False
    return os.geteuid() in (0, owner) or os.access(path, os.W_OK)


def tune_process_memory(models_on_cpu: bool) -> None:
    """What the daemon applies once at start: :func:`keep_freed_memory`, and with its models on the CPU
    :func:`release_cuda_library_pages`."""
    keep_freed_memory()
    if models_on_cpu:
        release_cuda_library_pages()
