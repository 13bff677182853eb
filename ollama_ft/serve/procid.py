"""A worker process known by more than its pid: its pid and its start time (psutil's
create_time, from /proc/PID/stat). A pid the kernel reused for another process after a
crash has another start time, so the bridge neither waits for it nor signals it."""

from __future__ import annotations

import os
import signal


def start_time(pid: int | None) -> float | None:
    """The process's start time (seconds since the epoch), None when there is none."""
    if not pid:
        return None
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError):
        return None


def alive(pid: int | None, started: float | None) -> bool:
    """The very process that was started then: same pid, same start time, not a zombie."""
    if not pid or started is None:
        return False
    import psutil

    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) > 1e-3:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError, ValueError):
        return False


def signal_group(pid: int | None, started: float | None, sig: int = signal.SIGTERM) -> bool:
    """Signal the process group a worker leads (start_new_session), only if it is still
    that worker. True if a signal went out."""
    if not alive(pid, started):
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
