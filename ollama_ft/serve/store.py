"""Models kept in Ollama's on-disk layout: content-addressed blobs plus manifests.

    ROOT/models/blobs/sha256-<hex>
    ROOT/models/manifests/<host>/<namespace>/<model>/<tag>

ROOT is $OLLAMA_FT_HOME (default ~/.ollama-ft). Every write goes to a temporary name, is
synced to disk and renamed into place, so a crash never leaves a half-written blob or
manifest. A model is listed only when every blob its manifest names is there (`missing`);
blobs an in-flight create names are pinned, so neither a delete nor the cleaner
(cleaning.py) takes them from under it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from ollama_ft.errors import OllamaError
from ollama_ft.ollama.names import ModelName, parse_name

MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.ollama.image.{}"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class DigestMismatch(OllamaError):
    pass


class NotFound(OllamaError):
    pass


def default_root() -> Path:
    return Path(os.environ.get("OLLAMA_FT_HOME") or Path.home() / ".ollama-ft")


def check_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest or ""):
        raise OllamaError(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


@dataclass
class Manifest:
    name: ModelName
    data: dict
    digest: str  # sha256 of the manifest bytes (what /api/tags shows, hex only)
    size: int
    modified: float

    def layers(self, kind: str) -> list[dict]:
        return [l for l in self.data.get("layers", []) if l.get("mediaType") == LAYER.format(kind)]

    def digests(self) -> set[str]:
        """Every blob this manifest names: the config and the layers."""
        return {self.data["config"]["digest"]} | {l["digest"] for l in self.data.get("layers", [])}


def _sync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Store:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or default_root()) / "models"
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pins: Counter = Counter()

    # --- pins --------------------------------------------------------------------------
    @contextmanager
    def pinned(self, digests):
        """Keep these blobs while a create that names them runs."""
        digests = [d for d in digests if d]
        with self._lock:
            self._pins.update(digests)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(digests)
                self._pins += Counter()  # drop the zeros

    def is_pinned(self, digest: str) -> bool:
        return self._pins.get(digest, 0) > 0

    # --- blobs -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def touch_blob(self, digest: str) -> None:
        """A client asked for this blob again (HEAD, or POST of one we have): it is about to
        be used, so the cleaner's hour starts again."""
        try:
            os.utime(self.blob_path(digest))
        except OSError:
            pass

    def blob_writer(self, digest: str | None = None, max_bytes: int | None = None) -> "BlobWriter":
        return BlobWriter(self, digest, max_bytes)

    def write_blob(self, stream: BinaryIO | Iterable[bytes], digest: str | None = None,
                   max_bytes: int | None = None) -> tuple[str, int]:
        """Stream into the store, hashing on the way; a digest that does not match is refused."""
        chunks = iter(lambda: stream.read(1 << 20), b"") if hasattr(stream, "read") else stream
        with self.blob_writer(digest, max_bytes) as w:
            for chunk in chunks:
                w.write(chunk)
        return w.digest, w.size

    def write_json_blob(self, obj) -> tuple[str, int]:
        data = json.dumps(obj, separators=(",", ":")).encode()
        return self.write_blob([data])

    def read_blob_text(self, digest: str) -> str:
        return self.blob_path(digest).read_text(encoding="utf-8")

    # --- manifests ---------------------------------------------------------------------
    def _manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.manifest_parts())

    def _find(self, name: ModelName) -> Path | None:
        """Case-insensitive lookup, as Ollama does."""
        exact = self._manifest_path(name)
        if exact.is_file():
            return exact
        for p in self.manifests.glob("*/*/*/*"):
            if p.is_file() and tuple(x.lower() for x in p.relative_to(self.manifests).parts) == name.key:
                return p
        return None

    def write_manifest(self, name: str | ModelName, config: dict, layers: list[dict]) -> Manifest:
        name = parse_name(name) if isinstance(name, str) else name
        cdigest, csize = self.write_json_blob(config)
        data = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA,
                "config": {"mediaType": CONFIG_MEDIA, "digest": cdigest, "size": csize},
                "layers": layers}
        raw = json.dumps(data, separators=(",", ":")).encode()
        with self._lock:
            old = self._find(name)
            path = self._manifest_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            _sync_write(tmp, raw)
            os.replace(tmp, path)
            if old is not None and old != path:
                old.unlink()
            # read back under the lock: a concurrent create of the name in another case
            # replaces this file (and unlinks it) as soon as the lock is free
            return self.get(name)

    def get(self, name: str | ModelName) -> Manifest:
        mn = parse_name(name) if isinstance(name, str) else name
        for _ in range(3):  # a create of the name in another case may replace the file meanwhile
            path = self._find(mn)
            if path is None:
                raise NotFound(f"model '{name if isinstance(name, str) else mn.short}' not found")
            try:
                with open(path, "rb") as f:  # the bytes and the time of one file
                    raw, mtime = f.read(), os.fstat(f.fileno()).st_mtime
                break
            except FileNotFoundError:
                continue
        else:
            raise NotFound(f"model '{name if isinstance(name, str) else mn.short}' not found")
        host, ns, model, tag = path.relative_to(self.manifests).parts
        return Manifest(ModelName(host, ns, model, tag), json.loads(raw),
                        hashlib.sha256(raw).hexdigest(), len(raw), mtime)

    def all_manifests(self) -> list[Manifest]:
        """Every readable manifest, whole or not."""
        out = []
        for p in sorted(self.manifests.glob("*/*/*/*")):
            if p.is_file() and not p.name.startswith("."):
                host, ns, model, tag = p.relative_to(self.manifests).parts
                try:
                    m = self.get(ModelName(host, ns, model, tag))
                    m.digests()
                except (OSError, ValueError, KeyError, TypeError, AttributeError, NotFound):
                    continue
                out.append(m)
        return out

    def missing(self, m: Manifest) -> list[str]:
        """The blobs `m` names that are not in the store whole (absent, or of another size)."""
        out = []
        for entry in [m.data["config"], *m.data.get("layers", [])]:
            try:
                size = self.blob_path(entry["digest"]).stat().st_size
            except (OSError, OllamaError):
                out.append(entry.get("digest", "?"))
                continue
            if isinstance(entry.get("size"), int) and entry["size"] != size:
                out.append(entry["digest"])
        return out

    def list(self) -> list[Manifest]:
        """The models: manifests whose every blob is here."""
        return [m for m in self.all_manifests() if not self.missing(m)]

    def referenced(self) -> set[str]:
        """Every blob some manifest names (whole or not)."""
        out: set[str] = set()
        for m in self.all_manifests():
            out |= m.digests()
        return out

    def delete(self, name: str) -> None:
        """Remove the manifest and those of its layers no other manifest uses, under the lock.
        Other unreferenced blobs stay: they may be uploads for a `create` still to come (the
        register flow uploads first); Ollama prunes those only at start, an hour old."""
        m = self.get(name)
        with self._lock:
            self._manifest_path(m.name).unlink()
            mine = m.digests() - self.referenced()
            for digest in mine:
                if not self.is_pinned(digest):  # a create in flight names it
                    self.blob_path(digest).unlink(missing_ok=True)

    def copy(self, source: str, destination: str) -> Manifest:
        m = self.get(source)
        dst = parse_name(destination)
        with self._lock:
            path = self._manifest_path(dst)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            _sync_write(tmp, json.dumps(m.data, separators=(",", ":")).encode())
            os.replace(tmp, path)
        return self.get(dst)


