"""What the Trainer iterates: examples of a token store, alone or packed into rows.

Both read their tokens from the store's memory-mapped arrays when a batch asks for them, so
nothing the size of the dataset is held in Python objects: an example is an index, a packed
row a small array of indices.
"""

from __future__ import annotations

import numpy as np

from ollama_ft.train.packing import pack_examples, pack_rows


class TokenDataset:
    """Example i of a TokenStore (or a view of one) as {input_ids, labels} int64 arrays."""

    def __init__(self, store):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        ids, labels = self.store.arrays(int(i))
        return {"input_ids": ids, "labels": labels}


class PackedDataset:
    """The store's examples packed first-fit-decreasing into rows of at most max_len tokens."""

    def __init__(self, store, max_len: int):
        self.store = store
        self.rows = pack_rows(store.lengths, max_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict:
        members = self.rows[int(r)]
        return pack_examples(members, [self.store.arrays(i) for i in members.tolist()])

    @property
    def tokens(self) -> int:
        return int(np.asarray(self.store.lengths).sum())
