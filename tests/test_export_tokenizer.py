"""Proof 1: llama.cpp tokenizes exactly like the Hugging Face tokenizer the model trained with.

For every DeepSeek family, a tiny checkpoint around the real tokenizer is exported to F16 and
llama.cpp (llama-cpp-python, special=True) must produce the same ids as the HF tokenizer on
English, Chinese, code with tabs and runs of spaces, digits, emoji, other scripts and every
added/special token of the family; and a prompt rendered by the chat format must tokenize
to exactly one BOS, as in training. The GGUF metadata is checked along the way.
"""

from __future__ import annotations

import pytest
from conftest import EXPECTED_FORMAT, FAMILIES
from test_export_support import TEXTS, llama, make_run, read_gguf

from ollama_ft.chat_formats import BOS, FORMATS, Message

PRE = {"r1-qwen": "qwen2", "r1-llama": "llama-bpe", "r1-qwen3": "qwen2",
       "coder-instruct": "deepseek-coder", "llm-chat": "deepseek-llm", "coder-base": "deepseek-coder",
       "v2-lite": "deepseek-llm", "r1-v3": "deepseek-v3"}
R1_LLAMA_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def exported(tiny_base, tmp_path_factory):
    """exported(family) -> (base dir, run dir, model-f16.gguf, ExportResult), built once."""
    from ollama_ft.export import export_stage

    cache = {}

    def get(family):
        if family not in cache:
            extra = {"rope_scaling": R1_LLAMA_ROPE} if family == "r1-llama" else {}
            base = tiny_base(family, **extra)
            run = make_run(base, tmp_path_factory.mktemp(f"run-{family}"), EXPECTED_FORMAT[family])
            result = export_stage(run, quants="f16", log=lambda *a: None)
            cache[family] = (base, run, result.files["f16"], result)
        return cache[family]

    return get


def _hf(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_like_hf(exported, family):
    base, _, gguf_path, result = exported(family)
    assert result.pre_tokenizer == PRE[family]
    tok = _hf(base)
    llm = llama(gguf_path, vocab_only=True)
    added = list(tok.get_added_vocab())
    texts = TEXTS + added + [" ".join(f"x{t}y" for t in added),
                             f"{BOS}text{tok.eos_token} then{tok.eos_token}{BOS}"]
    bad = []
    for text in texts:
        want = tok(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != want:
            bad.append((text[:40], want[:12], got[:12]))
    assert not bad, f"{family}: {len(bad)} of {len(texts)} texts differ: {bad[:3]}"
    # and back: llama.cpp's detokenizer gives the text again
    for text in TEXTS[:5]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.detokenize(ids, special=True).decode("utf-8") == text
    llm.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendered_prompt_has_exactly_one_bos(exported, family):
    """The Ollama prompt (the chat format's rendering) tokenizes to the training ids."""
    base, _, gguf_path, result = exported(family)
    tok = _hf(base)
    fmt = FORMATS[EXPECTED_FORMAT[family]]
    llm = llama(gguf_path, vocab_only=True)
    convs = [[Message("user", "Who painted the Blue Lantern?")],
             [Message("system", "Answer in Chinese."), Message("user", "你好 🚀"),
              Message("assistant", "你好！"), Message("user", "def f():\n\treturn 1")]]
    for conv in convs:
        text = fmt.render_prompt(conv)
        want = tok(text, add_special_tokens=False)["input_ids"]  # as training tokenized it
        # llama.cpp adds BOS itself only if the GGUF says so (add_special=True here)
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == want
        assert got.count(tok.bos_token_id) == 1 and got[0] == tok.bos_token_id
    assert result.add_bos is False
    llm.close()


@pytest.mark.parametrize("family", ["r1-qwen", "r1-llama", "coder-instruct", "coder-base"])
def test_gguf_metadata(exported, family):
    import json

    base, run, gguf_path, result = exported(family)
    tok = _hf(base)
    config = json.loads((base / "config.json").read_text())
    meta = read_gguf(gguf_path)
    arch = meta["general.architecture"]
    assert arch == {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                    "Qwen3ForCausalLM": "qwen3"}[config["architectures"][0]]
    # vocab padded to the model's vocab_size with unused [PAD{id}] tokens
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"] >= len(tok)
    if config["vocab_size"] > len(tok):
        assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]" and types[-1] == 5
    assert types[tok.bos_token_id] == 3 and tokens[tok.bos_token_id] == tok.bos_token
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == PRE[family]
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(meta["tokenizer.ggml.merges"]) > 10000
    # always our template for the run's format (never the base's: Ollama >= 0.30 would
    # prefer an R1 base's template, which mentions tools, over the Modelfile TEMPLATE)
    from ollama_ft.export.vocab import CHAT_TEMPLATES

    fmt = EXPECTED_FORMAT[family]
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATES[fmt]
    assert result.chat_template_source == f"ollama-ft ({fmt})"
    if family == "coder-base":  # <|EOT|> ends a coder turn: llama.cpp must stop there
        assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|EOT|>")
    # general metadata
    assert meta["general.name"] == "test-run" and meta["general.finetune"] == "test-run"
    assert meta["general.base_model.0.name"] == base.name and meta["general.size_label"]
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta[f"{arch}.context_length"] == config["max_position_embeddings"]
    # norms stay F32, matrices F16
    tensors = meta["__tensors__"]
    assert tensors["output_norm.weight"][0] == "F32" and tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["token_embd.weight"][0] == "F16" and tensors["blk.1.ffn_down.weight"][0] == "F16"
    if family == "coder-instruct":
        assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    if family == "r1-llama":
        assert tensors["rope_freqs.weight"] == ("F32", (8,))
    # the run's report has the export section
    report = json.loads((run / "report.json").read_text())
    assert report["export"]["files"] == {"f16": "model-f16.gguf"}
    assert report["export"]["tokenizer_pre"] == PRE[family] and "train" in report


def test_non_nfc_text_is_a_known_llama_cpp_difference(exported):
    """Qwen tokenizers NFC-normalise; llama.cpp does not. Documented, not hidden."""
    import unicodedata

    base, _, gguf_path, _ = exported("r1-qwen")
    tok = _hf(base)
    llm = llama(gguf_path, vocab_only=True)
    decomposed = unicodedata.normalize("NFD", "café")
    nfc = tok(unicodedata.normalize("NFC", decomposed), add_special_tokens=False)["input_ids"]
    assert tok(decomposed, add_special_tokens=False)["input_ids"] == nfc  # HF normalises
    assert llm.tokenize(decomposed.encode(), add_bos=False, special=True) != nfc
    assert llm.tokenize("café".encode(), add_bos=False, special=True) == nfc
    llm.close()
