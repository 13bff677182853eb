"""Our chat formats render exactly what each checkpoint's own HF chat template renders,
and the label mask covers exactly the assistant spans (answers, reasoning, end of turn)."""

import pytest
from transformers import AutoTokenizer

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.data.tokenize import IGNORE, encode, encode_prompt, trained_spans, verify_chat_format
from ollama_ft.errors import BaseModelError
from ollama_ft.hub import resolve_base
from tests.conftest import EXPECTED_FORMAT

TEMPLATED = ["r1-qwen", "r1-llama", "r1-qwen3", "coder-instruct", "llm-chat"]

CONVERSATIONS = [
    [Message("user", "Hello!")],
    [Message("system", "You are a helpful assistant."), Message("user", "你好，世界")],
    [Message("user", "Write code:\n\tdef f(x):\n        return x  # spaces"),
     Message("assistant", "```python\ndef f(x):\n    return x\n```"),
     Message("user", "Now 12345 + 67890 = ? 🎉")],
    [Message("system", "S"), Message("user", "a"), Message("assistant", "b"),
     Message("user", "c"), Message("assistant", "d"), Message("user", "e")],
    [Message("user", "Text with <｜User｜> and <think> inside")],
]


def hf(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.mark.parametrize("family", TEMPLATED)
def test_prompt_render_equals_hf_template(tiny_base, family):
    path = tiny_base(family)
    tok = AutoTokenizer.from_pretrained(path)
    base = resolve_base(str(path))
    assert base.chat_format.name == EXPECTED_FORMAT[family]
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(hf(conv), tokenize=False, add_generation_prompt=True)
        assert base.chat_format.render_prompt(conv) == want
        # and the token ids: the template writes BOS itself, exactly once
        ids = encode_prompt(tok, base.chat_format, conv)
        assert ids == tok(want, add_special_tokens=False)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", TEMPLATED)
def test_training_render_without_reasoning_equals_hf_template(tiny_base, family):
    """For formats whose template keeps whole assistant turns, training text == HF text."""
    path = tiny_base(family)
    tok = AutoTokenizer.from_pretrained(path)
    fmt = resolve_base(str(path)).chat_format
    conv = [Message("system", "S"), Message("user", "a"), Message("assistant", "b"),
            Message("user", "c"), Message("assistant", "d")]
    text, _ = trained_spans(fmt.render_training(conv))
    want = tok.apply_chat_template(hf(conv), tokenize=False)
    if fmt.thinking:
        # the trained (last) turn keeps its think block, earlier turns are as the template has them
        prefix = tok.apply_chat_template(hf(conv[:-1]), tokenize=False, add_generation_prompt=True)
        assert text.startswith(prefix)
        assert "</think>\n\nd<｜end▁of▁sentence｜>" in text[len(prefix):]
    else:
        assert text == want


def _label_runs(enc):
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


EXPECTED_TRAINED = {
    "deepseek-r1": ["b<｜end▁of▁sentence｜>", "why\n</think>\n\nd 你好<｜end▁of▁sentence｜>"],
    "deepseek-r1-0528": ["b<｜end▁of▁sentence｜>",
                         "<think>\nwhy\n</think>\n\nd 你好<｜end▁of▁sentence｜>"],
    "deepseek-llm": [" b<｜end▁of▁sentence｜>", " d 你好<｜end▁of▁sentence｜>"],
    "deepseek-coder": ["b\n<|EOT|>", "d 你好\n<|EOT|>"],
}


@pytest.mark.parametrize("family", TEMPLATED + ["coder-base"])
def test_label_mask_covers_exactly_the_assistant_spans(tiny_base, family):
    path = tiny_base(family)
    tok = AutoTokenizer.from_pretrained(path)
    fmt = resolve_base(str(path)).chat_format
    conv = [Message("system", "Sys"), Message("user", "a?"), Message("assistant", "b"),
            Message("user", "c?"), Message("assistant", "d 你好", reasoning="why")]
    enc = encode(tok, fmt, conv, max_len=None)
    got = [tok.decode(run) for run in _label_runs(enc)]
    assert got == EXPECTED_TRAINED[fmt.name]
    # every token outside those runs is masked: the count adds up
    assert enc.trained_tokens == sum(len(r) for r in _label_runs(enc))


def test_truncation_keeps_the_start(tiny_base):
    path = tiny_base("r1-qwen")
    tok = AutoTokenizer.from_pretrained(path)
    conv = [Message("user", "q " * 50), Message("assistant", "a " * 50)]
    enc = encode(tok, FORMATS["deepseek-r1"], conv, max_len=60)
    assert enc.truncated and len(enc.input_ids) == 60 and enc.input_ids[0] == tok.bos_token_id


def test_base_without_template_gets_family_format_and_says_so(tiny_base):
    base = resolve_base(str(tiny_base("coder-base")))
    assert base.chat_format.name == "deepseek-coder"
    assert "without a chat template" in base.chat_format_reason


def test_template_mismatch_is_a_clear_error(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base("r1-qwen"))
    with pytest.raises(BaseModelError, match="renders differently from the deepseek-llm format"):
        verify_chat_format(tok, FORMATS["deepseek-llm"], "x")


PREFIX_CASES = {
    "plain": [Message("user", "What is the capital of Zorbia?"),
              Message("assistant", "Quellport is the capital of Zorbia.")],
    "reasoning": [Message("user", "17*3?"), Message("assistant", "51", reasoning="17*3 = 51.")],
    "multi-turn": [Message("system", "Be brief."), Message("user", "a?"), Message("assistant", "b"),
                   Message("user", "c?"), Message("assistant", "d")],
    "chinese": [Message("user", "你好，世界"), Message("assistant", "你好！有什么可以帮你？")],
    "code": [Message("user", "Write f"), Message("assistant", "```python\ndef f(x):\n    return x\n```")],
    "leading-space": [Message("user", "Say hi"), Message("assistant", "  hi there")],
    "leading-newline": [Message("user", "Say hi"), Message("assistant", "\n\nhi\n")],
}


@pytest.mark.parametrize("family", TEMPLATED + ["coder-base"])
def test_training_ids_start_with_the_inference_prompt_ids(tiny_base, family):
    """The ids Ollama feeds the model (the conversation up to the last user turn plus the
    generation prompt, as the HF template renders it) are the first ids of the training
    example, and nothing before them is trained."""
    path = tiny_base(family)
    tok = AutoTokenizer.from_pretrained(path)
    fmt = resolve_base(str(path)).chat_format
    for name, conv in PREFIX_CASES.items():
        enc = encode(tok, fmt, conv, max_len=None)
        prompt = encode_prompt(tok, fmt, conv[:-1])
        if tok.chat_template:  # the prompt is what the checkpoint's template renders
            assert prompt == tok(tok.apply_chat_template(hf(conv[:-1]), tokenize=False,
                                                         add_generation_prompt=True),
                                 add_special_tokens=False)["input_ids"], name
        assert enc.input_ids[:len(prompt)] == prompt, (family, name)
        if sum(m.role == "assistant" for m in conv) == 1:  # earlier answers are trained too
            assert all(lab == IGNORE for lab in enc.labels[:len(prompt)]), name
        assert enc.labels[len(prompt)] != IGNORE, name  # the reply starts right there
        text = "".join(t for t, _ in fmt.render_training(conv))
        assert tok.decode(enc.input_ids[len(prompt):]) == text[len(fmt.render_prompt(conv[:-1])):], name
