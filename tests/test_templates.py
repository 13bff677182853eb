"""Template parity: our Go TEMPLATEs, executed by Go's real text/template the way Ollama
executes them (tests/gotmpl), render what the HF chat template renders, token for token.

For every chat format and every conversation of the suite:
  1. the Go render (think unset, true, a level; /api/chat's defaulting) equals
     ChatFormat.render_prompt, the renderer proven equal to the HF templates;
  2. the HF tokenizer's ids of the Go render equal the ids of the HF template's render;
  3. llama.cpp's ids of the Go render, with the GGUF's add_bos, equal those ids.
Plus: the thinking capability Ollama infers, thinking turned off, continuing a final
assistant message, and Ollama's message rules (system join, same-role merge).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollama_ft.chat_formats import BOS, CODER_EOT, EOS, FORMATS, Message
from ollama_ft.ollama.templates import template_for

FAMILIES = {"r1-qwen": "deepseek-r1", "r1-llama": "deepseek-r1", "r1-qwen3": "deepseek-r1-0528",
            "coder-instruct": "deepseek-coder", "llm-chat": "deepseek-llm"}

# Conversations ending with a user turn (the generation prompt follows).
SUITE: dict[str, list[Message]] = {
    "one-turn": [Message("user", "Hello!")],
    "system-chinese": [Message("system", "You are a helpful assistant."),
                       Message("user", "你好，世界")],
    "code": [Message("user", "Write code:\n\tdef f(x):\n        return x  # spaces"),
             Message("assistant", "```python\ndef f(x):\n    return x\n```"),
             Message("user", "Now 12345 + 67890 = ? 🎉")],
    "several-turns": [Message("system", "S"), Message("user", "a"), Message("assistant", "b"),
                      Message("user", "c"), Message("assistant", "d"), Message("user", "e")],
    "special-text": [Message("user", "Text with <｜User｜> and <think> inside {{ .System }}")],
    "reasoning-earlier": [
        Message("system", "Think step by step."), Message("user", "What is 17*3?"),
        Message("assistant", "51", reasoning="17*3 = 17*3 = 51."),
        Message("user", "And 17*4? 用中文回答"),
        Message("assistant", "六十八", reasoning="17*4 = 68"), Message("user", "Thanks!")],
    "whitespace": [Message("user", "  spaces around  \n\n"), Message("assistant", " a \n"),
                   Message("user", "\tTab\r\nCRLF")],
}
# what ends an assistant turn in each format's rendering (for continuation checks)
TURN_END = {"deepseek-r1": EOS, "deepseek-r1-0528": EOS, "deepseek-llm": EOS,
            "deepseek-coder": "\n" + CODER_EOT + "\n"}


def _messages(conv: list[Message], reasoning_key: str) -> list[dict]:
    return [{"role": m.role, "content": m.content, **({reasoning_key: m.reasoning} if m.reasoning else {})}
            for m in conv]


def ollama_messages(conv: list[Message]) -> list[dict]:
    """What an Ollama client sends: reasoning of earlier turns travels in `thinking`."""
    return _messages(conv, "thinking")


def hf_messages(conv: list[Message]) -> list[dict]:
    """The same conversation for an HF chat template (which ignores reasoning_content)."""
    return _messages(conv, "reasoning_content")


def render(gotmpl, fmt_name: str, cases: list[dict]) -> list[str]:
    answer = gotmpl(template_for(fmt_name)[0], cases)
    prompts = []
    for case, result in zip(cases, answer["results"]):
        assert "error" not in result, (case, result)
        prompts.append(result["prompt"])
    return prompts


# --- the templates as Ollama sees them -----------------------------------------------------

@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_template_parses_and_gets_the_right_capabilities(gotmpl, fmt_name):
    template, _ = template_for(fmt_name)
    assert not template.endswith("\n") and template.endswith("}}")
    answer = gotmpl(template, [])
    assert "messages" in answer["vars"]
    assert "tools" not in answer["capabilities"]
    if FORMATS[fmt_name].thinking:
        assert answer["capabilities"] == ["completion", "thinking"]
        assert answer["thinking_tags"] == ["<think>", "</think>"]
    else:
        assert answer["capabilities"] == ["completion"]
        assert answer["thinking_tags"] == ["", ""]


# --- 1. the Go render equals the proven Python renderer ------------------------------------

@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_go_render_equals_render_prompt(gotmpl, fmt_name):
    fmt = FORMATS[fmt_name]
    cases, want = [], []
    for conv in SUITE.values():
        for think in (None, True, "high"):
            cases.append({"messages": ollama_messages(conv), "think": think})
            want.append(fmt.render_prompt(conv))
        cases.append({"messages": ollama_messages(conv), "handler": "chat"})  # /api/chat
        want.append(fmt.render_prompt(conv))
    assert render(gotmpl, fmt_name, cases) == want


# --- 2. HF token ids ------------------------------------------------------------------------

def _hf_ids(tok, conv) -> list[int]:
    ids = tok.apply_chat_template(hf_messages(conv), tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return list(ids)


@pytest.fixture(scope="module")
def go_renders(gotmpl):
    """format -> the Go render of every SUITE conversation (think unset)."""
    return {name: dict(zip(SUITE, render(gotmpl, name, [{"messages": ollama_messages(c)}
                                                        for c in SUITE.values()])))
            for name in FORMATS}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_go_render_tokenizes_like_the_hf_template(tiny_base, go_renders, family):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base(family))
    for name, conv in SUITE.items():
        go_text = go_renders[FAMILIES[family]][name]
        hf_text = tok.apply_chat_template(hf_messages(conv), tokenize=False,
                                          add_generation_prompt=True)
        assert go_text == hf_text, name
        ids = tok(go_text, add_special_tokens=False)["input_ids"]
        assert ids == _hf_ids(tok, conv), name
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, name


# --- 3. llama.cpp token ids ----------------------------------------------------------------

def _vocab_gguf(base: Path, fmt_name: str, out: Path) -> Path:
    """A GGUF holding the tokenizer metadata the export stage writes for `base` (tokens,
    merges, pre-tokenizer, special ids, add_bos), with enough hyperparameters for llama.cpp
    to load its vocabulary (the tokenizer part is the export stage's own code)."""
    import gguf

    from ollama_ft.export import vocab
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    meta = vocab.read_tokenizer(base, int(cfg["vocab_size"]), FORMATS[fmt_name])
    arch = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
            "Qwen3ForCausalLM": "qwen3"}[cfg["architectures"][0]]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    vocab.add_tokenizer_to_gguf(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_ids_of_the_go_render_equal_hf_ids(tiny_base, go_renders, tmp_path, family):
    import llama_cpp
    from transformers import AutoTokenizer

    base = tiny_base(family)
    fmt_name = FAMILIES[family]
    model = llama_cpp.Llama(str(_vocab_gguf(base, fmt_name, tmp_path / "vocab.gguf")),
                            vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(base)
    for name, conv in SUITE.items():
        # add_bos=True: llama.cpp adds BOS only if the GGUF says so (as Ollama's runner does)
        ids = model.tokenize(go_renders[fmt_name][name].encode("utf-8"), add_bos=True,
                             special=True)
        assert ids == _hf_ids(tok, conv), name


# --- thinking off, continuation, Ollama's message rules ------------------------------------

def _training_text(fmt_name: str, conv: list[Message]) -> str:
    return "".join(text for text, _ in FORMATS[fmt_name].render_training(conv))


@pytest.mark.parametrize("fmt_name", ["deepseek-r1", "deepseek-r1-0528"])
def test_thinking_off_starts_the_reply_after_an_empty_think_block(gotmpl, fmt_name):
    """think: false renders what training renders for an answer without reasoning."""
    cases, want = [], []
    for conv in SUITE.values():
        cases.append({"messages": ollama_messages(conv), "think": False})
        want.append(_training_text(fmt_name, conv + [Message("assistant", "ANSWER")])
                    .removesuffix("ANSWER" + EOS))
    got = render(gotmpl, fmt_name, cases)
    assert got == want
    assert all(g.endswith("<｜Assistant｜><think>\n\n</think>\n\n") for g in got)
    # with thinking on (or unset) the reply opens <think> as in HF (R1) or is left to the
    # model (R1-0528); the prompt does not close a think block
    on = render(gotmpl, fmt_name, [{"messages": ollama_messages(SUITE["code"]), "think": True}])
    assert not on[0].endswith("</think>\n\n")
    if fmt_name == "deepseek-r1":
        # Ollama starts its thinking parser inside the block when the trimmed prompt ends
        # with the opening tag: the reasoning arrives as message.thinking
        assert on[0].strip().endswith("<think>")


@pytest.mark.parametrize("fmt_name", ["deepseek-llm", "deepseek-coder"])
def test_non_thinking_formats_ignore_think_and_refuse_it_in_chat(gotmpl, fmt_name):
    conv = ollama_messages(SUITE["several-turns"])
    got = render(gotmpl, fmt_name, [{"messages": conv, "think": False},
                                    {"messages": conv, "think": None}])
    assert got[0] == got[1] == FORMATS[fmt_name].render_prompt(SUITE["several-turns"])
    answer = gotmpl(template_for(fmt_name)[0], [{"messages": conv, "think": True,
                                                 "handler": "chat"}])
    assert "does not support thinking" in answer["results"][0]["error"]


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_a_final_assistant_message_is_continued(gotmpl, fmt_name):
    """Ending with an assistant message (prefill): the render is the training text of that
    turn without its end of turn, reasoning (Ollama's `thinking`) in its think block."""
    conv = SUITE["reasoning-earlier"] + [Message("assistant", "The answer is",
                                                 reasoning="Let me see.")]
    got = render(gotmpl, fmt_name, [{"messages": ollama_messages(conv), "think": True}])[0]
    want = _training_text(fmt_name, conv).removesuffix(TURN_END[fmt_name])
    assert got == want
    if FORMATS[fmt_name].thinking:
        assert got.endswith("<think>\nLet me see.\n</think>\n\nThe answer is")


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_ollamas_message_rules(gotmpl, fmt_name):
    """System messages join into .System with blank lines; consecutive messages of one role
    merge with a blank line (so a conversation renders as its collated form)."""
    fmt = FORMATS[fmt_name]
    conv = [Message("system", "A"), Message("system", "B"), Message("user", "q1"),
            Message("user", "q2"), Message("assistant", "a1"), Message("user", "q3")]
    collated = [Message("system", "A\n\nB"), Message("user", "q1\n\nq2"),
                Message("assistant", "a1"), Message("user", "q3")]
    got = render(gotmpl, fmt_name, [{"messages": ollama_messages(conv)}])[0]
    assert got == fmt.render_prompt(collated)
    assert got.startswith(BOS + "A\n\nB")


def test_the_harness_appends_response_to_legacy_templates(gotmpl):
    """Ollama's rule for templates naming neither .Messages nor .Response (legacy, per turn)."""
    answer = gotmpl("{{ if .System }}[{{ .System }}]{{ end }}U:{{ .Prompt }} A:", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
                      {"role": "assistant", "content": "r"}, {"role": "user", "content": "y"}]}])
    assert answer["results"][0]["prompt"] == "[s]U:x A:rU:y A:"


