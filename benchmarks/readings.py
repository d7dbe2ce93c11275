"""Readings the benchmarks take of the processes they run: CPU seconds from /proc,
a value from a Prometheus text page."""

from __future__ import annotations

import os
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) * _TICK_S  # utime, stime


def metric_value(page: str, name: str) -> float | None:
    """The value of an unlabelled series ``name`` on a /metrics page; None if absent."""
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
