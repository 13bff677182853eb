"""Check a whole data file before training: shapes, rejects, duplicates, token lengths.

`check_data` reads every record first; structural errors fail at once with `file:line:
what is wrong`, empty records and duplicates are dropped and reported, and the report
carries token length percentiles and truncation at max_len.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ollama_ft.chat_formats import ChatFormat, Message
from ollama_ft.data.formats import (SHAPES, EmptyRecord, RecordError, describe_shapes,
                                    detect_shape, normalize)
from ollama_ft.data.readers import read_records
from ollama_ft.errors import DataError

MAX_LISTED = 10


@dataclass
class Example:
    location: str
    messages: list[Message]


@dataclass
class DataReport:
    file: str
    format: str
    records_read: int = 0
    kept: int = 0
    duplicates_dropped: int = 0
    duplicates: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    with_reasoning: int = 0
    system_prompt: str | None = None  # the one every example used, if they all used one
    chat_format: str | None = None
    max_len: int | None = None
    token_lengths: dict | None = None
    truncated: int = 0
    trained_tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = [f"file:              {self.file}",
                 f"format:            {self.format}",
                 f"records read:      {self.records_read}",
                 f"kept:              {self.kept}",
                 f"duplicates:        {self.duplicates_dropped} dropped",
                 f"rejected (empty):  {len(self.rejected)}"]
        for r in self.rejected[:MAX_LISTED]:
            lines.append(f"  {r['location']}: {r['why']}")
        if self.with_reasoning:
            lines.append(f"with reasoning:    {self.with_reasoning}")
        if self.chat_format:
            lines.append(f"chat format:       {self.chat_format}")
        if self.token_lengths:
            t = self.token_lengths
            lines.append(f"tokens/example:    p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  "
                         f"max {t['max']}")
            lines.append(f"trained tokens:    {self.trained_tokens}")
            lines.append(f"truncated at {self.max_len}: {self.truncated}")
        return lines


def load_examples(path: str | Path, shape: str | None = None) -> tuple[list[Example], DataReport]:
    """Every record of the file, validated; raises DataError listing the invalid ones."""
    if shape is not None and shape not in SHAPES:
        raise DataError(f"--format {shape!r} is not a data format; use one of: {', '.join(SHAPES)}")
    report = DataReport(file=str(path), format=shape or "")
    examples: list[Example] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for location, record in read_records(path):
        report.records_read += 1
        rec_shape = shape or report.format or detect_shape(record)
        if rec_shape is None:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            errors.append(f"{location}: cannot tell the data format from {keys}; expected "
                          f"{describe_shapes()} (or pass --format)")
            continue
        report.format = report.format or rec_shape
        own = detect_shape(record)
        if shape is None and own != rec_shape:
            errors.append(f"{location}: this record looks like {own or 'no known format'} but "
                          f"the file's format is {rec_shape} (from its first record); use one "
                          "format per file")
            continue
        try:
            messages = normalize(record, rec_shape)
        except EmptyRecord as e:
            report.rejected.append({"location": location, "why": str(e)})
            continue
        except RecordError as e:
            errors.append(f"{location}: {e}")
            continue
        key = hashlib.sha1(json.dumps([(m.role, m.content, m.reasoning) for m in messages],
                                      ensure_ascii=False).encode()).hexdigest()
        if key in seen:
            report.duplicates_dropped += 1
            if len(report.duplicates) < MAX_LISTED:
                report.duplicates.append(f"{location} repeats {seen[key]}")
            continue
        seen[key] = location
        examples.append(Example(location, messages))
    if errors:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataError(f"{len(errors)} invalid record(s) in {path}; fix them (nothing was "
                        "trained):\n  " + "\n  ".join(errors[:MAX_LISTED]) + more)
    if not examples:
        raise DataError(f"{path}: no usable records ({report.records_read} read, "
                        f"{len(report.rejected)} empty, {report.duplicates_dropped} duplicates)")
    report.kept = len(examples)
    systems = {e.messages[0].content if e.messages[0].role == "system" else None for e in examples}
    report.system_prompt = systems.pop() if len(systems) == 1 else None
    report.with_reasoning = sum(1 for e in examples for m in e.messages if m.reasoning)
    return examples, report


def percentiles(values: list[int]) -> dict:
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": v[-1], "mean": round(
        sum(v) / len(v), 1)}


def check_data(path, tokenizer, fmt: ChatFormat, max_len: int, shape: str | None = None):
    """Load, validate and tokenize a file. Returns (examples, encoded, report)."""
    from ollama_ft.data.tokenize import encode, truncate

    examples, report = load_examples(path, shape)
    report.chat_format, report.max_len = fmt.name, max_len
    encoded, lengths, kept = [], [], []
    for ex in examples:
        full = encode(tokenizer, fmt, ex.messages, None)
        lengths.append(len(full.input_ids))
        enc = truncate(full, max_len)
        if enc.trained_tokens == 0:
            report.rejected.append({"location": ex.location, "why": f"no assistant tokens left "
                                    f"after truncation at max_len {max_len}"})
            continue
        report.truncated += enc.truncated
        report.trained_tokens += enc.trained_tokens
        encoded.append(enc)
        kept.append(ex)
    if not encoded:
        raise DataError(f"{path}: every record lost its assistant answer to truncation at "
                        f"max_len {max_len}; raise --max-len")
    report.kept = len(encoded)
    report.token_lengths = percentiles(lengths)
    return kept, encoded, report

