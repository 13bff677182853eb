"""The bridge's bounds, each an environment setting, and the gate that enforces a count.

Past a bound the bridge answers at once, as Ollama does when its queue is full: 503 with
`{"error": "server busy, please try again. ..."}` naming the bound and its setting, and a
Retry-After header. Nothing waits without a limit.

    OLLAMA_FT_MAX_QUEUED_JOBS   training jobs waiting to run                    (16)
    OLLAMA_FT_MAX_FOLLOWERS     open /api/ft/jobs/ID/events streams              (64)
    OLLAMA_FT_MAX_UPLOADS       blob and data uploads in flight at once          (8)
    OLLAMA_FT_MEMORY_BUDGET     bytes of loaded models (default 80% of available)
    OLLAMA_MAX_QUEUE            requests waiting for a model (engine.py, 512)
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from ollama_ft.errors import ConfigError
from ollama_ft.serve.http import HTTPError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_size(value: str, setting: str) -> int:
    """'8GiB', '512M', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{setting}={value!r}: expected a size such as 8GiB, 512MiB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Limits:
    queued_jobs: int = 16
    followers: int = 64
    uploads: int = 8

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(queued_jobs=env_int("OLLAMA_FT_MAX_QUEUED_JOBS", cls.queued_jobs),
                   followers=env_int("OLLAMA_FT_MAX_FOLLOWERS", cls.followers),
                   uploads=env_int("OLLAMA_FT_MAX_UPLOADS", cls.uploads))


def busy(what: str, limit: int, setting: str, retry_after: int = 5) -> HTTPError:
    return HTTPError(503, f"server busy, please try again.  {what} are at the limit of {limit} "
                          f"(set {setting} to change it)",
                     headers={"Retry-After": str(retry_after)})


class Gate:
    """At most `limit` holders at once; one more is refused at once (busy())."""

    def __init__(self, limit: int, what: str, setting: str):
        self.limit, self.what, self.setting = limit, what, setting
        self._lock = threading.Lock()
        self.held = 0

    def enter(self) -> None:
        with self._lock:
            if self.held >= self.limit:
                raise busy(self.what, self.limit, self.setting)
            self.held += 1

    def leave(self) -> None:
        with self._lock:
            self.held = max(0, self.held - 1)

    @contextmanager
    def hold(self):
        self.enter()
        try:
            yield
        finally:
            self.leave()
