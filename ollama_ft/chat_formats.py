"""DeepSeek chat formats: how a conversation becomes text, and which parts are trained.

Each format renders exactly what the checkpoint's own Hugging Face chat template renders
for inference (tests check this against the real templates), and adds the one thing the
stock templates cannot do for training: the trained assistant turn keeps its reasoning
(`<think>\\n{reasoning}\\n</think>\\n\\n{answer}`) while earlier turns drop it, as at inference.

A rendered conversation is a list of segments `(text, trained)`; joined, they are the
training text, and the `trained` spans are where the loss is taken.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
CODER_EOT = "<|EOT|>"
CODER_DEFAULT_SYSTEM = (
    "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
    "Deepseek Company, and you only answer questions related to computer science. For "
    "politically sensitive questions, security and privacy issues, and other non-computer "
    "science questions, you will refuse to answer"
)


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    reasoning: str | None = None


Segment = tuple[str, bool]


@dataclass(frozen=True)
class ChatFormat:
    name: str
    description: str
    stops: tuple[str, ...]  # end-of-turn markers generation must stop on
    thinking: bool  # the format carries <think> reasoning
    default_system: str | None = None
    # template substrings that identify the format in a tokenizer_config chat_template
    signature: tuple[str, ...] = field(default=())

    # --- rendering -------------------------------------------------------------------
    def render_training(self, messages: list[Message]) -> list[Segment]:
        """Segments of a whole conversation; the last assistant turn keeps its reasoning."""
        last_assistant = max(i for i, m in enumerate(messages) if m.role == "assistant")
        segs: list[Segment] = [(self._preamble(messages), False)]
        for i, m in enumerate(messages):
            if m.role == "user":
                segs.append((self._user(m.content), False))
            elif m.role == "assistant":
                head, body = self._assistant(m, keep_reasoning=i == last_assistant)
                segs.append((head, False))
                segs.append((body, True))
                segs.append((self._after_assistant(), False))
        return [s for s in segs if s[0]]

    def render_prompt(self, messages: list[Message]) -> str:
        """Inference text: the conversation so far plus the generation prompt."""
        parts = [self._preamble(messages)]
        for m in messages:
            if m.role == "user":
                parts.append(self._user(m.content))
            elif m.role == "assistant":
                head, body = self._assistant(m, keep_reasoning=False)
                parts += [head, body, self._after_assistant()]
        parts.append(self._generation_prompt())
        return "".join(parts)

    # --- per-format pieces (overridden below) ----------------------------------------
    def _system_text(self, messages: list[Message]) -> str:
        systems = [m.content for m in messages if m.role == "system"]
        return "\n\n".join(systems)

    def _preamble(self, messages):  # pragma: no cover - abstract
        raise NotImplementedError

    def _user(self, content: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _assistant(self, m: Message, keep_reasoning: bool) -> tuple[str, str]:
        raise NotImplementedError  # pragma: no cover

    def _after_assistant(self) -> str:
        return ""

    def _generation_prompt(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _think_block(reasoning: str | None) -> str:
    return f"<think>\n{(reasoning or '').strip()}\n</think>\n\n" if reasoning else "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class R1Format(ChatFormat):
    """R1 and its Qwen/Llama distills: the generation prompt opens the think block."""

    def _preamble(self, messages):
        return BOS + self._system_text(messages)

    def _user(self, content):
        return USER + content

    def _assistant(self, m, keep_reasoning):
        if keep_reasoning:
            # `<think>\n` is part of the generation prompt, so the trained text starts inside it
            reasoning = (m.reasoning or "").strip()
            body = (reasoning + "\n" if reasoning else "\n") + "</think>\n\n" + m.content + EOS
            return ASSISTANT + "<think>\n", body
        return ASSISTANT, m.content + EOS

    def _generation_prompt(self):
        return ASSISTANT + "<think>\n"


@dataclass(frozen=True)
class R1Qwen3Format(ChatFormat):
    """R1-0528-Qwen3: the user turn already ends with <｜Assistant｜>; the model opens <think>."""

    def _preamble(self, messages):
        return BOS + self._system_text(messages)

    def _user(self, content):
        return USER + content + ASSISTANT

    def _assistant(self, m, keep_reasoning):
        think = _think_block(m.reasoning) if keep_reasoning else ""
        return "", think + m.content + EOS

    def _generation_prompt(self):
        return ""


@dataclass(frozen=True)
class LlmFormat(ChatFormat):
    """deepseek-llm chat and V2 chat: `User: …\\n\\nAssistant: …<eos>`."""

    def _preamble(self, messages):
        system = self._system_text(messages)
        return BOS + (system + "\n\n" if system else "")

    def _user(self, content):
        return "User: " + content + "\n\n"

    def _assistant(self, m, keep_reasoning):
        return "Assistant:", " " + m.content + EOS

    def _generation_prompt(self):
        return "Assistant:"


@dataclass(frozen=True)
class CoderFormat(ChatFormat):
    """deepseek-coder instruct: `### Instruction:` / `### Response:` turns ending in <|EOT|>."""

    def _preamble(self, messages):
        system = self._system_text(messages)
        # a given system prompt is written as is; the default one ends with a newline
        return BOS + (system if system else self.default_system + "\n")

    def _user(self, content):
        return "### Instruction:\n" + content + "\n"

    def _assistant(self, m, keep_reasoning):
        return "### Response:\n", m.content + "\n" + CODER_EOT

    def _after_assistant(self):
        return "\n"

    def _generation_prompt(self):
        return "### Response:\n"


FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        R1Format("deepseek-r1", "DeepSeek-R1 and its Qwen/Llama distills (thinking)",
                 stops=(EOS, USER, ASSISTANT), thinking=True,
                 signature=(USER, ASSISTANT + "<think>\\n")),
        R1Qwen3Format("deepseek-r1-0528", "DeepSeek-R1-0528-Qwen3 (thinking)",
                      stops=(EOS, USER, ASSISTANT), thinking=True,
                      signature=(USER, "'<｜User｜>' + content + '<｜Assistant｜>'")),
        LlmFormat("deepseek-llm", "deepseek-llm chat and DeepSeek-V2 chat",
                  stops=(EOS, "User:"), thinking=False,
                  signature=("'User: '", "'Assistant: '")),
        CoderFormat("deepseek-coder", "deepseek-coder instruct", stops=(CODER_EOT, EOS),
                    thinking=False, default_system=CODER_DEFAULT_SYSTEM,
                    signature=("### Instruction:", "### Response:")),
    )
}


def detect_format(chat_template: str | None) -> ChatFormat | None:
    """The format whose signature the template carries, most specific first."""
    if not chat_template:
        return None
    for name in ("deepseek-r1-0528", "deepseek-r1", "deepseek-coder", "deepseek-llm"):
        fmt = FORMATS[name]
        if all(s in chat_template for s in fmt.signature):
            return fmt
    return None


def base_chat_template(path: Path) -> str | None:
    """A checkpoint's Jinja chat template: tokenizer_config.json's (the default one of a named
    list), else chat_template.jinja; None when it has none."""
    template = None
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def checkpoint_chat_format(path: Path, entry=None, where: str = "the base") -> tuple[ChatFormat, str]:
    """The chat format of a checkpoint folder and why: the format its chat template carries;
    without one, the catalogue entry's (`entry`, a catalog.BaseModel), else what its
    tokenizer's special tokens say. Training and every later stage use this one rule."""
    template = base_chat_template(Path(path))
    if template:
        fmt = detect_format(template)
        if fmt is None:
            from ollama_ft.errors import BaseModelError

            raise BaseModelError(f"{where}: its chat template is not one of the DeepSeek formats "
                                 f"we know ({', '.join(FORMATS)}); pass --chat-format NAME to "
                                 "train with one of them")
        return fmt, "detected from the tokenizer's chat template"
    if entry is not None:
        return FORMATS[entry.chat_format], f"base model without a chat template: {entry.alias} format"
    vocab = _special_tokens(Path(path))
    if "<|EOT|>" in vocab:
        return FORMATS["deepseek-coder"], "base model without a chat template: deepseek-coder tokenizer"
    if "<｜User｜>" in vocab:
        return FORMATS["deepseek-r1"], "base model without a chat template: R1 tokenizer"
    return FORMATS["deepseek-llm"], "base model without a chat template: deepseek-llm format"


def _special_tokens(path: Path) -> set[str]:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        return set()
    data = json.loads(tj.read_text(encoding="utf-8"))
    return {t.get("content", "") for t in data.get("added_tokens", [])}
