#!/usr/bin/env python
"""Training speed, side by side, on the same model, data, LoRA (r=16, all linear layers),
sequence budget (batch 4 x 512 tokens) and number of optimizer steps:

  common   transformers Trainer + PEFT, every example padded to 512, loss over full logits
  trl      TRL SFTTrainer, packing (bfd), completion-only loss           (pip install trl)
  ollama-ft  ollama-ft's train stage (packing, logits only where the labels are)

Each contender runs in its own process; reported: real (non-padding) tokens per second,
peak RSS, the final training loss, and the loss of the trained adapter on one fixed set of
examples (the same tokens for everyone).

    python scripts/bench_train.py --model tiny --steps 30
    python scripts/bench_train.py --model 0.3b --steps 6 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2),
          "0.3b": dict(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816)}
LORA = dict(r=16, alpha=32, dropout=0.05)
BATCH, SEQ, LR = 4, 512, 2e-4
WORDS = ("model data token river stone light paper window garden table music orange quick "
         "slow bright dark little large answer question number letter story city mountain "
         "ocean forest engine circle square").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """Long-tailed lengths: median about 120 tokens, tail to 512."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q_words = rng.randint(6, 30)
            a_words = min(int(rng.lognormvariate(4.1, 0.6)), 380)
            q = " ".join(rng.choice(WORDS) for _ in range(q_words)) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(a_words)) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


def encoded(base: Path, data: Path):
    from transformers import AutoTokenizer

    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.data.check import check_data

    tok = AutoTokenizer.from_pretrained(base)
    _, enc, report = check_data(data, tok, FORMATS["deepseek-r1"], SEQ)
    return tok, [{"input_ids": e.input_ids, "labels": e.labels} for e in enc], report


def eval_loss(model, rows) -> float:
    """Assistant-token loss of the trained model on fixed examples (same for everyone)."""
    import torch

    from ollama_ft.train.loss import selective_lm_loss
    from ollama_ft.train.packing import PackedCollator, pack

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in pack(rows, SEQ):
            batch = PackedCollator(0)([row])
            batch.pop("num_real_tokens")
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(selective_lm_loss(model, batch)) * n
            count += n
    return total / count


def peft_model(base: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                            lora_dropout=LORA["dropout"], target_modules=targets,
                                            task_type="CAUSAL_LM"))


def run_common(base, data, steps, out):
    from transformers import Trainer, TrainingArguments, set_seed

    tok, rows, _ = encoded(base, data)
    set_seed(0)
    model = peft_model(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(batch):
        import torch

        ids = torch.full((len(batch), SEQ), pad)
        labels = torch.full((len(batch), SEQ), -100)
        mask = torch.zeros((len(batch), SEQ), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(output_dir=str(out / "ck"), per_device_train_batch_size=BATCH,
                             max_steps=steps, learning_rate=LR, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, seed=0, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    res = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": trainer.state.num_input_tokens_seen, "train_s": res.metrics["train_runtime"],
            "final_loss": losses[-1]}, model, rows


def run_trl(base, data, steps, out):
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.data.check import load_examples
    from ollama_ft.data.tokenize import trained_spans

    tok, rows, _ = encoded(base, data)
    fmt = FORMATS["deepseek-r1"]
    examples, _ = load_examples(data)
    prompts, completions = [], []
    for ex in examples:  # the same text: prompt = everything before the trained span
        text, spans = trained_spans(fmt.render_training(ex.messages))
        prompts.append(text[:spans[0][0]])
        completions.append(text[spans[0][0]:])
    ds = Dataset.from_dict({"prompt": prompts, "completion": completions})
    set_seed(0)
    model = peft_model(base)
    cfg = SFTConfig(output_dir=str(out / "ck"), per_device_train_batch_size=BATCH, max_steps=steps,
                    learning_rate=LR, logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, seed=0, packing=True, max_length=SEQ, completion_only_loss=True,
                    include_num_input_tokens_seen="all", disable_tqdm=True, dataset_num_proc=1)
    tok.pad_token = tok.pad_token or tok.eos_token
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    res = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": trainer.state.num_input_tokens_seen, "train_s": res.metrics["train_runtime"],
            "final_loss": losses[-1]}, model, rows


def run_ours(base, data, steps, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ollama_ft.config import RunConfig
    from ollama_ft.train.trainer import train_stage

    cfg = RunConfig(name="bench", base=str(base), data=str(data), output_dir=str(out / "run"),
                    max_steps=steps, lr=LR, batch_size=BATCH, max_len=SEQ, lora_r=LORA["r"],
                    lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], warmup=0,
                    scheduler="linear", logging_steps=1, save_steps=10**6, seed=0, export=False).validate()
    result = train_stage(cfg, log=lambda *a: None)
    report = json.loads((out / "run" / "report.json").read_text())["train"]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    res = {"tokens": report["tokens_seen"], "train_s": report["tokens_seen"] / report["tokens_per_s"],
           "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
           "peak_rss_mb": report["peak_rss_mb"]}  # measured when training ended
    _, enc_rows, _ = encoded(base, data)
    import torch

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      result.adapter_dir)
    return res, model, enc_rows


CONTENDERS = {"common": run_common, "trl": run_trl, "ollama-ft": run_ours}


def child(args):
    out = Path(args.out)
    res, model, rows = CONTENDERS[args.contender](Path(args.base), Path(args.data), args.steps, out)
    res.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["tokens_per_s"] = res["tokens"] / res["train_s"]
    res["eval_loss"] = eval_loss(model, rows[:64])
    (out / "result.json").write_text(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--contenders", default="common,trl,ollama-ft")
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        return child(args)

    from ollama_ft.tinymodel import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = build_tiny_model(work / "base", "deepseek-r1-distill-qwen-7b", **MODELS[args.model])
    data = work / "data.jsonl"
    make_data(data, args.examples)
    _, _, report = encoded(base, data)
    print(f"model {args.model} ({MODELS[args.model]}), {report.kept} examples, tokens/example "
          f"{report.token_lengths}, steps {args.steps}, batch {BATCH} x {SEQ}", flush=True)
    results = {}
    for name in args.contenders.split(","):
        out = work / name
        out.mkdir()
        t0 = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run([sys.executable, __file__, "--contender", name, "--base", str(base),
                            "--data", str(data), "--out", str(out), "--steps", str(args.steps)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads((out / "result.json").read_text())
        print(f"{name}: {results[name]} ({time.time() - t0:.0f} s with set-up)", flush=True)
    ours = results.get("ollama-ft")
    lines = [f"### {args.model} model ({MODELS[args.model]}), {args.steps} steps, batch {BATCH} x {SEQ} tokens",
             "", "| contender | tokens/s | peak RSS (MiB) | final train loss | loss on fixed examples | "
             "ollama-ft speed-up | ollama-ft RSS ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
        rss = f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x" if ours else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | "
                     f"{r['eval_loss']:.4f} | {speed} | {rss} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
