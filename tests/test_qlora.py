"""QLoRA wherever bitsandbytes runs, the CPU included: train on the base in NF4, save the
adapter, export it merged into the 16-bit base, and the GGUF answers the trained facts as
the NF4 model does."""

import importlib.util
import json
import sys

import pytest

from ollama_ft.chat_formats import FORMATS, Message
from ollama_ft.config import RunConfig
from ollama_ft.errors import ConfigError
from ollama_ft.train.trainer import train_stage
from tests.conftest import FACTS, qa_rows, write_jsonl

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (requirements-test.txt)")


def _cfg(tmp_path, base, **kw):
    data = write_jsonl(tmp_path / "facts.jsonl", qa_rows(FACTS))
    return RunConfig(name="q", base=str(base), data=str(data), output_dir=str(tmp_path / "q"),
                     load_in_4bit=True, lr=3e-3, batch_size=4, warmup=0, lora_dropout=0.0,
                     seed=0, max_len=128, logging_steps=10, **kw).validate()


def test_without_bitsandbytes_4bit_is_refused_before_anything_loads(tiny_base, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"--load-in-4bit \(QLoRA\) needs bitsandbytes"):
        train_stage(_cfg(tmp_path, tiny_base("r1-qwen"), max_steps=2), log=lambda *a: None)
    assert not (tmp_path / "q").exists()


@needs_bnb
@pytest.mark.slow
def test_qlora_on_the_cpu_trains_exports_and_the_gguf_answers_as_the_nf4_model(tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.data.tokenize import encode_prompt
    from ollama_ft.evaluation.gguf_model import GGUFModel
    from ollama_ft.export import export_stage
    from ollama_ft.train.generate import greedy_answer
    from ollama_ft.train.qlora import quantization_config

    base = tiny_base("r1-qwen", hidden=128, final_norm=4.0)  # a base that can learn (demo's)
    cfg = _cfg(tmp_path, base, max_steps=60, save_steps=60)
    result = train_stage(cfg, log=lambda *a: None)
    report = json.loads((cfg.run_dir / "report.json").read_text())["train"]
    assert report["load_in_4bit"] is True and report["device"] == "cpu"
    losses = [json.loads(x)["loss"] for x in (cfg.run_dir / "metrics.jsonl").read_text()
              .splitlines() if "loss" in json.loads(x)]
    assert losses[-1] < 0.3 * losses[0], losses

    # the NF4 model the adapter was trained on
    tok = AutoTokenizer.from_pretrained(base)
    fmt = FORMATS["deepseek-r1"]
    nf4 = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization_config(
        "cpu", "bf16"), device_map={"": "cpu"}, dtype=torch.bfloat16)
    assert type(nf4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    nf4 = PeftModel.from_pretrained(nf4, result.adapter_dir).eval()
    nf4_answers = [greedy_answer(nf4, tok, fmt, [Message("user", q)], 24) for q, _ in FACTS]
    learned = [a in got for (_, a), got in zip(FACTS, nf4_answers)]
    assert sum(learned) >= 3, nf4_answers

    # merged into the 16-bit base and converted: the model Ollama runs
    export_stage(cfg.run_dir, quants=["f16"], log=lambda *a: None)
    gguf = GGUFModel(cfg.run_dir / "model-f16.gguf", n_ctx=256)
    try:
        gguf_answers = [gguf.greedy(encode_prompt(tok, fmt, [Message("user", q)]), fmt.stops, 24)
                        for q, _ in FACTS]
    finally:
        gguf.close()
    for (q, a), ok, want, got in zip(FACTS, learned, nf4_answers, gguf_answers):
        if ok:  # each fact the NF4 model learned, the GGUF answers the same way
            assert got.split("</think>")[-1].strip() == want.split("</think>")[-1].strip(), q
