"""The chat format of an Ollama base: its own TEMPLATE, rendered as the daemon renders it.

Whoever wrote the TEMPLATE, the inference prompt of a turn is what the daemon renders for the
conversation up to that turn (the project's Go-template engine, with Ollama's collation of
messages and its SYSTEM for requests without one). A trained turn is that prompt, then the
answer (its reasoning first, as `<think>` … `</think>`, when the example has one), then the
end-of-turn text: the stop the TEMPLATE writes after an assistant message (found by
rendering), else the first stop parameter, else the EOS token. So the inference prompt is a
token-for-token prefix of the training example by construction. Earlier assistant turns are
trained too where the TEMPLATE writes them as prompt + answer + end (checked per example).
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_ft.chat_formats import ChatFormat, Message, Segment

_PROBE = "\x00ollama-ft-answer\x00"
THINK_OPEN = "<think>\n"


@dataclass(frozen=True)
class TemplateFormat(ChatFormat):
    template: str = ""
    bos: str = ""  # BOS text the daemon's llama.cpp adds before the prompt (add_bos_token)
    eos: str = ""  # the tokenizer's EOS text: the end of a turn when nothing else says
    bos_token: str = ""  # the BOS token's text, for a Jinja template's `bos_token`

    @property
    def jinja(self) -> bool:
        """The daemon serves the GGUF's own (Jinja) chat template: Ollama >= 0.30 prefers it
        when it claims more capabilities than the Go TEMPLATE (its /api/show then shows it)."""
        return is_jinja(self.template)

    # --- rendering, as the daemon does -----------------------------------------------
    def _prompt_template(self):
        return prompt_template(self.template, self.bos_token, self.eos)

    def _with_system(self, messages: list[Message]) -> list[Message]:
        if self.default_system and not any(m.role == "system" for m in messages):
            return [Message("system", self.default_system)] + list(messages)
        return list(messages)

    def _render(self, messages: list[Message]) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in self._with_system(messages)]
        return self.bos + self._prompt_template().render(msgs)

    def render_prompt(self, messages: list[Message]) -> str:
        return self._render(messages)

    def answer_text(self, m: Message, keep_reasoning: bool, prompt: str = "") -> str:
        """The trained answer; with its reasoning when kept. A prompt that already opens the
        think block (R1's `<｜Assistant｜><think>\n`) is continued inside it."""
        reasoning = (m.reasoning or "").strip() if keep_reasoning else ""
        if keep_reasoning and prompt.endswith(THINK_OPEN):
            return (reasoning + "\n" if reasoning else "\n") + "</think>\n\n" + m.content
        return f"{THINK_OPEN}{reasoning}\n</think>\n\n{m.content}" if reasoning else m.content

    def _frame(self, messages: list[Message], k: int) -> tuple[str, str]:
        """The text the TEMPLATE writes before and after assistant turn k's answer."""
        probe = list(messages[:k]) + [m for m in messages[k:] if m.role == "system"]
        try:
            text = self._render(probe + [Message("assistant", _PROBE), Message("user", "?")])
        except Exception:  # noqa: BLE001 - a template that refuses this shape: no frame
            text = ""
        before, _, after = text.partition(_PROBE)
        return before, after

    def lead_in(self, messages: list[Message], k: int, prompt: str) -> str:
        """What the TEMPLATE writes between the generation prompt and the answer (deepseek-llm:
        the space after "Assistant:")."""
        before, _ = self._frame(messages, k)
        return before[len(prompt):] if before.startswith(prompt) else ""

    def end_of_turn(self, messages: list[Message], k: int) -> str:
        """What follows assistant turn k: the stop the TEMPLATE writes there, or the first
        stop parameter, or EOS."""
        after = self._frame(messages, k)[1]
        # the first stop (or EOS) the TEMPLATE writes after the answer, with the white space
        # it writes before it (deepseek-coder: "\n<|EOT|>")
        found = [(after.find(s), -len(s), s) for s in (*self.stops, self.eos) if s and s in after]
        if found:
            i, _, stop = min(found)
            if not after[:i].strip():
                return after[:i] + stop
        return self.stops[0] if self.stops else self.eos

    def render_training(self, messages: list[Message]) -> list[Segment]:
        asst = [i for i, m in enumerate(messages) if m.role == "assistant"]
        last = asst[-1]
        systems_after = lambda k: [m for m in messages[k:] if m.role == "system"]  # noqa: E731
        prompt = self._render(messages[:last] + systems_after(last))
        segs: list[Segment] = []
        pos = 0
        for k in asst[:-1]:  # earlier turns: trained where the TEMPLATE writes them whole
            # where the TEMPLATE puts turn k's answer: render it with a marker instead
            marked = list(messages[:last]) + systems_after(last)
            marked[k] = Message("assistant", _PROBE)
            r = self._render(marked)
            i = r.find(_PROBE)
            body = self.answer_text(messages[k], False) + self.end_of_turn(messages, k)
            if i >= pos and r[:i] == prompt[:i] and prompt.startswith(body, i):
                p = self._render(messages[:k] + systems_after(k))  # turn k's own prompt
                start = len(p) if pos <= len(p) <= i and r.startswith(p) else i
                segs += [(prompt[pos:start], False), (prompt[start:i] + body, True)]
                pos = i + len(body)
        segs.append((prompt[pos:], False))
        answer = (self.lead_in(messages, last, prompt) + self.answer_text(messages[last], True, prompt)
                  + self.end_of_turn(messages, last))
        segs.append((answer, True))
        return [s for s in segs if s[0]]


def is_jinja(template: str) -> bool:
    return "{%" in template  # Go templates have no {% %} blocks


def prompt_template(template: str, bos_token: str = "", eos_token: str = ""):
    """The renderer the daemon uses for this template: Go TEMPLATE or the GGUF's Jinja."""
    from ollama_ft.ollamafmt.prompt import JinjaPrompt, PromptTemplate

    if is_jinja(template):
        return JinjaPrompt(template, bos_token, eos_token)
    return PromptTemplate(template)


def template_format(name: str, template: str, stops, system: str = "", bos: str = "",
                    eos: str = "", bos_token: str = "") -> TemplateFormat:
    """The chat format of an Ollama model `name` with this TEMPLATE, stops and SYSTEM."""
    try:
        renderer = prompt_template(template, bos_token, eos)
        renderer.render([{"role": "user", "content": "hi"}])
    except Exception as e:  # noqa: BLE001 - Go template or jinja2 errors, both the daemon's text
        from ollama_ft.errors import BaseModelError

        raise BaseModelError(f"ollama:{name}: its TEMPLATE cannot be rendered ({e})") from None
    stops = tuple(s for s in stops if s) or ((eos,) if eos else ())
    return TemplateFormat(f"ollama:{name}", f"the TEMPLATE {name} is served with",
                          stops=stops, thinking=renderer.thinking,
                          default_system=system or None, template=template, bos=bos, eos=eos,
                          bos_token=bos_token)
