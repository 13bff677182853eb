"""Which template a model is rendered with, and the capabilities /api/show reports, by the
rules of Ollama >= 0.30 (server/images.go, read from v0.33.0-rc2).

Capabilities come from the Go TEMPLATE (`tools` if it uses .Tools, `insert` if .Suffix,
`thinking` if .Thinking sits between literal tags inside `range .Messages`) and from the
GGUF's `tokenizer.chat_template` (`tools` if it says "tools" or "tool_call", `thinking` if
it has <think> and </think> or splits content on </think>). When the GGUF template claims
more (and the TEMPLATE has no tool round trip, or the Jinja one has one too), or both have
tools but only the Jinja one a round trip, the GGUF template wins and the TEMPLATE is not
used. OLLAMA_GO_TEMPLATE set to a boolean decides instead.
"""

from __future__ import annotations

import os

TRUE = ("1", "t", "true", "y", "yes", "on")
FALSE = ("0", "f", "false", "n", "no", "off")

_TOOL_ROLE_TESTS = ("role'] == 'tool'", "role'] == \"tool\"", "role\"] == 'tool'",
                    "role\"] == \"tool\"", "message.role == 'tool'", "message.role == \"tool\"",
                    "ipython")


def chat_template_capabilities(text: str | None) -> list[str]:
    if not text:
        return []
    caps = []
    if "tools" in text or "tool_call" in text:
        caps.append("tools")
    splits = "content.split('</think>')" in text or 'content.split("</think>")' in text
    if ("<think>" in text and "</think>" in text) or (
            splits and "reasoning_content" not in text and "<SPECIAL_12>" not in text):
        caps.append("thinking")
    return caps


def chat_template_has_tool_round_trip(text: str | None) -> bool:
    if not text or "tools" not in chat_template_capabilities(text):
        return False
    calls = "tool_calls" in text or "assistant_tool_call" in text
    return calls and ("tool_response" in text or "tool_results" in text
                      or any(t in text for t in _TOOL_ROLE_TESTS))


def go_template_capabilities(template) -> list[str]:
    """`template`: a prompt.PromptTemplate (or None)."""
    if template is None:
        return []
    caps = []
    if template.tools:
        caps.append("tools")
    if ".Suffix" in template.text:
        caps.append("insert")
    if template.thinking:
        caps.append("thinking")
    return caps


def go_template_has_tool_round_trip(template) -> bool:
    if template is None or not template.tools or ".ToolCalls" not in template.text:
        return False
    raw = template.text
    return 'eq .Role "tool"' in raw or "tool_response" in raw or "TOOL_RESULTS" in raw


def prefers_chat_template(chat_text: str | None, template) -> bool:
    if not chat_text or template is None:
        return False
    chat_caps, go_caps = chat_template_capabilities(chat_text), go_template_capabilities(template)
    if len(chat_caps) > len(go_caps):
        return not go_template_has_tool_round_trip(template) or \
            chat_template_has_tool_round_trip(chat_text)
    if set(chat_caps) != set(go_caps) or "tools" not in chat_caps:
        return False
    return chat_template_has_tool_round_trip(chat_text) and \
        not go_template_has_tool_round_trip(template)


def go_template_env() -> bool | None:
    """OLLAMA_GO_TEMPLATE as a boolean, or None when unset (or not a boolean)."""
    value = os.environ.get("OLLAMA_GO_TEMPLATE", "").strip().lower()
    return True if value in TRUE else False if value in FALSE else None


def uses_go_template(template, chat_text: str | None) -> bool:
    """Whether the TEMPLATE (None: the model has none) renders the model's prompts."""
    if template is None:
        return False
    forced = go_template_env()
    if forced is not None:
        return forced
    return not prefers_chat_template(chat_text, template)


def capabilities(template, chat_text: str | None) -> list[str]:
    """What /api/show lists, in Ollama's order."""
    if uses_go_template(template, chat_text):
        return ["completion"] + [c for c in go_template_capabilities(template)]
    return chat_template_capabilities(chat_text) + ["completion"]
