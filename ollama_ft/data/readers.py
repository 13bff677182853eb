"""Read JSONL, JSON, CSV and Parquet files into (location, record) pairs.

A location is what an error message names: `file:line` for JSONL and CSV, `file: item N`
for JSON, `file: row N` for Parquet. Bad bytes and bad syntax raise DataError at once with
the location; nothing is read past the first unreadable line.

Records are numbered (the line, item or row number of the location) so that a location can
be written again from the number alone (`location`). JSONL is read line by line and can be
cut into byte ranges that start at a line (`jsonl_ranges`) and read alone
(`read_jsonl_range`): how several processes read one file without passing its text around.
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
BOM = b"\xef\xbb\xbf"


def file_kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of "
                        f"{', '.join(sorted(SUFFIXES))} (JSONL, JSON, CSV or Parquet)")
    return kind


def location(path, kind: str, num: int) -> str:
    """What an error message calls record `num` of a `kind` file."""
    if kind == "json":
        return f"{path}: item {num}"
    if kind == "parquet":
        return f"{path}: row {num}"
    return f"{path}:{num}"


def checked_file(path: str | Path) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path, file_kind(path)


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    path, kind = checked_file(path)
    for num, _, record in iter_records(path, kind):
        yield location(path, kind, num), record


def iter_records(path: Path, kind: str) -> Iterator[tuple[int, int, object]]:
    """(number, byte offset or -1, record) of every record of the file."""
    if kind == "jsonl":
        yield from read_jsonl_range(path, 0, path.stat().st_size, 1)
    elif kind == "parquet":
        for num, rec in _read_parquet(path):
            yield num, -1, rec
    else:
        text = _decode(path)
        rows = _read_json(path, text) if kind == "json" else _read_csv(path, text)
        for num, rec in rows:
            yield num, -1, rec


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw[:e.start].count(b"\n") + 1, raw[e.start], e.start) from None
    return text


def _not_utf8(path, line: int, byte: int, offset: int) -> DataError:
    return DataError(f"{path}:{line}: not UTF-8 (byte 0x{byte:02x} at offset {offset}); re-save "
                     "the file as UTF-8")


# --- JSONL ----------------------------------------------------------------------------------
def jsonl_ranges(path: Path, target_bytes: int = 1 << 20) -> Iterator[tuple[int, int, int]]:
    """(start, end, first line number) of consecutive byte ranges of about target_bytes that
    begin at a line; together they cover the file."""
    start, line, pos = 0, 1, 0
    with open(path, "rb") as f:
        while block := f.read(target_bytes):
            cut = block.rfind(b"\n")
            if cut >= 0:  # (a line longer than a block runs on into the next range)
                end = pos + cut + 1
                yield start, end, line
                line += block.count(b"\n")  # the carried tail of the last block has none
                start = end
            pos += len(block)
    if start < pos:
        yield start, pos, line


def read_jsonl_range(path: Path, start: int, end: int, first_line: int
                     ) -> Iterator[tuple[int, int, object]]:
    """(line number, byte offset, record) of the lines in [start, end), read line by line."""
    with open(path, "rb") as f:
        f.seek(start)
        here, n = start, first_line
        while here < end:
            raw = f.readline()
            if not raw:
                break
            at, here = here, here + len(raw)
            if at == 0 and raw.startswith(BOM):
                raw, at = raw[len(BOM):], len(BOM)
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise _not_utf8(path, n, raw[e.start], at + e.start) from None
            if line:
                try:
                    yield n, at, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                                    "each line must be one JSON object") from None
            n += 1


def read_jsonl_line(path: Path, offset: int) -> object:
    """The record of the line at a byte offset that read_jsonl_range gave."""
    with open(path, "rb") as f:
        f.seek(offset)
        return json.loads(f.readline().decode("utf-8"))


# --- JSON, CSV, Parquet ---------------------------------------------------------------------
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
    for i, rec in enumerate(doc):
        yield i + 1, rec


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
        yield line, {k: _maybe_json(v) for k, v in row.items() if k}


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
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        num = 0
        for batch in batches:
            for rec in batch.to_pylist():
                num += 1
                yield num, rec
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
