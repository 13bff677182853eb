"""Read JSONL, JSON, CSV and Parquet files into (location, record) pairs.

A location is what an error message names: `file:line` for JSONL and CSV, `file: item N`
for JSON, `file: row N` for Parquet. Bad bytes and bad syntax raise DataError at once with
the location; nothing is read past the first unreadable line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

from ollama_ft.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}


def file_kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of "
                        f"{', '.join(sorted(SUFFIXES))} (JSONL, JSON, CSV or Parquet)")
    return kind


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); re-save the file as UTF-8") from None
    return text


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    kind = file_kind(path)
    if kind == "parquet":
        yield from _read_parquet(path)
        return
    text = _decode(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, text)
    elif kind == "json":
        yield from _read_json(path, text)
    else:
        yield from _read_csv(path, text)


def _read_jsonl(path: Path, text: str):
    for n, line in enumerate(io.StringIO(text), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); each "
                            "line must be one JSON object") from None


def _read_json(path: Path, text: str):
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f"{path}: a JSON file must hold a list of records or an object with a "
                        "'data' list")
    # Name items by the line they start on when we can find it cheaply, else by index.
    for i, rec in enumerate(doc):
        yield f"{path}: item {i + 1}", rec


def _read_csv(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}:1: empty CSV; the first line must name the columns")
    for row in reader:
        line = reader.line_num
        if None in row:
            raise DataError(f"{path}:{line}: more values than the header has columns")
        if not any((v or "").strip() for v in row.values()):
            continue
        yield f"{path}:{line}", {k: _maybe_json(v) for k, v in row.items() if k}


def _maybe_json(value: str | None):
    """CSV cells holding a JSON list (a `messages` column) are parsed; other text stays text."""
    if value is None:
        return None
    s = value.strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path}: row {i + 1}", rec
