"""Tokenize rendered conversations with assistant-only labels.

A conversation is tokenized in two pieces: the inference prompt of its last assistant
turn (everything before it plus the generation prompt, exactly what Ollama and the HF
template render when that turn is asked for), then the rest. So the first ids of every
training example are the ids the model is given at inference, whatever the tokenizer would
merge across the boundary (R1's `<think>\n` + `\n</think>` is `<think>` `ĊĊ` `</think>`
as one string, but inference ends the prompt at `<think>` `Ċ`). Each token is trained when
its last character lies in a trained segment, so the labels cover exactly the assistant
answers, their reasoning and their end-of-turn token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ollama_ft.chat_formats import ChatFormat, Message

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def trained_spans(segments) -> tuple[str, list[tuple[int, int]]]:
    text, spans, pos = [], [], 0
    for s, trained in segments:
        if trained:
            spans.append((pos, pos + len(s)))
        text.append(s)
        pos += len(s)
    return "".join(text), spans


def encode(tokenizer, fmt: ChatFormat, messages: list[Message], max_len: int | None) -> Encoded:
    text, spans = trained_spans(fmt.render_training(messages))
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    # system messages anywhere are the preamble, as in the training text
    prompt = fmt.render_prompt(messages[:last] + [m for m in messages[last:] if m.role == "system"])
    if not text.startswith(prompt):  # a format whose training text is not prompt + reply
        raise AssertionError(f"{fmt.name}: the training text does not start with the prompt")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, piece in ((0, prompt), (len(prompt), text[len(prompt):])):
        if not piece:
            continue
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        offsets += [(start + a, start + b) for a, b in enc["offset_mapping"]]
    starts = [s for s, _ in spans]
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        last_char = max(a, b - 1)
        k = bisect.bisect_right(starts, last_char) - 1
        labels.append(tok if k >= 0 and spans[k][0] <= last_char < spans[k][1] else IGNORE)
    return truncate(Encoded(ids, labels), max_len)


def truncate(enc: Encoded, max_len: int | None) -> Encoded:
    """Keep the start: the first max_len tokens (and their labels)."""
    if max_len is None or len(enc.input_ids) <= max_len:
        return enc
    return Encoded(enc.input_ids[:max_len], enc.labels[:max_len], True)


def encode_prompt(tokenizer, fmt: ChatFormat, messages: list[Message]) -> list[int]:
    """Token ids of an inference prompt (conversation ending with a user turn)."""
    return list(tokenizer(fmt.render_prompt(messages), add_special_tokens=False)["input_ids"])


PROBES = (
    [Message("system", "You are terse."), Message("user", "Hi 你好"),
     Message("assistant", "Hello."), Message("user", "2+2?")],
    [Message("user", "Write `x = 1`\n\tthen stop.")],
)


def verify_chat_format(tokenizer, fmt: ChatFormat, where: str) -> None:
    """Our renderer must produce exactly what the checkpoint's own chat template renders."""
    from ollama_ft.errors import BaseModelError

    if not getattr(tokenizer, "chat_template", None):
        return
    for probe in PROBES:
        hf = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in probe], tokenize=False,
            add_generation_prompt=True)
        ours = fmt.render_prompt(probe)
        if hf != ours:
            i = next((k for k, (a, b) in enumerate(zip(hf, ours)) if a != b), min(len(hf), len(ours)))
            raise BaseModelError(
                f"{where}: the tokenizer's chat template renders differently from the "
                f"{fmt.name} format at character {i} (template: {hf[max(0, i - 20):i + 20]!r}, "
                f"ours: {ours[max(0, i - 20):i + 20]!r}); pass --chat-format NAME if another "
                "DeepSeek format fits")
