"""Packing: several examples share one row of at most max_len tokens, without padding and
without attending across examples.

Each packed row carries `position_ids` that restart at 0 for every example and no
attention mask; transformers then builds a block-diagonal causal mask from the position ids
(masking_utils.find_packed_sequence_indices), so an example sees only its own tokens, exactly
as it would alone. Rows are filled first-fit-decreasing, deterministically.
"""

from __future__ import annotations

IGNORE = -100


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """[{input_ids, labels}] -> [{input_ids, labels, position_ids}] rows of <= max_len tokens."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    packed = []
    for members in rows:
        members.sort()  # keep the data's order inside a row
        ids, labels, pos = [], [], []
        for i in members:
            e = examples[i]
            ids += e["input_ids"]
            # the first token of each example is never a target (no cross-example loss)
            labels += [IGNORE] + list(e["labels"][1:])
            pos += list(range(len(e["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


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
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            pos[i, :k] = torch.tensor(b["position_ids"])
            pos[i, k:] = torch.arange(n - k)
        real = sum(len(b["input_ids"]) for b in batch)
        return {"input_ids": ids, "labels": labels, "position_ids": pos,
                "num_real_tokens": torch.tensor(real)}
