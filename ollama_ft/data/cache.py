"""Where token stores are kept, and the key that says a store fits a check.

A store is reused when everything that decides its tokens is the same: the data file's bytes
(SHA-256), the tokenizer (its tokenizer.json as the backend writes it), the chat format
(every field of the format object: for an `ollama:NAME` format its TEMPLATE text, stops,
system, BOS/EOS), max_len, --format, and the code that reads, renders and tokenizes. So a
second `data check`, `train --resume` and `eval` of the same file find the first one's store,
and any change makes a new one.

Stores live in $OLLAMA_FT_CACHE/tokens (default ~/.cache/ollama-ft/tokens); the least
recently used beyond MAX_STORES are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from ollama_ft.data.store import META

VERSION = 1
MAX_STORES = 16
# the code whose change changes a store: the data package, the chat formats and what an
# Ollama TEMPLATE format renders with
_CODE = ("data/readers.py", "data/formats.py", "data/examine.py", "data/tokenize.py",
         "data/batch.py", "data/store.py", "data/check.py", "data/build.py", "chat_formats.py",
         "ollama_base/chat.py", "ollamafmt/prompt.py", "ollamafmt/gotemplate.py")


def cache_root() -> Path:
    env = os.environ.get("OLLAMA_FT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ollama-ft") / "tokens"


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_digest(backend) -> str:
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def code_digest(fmt) -> str:
    import inspect

    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = [package / p for p in _CODE] + [Path(inspect.getfile(type(fmt)))]
    for f in files:
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()


def store_key(file_sha: str, backend, fmt, max_len: int | None, shape: str | None) -> str:
    parts = [f"v{VERSION}", file_sha, tokenizer_digest(backend), repr(fmt), str(max_len),
             str(shape), code_digest(fmt)]
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:40]


def find(key: str, root: Path | None = None) -> Path | None:
    """The store made for `key`, if there is one (marked as just used)."""
    d = (root or cache_root()) / key
    if (d / META).is_file():
        os.utime(d / META)
        return d
    return None


def new_dir(key: str, root: Path | None = None) -> Path:
    """A fresh directory to build `key`'s store in (publish() puts it in place)."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    d = root / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
    d.mkdir()
    return d


def publish(tmp: Path, key: str) -> Path:
    """Rename a whole store into place; another process that got there first wins."""
    final = tmp.parent / key
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / META).is_file():
            raise
    prune(tmp.parent)
    return final


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def prune(root: Path, keep: int = MAX_STORES) -> None:
    """Remove the least recently used stores beyond `keep`, and builds abandoned a day ago."""
    stores, now = [], time.time()
    for d in root.iterdir():
        if d.name.startswith(".tmp-"):
            if now - d.stat().st_mtime > 86400:
                shutil.rmtree(d, ignore_errors=True)
        elif (d / META).is_file():
            stores.append(((d / META).stat().st_mtime, d))
    for _, d in sorted(stores, reverse=True)[keep:]:
        shutil.rmtree(d, ignore_errors=True)
