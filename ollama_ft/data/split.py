"""Which examples are held out for evaluation: one rule for training and `ollama-ft eval`."""

from __future__ import annotations

import random


def eval_indices(n: int, eval_split: float, seed: int) -> set[int]:
    """The indices (of n kept examples) that eval_split holds out, drawn with the run's seed."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:max(1, round(n * eval_split))])
