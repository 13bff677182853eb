"""Greedy generation with the PyTorch model: how the trained model answers (demo, tests)."""

from __future__ import annotations

from ollama_ft.chat_formats import ChatFormat, Message
from ollama_ft.data.tokenize import encode_prompt


def greedy_answer(model, tokenizer, fmt: ChatFormat, messages: list[Message],
                  max_new_tokens: int = 64) -> str:
    return greedy_continuation(model, tokenizer, fmt, encode_prompt(tokenizer, fmt, messages),
                               max_new_tokens)


def greedy_continuation(model, tokenizer, fmt: ChatFormat, ids: list[int],
                        max_new_tokens: int = 64) -> str:
    """The greedy continuation of prompt ids as text, ended at the format's stop tokens."""
    import torch

    stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in fmt.stops]
    stop_ids = [i for i in stop_ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stop_ids or None,
                             pad_token_id=tokenizer.pad_token_id or stop_ids[0])
    new = out[0, len(ids):].tolist()
    while new and new[-1] in stop_ids:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=False)
