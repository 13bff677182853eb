#!/usr/bin/env python3
"""How closely does training on an Ollama model's dequantized weights match what Ollama runs?

For runs trained with `--base ollama:NAME`, on prompts of a data file (their chats rendered with
the run's own chat format, answers included, teacher-forced):

  before   PyTorch on the dequantized checkpoint  vs  llama.cpp on the model's GGUF blob
  after    the same + the trained LoRA (PEFT)     vs  llama.cpp on the blob + adapter.gguf

Printed per run: the largest and mean absolute logit difference, how often the top token agrees
over all positions, and how many greedy answers (up to 48 tokens) are the same text.

    python scripts/fidelity_ollama_base.py RUN --data held-out.jsonl [--limit 12]
    python scripts/fidelity_ollama_base.py --fixtures [--quant q4_k_m]   # DeepSeek fixtures:
        # R1-Qwen, R1-Llama, R1-0528-Qwen3 tiny models, converted by llama.cpp's own converter,
        # quantized, created in an ollama-ft bridge, fine-tuned from it, then measured
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEW_TOKENS = 48


def measure(run: Path, data: Path, limit: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.data.check import check_data
    from ollama_ft.data.tokenize import encode_prompt
    from ollama_ft.evaluation.gguf_model import GGUFModel
    from ollama_ft.ollama_base.resolve import of_run
    from ollama_ft.run import Run
    from ollama_ft.train.generate import greedy_continuation

    ob, fmt = of_run(run)
    ckpt = Run.open(run).base_path()
    tok = AutoTokenizer.from_pretrained(ckpt)
    examples, encoded, _ = check_data(str(data), tok, fmt, 512, None)
    examples, encoded = examples[:limit], encoded[:limit]
    prompts = []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m.role == "assistant")
        prompts.append(encode_prompt(tok, fmt, ex.messages[:last]))
    n_ctx = max(len(e.input_ids) for e in encoded) + NEW_TOKENS + 16
    out = {"run": run.name, "base": ob.name, "quant": ob.quant, "examples": len(examples)}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for stage in ("before", "after"):
        if stage == "after":
            model = PeftModel.from_pretrained(model, run / "adapter").merge_and_unload().eval()
        gm = GGUFModel(Path(ob.blob), n_ctx, lora_path=run / "adapter.gguf" if stage == "after" else None)
        diffs, agree, total, same = [], 0, 0, 0
        try:
            for enc, prompt in zip(encoded, prompts):
                ids = enc.input_ids
                with torch.no_grad():
                    ref = model(torch.tensor([ids])).logits[0].float().numpy()
                gm.llm.reset()
                gm.llm.eval(ids)
                got = np.asarray(gm.llm.scores[:len(ids)], dtype=np.float32)
                d = np.abs(ref - got)
                diffs.append((float(d.max()), float(d.mean())))
                agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
                total += len(ids)
                want = greedy_continuation(model, tok, fmt, prompt, NEW_TOKENS)
                have = gm.greedy(prompt, fmt.stops, NEW_TOKENS)
                for s in fmt.stops:
                    want = want.split(s)[0]
                same += want.strip() == have.strip()
        finally:
            gm.close()
        out[stage] = {"max_abs_logit_diff": round(max(d[0] for d in diffs), 4),
                      "mean_abs_logit_diff": round(float(np.mean([d[1] for d in diffs])), 5),
                      "top1_agreement": round(agree / total, 4),
                      "greedy_same": f"{same}/{len(examples)}"}
    return out


def print_rows(rows: list[dict]) -> None:
    print("\n| run | base | quant | stage | max abs logit diff | mean abs | top-1 agreement | "
          "same greedy answer |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        for stage in ("before", "after"):
            s = r[stage]
            print(f"| {r['run']} | {r['base']} | {r['quant']} | {stage} | "
                  f"{s['max_abs_logit_diff']} | {s['mean_abs_logit_diff']} | "
                  f"{s['top1_agreement']:.1%} | {s['greedy_same']} |")


def fixtures(quant: str, root: Path) -> list[dict]:
    """Tiny DeepSeek fixtures through llama.cpp's converter, quantized, created in a bridge,
    trained from it on a few facts, measured."""
    import httpx
    from bench_export import fetch_converter
    from smollm2_from_ollama import start

    from ollama_ft.export.quantize import llama_quantize
    from ollama_ft.ollama.client import sha256_file
    from ollama_ft.quants import QUANT_TYPES
    from ollama_ft.tinymodel import build_tiny_model

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import FACTS, FAMILIES, qa_rows, write_jsonl
    from library_templates import R1_LIBRARY, R1_STOPS

    script, env = fetch_converter(root, None)
    url, proc, _ = start(root, None)
    data = write_jsonl(root / "facts.jsonl", qa_rows(FACTS))
    rows = []
    try:
        for family in ("r1-qwen", "r1-llama", "r1-qwen3"):
            base = build_tiny_model(root / family, **{**FAMILIES[family], "hidden": 128,
                                                      "final_norm": 4.0})
            f16 = root / f"{family}-f16.gguf"
            subprocess.run([sys.executable, str(script), str(base), "--outtype", "f16",
                            "--outfile", str(f16)], check=True, env=env, capture_output=True)
            gguf = root / f"{family}-{quant}.gguf"
            if quant == "f16":
                gguf = f16
            else:
                llama_quantize(f16, gguf, QUANT_TYPES[quant], None)
            digest = sha256_file(gguf)
            with open(gguf, "rb") as f:
                httpx.post(f"{url}/api/blobs/{digest}", content=f, timeout=600).raise_for_status()
            httpx.post(f"{url}/api/create", timeout=600, json={
                "model": family, "files": {gguf.name: digest}, "template": R1_LIBRARY,
                "parameters": {"stop": R1_STOPS}, "stream": False}).raise_for_status()
            run = root / f"run-{family}"
            subprocess.run([sys.executable, "-m", "ollama_ft", "train", "--base",
                            f"ollama:{family}", "--data", str(data), "--name", f"ft-{family}",
                            "--output-dir", str(run), "--host", url, "--max-steps", "60",
                            "--save-steps", "60", "--lr", "3e-3", "--batch-size", "4",
                            "--warmup", "0", "--lora-dropout", "0", "--max-len", "128",
                            "--report-to", "none", "--no-register"], check=True)
            rows.append(measure(run, data, len(FACTS)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(20)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--data", type=Path, help="chats to measure on (the held-out file)")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--fixtures", action="store_true")
    ap.add_argument("--quant", default="q4_k_m", help="with --fixtures: the GGUF type created")
    args = ap.parse_args()
    rows = [measure(r, args.data, args.limit) for r in args.runs]
    if args.fixtures:
        rows += fixtures(args.quant, Path(tempfile.mkdtemp(prefix="fidelity-")))
    print_rows(rows)


if __name__ == "__main__":
    main()
