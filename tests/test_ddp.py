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
