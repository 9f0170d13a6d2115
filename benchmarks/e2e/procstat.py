"""Per-process CPU time and memory from ``/proc`` (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CLK_TCK", "ProcSample", "cpu_seconds", "rss_bytes", "sample"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads, not its children), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of proc(5) are utime and stime; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class ProcSample:
    cpu: float
    rss: int


def sample(pid: int) -> ProcSample:
    return ProcSample(cpu_seconds(pid), rss_bytes(pid))
