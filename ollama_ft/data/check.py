"""Check a whole data file before training: shapes, rejects, duplicates, token lengths.

`check_data` reads every record; structural errors fail with `file:line: what is wrong`,
empty records and duplicates are dropped and reported, and the report carries token length
percentiles and truncation at max_len. The tokens go into a token store (data/store.py),
built in parallel (data/build.py) and kept in the cache (data/cache.py): checking the same
file again with the same tokenizer, chat format and max_len reads the store instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ollama_ft.chat_formats import ChatFormat, Message
from ollama_ft.data.examine import FileFormat, dedupe_key, detect_file_format, examine
from ollama_ft.data.formats import SHAPES
from ollama_ft.data.readers import checked_file, iter_records, location, read_jsonl_line
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


def _check_shape(shape: str | None) -> None:
    if shape is not None and shape not in SHAPES:
        raise DataError(f"--format {shape!r} is not a data format; use one of: {', '.join(SHAPES)}")


def _invalid(path, errors: list[str], n_errors: int) -> DataError:
    more = f"\n  ... and {n_errors - MAX_LISTED} more" if n_errors > MAX_LISTED else ""
    return DataError(f"{n_errors} invalid record(s) in {path}; fix them (nothing was "
                     "trained):\n  " + "\n  ".join(errors[:MAX_LISTED]) + more)


def _no_usable(path, report: DataReport) -> DataError:
    return DataError(f"{path}: no usable records ({report.records_read} read, "
                     f"{len(report.rejected)} empty, {report.duplicates_dropped} duplicates)")


def load_examples(path: str | Path, shape: str | None = None) -> tuple[list[Example], DataReport]:
    """Every record of the file, validated; raises DataError listing the invalid ones."""
    _check_shape(shape)
    file, kind = checked_file(path)
    ff = detect_file_format(((n, r) for n, _, r in iter_records(file, kind)), shape)
    report = DataReport(file=str(path), format=ff.shape or "")
    examples: list[Example] = []
    errors: list[str] = []
    seen: dict[bytes, str] = {}
    where = lambda n: location(file, kind, n)  # noqa: E731
    for num, _, record in iter_records(file, kind):
        report.records_read += 1
        status, value = examine(num, record, ff, where)
        if status == "error":
            errors.append(value)
            continue
        if status == "empty":
            report.rejected.append({"location": where(num), "why": value})
            continue
        key = dedupe_key(value)
        if key in seen:
            report.duplicates_dropped += 1
            if len(report.duplicates) < MAX_LISTED:
                report.duplicates.append(f"{where(num)} repeats {seen[key]}")
            continue
        seen[key] = where(num)
        examples.append(Example(where(num), value))
    if errors:
        raise _invalid(path, errors, len(errors))
    if not examples:
        raise _no_usable(path, report)
    report.kept = len(examples)
    systems = {e.messages[0].content if e.messages[0].role == "system" else None for e in examples}
    report.system_prompt = systems.pop() if len(systems) == 1 else None
    report.with_reasoning = sum(1 for e in examples for m in e.messages if m.reasoning)
    return examples, report


def percentiles(values) -> dict:
    v = np.sort(np.asarray(values, dtype=np.int64))

    def pct(p):
        return int(v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))])

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": int(v[-1]),
            "mean": round(int(v.sum()) / len(v), 1)}


def check_data(path, tokenizer, fmt: ChatFormat, max_len: int, shape: str | None = None, *,
               num_proc: int | None = None, cache: bool = True, log=None):
    """Load, validate and tokenize a file. Returns (examples, encoded, report): `encoded` a
    TokenStore (a sequence of Encoded, memory-mapped), `examples` an ExampleList (a sequence
    of Example, read from the file on demand), both of the kept examples in file order.

    num_proc: tokenizing processes (default: one per CPU for a file of 4 MB or more);
    cache=False builds a store that is not kept for the next check (its files are removed
    once mapped)."""
    from ollama_ft.data import cache as store_cache
    from ollama_ft.data.batch import backend_of
    from ollama_ft.data.store import TokenStore

    _check_shape(shape)
    file, kind = checked_file(path)
    backend = backend_of(tokenizer)
    key = store_cache.store_key(store_cache.file_digest(file), backend, fmt, max_len, shape)
    found = store_cache.find(key) if cache else None
    if found is not None:
        if log:
            log(f"token store: {found} (reused)")
    else:
        tmp = store_cache.new_dir(key)
        try:
            _build(file, kind, path, tokenizer, fmt, max_len, shape, num_proc, tmp, log)
        except BaseException:
            store_cache.discard(tmp)
            raise
        found = store_cache.publish(tmp, key) if cache else tmp
    store = TokenStore(found)
    if not cache:  # mapped already: the files go when the store does (POSIX)
        store_cache.discard(found)
    report = report_of(store.meta["report"], path, file, kind)
    ff = FileFormat(**store.meta["file_format"])
    return ExampleList(file, kind, ff, store.records, store.byte_offsets), store, report


def _build(file: Path, kind: str, path, tokenizer, fmt, max_len, shape, num_proc, out: Path, log):
    import time

    from ollama_ft.data.build import Job, results
    from ollama_ft.data.store import StoreWriter

    t0 = time.perf_counter()
    ff = detect_file_format(((n, r) for n, _, r in _first_records(file, kind)), shape)
    job = Job(file, kind, ff, fmt, max_len)
    if log:
        log(f"tokenizing {file} ({file.stat().st_size / 2**20:.1f} MB) into a token store ...")
    report = DataReport(file=str(path), format=ff.shape or "", chat_format=fmt.name,
                        max_len=max_len)
    writer = StoreWriter(out)
    seen: dict[bytes, int] = {}
    errors: list[str] = []
    n_errors = 0
    duplicates: list[list[int]] = []
    empty: list[list] = []
    lost: list[int] = []  # kept examples without a target left after truncation
    systems: set = set()
    full_lengths: list[np.ndarray] = []
    usable = 0
    for res in results(job, tokenizer, num_proc):
        if res.fatal:
            raise DataError(res.fatal)
        report.records_read += res.records_read
        errors += res.errors[:MAX_LISTED - len(errors)]
        n_errors += res.n_errors
        empty += [[n, why] for n, why in res.rejected]
        if n_errors or res.batch is None:
            continue
        keep = np.ones(len(res.nums), dtype=bool)
        for j, (num, k) in enumerate(zip(res.nums.tolist(), res.keys)):
            first = seen.setdefault(k, num)
            if first != num:
                keep[j] = False
                report.duplicates_dropped += 1
                if len(duplicates) < MAX_LISTED:
                    duplicates.append([num, first])
        usable += int(keep.sum())
        report.with_reasoning += int(res.reasoning[keep].sum())
        if len(systems) < 2:
            systems.update(s for s, k in zip(res.systems, keep) if k)
        b = res.batch
        full_lengths.append(b.full_lengths[keep])
        trainable = keep & (b.trained_counts > 0)
        lost += res.nums[keep & (b.trained_counts == 0)].tolist()
        tokens = np.repeat(trainable, b.lengths)
        truncated = (b.full_lengths > b.lengths)[trainable]
        writer.append(b.ids[tokens], b.trained[tokens], b.lengths[trainable], res.nums[trainable],
                      res.byte_offsets[trainable], truncated)
        report.truncated += int(truncated.sum())
        report.trained_tokens += int(b.trained_counts[trainable].sum())
    if n_errors:
        raise _invalid(path, errors, n_errors)
    report.rejected = empty  # (numbers until report_of writes the locations)
    if not usable:
        raise _no_usable(path, report)
    report.system_prompt = next(iter(systems)) if len(systems) == 1 else None
    report.rejected = empty + [[n, f"no assistant tokens left after truncation at max_len "
                                   f"{max_len}"] for n in lost]
    report.duplicates = duplicates
    if len(lost) == usable:
        raise DataError(f"{path}: every record lost its assistant answer to truncation at "
                        f"max_len {max_len}; raise --max-len")
    report.kept = usable - len(lost)
    report.token_lengths = percentiles(np.concatenate(full_lengths))
    neutral = {k: v for k, v in report.to_json().items() if k != "file"}
    writer.close({"report": neutral, "file_format": {"forced": ff.forced, "detected": ff.detected,
                                                     "detected_at": ff.detected_at},
                  "build_s": round(time.perf_counter() - t0, 2)})
    if log:
        log(f"tokenized {report.records_read} records in {time.perf_counter() - t0:.1f} s")


def _first_records(file: Path, kind: str):
    """Records from the start, stopping quietly at a read error (the build reports it)."""
    try:
        yield from iter_records(file, kind)
    except DataError:
        return


def report_of(neutral: dict, path, file: Path, kind: str) -> DataReport:
    """The stored report, with the locations of this file's path."""
    where = lambda n: location(file, kind, n)  # noqa: E731
    values = {k: v for k, v in neutral.items() if k in {f.name for f in fields(DataReport)}}
    values["duplicates"] = [f"{where(n)} repeats {where(first)}"
                            for n, first in neutral["duplicates"]]
    values["rejected"] = [{"location": where(n), "why": why} for n, why in neutral["rejected"]]
    return DataReport(file=str(path), **values)


class ExampleList:
    """The kept examples of a check, in file order, read again from the file when asked for
    (a JSONL line is found by its byte offset)."""

    def __init__(self, file: Path, kind: str, ff: FileFormat, records: np.ndarray,
                 byte_offsets: np.ndarray):
        self.file, self.kind, self.ff = file, kind, ff
        self.records, self.byte_offsets = records, byte_offsets
        self._all: list[Example] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _example(self, num: int, record) -> Example:
        where = lambda n: location(self.file, self.kind, n)  # noqa: E731
        status, value = examine(num, record, self.ff, where)
        if status != "ok":  # the file changed since it was checked
            raise DataError(f"{where(num)}: changed since it was checked; check it again")
        return Example(where(num), value)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.kind == "jsonl":
            num = int(self.records[i])
            return self._example(num, read_jsonl_line(self.file, int(self.byte_offsets[i])))
        if self._all is None:
            self._all = list(self)
        return self._all[i]

    def __iter__(self):
        wanted = iter(self.records.tolist())
        target = next(wanted, None)
        for num, _, record in iter_records(self.file, self.kind):
            if target is None:
                return
            if num == target:
                yield self._example(num, record)
                target = next(wanted, None)
