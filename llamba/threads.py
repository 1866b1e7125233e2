"""Torch threads chosen for the machine as it is now: its cores less what other processes keep busy.

On a small machine, OpenMP threads that outnumber the free cores spin at every barrier while the core they wait
for runs another process: two torch threads beside one busy process ran a distillation stage 13-17x slower than
idle (one thread would have run it about 2x slower). `ThreadGovernor` measures, between two calls, how many cores
the *other* processes used (the machine's busy time from /proc/stat less this process's own CPU time) and sets
torch's thread count to the cores left, at least one. `--threads N` fixes the count instead.

Linux only (/proc/stat); elsewhere the governor leaves torch's default alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

_fixed: int | None = None  # --threads N of the running command (None: auto)


def configure(threads: int | None) -> None:
    """The command's --threads: a fixed count (set at once), or None for the governor's choice."""
    global _fixed
    _fixed = threads
    if threads is not None:
        torch.set_num_threads(threads)


def machine_busy_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine since boot, wall clock) from /proc/stat, None where it is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class ThreadGovernor:
    """Call `update()` often (every training step); at most every `every_s` seconds it sets torch's threads to the
    cores the other processes left free since the last decision (rounded; at least 1, at most the usable cores)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.cores = usable_cores()
        self.enabled = _fixed is None and machine_busy_seconds() is not None
        self.threads = torch.get_num_threads()
        self._last = self._sample()
        self.changes: list[
            tuple[float, int]
        ] = []  # (others' busy cores, threads) at each change, for the log

    def _sample(self):
        m = machine_busy_seconds()
        return None if m is None else (m[0], m[1], own_cpu_seconds())

    def others_busy(self, before, after) -> float:
        """Cores used by other processes between two samples."""
        wall = after[1] - before[1]
        return max(0.0, ((after[0] - before[0]) - (after[2] - before[2])) / max(wall, 1e-9))

    def update(self) -> int:
        if not self.enabled:
            return self.threads
        now = self._sample()
        if now[1] - self._last[1] < self.every_s:
            return self.threads
        busy = self.others_busy(self._last, now)
        self._last = now
        want = max(1, min(self.cores, round(self.cores - busy)))
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.changes.append((round(busy, 2), want))
        return self.threads
