"""The token store: every kept example's token ids and targets in memory-mapped files.

A store is a directory of flat arrays, written once and then only read:

  ids.u32       the token ids of all examples, one after another (uint32)
  trained.u8    1 where a token is a target (its label is its id), else 0 (label -100)
  index.npy     per example: start of its tokens, record number (line/item/row of the file),
                byte offset of its line (JSONL; -1 otherwise), truncated (0/1)
  meta.json     what the store was made from, counts, and the data report

Nothing is loaded into Python objects: `TokenStore` maps the files and hands out one
example at a time (`Encoded`, or numpy slices for training), so memory does not grow with
the dataset. `StoreWriter` appends chunk by chunk and the directory is renamed into place
when whole (data/cache.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ollama_ft.data.tokenize import IGNORE, Encoded

IDS, TRAINED, INDEX, META = "ids.u32", "trained.u8", "index.npy", "meta.json"
# index columns
START, RECORD, BYTE, TRUNCATED = range(4)


class StoreWriter:
    """Append examples to a new store in `directory` (kept in order)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ids = open(self.dir / IDS, "wb")
        self._trained = open(self.dir / TRAINED, "wb")
        self._index: list[np.ndarray] = []
        self.tokens = 0

    def append(self, ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray,
               records: np.ndarray, byte_offsets: np.ndarray, truncated: np.ndarray) -> None:
        if not len(lengths):
            return
        starts = self.tokens + np.cumsum(lengths) - lengths
        self._index.append(np.stack([starts, records, byte_offsets, truncated]).T.astype(np.int64))
        self._ids.write(np.ascontiguousarray(ids, dtype=np.uint32).tobytes())
        self._trained.write(np.ascontiguousarray(trained, dtype=np.uint8).tobytes())
        self.tokens += int(lengths.sum())

    def close(self, meta: dict) -> None:
        self._ids.close()
        self._trained.close()
        index = np.concatenate(self._index) if self._index else np.zeros((0, 4), np.int64)
        np.save(self.dir / INDEX, index)
        meta = {**meta, "examples": len(index), "tokens": self.tokens}
        (self.dir / META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


class TokenStore:
    """The examples of a store, as a read-only sequence of `Encoded` (and numpy slices).

    `TokenStore(dir)[i]` is example i; a slice or `select(indices)` is a view of some of
    them, in that order."""

    def __init__(self, directory: Path, _order: np.ndarray | None = None, _parent=None):
        self.dir = Path(directory)
        if _parent is not None:
            self.meta, self._ids, self._trained, self._index = (
                _parent.meta, _parent._ids, _parent._trained, _parent._index)
        else:
            self.meta = json.loads((self.dir / META).read_text(encoding="utf-8"))
            n = self.meta["tokens"]
            self._ids = np.memmap(self.dir / IDS, dtype=np.uint32, mode="r", shape=(n,))
            self._trained = np.memmap(self.dir / TRAINED, dtype=np.uint8, mode="r", shape=(n,))
            self._index = np.load(self.dir / INDEX, mmap_mode="r")
        self._order = _order  # None: every example, in file order

    # --- the sequence ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order) if self._order is not None else len(self._index)

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return int(self._order[i]) if self._order is not None else i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        ids, labels = self.arrays(i)
        return Encoded(ids.tolist(), labels.tolist(), bool(self._index[self._row(i), TRUNCATED]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def select(self, indices) -> "TokenStore":
        """A view of the examples at these positions (of this view), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = self._order[indices] if self._order is not None else indices
        return TokenStore(self.dir, rows, self)

    # --- numpy access, for training ---------------------------------------------------------
    def _span(self, row: int) -> tuple[int, int]:
        start = int(self._index[row, START])
        end = int(self._index[row + 1, START]) if row + 1 < len(self._index) else len(self._ids)
        return start, end

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of example i as int64 arrays (labels -100 where not trained)."""
        a, b = self._span(self._row(i))
        ids = self._ids[a:b].astype(np.int64)
        return ids, np.where(self._trained[a:b] != 0, ids, IGNORE)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each example (of this view), int64."""
        starts = np.append(np.asarray(self._index[:, START]), len(self._ids))
        all_lengths = np.diff(starts)
        return all_lengths[self._order] if self._order is not None else all_lengths

    @property
    def records(self) -> np.ndarray:
        """Record number (line, item or row of the file) of each example of this view."""
        col = np.asarray(self._index[:, RECORD])
        return col[self._order] if self._order is not None else col

    @property
    def byte_offsets(self) -> np.ndarray:
        col = np.asarray(self._index[:, BYTE])
        return col[self._order] if self._order is not None else col
