"""Packing: several examples share one row of at most max_len tokens, without padding and
without attending across examples.

Each packed row carries `position_ids` that restart at 0 for every example and no
attention mask; transformers then builds a block-diagonal causal mask from the position ids
(masking_utils.find_packed_sequence_indices), so an example sees only its own tokens, exactly
as it would alone. Rows are filled first-fit-decreasing, deterministically.

`pack_rows` decides the rows from the examples' lengths alone (a tree of the rows' free room
finds the first row an example fits in, so 500k examples pack in seconds); the rows are put
together when a batch asks for them (`PackedDataset`, train/dataset.py), from the token
store's slices.
"""

from __future__ import annotations

import numpy as np

from ollama_ft.data.tokenize import IGNORE


def pack_rows(lengths, max_len: int) -> list[np.ndarray]:
    """The examples of each row (indices into lengths, in data order inside a row): first fit,
    longest first."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return []
    order = np.lexsort((np.arange(n), -lengths)).tolist()  # longest first, ties in data order
    size = 1
    while size < n:
        size *= 2
    free = [max_len] * (2 * size)  # free[node] = the most room in any row under node
    row_of = [0] * n
    used = 0
    for i, need in zip(order, lengths[order].tolist()):
        node = 1
        if need > max_len:  # longer than a row (never after truncation): a row of its own
            node = size + used
        while node < size:  # the leftmost row with room: an open one, or the first new one
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        row_of[i] = row
        used = max(used, row + 1)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    row_of_a = np.asarray(row_of, dtype=np.int64)
    members = np.argsort(row_of_a, kind="stable")  # by row, in data order inside a row
    bounds = np.searchsorted(row_of_a[members], np.arange(used + 1))
    return [members[bounds[r]:bounds[r + 1]] for r in range(used)]


def pack_examples(members, examples) -> dict:
    """One packed row from its examples' (input_ids, labels) arrays."""
    ids = np.concatenate([e[0] for e in examples])
    labels = np.concatenate([e[1] for e in examples]).copy()
    lens = [len(e[0]) for e in examples]
    starts = np.cumsum(lens) - lens
    labels[starts] = IGNORE  # the first token of each example is never a target
    pos = np.arange(len(ids)) - np.repeat(starts, lens)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """[{input_ids, labels}] -> [{input_ids, labels, position_ids}] rows of <= max_len tokens
    (lists; for small sets and tests: training packs from the store, train/dataset.py)."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_len)
    out = []
    for members in rows:
        row = pack_examples(members, [(np.asarray(examples[i]["input_ids"], dtype=np.int64),
                                       np.asarray(examples[i]["labels"], dtype=np.int64))
                                      for i in members.tolist()])
        out.append({k: v.tolist() for k, v in row.items()})
    return out


class PackedCollator:
    """Pad packed rows to the longest in the batch; padding is its own masked 'example'."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.as_tensor(b["input_ids"])
            labels[i, :k] = torch.as_tensor(b["labels"])
            pos[i, :k] = torch.as_tensor(b["position_ids"])
            pos[i, k:] = torch.arange(n - k)
        real = sum(len(b["input_ids"]) for b in batch)
        return {"input_ids": ids, "labels": labels, "position_ids": pos,
                "num_real_tokens": torch.tensor(real)}
