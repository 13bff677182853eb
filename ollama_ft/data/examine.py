"""One record at a time: its data format, its conversation, what is wrong with it.

The rules `data check` applies to every record, wherever it is read (in the main process or
in a tokenizing worker): a file has one format, the one its first recognisable record shows
(unless --format names it); a record that cannot be read as that format is an error, one
with nothing to learn from is rejected, and conversations are compared for duplicates by a
digest of their normalised messages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from ollama_ft.chat_formats import Message
from ollama_ft.data.formats import (
    EmptyRecord,
    RecordError,
    describe_shapes,
    detect_shape,
    normalize,
)


@dataclass(frozen=True)
class FileFormat:
    """The data format records are read as: `forced` (--format) or the one `detected` from
    the record numbered `detected_at` (records before it show none)."""
    forced: str | None = None
    detected: str | None = None
    detected_at: int = 0

    @property
    def shape(self) -> str | None:
        return self.forced or self.detected


def detect_file_format(records, forced: str | None) -> FileFormat:
    """The file's format from the first records that show one: records is (num, record)."""
    if forced:
        return FileFormat(forced)
    for num, record in records:
        shape = detect_shape(record)
        if shape is not None:
            return FileFormat(None, shape, num)
    return FileFormat()


def examine(num: int, record: object, ff: FileFormat, where: Callable[[int], str]
            ) -> tuple[str, list[Message] | str]:
    """("ok", messages), ("empty", why) or ("error", "LOCATION: what is wrong"); where(num)
    is the record's location."""
    rec_shape = ff.forced or (ff.detected if num >= ff.detected_at and ff.detected else None)
    if rec_shape is None:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        return "error", (f"{where(num)}: cannot tell the data format from {keys}; expected "
                         f"{describe_shapes()} (or pass --format)")
    if ff.forced is None:
        own = detect_shape(record)
        if own != rec_shape:
            return "error", (f"{where(num)}: this record looks like {own or 'no known format'} but "
                             f"the file's format is {rec_shape} (from its first record); use "
                             "one format per file")
    try:
        return "ok", normalize(record, rec_shape)
    except EmptyRecord as e:
        return "empty", str(e)
    except RecordError as e:
        return "error", f"{where(num)}: {e}"


def dedupe_key(messages: list[Message]) -> bytes:
    """Equal for conversations that are the same after normalising."""
    return hashlib.sha1(json.dumps([(m.role, m.content, m.reasoning) for m in messages],
                                   ensure_ascii=False).encode()).digest()
