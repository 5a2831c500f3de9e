"""How much of this machine's CPU other processes took while a benchmark ran: the fact a results
file needs to say whether its times and latencies are clean or upper bounds.

Linux only (``/proc/stat``); elsewhere ``other_cpu_share`` is None and the results say it was not
measured. Standard library only: psutil is not a dependency and ``os.getloadavg`` counts this
benchmark's own threads as load.
"""
from __future__ import annotations

import os
import time

#: above this share of the machine's CPU time taken by others, a results file calls its times upper bounds
QUIET_BELOW = 0.05


def snapshot():
    """(wall s, CPU s every core spent busy, CPU s of this process and its waited-for children),
    or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    t = os.times()
    return time.time(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def other_cpu_share(start, end=None):
    """The share of all cores' time from ``start`` to ``end`` (``snapshot()``s; end: now) that other
    processes kept busy: 0 on a quiet machine, 1 when others filled every core. None when not
    measurable."""
    end = snapshot() if end is None else end
    if start is None or end is None or end[0] - start[0] <= 0:
        return None
    capacity = (end[0] - start[0]) * (os.cpu_count() or 1)
    others = (end[1] - start[1]) - (end[2] - start[2])
    return round(min(1.0, max(0.0, others / capacity)), 3)


def describe(share) -> str:
    """One clause for a results file: what others took and what that means for the times."""
    if share is None:
        return "other processes' CPU use not measured (times may be upper bounds)"
    if share < QUIET_BELOW:
        return f"other processes took {share:.0%} of its CPU time while this ran (a quiet machine)"
    return (f"other processes took {share:.0%} of its CPU time while this ran, SHARED "
            "(times and latencies are upper bounds)")
