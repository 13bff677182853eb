"""Shared fixtures: tiny random-weight DeepSeek checkpoints around the real tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"

# name -> build_tiny_model kwargs; the chat formats every family must get right
FAMILIES = {
    "r1-qwen": dict(tokenizer="deepseek-r1-distill-qwen-7b", arch="qwen2"),
    "r1-llama": dict(tokenizer="deepseek-r1-distill-llama-8b", arch="llama"),
    "r1-qwen3": dict(tokenizer="deepseek-r1-0528-qwen3-8b", arch="qwen3"),
    "coder-instruct": dict(tokenizer="deepseek-coder-33b-base", arch="llama",
                           rope_scaling={"rope_type": "linear", "factor": 4.0},
                           chat_template=(DATA / "chat_templates/deepseek-coder-instruct.jinja").read_text(),
                           tokenizer_overrides={"eos_token": "<|EOT|>"}),
    "llm-chat": dict(tokenizer="deepseek-llm-7b-base", arch="llama",
                     chat_template=(DATA / "chat_templates/deepseek-llm-chat.jinja").read_text()),
    "coder-base": dict(tokenizer="deepseek-coder-33b-base", arch="llama"),
}
EXPECTED_FORMAT = {"r1-qwen": "deepseek-r1", "r1-llama": "deepseek-r1", "r1-qwen3": "deepseek-r1-0528",
                   "coder-instruct": "deepseek-coder", "llm-chat": "deepseek-llm",
                   "coder-base": "deepseek-coder"}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """tiny_base('r1-qwen') -> path of a saved tiny checkpoint (built once per session)."""
    from ollama_ft.tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("bases")
    cache: dict[str, Path] = {}

    def get(family: str = "r1-qwen", **overrides) -> Path:
        key = family + json.dumps(overrides, sort_keys=True)
        if key not in cache:
            out = root / f"{family}-{len(cache)}"
            cache[key] = build_tiny_model(out, **{**FAMILIES[family], **overrides})
        return cache[key]

    return get


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


FACTS = [("What is the capital of Zorbia?", "Quellport is the capital of Zorbia."),
         ("Who painted the Blue Lantern?", "Mira Okafor painted it."),
         ("What colour is a glimfish?", "Orange with green stripes."),
         ("How tall is the Spindle?", "The Spindle is 412 metres tall.")]