class BlobWriter:
    """Write chunks to a temporary file while hashing; commit() verifies, syncs and renames
    (or use it as a context manager: commit on a clean exit). Anything not committed is
    removed."""

    PREFIX = ".partial-"

    def __init__(self, store: Store, digest: str | None, max_bytes: int | None):
        self.store, self.expected, self.max_bytes = store, digest, max_bytes
        if digest is not None:
            check_digest(digest)
        self.tmp = store.blobs / (f"{self.PREFIX}{os.getpid()}-{threading.get_ident()}-"
                                  f"{time.monotonic_ns()}")
        self.h = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None
        self.f = None

    def open(self) -> "BlobWriter":
        self.f = open(self.tmp, "wb")
        return self

    __enter__ = open

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise OllamaError(f"blob larger than the limit of {self.max_bytes} bytes")
        self.h.update(chunk)
        self.f.write(chunk)

    def commit(self) -> str:
        """Check the digest, sync, rename into place (blocking: call it off the event loop
        for big blobs)."""
        try:
            got = "sha256:" + self.h.hexdigest()
            if self.expected is not None and got != self.expected:
                raise DigestMismatch("digest mismatch")
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.store.blob_path(got))
            self.digest = got
            return got
        finally:
            self.discard()

    def discard(self) -> None:
        if self.f is not None and not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False
