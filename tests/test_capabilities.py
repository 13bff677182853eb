"""The bridge chooses a model's template and reports its capabilities by Ollama >= 0.30's
rules: the GGUF's chat template wins over the TEMPLATE when it claims more. The cases are
those Ollama's own server tests state (server/images_test.go, v0.33.0-rc2); the real daemon
agrees on our exported models (tests/test_real_ollama.py, tests/test_bridge_vs_ollama.py)."""

from __future__ import annotations

import pytest

from ollama_ft.ollamafmt.capabilities import capabilities, prefers_chat_template, uses_go_template
from ollama_ft.ollamafmt.prompt import JinjaPrompt, PromptTemplate

CUSTOM = "CUSTOM {{ .Prompt }}"
TOOLS_JINJA = "{% if tools %}{{ tools }}{% endif %}{{ messages[0]['content'] }}"
ROUND_TRIP_JINJA = """{% if tools %}{{ tools }}{% endif %}
{% for message in messages %}
{% if message.tool_calls %}
{% for tool_call in message.tool_calls %}{{ tool_call.function.name }}{% endfor %}
{% endif %}
{% if message.role == 'tool' %}tool_response {{ message.content }}{% endif %}
{% endfor %}"""
GO_TOOLS_NO_ROLE = """{{ if .Tools }}tools{{ end }}
{{ range .Messages }}
{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}
{{ end }}"""
WEAKER_TOOLS_JINJA = """{%- if tools and not available_tools -%}
{%- if available_tools -%}{{ available_tools | tojson }}{%- endif -%}
{%- if thinking -%}<think></think><response></response>{%- endif -%}"""
GO_ROUND_TRIP = """{{ if .Tools }}tools{{ end }}
{{ range .Messages }}
{{ if eq .Role "tool" }}tool_response{{ else }}{{ .Role }}{{ end }}
{{ if .ToolCalls }}{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}{{ else }}{{ .Content }}{{ end }}
{{ end }}"""
GO_THINKING = "{{ range .Messages }}{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}{{ end }}"


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("OLLAMA_GO_TEMPLATE", raising=False)


@pytest.mark.parametrize("chat, go, prefer", [
    ("{{ bos_token }}{{ messages[0]['content'] }}", CUSTOM, False),
    (TOOLS_JINJA, CUSTOM, True),
    ("{% if tools %}{{ tools }}{% endif %}{% set content = (content.split('</think>')|last) %}",
     GO_THINKING, True),
    (ROUND_TRIP_JINJA, GO_TOOLS_NO_ROLE, True),
    (WEAKER_TOOLS_JINJA, GO_ROUND_TRIP, False),
    (None, CUSTOM, False),
])
def test_template_choice(chat, go, prefer):
    t = PromptTemplate(go)
    assert prefers_chat_template(chat, t) is prefer
    assert uses_go_template(t, chat) is not prefer


def test_ollama_go_template_decides_when_set(monkeypatch):
    t = PromptTemplate(CUSTOM)
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", "1")
    assert uses_go_template(t, TOOLS_JINJA) and "tools" not in capabilities(t, TOOLS_JINJA)
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", "0")
    assert not uses_go_template(t, TOOLS_JINJA) and "tools" in capabilities(t, TOOLS_JINJA)
    monkeypatch.setenv("OLLAMA_GO_TEMPLATE", "maybe")  # not a boolean: as if unset
    assert not uses_go_template(t, TOOLS_JINJA)


def test_r1s_own_template_beats_our_template_but_our_gguf_template_does_not(tiny_base):
    """What the issue saw on Ollama 0.33: the R1 HF template mentions tool calls, so it
    won; the chat template our GGUFs carry claims what the TEMPLATE does and loses."""
    from transformers import AutoTokenizer

    from ollama_ft.export.vocab import CHAT_TEMPLATES
    from ollama_ft.ollama.templates import template_for

    hf = AutoTokenizer.from_pretrained(tiny_base("r1-qwen")).chat_template
    ours = PromptTemplate(template_for("deepseek-r1")[0])
    assert capabilities(ours, hf) == ["tools", "thinking", "completion"]
    assert capabilities(ours, CHAT_TEMPLATES["deepseek-r1"]) == ["completion", "thinking"]
    for fmt in CHAT_TEMPLATES:
        assert uses_go_template(PromptTemplate(template_for(fmt)[0]), CHAT_TEMPLATES[fmt])


def test_jinja_prompt_renders_like_hf_with_thinking_switch(tiny_base):
    from transformers import AutoTokenizer

    from ollama_ft.export.vocab import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(tiny_base("r1-qwen"))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a", "thinking": "t"}, {"role": "user", "content": "q"}]
    p = JinjaPrompt(tok.chat_template, tok.bos_token, tok.eos_token)
    assert p.render(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ours = JinjaPrompt(CHAT_TEMPLATES["deepseek-r1"], tok.bos_token, tok.eos_token)
    assert ours.render(msgs, think=False).endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    assert ours.render(msgs, think=True).endswith("<｜Assistant｜><think>\n")
