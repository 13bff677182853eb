"""Unexpected failures of the bridge: the client is told what went wrong in its own terms
and an error id; the traceback, the paths and the exception's text go to the bridge's log
(its stderr) under that id, where an operator finds them."""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets

log = logging.getLogger("ollama_ft.serve")

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# numpy's tofile (gguf-py writes tensors with it) reports a cut-short write without an errno
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def disk_full(exc: BaseException) -> bool:
    """No space left, a quota, a file past RLIMIT_FSIZE, or a write the disk cut short:
    the disk is full for us."""
    return isinstance(exc, OSError) and (exc.errno in DISK_FULL or (
        exc.errno is None and bool(SHORT_WRITE.search(str(exc)))))


def describe(exc: BaseException) -> str:
    """What went wrong, without paths or the exception's own text."""
    if disk_full(exc):
        return "the bridge's disk is full (no space left to write)"
    if isinstance(exc, OSError) and exc.errno:
        return f"a file operation failed ({os.strerror(exc.errno)})"
    return f"internal error ({type(exc).__name__})"


def incident(what: str, exc: BaseException) -> str:
    """Log `exc` with its traceback under a fresh id; return the client's message."""
    eid = secrets.token_hex(4)
    log.error("error id %s: %s", eid, what, exc_info=(type(exc), exc, exc.__traceback__))
    return f"{what}: {describe(exc)}; error id {eid} (the bridge's log has the details)"
