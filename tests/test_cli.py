"""The command line as a user runs it: clear errors, no tracebacks, nothing lost."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FACTS, qa_rows, write_jsonl


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ollama_ft", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_and_models():
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
    r = cli("models")
    assert "deepseek-r1:1.5b" in r.stdout and "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in r.stdout


def test_every_config_key_is_a_train_flag_with_its_help_and_default():
    """The flags are made from RunConfig's fields (config.py holds help, choices, defaults)."""
    import dataclasses

    from click.testing import CliRunner

    from ollama_ft.cli import main
    from ollama_ft.config import RunConfig

    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=400).output
    for f in dataclasses.fields(RunConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert f.metadata["help"].split()[0] in out, f.name  # its help text
    assert "One of linear, cosine" in out and "(default cosine)" in out and "(default 2048)" in out
    assert "--no-gradient-checkpointing" in out and "(default on)" in out


def test_data_check_reports(tiny_base, tmp_path):
    rows = qa_rows(FACTS) + [{"messages": [{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": ""}]}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    r = cli("data", "check", f, "--base", tiny_base("r1-qwen"), "--max-len", 20, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["format"] == "messages" and rep["kept"] == 4 and rep["truncated"] > 0
    assert rep["rejected"][0]["location"].endswith("d.jsonl:5")
    assert set(rep["token_lengths"]) >= {"p50", "p90", "p99", "max"}
    r = cli("data", "check", f, "--base", tiny_base("r1-qwen"))
    assert "tokens/example:" in r.stdout and "format:            messages" in r.stdout


def test_bad_data_fails_fast_without_traceback_and_trains_nothing(tiny_base, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "Q", "response": "A"}\n{"prompt": "Q2"\n')
    r = cli("train", "--base", tiny_base("r1-qwen"), "--data", f, "--name", "x",
            "--output-dir", tmp_path / "run", "--max-steps", 2)
    assert r.returncode == 2
    assert f"{f}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = cli("data", "check", f, "--base", tiny_base("r1-qwen"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--base", "deepseek-r9"], "not a folder, a known alias"),
    (["--lr", "5"], "'lr' must be a learning rate"),
    (["--format", "csvish"], "is not a data format"),
])
def test_user_mistakes_are_one_line_errors(tiny_base, tmp_path, args, needle):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    base = ["--base", tiny_base("r1-qwen")] if "--base" not in args else []
    r = cli("train", *base, "--data", f, "--name", "x", "--output-dir", tmp_path / "run", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_train_from_config_file_with_flag_override(tiny_base, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {tiny_base('r1-qwen')}\ndata: {f}\nname: fromyaml\nmax_steps: 50\n"
                   f"output_dir: {tmp_path / 'run'}\nlogging_steps: 1\n")
    r = cli("train", "--config", cfg, "--max-steps", 3, "--no-export")
    assert r.returncode == 0, r.stderr
    import yaml

    written = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert written["max_steps"] == 3 and written["name"] == "fromyaml" and written["export"] is False
    assert written["lora_r"] == 16 and written["lr"] == 2e-4  # defaults filled in
    assert "training" in r.stderr and "adapter:" in r.stderr


def test_doctor_says_what_is_there_and_what_to_fix():
    from tests.conftest import free_port

    r = subprocess.run([sys.executable, "-m", "ollama_ft", "doctor", "--host", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in ("torch", "transformers", "peft", "llama_cpp", "gguf"):
        assert any(line.startswith("ok") and f" {name} " in line for line in lines), name
    assert any(line.startswith("warn") and "Ollama daemon" in line for line in lines)
    assert "ollama serve" in r.stdout and "HF_HUB_OFFLINE is set" in r.stdout
    from ollama_ft.llamacpp import amx_in_use

    kernels = next(line for line in lines if " llama.cpp kernels " in line)
    assert kernels.startswith("ok") and (("AMX CPU" in kernels) == amx_in_use()), kernels
