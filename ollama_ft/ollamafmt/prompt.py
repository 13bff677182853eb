"""Build prompts from a model's TEMPLATE the way Ollama does, and split thinking from answers.

- All system messages are joined by blank lines into `.System`; consecutive messages of the
  same role (except tool) are merged with a blank line.
- A template mentioning neither `.Messages` nor `.Response` gets `{{ .Response }}` appended.
- A template without `.Messages` (legacy) is executed once per turn with .System/.Prompt/
  .Response, the last turn cut where the response would start.
- Oldest messages are dropped (system messages kept) until the prompt fits num_ctx.
"""

from __future__ import annotations

import re
from typing import Callable

from ollama_ft.ollamafmt.gotemplate import Template

_SENTINEL = "\x00\x01RESPONSE\x01\x00"


def _message(m: dict) -> dict:
    return {"Role": m.get("role", ""), "Content": m.get("content") or "",
            "Thinking": m.get("thinking") or "", "ToolCalls": m.get("tool_calls") or [],
            "ToolName": m.get("tool_name") or "", "ToolCallID": m.get("tool_call_id") or "",
            "Images": m.get("images") or []}


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    system, out = [], []
    for m in messages:
        m = _message(m)
        if m["Role"] == "system":
            system.append(m["Content"])
        if out and out[-1]["Role"] == m["Role"] and m["Role"] != "tool":
            out[-1] = {**out[-1], "Content": out[-1]["Content"] + "\n\n" + m["Content"]}
            continue
        out.append(m)
    return "\n\n".join(system), out


class PromptTemplate:
    def __init__(self, text: str):
        if ".Messages" not in text and ".Response" not in text:
            text = text + "{{ .Response }}"
        self.text = text
        self.template = Template(text)
        self.uses_messages = ".Messages" in text
        self.thinking_tags = infer_thinking_tags(text)

    @property
    def thinking(self) -> bool:
        return self.thinking_tags is not None

    @property
    def tools(self) -> bool:
        return ".Tools" in self.text

    def render(self, messages: list[dict], tools=None, think: bool | None = None,
               think_level: str = "") -> str:
        system, msgs = collate(messages)
        values = {"System": system, "Messages": msgs, "Tools": tools or [], "Response": "",
                  "Prompt": "", "Think": bool(think), "ThinkLevel": think_level,
                  "IsThinkSet": think is not None}
        if self.uses_messages:
            return self.template.execute(values)
        return self._legacy(msgs, values)

    def _legacy(self, messages, values):
        """Once per turn over the collated messages, the last turn cut where .Response is."""
        out, system, prompt, response = [], "", "", ""

        def run(sys_, p, r):
            out.append(self.template.execute({**values, "System": sys_, "Prompt": p, "Response": r}))

        for m in messages:
            role, content = m["Role"], m["Content"]
            if role == "system":
                if prompt or response:
                    run(system, prompt, response)
                    system = prompt = response = ""
                system = content
            elif role == "user":
                if response:
                    run(system, prompt, response)
                    system = prompt = response = ""
                prompt = content
            elif role == "assistant":
                response = content
        last = self.template.execute({**values, "System": system, "Prompt": prompt,
                                      "Response": _SENTINEL})
        cut = last.find(_SENTINEL)
        out.append((last[:cut] + response) if cut >= 0 else last)
        return "".join(out)

    def render_fitting(self, messages: list[dict], n_ctx: int, count_tokens: Callable[[str], int],
                       **kw) -> tuple[str, int]:
        return render_fitting(self.render, messages, n_ctx, count_tokens, **kw)


def render_fitting(render, messages: list[dict], n_ctx: int, count_tokens: Callable[[str], int],
                   **kw) -> tuple[str, int]:
    """Drop the oldest non-system messages until the prompt fits n_ctx (the last stays)."""
    n = len(messages) - 1
    for i in range(n - 1, -1, -1):
        system = [m for m in messages[:i] if m.get("role") == "system"]
        if count_tokens(render(system + messages[i:], **kw)) > n_ctx:
            break
        n = i
    system = [m for m in messages[:n] if m.get("role") == "system"]
    return render(system + messages[n:], **kw), n


