#!/usr/bin/env python
"""Parity figures of the deepseek2 GGUF export (DeepSeek-V2-Lite and V3/R1 shapes).

Builds the tiny fixtures the tests use (ollama_ft.tinymodel: V2-Lite-shaped, 27 layers, real
DeepSeek-V2 tokenizer; V3-shaped, 3 layers, real R1 tokenizer), puts a random non-zero LoRA
on every target projection, exports F16, Q8_0 and Q4_K_M, and compares llama.cpp's logits
on one conversation with the fp32 PyTorch model (base + PEFT adapter):
max |logit diff|, share of positions with the same argmax, and KL(PyTorch || GGUF).

Usage:  python scripts/parity_deepseek2.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

SHAPES = {"V2-Lite": dict(tokenizer="deepseek-v2", arch="deepseek2", layers=27, fmt="deepseek-llm"),
          "V3/R1": dict(tokenizer="deepseek-r1", arch="deepseek3", layers=3, fmt="deepseek-r1")}


def lora_run(base: Path, run: Path, arch: str, fmt: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.lora import LINEAR_TARGETS, exact_targets

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with exact_targets(arch):
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=list(LINEAR_TARGETS[arch])))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    run.mkdir(parents=True, exist_ok=True)
    peft.save_pretrained(run / "adapter")
    (run / "run.yaml").write_text(f"name: parity\nbase: {base}\n")
    (run / "report.json").write_text(json.dumps({"train": {"base_path": str(base), "chat_format": fmt}}))


def torch_logits(base: Path, adapter: Path, arch: str, ids) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_ft.train.lora import exact_targets

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with exact_targets(arch):
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def gguf_logits(path: Path, ids) -> np.ndarray:
    from ollama_ft.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=512, logits_all=True, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


def kl(p_logits, q_logits) -> np.ndarray:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.export import export_stage
    from ollama_ft.tinymodel import build_tiny_model

    work = a.workdir or Path(tempfile.mkdtemp(prefix="parity-ds2-"))
    conv = [Message("system", "You are terse."),
            Message("user", "What is the capital of Zorbia? 请用中文回答。"),
            Message("assistant", "Quellport."), Message("user", "def f(x):\n\treturn x + 1  # 🚀")]
    print("| model | GGUF | max abs logit diff | same argmax | KL mean | KL max |")
    print("|---|---|---:|---:|---:|---:|")
    for label, s in SHAPES.items():
        d = work / s["arch"]
        base = build_tiny_model(d / "base", tokenizer=s["tokenizer"], arch=s["arch"], hidden=64,
                                layers=s["layers"], heads=4)
        lora_run(base, d / "run", s["arch"], s["fmt"])
        export_stage(d / "run", quants="f16,q8_0,q4_k_m", log=lambda *x: None)
        tok = AutoTokenizer.from_pretrained(base)
        ids = tok(FORMATS[s["fmt"]].render_prompt(conv), add_special_tokens=False)["input_ids"]
        ref = torch_logits(base, d / "run" / "adapter", s["arch"], ids)
        for q in ("f16", "q8_0", "q4_k_m"):
            got = gguf_logits(d / "run" / f"model-{q}.gguf", ids)
            k = kl(ref, got)
            print(f"| {label} | {q} | {np.abs(got - ref).max():.1e} | "
                  f"{(got.argmax(-1) == ref.argmax(-1)).mean():.0%} | {k.mean():.1e} | {k.max():.1e} |")


if __name__ == "__main__":
    main()
