"""`ollama-ft demo`: a small DeepSeek-R1-shaped model learns the bundled sample dataset.

It needs no Hub: the base is built locally around the real R1 tokenizer (tinymodel.py).
Before training it answers the sample questions wrongly; after, with the trained answers.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE = Path(__file__).with_name("sample.jsonl")
DEMO_BASE = dict(tokenizer="deepseek-r1-distill-qwen-7b", hidden=128, layers=2, heads=4,
                 kv_heads=2, seed=0)
DEMO_TRAIN = dict(max_steps=80, lr=3e-3, batch_size=8, warmup=5, logging_steps=5, save_steps=40,
                  max_len=256, lora_r=16, lora_alpha=32, lora_dropout=0.0, seed=0)


def sample_questions() -> list[tuple[str, str]]:
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        out.append((msgs[0]["content"], msgs[1]["content"]))
    return out


def build_demo_base(workdir: Path, log=print) -> Path:
    from ollama_ft.tinymodel import build_tiny_model

    base = Path(workdir) / "base"
    if not (base / "config.json").is_file():
        log(f"building a small DeepSeek-R1-Distill-Qwen-shaped base in {base} (random weights, "
            "real R1 tokenizer)")
        build_tiny_model(base, **DEMO_BASE)
    return base


def answers_with_torch(base: Path, adapter: Path | None, questions: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.train.generate import greedy_answer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    fmt = FORMATS["deepseek-r1"]
    return [greedy_answer(model, tok, fmt, [Message("user", q)], max_new_tokens=32) for q in questions]


def _answer_only(text: str) -> str:
    return text.split("</think>")[-1].strip()


def run_demo(workdir: str | Path = "runs/demo", steps: int | None = None, log=print):
    import shutil

    from ollama_ft.config import RunConfig
    from ollama_ft.pipeline import run_pipeline

    workdir = Path(workdir)
    base = build_demo_base(workdir, log)
    qa = sample_questions()
    questions = [q for q, _ in qa]
    log("asking the base model before training ...")
    before = answers_with_torch(base, None, questions)
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = RunConfig(name="demo", base=str(base), data=str(SAMPLE), output_dir=str(run_dir),
                    **{**DEMO_TRAIN, **({"max_steps": steps} if steps else {})}).validate()
    result = run_pipeline(cfg, log=log)
    after = answers_with_torch(base, result.adapter_dir, questions)
    log("")
    right = 0
    for (q, want), b, a in zip(qa, before, after):
        ok = _answer_only(a) == want
        right += ok
        log(f"Q: {q}\n   before: {_answer_only(b)[:70]!r}\n   after:  {_answer_only(a)[:70]!r}"
            f"  {'✓' if ok else '✗'}")
    log(f"\n{right}/{len(qa)} answers match the training data after fine-tuning.")
    log(f"run directory: {run_dir} (adapter/, metrics.jsonl, loss.png, report.json)")
    return {"before": before, "after": after, "right": right, "total": len(qa), "run_dir": run_dir}
