"""Cleaning the bridge's home like Ollama cleans its store.

At start, before serving: partial files of uploads a killed bridge left (blobs/.partial-*,
uploads/.upload-*) and half-written manifests (.TAG.tmp). At start and then every
OLLAMA_FT_CLEAN_INTERVAL seconds (3600):
- blobs no manifest names, older than OLLAMA_FT_BLOB_MAX_AGE seconds (3600, Ollama's
  hour: the register flow uploads first and creates after), never one an in-flight create
  has pinned; OLLAMA_NOPRUNE (as Ollama) keeps them all;
- uploaded data files no job needs, older than OLLAMA_FT_UPLOAD_MAX_AGE seconds (a day).
  A job needs its data while it is queued or running, and while it can be resumed
  (interrupted, cancelled, failed).
A blob asked for again (HEAD, or a POST of one the store has) starts its hour again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.serve.limits import env_int
from ollama_ft.serve.store import BlobWriter, Store

log = logging.getLogger("ollama_ft.serve")

UPLOAD_PARTIAL = ".upload-"


@dataclass
class Swept:
    partial: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)


def _older_than(path: Path, seconds: float, now: float) -> bool:
    try:
        return path.stat().st_mtime < now - seconds
    except OSError:
        return False


class Cleaner:
    def __init__(self, store: Store | None, uploads: Path, jobs=None, blob_age: int | None = None,
                 upload_age: int | None = None, interval: int | None = None,
                 prune_blobs: bool | None = None):
        self.store, self.uploads, self.jobs = store, Path(uploads), jobs
        self.blob_age = blob_age if blob_age is not None else env_int(
            "OLLAMA_FT_BLOB_MAX_AGE", 3600, 0)
        self.upload_age = upload_age if upload_age is not None else env_int(
            "OLLAMA_FT_UPLOAD_MAX_AGE", 86400, 0)
        self.interval = interval if interval is not None else env_int(
            "OLLAMA_FT_CLEAN_INTERVAL", 3600)
        self.prune_blobs = (prune_blobs if prune_blobs is not None
                            else not os.environ.get("OLLAMA_NOPRUNE"))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- at start ----------------------------------------------------------------------------
    def at_start(self) -> Swept:
        """Partial files first (nothing is uploading yet), then a sweep."""
        out = Swept()
        places = [(self.uploads, UPLOAD_PARTIAL)]
        if self.store is not None:
            places.append((self.store.blobs, BlobWriter.PREFIX))
        for folder, prefix in places:
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(prefix) and p.is_file():
                        p.unlink(missing_ok=True)
                        out.partial.append(p.name)
        if self.store is not None:
            for p in self.store.manifests.glob("**/.*.tmp"):
                p.unlink(missing_ok=True)
                out.partial.append(str(p.relative_to(self.store.manifests)))
        swept = self.sweep()
        out.blobs, out.uploads = swept.blobs, swept.uploads
        return out

    # --- on a timer ----------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> Swept:
        now = time.time() if now is None else now
        out = Swept()
        if self.store is not None and self.prune_blobs:
            out.blobs = self._prune_blobs(now)
        out.uploads = self._prune_uploads(now)
        if out.blobs or out.uploads:
            log.info("cleaning: removed %d unused blob(s) and %d unused upload(s)",
                     len(out.blobs), len(out.uploads))
        return out

    def _prune_blobs(self, now: float) -> list[str]:
        s = self.store
        removed = []
        with s._lock:  # no manifest is written or deleted meanwhile
            used = s.referenced()
            for p in s.blobs.iterdir():
                if not p.name.startswith("sha256-"):
                    continue
                digest = p.name.replace("-", ":", 1)
                if digest in used or s.is_pinned(digest) or not _older_than(p, self.blob_age, now):
                    continue
                p.unlink(missing_ok=True)
                removed.append(digest)
        return removed

    def _prune_uploads(self, now: float) -> list[str]:
        if not self.uploads.is_dir():
            return []
        removed = []
        lock = self.jobs.lock if self.jobs is not None else threading.Lock()
        with lock:  # no job is submitted (naming an upload) meanwhile
            needed = self.jobs.needed_files() if self.jobs is not None else set()
            for p in self.uploads.iterdir():
                if (p.name.startswith(".") or not p.is_file() or os.path.realpath(p) in needed
                        or not _older_than(p, self.upload_age, now)):
                    continue
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def start(self) -> None:
        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self.sweep()
                except Exception:  # never let cleaning stop the bridge
                    log.exception("cleaning failed")
        self._thread = threading.Thread(target=loop, daemon=True, name="ollama-ft-cleaner")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