# --- the GGUF's own chat template (what a Jinja runtime renders) ---------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_chat_template_renders_like_the_checkpoints_own(tiny_base, go_renders, family):
    """tokenizer.chat_template in our GGUFs renders, for every conversation without tool
    calls, exactly the checkpoint's own template's text (and with enable_thinking=false
    what our TEMPLATE renders with think:false)."""
    from transformers import AutoTokenizer

    from ollama_ft.export.vocab import CHAT_TEMPLATES

    tok = AutoTokenizer.from_pretrained(tiny_base(family))
    fmt_name = FAMILIES[family]
    ours = CHAT_TEMPLATES[fmt_name]
    for name, conv in SUITE.items():
        want = tok.apply_chat_template(hf_messages(conv), tokenize=False, add_generation_prompt=True)
        got = tok.apply_chat_template(hf_messages(conv), tokenize=False, add_generation_prompt=True,
                                      chat_template=ours)
        assert got == want == go_renders[fmt_name][name], name
        if FORMATS[fmt_name].thinking:
            no_think = tok.apply_chat_template(hf_messages(conv), tokenize=False,
                                               add_generation_prompt=True, chat_template=ours,
                                               enable_thinking=False)
            assert no_think == _training_text(fmt_name, conv + [Message("assistant", "A")]) \
                .removesuffix("A" + EOS), name


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_gguf_chat_template_claims_no_capability_the_template_lacks(fmt_name):
    """Ollama >= 0.30 ignores the TEMPLATE when the GGUF's chat template has more
    capabilities (server/images.go: tools if it says "tools" or "tool_call"; thinking if it
    has <think> and </think> or splits content on </think>). Ours claims thinking exactly
    for the thinking formats and tools never, so the proven TEMPLATE stays in use
    (tests/test_real_ollama.py shows it on a real daemon)."""
    from ollama_ft.export.vocab import CHAT_TEMPLATES

    jinja = CHAT_TEMPLATES[fmt_name]
    assert "tools" not in jinja and "tool_call" not in jinja
    thinking = ("<think>" in jinja and "</think>" in jinja) or "content.split('</think>')" in jinja
    assert thinking == FORMATS[fmt_name].thinking
