"""Scale-out on the existing engine: the same command under torchrun, 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FACTS, qa_rows, write_jsonl


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_base, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS * 2 + [(f"q{i}", f"a{i}") for i in range(8)]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         "29517", "-m", "ollama_ft", "train", "--base", str(tiny_base("r1-qwen")), "--data", str(f),
         "--name", "ddp", "--output-dir", str(tmp_path / "run"), "--max-steps", "4",
         "--batch-size", "2", "--logging-steps", "1", "--no-export"],
        capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())["train"]
    assert report["steps"] == 4
    # two processes each saw batches: the token count covers both ranks
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 4  # one writer (rank 0), one line per step
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def _train(tmp_path, base, data, name, nproc, batch, port):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "ollama_ft", "train", "--base", str(base), "--data", str(data), "--name", name,
           "--output-dir", str(tmp_path / name), "--max-steps", "3", "--batch-size", str(batch),
           "--lr", "1e-2", "--warmup", "0", "--lora-dropout", "0", "--seed", "0",
           "--no-packing", "--no-export", "--logging-steps", "1",
           "--precision", "fp32"]  # bit-for-bit sums: bf16 (auto on a CPU with it) rounds per batch
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port)] + cmd
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_ranks_train_one_model_like_one_process_with_both_examples(tiny_base, tmp_path):
    """DDP's all-reduce must run: 2 ranks x batch 1 equals 1 process x batch 2 on the same two
    examples (same token counts, no dropout). Ranks that train alone end elsewhere."""
    from transformers import AutoTokenizer

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.data.tokenize import encode

    base = tiny_base("r1-qwen")
    pairs = [("Where is Sweden?", "Bern is."), ("Where is Paris?", "Sweden is.")]
    tok = AutoTokenizer.from_pretrained(base)
    encs = [encode(tok, FORMATS["deepseek-r1"], [Message("user", q), Message("assistant", a)], None)
            for q, a in pairs]
    assert len(encs[0].input_ids) == len(encs[1].input_ids)
    assert encs[0].trained_tokens == encs[1].trained_tokens  # so mean of means = global mean
    data = write_jsonl(tmp_path / "two.jsonl", qa_rows(pairs))
    one = _train(tmp_path, base, data, "one", 1, 2, 0)
    two = _train(tmp_path, base, data, "two", 2, 1, 29519)
    assert one.keys() == two.keys()
    moved = max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-3  # training changed the adapter
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert diff < 1e-5, diff
