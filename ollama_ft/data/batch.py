"""Tokenize many conversations in one call, with exactly the ids and labels of `encode`.

`tokenize.encode` is the definition of what is trained: the inference prompt of the last
assistant turn and the rest of the conversation are tokenized as two pieces, and a token is
a target when its last character lies in a trained segment. `encode_many` does the same for a
whole batch: every piece of every conversation goes through the fast tokenizer's Rust
backend at once (`Tokenizer.encode_batch`), and the labels are found for all tokens with one
search over the trained spans, laid end to end. tests/test_token_store.py checks it against
`encode` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from ollama_ft.chat_formats import ChatFormat, Message
from ollama_ft.data.tokenize import trained_spans


@dataclass
class EncodedBatch:
    """Examples one after another: each one's first max_len tokens and whether each is a
    target; per example its kept and its full (untruncated) token count and its targets."""
    ids: np.ndarray  # uint32
    trained: np.ndarray  # bool
    lengths: np.ndarray  # int64, tokens kept per example
    full_lengths: np.ndarray  # int64, tokens before truncation
    trained_counts: np.ndarray  # int64


def backend_of(tokenizer):
    """The Rust tokenizer a transformers fast tokenizer calls, as `tokenizer(text)` uses it
    (no truncation, no padding)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (tokenizer.json); "
                        "ollama-ft needs one for token offsets")
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


def encode_many(backend, fmt: ChatFormat, conversations: list[list[Message]],
                max_len: int | None) -> EncodedBatch:
    pieces: list[str] = []
    piece_base: list[int] = []  # where each piece starts in the texts laid end to end
    piece_example: list[int] = []
    starts: list[int] = []  # trained spans, laid end to end likewise
    ends: list[int] = []
    base = 0
    for e, messages in enumerate(conversations):
        text, spans = trained_spans(fmt.render_training(messages))
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        prompt = fmt.render_prompt(messages[:last] + [m for m in messages[last:]
                                                      if m.role == "system"])
        if not text.startswith(prompt):
            raise AssertionError(f"{fmt.name}: the training text does not start with the prompt")
        for start, piece in ((0, prompt), (len(prompt), text[len(prompt):])):
            if piece:
                pieces.append(piece)
                piece_base.append(base + start)
                piece_example.append(e)
        starts += [base + a for a, _ in spans]
        ends += [base + b for _, b in spans]
        base += len(text) + 1
    encodings = backend.encode_batch(pieces, add_special_tokens=False) if pieces else []
    counts = np.fromiter((len(x.ids) for x in encodings), dtype=np.int64, count=len(encodings))
    n = int(counts.sum())
    ids = np.fromiter(chain.from_iterable(x.ids for x in encodings), dtype=np.uint32, count=n)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(x.offsets for x in encodings)),
                          dtype=np.int64, count=2 * n).reshape(n, 2)
    last_char = np.repeat(np.asarray(piece_base, dtype=np.int64), counts) + np.maximum(
        offsets[:, 0], offsets[:, 1] - 1)
    starts_a, ends_a = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    k = np.searchsorted(starts_a, last_char, side="right") - 1
    trained = (k >= 0) & (last_char < ends_a[np.maximum(k, 0)] if len(ends_a) else False)
    full = np.bincount(np.asarray(piece_example, dtype=np.int64), weights=counts,
                       minlength=len(conversations)).astype(np.int64)
    if max_len is not None and n and full.max() > max_len:
        first = np.repeat(np.cumsum(full) - full, full)
        keep = np.arange(n) - first < max_len
        ids, trained = ids[keep], trained[keep]
    lengths = full if max_len is None else np.minimum(full, max_len)
    example_of = np.repeat(np.arange(len(conversations)), lengths)
    trained_counts = np.bincount(example_of, weights=trained,
                                 minlength=len(conversations)).astype(np.int64)
    return EncodedBatch(ids, np.asarray(trained, dtype=bool), lengths, full, trained_counts)
