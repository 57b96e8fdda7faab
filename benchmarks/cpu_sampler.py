"""CPU time of every process, and of the busiest processes' threads, second by second (Linux ``/proc``).

Run it beside a benchmark to see who shares the machine's CPUs with the daemon, e.g. the broker's JIT compiler
threads in the latency benchmark's first seconds (benchmarks/RESULTS.md, Latency, thirteenth session):

    python -m benchmarks.cpu_sampler /tmp/cpu.jsonl &    # one JSON line a second until stopped
    python -m benchmarks.latency ...; kill %1
    python -m benchmarks.cpu_sampler --show /tmp/cpu.jsonl

Each line: the wall time, the host's user / system / idle / iowait / steal shares, the six busiest processes
(cores, pid, name) and the busiest threads (cores, name) of the three busiest processes above 0.3 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, str]:
    """(user + system clock ticks, name) from the text of a ``/proc/<pid>[/task/<tid>]/stat`` file."""
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), text[text.find("(") + 1:text.rfind(")")]


def _ticks(stat_path: Path) -> tuple[int, str] | None:
    """:func:`parse_stat` of a process or thread; None once it has gone."""
    try:
        return parse_stat(stat_path.read_text())
    except OSError:
        return None


def _processes() -> dict[int, tuple[int, str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (t := _ticks(Path("/proc", entry, "stat"))):
            found[int(entry)] = t
    return found


def thread_ticks(pid: int | str) -> dict[int, tuple[int, str]]:
    """{thread id: (clock ticks, name)} of a process's live threads (empty once it has gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    return {int(t): ticks for t in tasks if (ticks := _ticks(Path(f"/proc/{pid}/task/{t}/stat")))}


def _host() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def sample(out: Path, interval: float = 1.0) -> None:
    """Append one JSON line per ``interval`` seconds to ``out`` until interrupted."""
    host0, procs0, t0 = _host(), _processes(), time.monotonic()
    threads0: dict[int, dict[int, tuple[int, str]]] = {}
    with out.open("a") as f:
        while True:
            time.sleep(interval)
            host1, procs1, t1 = _host(), _processes(), time.monotonic()
            dt, d = t1 - t0, [b - a for a, b in zip(host0, host1, strict=False)]
            total = sum(d) or 1
            busy = sorted(((procs1[p][0] - procs0[p][0]) / HZ / dt, p, procs1[p][1])
                          for p in procs1 if p in procs0)[::-1][:6]
            threads = {}
            for cores, pid, name in busy[:3]:
                if cores < 0.3:
                    continue
                now, before = thread_ticks(pid), threads0.get(pid, {})
                threads[f"{name}:{pid}"] = sorted(
                    (round((now[t][0] - before[t][0]) / HZ / dt, 2), now[t][1]) for t in now if t in before)[::-1][:6]
                threads0[pid] = now
            f.write(json.dumps({"t": round(time.time(), 1), "user": round(d[0] / total, 2),
                                "system": round(d[2] / total, 2), "idle": round(d[3] / total, 2),
                                "iowait": round(d[4] / total, 2), "steal": round(d[7] / total, 2),
                                "processes": [(round(c, 2), p, n) for c, p, n in busy], "threads": threads}) + "\n")
            f.flush()
            host0, procs0, t0 = host1, procs1, t1


def show(path: Path) -> None:
    """One line a second: seconds since the first sample, idle share, processes above 0.05 cores, threads."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for rec in lines:
        procs = ", ".join(f"{n}:{p} {c:.2f}" for c, p, n in rec["processes"] if c > 0.05)
        threads = "; ".join(f"{k}: " + ", ".join(f"{n} {c:.2f}" for c, n in v if c > 0.05)
                            for k, v in rec["threads"].items())
        print(f"{rec['t'] - lines[0]['t']:6.0f} s  idle {rec['idle']:.2f}  {procs}  {threads}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="the JSON-lines file to append to (or, with --show, to read)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--show", action="store_true", help="print a file written earlier, one line a second")
    args = p.parse_args(argv)
    if args.show:
        show(args.path)
        return 0
    try:
        sample(args.path, args.interval)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
