#!/usr/bin/env python
"""Training speed, side by side, on the same model, data, LoRA (r=16, all linear layers),
sequence budget (batch 4 x 512 tokens) and number of optimizer steps:

  common   transformers Trainer + PEFT, every example padded to 512, loss over full logits
  trl      TRL SFTTrainer, packing (bfd), completion-only loss           (pip install trl)
  ollama-ft  ollama-ft's train stage (packing, logits only where the labels are)
  ollama-ft-bf16  the same with --precision bf16: the frozen base in bf16 (LoRA weights,
             optimizer state and loss in fp32); on the CPU where it has AVX512-BF16/AMX
  ollama-ft-4bit  the same with --load-in-4bit: the base's linear weights in NF4
             (bitsandbytes), the rest in the auto precision

Each contender runs in its own process; reported: real (non-padding) tokens per second,
peak RSS (and peak GPU memory and model FLOPs utilisation on a GPU), the final training loss,
and the loss of the trained adapter on one fixed set of examples (the same tokens for
everyone).

    python scripts/bench_train.py --model tiny --steps 20
    python scripts/bench_train.py --model 0.3b --steps 8 --markdown docs/benchmarks.md
    python scripts/bench_train.py --model 1.5b --device cuda --seq 2048 --steps 20   # bf16
    python scripts/bench_train.py --model 0.3b --steps 8 --contenders ollama-ft,ollama-ft-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2),
          "0.3b": dict(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816),
          # DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2.5-Math-1.5B): for the GPU figures
          "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)}
LORA = dict(r=16, alpha=32, dropout=0.05)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 4
LR = 2e-4  # --lr sets it
SEQ = 512  # --seq sets it (the sequence budget: batch x SEQ tokens per step)
DEVICE = "cpu"  # --device; bf16 on cuda, fp32 on the cpu, for every contender
# dense bf16 peak TFLOP/s for MFU, by device name (override with --peak-tflops)
# (the first name contained in torch.cuda.get_device_name() wins: specific names first)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "4090": 165.0,
               "A10": 125.0}
WORDS = ("model data token river stone light paper window garden table music orange quick "
         "slow bright dark little large answer question number letter story city mountain "
         "ocean forest engine circle square").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    """Long-tailed lengths: median about 120 tokens, tail to 512."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q_words = rng.randint(6, 30)
            a_words = min(int(rng.lognormvariate(4.5, 0.65)), 480)
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
            batch = {k: v.to(DEVICE) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(selective_lm_loss(model, batch)) * n
            count += n
    return total / count


def base_model(base: Path):
    """The base in every contender's precision: bf16 on cuda, fp32 on the cpu."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(DEVICE)


def peft_model(base: Path, dropout: float = LORA["dropout"]):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base_model(base), LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                       lora_dropout=dropout, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))


def device_args() -> dict:
    """TrainingArguments shared by the Trainer-based contenders."""
    return dict(use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda", seed=0, report_to="none",
                disable_tqdm=True, save_strategy="no", logging_steps=1, learning_rate=LR,
                per_device_train_batch_size=BATCH)


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

    args = TrainingArguments(output_dir=str(out / "ck"), max_steps=steps, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding", **device_args())
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    return trainer_result(trainer, trainer.train()), model, rows


def trainer_result(trainer, res) -> dict:
    from ollama_ft.train.callbacks import peak_memory_mb

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": trainer.state.num_input_tokens_seen, "train_s": res.metrics["train_runtime"],
            "final_loss": losses[-1], **peak_memory_mb()}  # right after training, before the eval


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
    # TRL's defaults otherwise (gradient checkpointing on, as in SFTConfig)
    cfg = SFTConfig(output_dir=str(out / "ck"), max_steps=steps, packing=True, max_length=SEQ,
                    completion_only_loss=True, include_num_input_tokens_seen="all",
                    dataset_num_proc=1, **device_args())
    tok.pad_token = tok.pad_token or tok.eos_token
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    return trainer_result(trainer, trainer.train()), model, rows


def run_ours_bf16(base, data, steps, out):
    return run_ours(base, data, steps, out, precision="bf16")


def run_ours_4bit(base, data, steps, out):
    return run_ours(base, data, steps, out, precision="auto", load_in_4bit=True)


def run_ours(base, data, steps, out, precision=None, load_in_4bit=False):
    from peft import PeftModel

    from ollama_ft.config import RunConfig
    from ollama_ft.train.callbacks import peak_memory_mb
    from ollama_ft.train.trainer import train_stage

    cfg = RunConfig(name="bench", base=str(base), data=str(data), output_dir=str(out / "run"),
                    max_steps=steps, lr=LR, batch_size=BATCH, max_len=SEQ, lora_r=LORA["r"],
                    lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], warmup=0,
                    scheduler="linear", logging_steps=1, save_steps=10**6, seed=0, export=False,
                    device=DEVICE, precision=precision or ("bf16" if DEVICE == "cuda" else "fp32"),
                    load_in_4bit=load_in_4bit).validate()
    result = train_stage(cfg, log=lambda *a: None)
    report = json.loads((out / "run" / "report.json").read_text())["train"]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    res = {"tokens": report["tokens_seen"], "train_s": report["tokens_seen"] / report["tokens_per_s"],
           "final_loss": [r["loss"] for r in rows if "loss" in r][-1], **peak_memory_mb()}
    _, enc_rows, _ = encoded(base, data)
    return res, PeftModel.from_pretrained(base_model(base), result.adapter_dir), enc_rows


CONTENDERS = {"common": run_common, "trl": run_trl, "ollama-ft": run_ours,
              "ollama-ft-bf16": run_ours_bf16, "ollama-ft-4bit": run_ours_4bit}


def child(args):
    out = Path(args.out)
    res, model, rows = CONTENDERS[args.contender](Path(args.base), Path(args.data), args.steps, out)
    res["tokens_per_s"] = res["tokens"] / res["train_s"]
    res["eval_loss"] = eval_loss(model, rows[:args.eval_examples]) if args.eval_examples else float("nan")
    (out / "result.json").write_text(json.dumps(res))


def flops_per_token(model: dict, vocab: int, mean_len: float) -> float:
    """Model FLOPs per trained token for LoRA: forward 2N plus the activation gradients 2N
    (frozen weights need no weight gradients; the LoRA matrices are negligible), N = the
    decoder's linear weights + the output projection, plus causal attention (QK^T and AV,
    forward and backward) over examples of the mean length. Recomputation is not counted."""
    h, n_layers = model["hidden"], model["layers"]
    kv = h // model["heads"] * model["kv_heads"]
    ffn = model.get("intermediate", h * 3)
    n = n_layers * (2 * h * h + 2 * h * kv + 3 * h * ffn) + vocab * h
    return 4 * n + 3 * 2 * n_layers * h * mean_len


def peak_tflops(name: str | None) -> float | None:
    if name is None:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    return float(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--contenders", default="common,trl,ollama-ft")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    ap.add_argument("--peak-tflops", help="the GPU's dense bf16 peak, for MFU (default: by name)")
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--base", help="an existing checkpoint (its tokenizer must be the R1 one) "
                    "instead of building --model; e.g. one with a real model's configuration")
    ap.add_argument("--eval-examples", type=int, default=64,
                    help="fixed examples for the loss of the trained adapter (0: skip)")
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global SEQ, DEVICE, LR
    SEQ, DEVICE, LR = args.seq, args.device, args.lr
    if args.contender:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.base:  # its shape from its config
        c = json.loads((Path(args.base) / "config.json").read_text())
        MODELS[args.model] = dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                                  heads=c["num_attention_heads"], intermediate=c["intermediate_size"],
                                  kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]))
        base = Path(args.base)
    else:  # in a child: a process's peak RSS starts at its parent's RSS at the fork (Linux
        # carries the forked memory's high-water mark over the exec), so this one stays small
        base = work / "base"
        subprocess.run([sys.executable, "-c", "import json, sys; from ollama_ft.tinymodel import "
                        "build_tiny_model; build_tiny_model(sys.argv[1], "
                        "'deepseek-r1-distill-qwen-7b', **json.loads(sys.argv[2]))", str(base),
                        json.dumps(MODELS[args.model])], check=True, capture_output=True)
    data = work / "data.jsonl"
    make_data(data, args.examples)
    report = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; from ollama_ft.chat_formats import FORMATS; "
         "from ollama_ft.data.check import check_data; from transformers import AutoTokenizer; "
         "r = check_data(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2]), "
         "FORMATS['deepseek-r1'], int(sys.argv[3]))[2]; print(json.dumps(r.to_json()))",
         str(data), str(base), str(SEQ)], check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1])
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    gpu_name = ""
    if DEVICE == "cuda":
        import torch

        gpu_name = torch.cuda.get_device_name()
    print(f"model {args.model} ({MODELS[args.model]}), {report['kept']} examples, tokens/example "
          f"{report['token_lengths']}, steps {args.steps}, batch {BATCH} x {SEQ}", flush=True)
    results = {}
    for name in args.contenders.split(","):
        out = work / name
        out.mkdir()
        t0 = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run([sys.executable, __file__, "--contender", name, "--base", str(base),
                            "--data", str(data), "--out", str(out), "--steps", str(args.steps),
                            "--device", DEVICE, "--seq", str(SEQ), "--lr", str(LR),
                            "--eval-examples", str(args.eval_examples)],
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        results[name] = json.loads((out / "result.json").read_text())
        print(f"{name}: {results[name]} ({time.time() - t0:.0f} s with set-up)", flush=True)
    ours = results.get("ollama-ft")
    gpu = DEVICE == "cuda"
    peak = peak_tflops(args.peak_tflops) if gpu else None
    per_token = flops_per_token(MODELS[args.model], vocab, report["token_lengths"]["mean"])
    lines = [f"### {args.model} model ({MODELS[args.model]}), {args.steps} steps, batch {BATCH} x {SEQ} "
             f"tokens, {'bf16 on ' + gpu_name if gpu else 'on the CPU, fp32 unless the contender says bf16'}", "",
             "| contender | tokens/s | peak RSS (MiB) | " + ("peak GPU memory (MiB) | MFU | " if gpu else "")
             + "final train loss | loss on fixed examples | ollama-ft speed-up | ollama-ft memory ratio |",
             "|---|---:|---:|" + ("---:|---:|" if gpu else "") + "---:|---:|---:|---:|"]
    mem = "peak_gpu_mb" if gpu else "peak_rss_mb"
    for name, r in results.items():
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
        ratio = f"{ours[mem] / r[mem]:.2f}x" if ours else "-"
        extra = ""
        if gpu:
            mfu = f"{100 * r['tokens_per_s'] * per_token / (peak * 1e12):.1f}%" if peak else "-"
            extra = f"{r['peak_gpu_mb']:.0f} | {mfu} | "
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {extra}"
                     f"{r['final_loss']:.4f} | {r['eval_loss']:.4f} | {speed} | {ratio} |")
    bf16 = results.get("ollama-ft-bf16")
    if ours and bf16 and not gpu:
        lines += ["", "bf16 base against fp32, the same run: "
                  f"{bf16['tokens_per_s'] / ours['tokens_per_s']:.2f}x the tokens/s at "
                  f"{bf16['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x the peak RSS; final train "
                  f"loss {100 * (bf16['final_loss'] / ours['final_loss'] - 1):+.2f}%, loss on "
                  f"fixed examples {100 * (bf16['eval_loss'] / ours['eval_loss'] - 1):+.2f}%"]
    q4 = results.get("ollama-ft-4bit")
    if ours and q4 and not gpu:
        lines += ["", "4-bit (NF4) base against fp32, the same run: "
                  f"{q4['tokens_per_s'] / ours['tokens_per_s']:.2f}x the tokens/s at "
                  f"{q4['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x the peak RSS; final train "
                  f"loss {100 * (q4['final_loss'] / ours['final_loss'] - 1):+.2f}%"]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
