"""Is the process that wrote a record or a snapshot still there? Told apart from a later
process that reuses its pid.  No pytest here."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_kvmsnap.config import this_host


def running(host: str, pid: int, token: str) -> bool:
    """Is the process that wrote a record or snapshot still there?

    One on another host counts as running: this host cannot see it.  Here, the
    pid must exist and, where the writer recorded its ``process_token``, be the
    same process: a dead run's pid reused by another process is not its owner.
    """
    if host != this_host():
        return True
    if not pid_alive(pid):
        return False
    return not token or process_token(pid) in ("", token)


def process_token(pid: int) -> str:
    """What tells process ``pid`` apart from a later one with the same pid: this boot's id
    and the process's start time in clock ticks since boot ("" where /proc cannot say)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat_line.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
    return f"{boot}:{fields[19]}" if len(fields) > 19 else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