class JinjaPrompt:
    """A GGUF's own chat template, for the models Ollama >= 0.30 renders with it (see
    capabilities.py): HF semantics (jinja2, trim_blocks and lstrip_blocks), earlier
    reasoning passed as `reasoning_content`, thinking as `enable_thinking`."""

    uses_messages = True

    def __init__(self, text: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from ollama_ft.ollamafmt.capabilities import chat_template_capabilities

        self.text = text
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) \
            .from_string(text)
        caps = chat_template_capabilities(text)
        self.thinking_tags = ("<think>", "</think>") if "thinking" in caps else None
        self.tools = "tools" in caps
        self.specials = {"bos_token": bos_token, "eos_token": eos_token}

    @property
    def thinking(self) -> bool:
        return self.thinking_tags is not None

    def render(self, messages: list[dict], tools=None, think: bool | None = None,
               think_level: str = "") -> str:
        msgs = []
        for m in messages:
            out = {"role": m.get("role", ""), "content": m.get("content") or ""}
            if m.get("thinking"):
                out["reasoning_content"] = m["thinking"]
            msgs.append(out)
        kw = {} if think is None else {"enable_thinking": bool(think)}
        return self.template.render(messages=msgs, tools=tools or None,
                                    add_generation_prompt=True, **self.specials, **kw)

    def render_fitting(self, messages, n_ctx, count_tokens, **kw):
        return render_fitting(self.render, messages, n_ctx, count_tokens, **kw)


def infer_thinking_tags(template: str) -> tuple[str, str] | None:
    """The literal tags around `.Thinking` inside `range .Messages` (Ollama's rule)."""
    m = re.search(r"range[^}]*\.Messages", template)
    if not m:
        return None
    rest = template[m.end():]
    out = re.search(r"\{\{-?\s*\.Thinking\s*-?\}\}", rest)
    if not out:
        return None
    before, after = rest[:out.start()], rest[out.end():]
    texts_before = re.sub(r"\{\{.*?\}\}", "\x00", before, flags=re.S).split("\x00")
    texts_after = re.sub(r"\{\{.*?\}\}", "\x00", after, flags=re.S).split("\x00")
    open_tag = next((t.strip() for t in reversed(texts_before) if t.strip()), "")
    close_tag = next((t.strip() for t in texts_after if t.strip()), "")
    if open_tag.startswith("<") and open_tag.endswith(">") and close_tag.startswith("</"):
        return open_tag, close_tag
    return None


class ThinkingSplitter:
    """Feed generated text; get (thinking, content) deltas. Starts inside the block when the
    prompt already opened it (R1's generation prompt ends with `<think>\\n`)."""

    def __init__(self, tags: tuple[str, str], prompt: str):
        self.open, self.close = tags
        self.state = "thinking" if prompt.rstrip().endswith(self.open) else "start"
        self.buf = ""
        self.strip_next = self.state == "thinking"

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        thinking, content = [], []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(self.open):
                    self.buf = s[len(self.open):]
                    self.state, self.strip_next = "thinking", True
                    continue
                if self.open.startswith(s) and s and not final:
                    break  # could still become the opening tag
                if not s and not final:
                    break
                self.state = "content"
                continue
            if self.state == "thinking":
                if self.strip_next:
                    self.buf = self.buf.lstrip()
                    if not self.buf and not final:
                        break
                    self.strip_next = False
                i = self.buf.find(self.close)
                if i >= 0:
                    thinking.append(self.buf[:i])  # as Ollama: its trailing whitespace kept
                    self.buf = self.buf[i + len(self.close):]
                    self.state = "after"
                    continue
                keep = 0 if final else _partial_suffix(self.buf, self.close)  # maybe the tag
                thinking.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            if self.state == "after":
                self.buf = self.buf.lstrip()
                if not self.buf and not final:
                    break
                self.state = "content"
                continue
            content.append(self.buf)
            self.buf = ""
            break
        return "".join(thinking), "".join(content)


def _partial_suffix(text: str, tag: str) -> int:
    """How many trailing chars of text could be the start of tag (held back until known)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
