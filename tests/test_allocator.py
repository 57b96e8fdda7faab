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


def test_cuda_pages_kept_when_turned_off_and_nothing_without_cuda_libraries(tmp_path):
    from pipelines.allocator import release_cuda_library_pages

    assert release_cuda_library_pages({"ANOMALYD_RELEASE_CUDA_PAGES": "0"}) == 0
    maps = tmp_path / "maps"
    maps.write_text("7f0000000000-7f0000100000 r-xp 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f0000200000-7f0000300000 rw-p 00000000 08:01 99 /opt/nvidia/cu13/lib/libcublas.so.13\n"
                    "7f0000400000-7f0000500000 rw-p 00000000 00:00 0\n")
    assert release_cuda_library_pages({}, maps) == 0  # libc is no CUDA library; a writable mapping is never advised


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc and MADV_PAGEOUT are Linux's")
def test_cuda_library_pages_released_after_import_torch_and_torch_still_runs():
    """In a fresh process: with the CUDA wheel (PyPI's), the CUDA libraries' pages leave its resident set and the
    CPU path still computes; with a CPU-only torch there is nothing to release. The kernel reclaims only pages
    no other process maps, so this test runner, which imports torch too, releases its own pages first (as a
    daemon alone in its container has nobody to share them with)."""
    import subprocess
    import sys

    from pipelines.allocator import release_cuda_library_pages

    release_cuda_library_pages({})

    code = """
import re, torch
from pipelines.allocator import _CUDA_LIBRARY, release_cuda_library_pages
def private_cuda_kib():
    total, cuda = 0, False
    for line in open('/proc/self/smaps'):
        if re.match(r'^[0-9a-f]+-[0-9a-f]+ ', line):
            fields = line.split(maxsplit=5)
            cuda = len(fields) == 6 and 'w' not in fields[1] and bool(_CUDA_LIBRARY.search(fields[5]))
        elif cuda and line.startswith('Private_Clean:'):
            total += int(line.split()[1])
    return total
x = torch.randn(64, 64)
want = (x @ x).sum().item()
before = private_cuda_kib()
advised = release_cuda_library_pages({})
after = private_cuda_kib()
assert (x @ x).sum().item() == want
print(advised, before, after, torch.version.cuda is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    advised, before, after, cuda_build = out.stdout.split()
    if cuda_build == "True":
        assert int(advised) > 0 and int(after) <= int(before), out.stdout
        if int(before) > 50 * 1024:  # else another process on the machine (a daemon, a test run) maps them too:
            assert int(after) < int(before) // 10, out.stdout  # shared pages stay (the next test covers that case)
    else:
        assert int(advised) == 0


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc and MADV_PAGEOUT are Linux's")
def test_the_release_pages_out_a_library_mapping_only_this_process_holds(tmp_path):
    """The release on a file of its own under an ``nvidia/`` path, mapped and read by this process alone: its
    resident pages go, whatever else runs on the machine."""
    import mmap
    import os
    import re

    from pipelines.allocator import release_cuda_library_pages

    (tmp_path / "nvidia" / "lib").mkdir(parents=True)
    path = tmp_path / "nvidia" / "lib" / "libstand-in.so.1"
    with open(path, "wb") as f:
        f.write(os.urandom(16 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages, as a library's are

    def resident_kib() -> int:
        total, ours = 0, False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    ours = line.rstrip().endswith(str(path))
                elif ours and line.startswith("Rss:"):
                    total += int(line.split()[1])
        return total

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        checksum = sum(mapped[i] for i in range(0, len(mapped), 4096))  # every page resident
        before = resident_kib()
        advised = release_cuda_library_pages({})
        after = resident_kib()
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == checksum  # read back from the file
    assert before >= 15 * 1024 and advised >= 16 << 20 and after < before // 10, (before, advised, after)


@pytest.mark.skipif(platform.system() != "Linux", reason="the kernel's MADV_PAGEOUT rule is Linux's")
def test_page_out_is_asked_only_for_files_the_process_owns_or_may_write():
    """Linux pages out file pages only for a caller that owns the file (or is privileged) or may write it, and
    silently skips the rest; the release asks only for those (as another user, a root-owned library is skipped)."""
    import os
    import shutil
    import tempfile

    from pipelines.allocator import _may_page_out

    folder = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        mine = os.path.join(folder, "libmine.so")
        open(mine, "wb").close()
        assert _may_page_out(mine) and not _may_page_out(os.path.join(folder, "missing.so"))
        if os.geteuid() != 0:
            assert not _may_page_out("/bin/sh")  # root's, not writable
            return
        os.chown(mine, 65534, 65534)  # as the user "nobody" in a forked child: its own file yes, root's no
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                os._exit(0 if _may_page_out(mine) and not _may_page_out("/bin/sh") else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(folder)
