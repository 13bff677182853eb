"""Build a token store from a data file: read, check and tokenize in chunks, in parallel.

The file is cut into chunks (byte ranges that start at a line for JSONL, so a worker reads
its own lines; runs of records otherwise). Each chunk is examined and tokenized by a worker
process (`run_chunk`: records -> conversations -> `encode_many`); the main process takes the
chunks back in file order, drops duplicates, writes the kept examples to the store and adds
up the report. A small file is done in the main process, by the same code.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ollama_ft.data.batch import EncodedBatch, backend_of, encode_many
from ollama_ft.data.examine import FileFormat, dedupe_key, examine
from ollama_ft.data.readers import (
    iter_records,
    jsonl_ranges,
    location,
    read_jsonl_range,
)
from ollama_ft.errors import DataError

MAX_LISTED = 10
CHUNK_BYTES = 1 << 20  # a JSONL chunk: about 1,400 two-turn conversations
CHUNK_RECORDS = 2000  # a chunk of records read by the main process (JSON, CSV, Parquet)
IN_PROCESS_BYTES = 4 << 20  # smaller files are tokenized without starting workers


@dataclass
class Job:
    """What every chunk of one build shares."""
    path: Path
    kind: str
    ff: FileFormat
    fmt: object  # ChatFormat
    max_len: int | None


@dataclass
class ChunkResult:
    fatal: str | None = None  # a read error: the check stops here
    records_read: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_LISTED
    n_errors: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # empty records
    nums: np.ndarray | None = None  # per usable example: record number
    byte_offsets: np.ndarray | None = None
    keys: list[bytes] = field(default_factory=list)
    reasoning: np.ndarray | None = None  # messages with reasoning
    systems: list[str | None] = field(default_factory=list)
    batch: EncodedBatch | None = None


def run_chunk(job: Job, backend, chunk) -> ChunkResult:
    """Examine and tokenize one chunk: ("jsonl", start, end, first_line) or ("records",
    [(num, record), ...])."""
    out = ChunkResult()
    where = lambda n: location(job.path, job.kind, n)  # noqa: E731
    nums, offsets, conversations = [], [], []
    try:
        records = (read_jsonl_range(job.path, *chunk[1:]) if chunk[0] == "jsonl"
                   else ((n, -1, r) for n, r in chunk[1]))
        for num, offset, record in records:
            out.records_read += 1
            status, value = examine(num, record, job.ff, where)
            if status == "error":
                out.n_errors += 1
                if len(out.errors) < MAX_LISTED:
                    out.errors.append(value)
            elif status == "empty":
                out.rejected.append((num, value))
            elif not out.n_errors:  # once a record is wrong nothing is trained: stop tokenizing
                nums.append(num)
                offsets.append(offset)
                conversations.append(value)
    except DataError as e:
        out.fatal = str(e)
        return out
    if out.n_errors:
        return out
    out.nums = np.asarray(nums, dtype=np.int64)
    out.byte_offsets = np.asarray(offsets, dtype=np.int64)
    out.keys = [dedupe_key(c) for c in conversations]
    out.reasoning = np.fromiter((sum(1 for m in c if m.reasoning) for c in conversations),
                                dtype=np.int64, count=len(conversations))
    out.systems = [c[0].content if c[0].role == "system" else None for c in conversations]
    out.batch = encode_many(backend, job.fmt, conversations, job.max_len)
    return out


def plan_chunks(job: Job):
    if job.kind == "jsonl":
        for start, end, line in jsonl_ranges(job.path, CHUNK_BYTES):
            yield ("jsonl", start, end, line)
        return
    run = []
    try:
        for num, _, record in iter_records(job.path, job.kind):
            run.append((num, record))
            if len(run) == CHUNK_RECORDS:
                yield ("records", run)
                run = []
    except DataError as e:  # a read error after the records before it: reported in order
        yield ("records", run)
        yield ("fatal", str(e))
        return
    if run:
        yield ("records", run)


def default_procs() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def results(job: Job, tokenizer, num_proc: int | None):
    """ChunkResults in file order; from num_proc worker processes (default: one per CPU, up
    to 8, for a file of IN_PROCESS_BYTES or more), else from this process."""
    if num_proc is None:
        num_proc = 1 if job.path.stat().st_size < IN_PROCESS_BYTES else default_procs()
    if num_proc <= 1:
        backend = backend_of(tokenizer)
        for chunk in plan_chunks(job):
            yield (ChunkResult(fatal=chunk[1]) if chunk[0] == "fatal"
                   else run_chunk(job, backend, chunk))
        return
    yield from _in_workers(job, backend_of(tokenizer).to_str(), num_proc)


# --- worker processes -------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(job: Job, tokenizer_json: str) -> None:
    import signal

    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker
    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()
    backend.no_padding()
    _worker.update(job=job, backend=backend)


def _work(chunk) -> ChunkResult:
    return run_chunk(_worker["job"], _worker["backend"], chunk)


def _in_workers(job: Job, tokenizer_json: str, num_proc: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the caller may hold threads (torch, the tokenizer's pool) that fork would copy
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(job, tokenizer_json))
    pending: deque = deque()
    try:
        for chunk in plan_chunks(job):
            if chunk[0] == "fatal":
                pending.append(ChunkResult(fatal=chunk[1]))
            else:
                pending.append(pool.submit(_work, chunk))
            while len(pending) > 2 * num_proc:  # a bounded window: memory stays flat
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(item) -> ChunkResult:
    return item if isinstance(item, ChunkResult) else item.result()
