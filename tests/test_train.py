"""Real PEFT LoRA training on tiny checkpoints: it learns, resumes exactly, evaluates."""

import json

import pytest
import torch

from ollama_ft.config import RunConfig
from ollama_ft.errors import TrainingError
from ollama_ft.train.trainer import train_stage
from tests.conftest import FACTS, qa_rows, write_jsonl

FAST = dict(lr=3e-3, batch_size=4, warmup=0, logging_steps=2, lora_dropout=0.0, seed=0, max_len=128)


def run_cfg(tmp_path, base, data, name="t", **kw):
    return RunConfig(name=name, base=str(base), data=str(data), output_dir=str(tmp_path / name),
                     **{**FAST, **kw}).validate()


def load_peft(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return tok, PeftModel.from_pretrained(model, adapter).eval()


def test_learns_the_data_and_answers_it(tiny_base, tmp_path):
    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.train.generate import greedy_answer

    base = tiny_base("r1-qwen", hidden=128)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    result = train_stage(run_cfg(tmp_path, base, data, max_steps=60, save_steps=30), log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["rss_mb"] > 0
               for r in rows if "loss" in r)
    assert rows[-1]["checkpoint"]["step"] == 30  # the last one saved before that log line
    # TensorBoard (the default --report-to): the transformers integration's event file,
    # with the loss and our tokens/s in it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "t" / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/tokens_per_s" in tags and "train/rss_mb" in tags
    assert [e.value for e in acc.Scalars("train/loss")][0] == pytest.approx(losses[0], rel=1e-4)
    tok, model = load_peft(base, result.adapter_dir)
    for q, a in FACTS:
        got = greedy_answer(model, tok, FORMATS["deepseek-r1"], [Message("user", q)], 24)
        assert got.split("</think>")[-1].strip() == a
    run = tmp_path / "t"
    for name in ("run.yaml", "data-report.json", "metrics.jsonl", "loss.png", "report.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run / "report.json").read_text())["train"]
    assert report["steps"] == 60 and report["chat_format"] == "deepseek-r1"
    assert json.loads((run / "data-report.json").read_text())["train"]["kept"] == 4


@pytest.mark.parametrize("family", ["r1-llama", "r1-qwen3", "coder-instruct", "llm-chat"])
def test_each_architecture_trains(tiny_base, tmp_path, family):
    base = tiny_base(family)
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    result = train_stage(run_cfg(tmp_path, base, data, max_steps=12, logging_steps=1), log=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert result.adapter_dir.is_dir()


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


class Crash(Exception):
    pass


def test_killed_and_resumed_run_ends_with_the_same_adapter(tiny_base, tmp_path):
    from transformers import TrainerCallback

    base = tiny_base("r1-qwen")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS * 3))
    kw = dict(max_steps=8, save_steps=4, lora_dropout=0.1, batch_size=2)
    full = train_stage(run_cfg(tmp_path, base, data, "full", **kw), log=lambda *a: None)

    class CrashAtStep6(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 6:
                raise Crash

    with pytest.raises(Crash):
        train_stage(run_cfg(tmp_path, base, data, "cut", **kw), callbacks=[CrashAtStep6()],
                    log=lambda *a: None)
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "cut" / "adapter").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train_stage(run_cfg(tmp_path, base, data, "cut", **kw), log=lambda *a: None)
    resumed = train_stage(run_cfg(tmp_path, base, data, "cut", resume=True, **kw), log=lambda *a: None)
    a, b = _adapter_tensors(full.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_eval_split_early_stopping_and_curve(tiny_base, tmp_path):
    base = tiny_base("r1-qwen")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS * 2 + [(f"q{i}", f"a{i}") for i in range(6)]))
    result = train_stage(run_cfg(tmp_path, base, data, eval_split=0.25, max_steps=6, save_steps=2,
                                 early_stopping_patience=2), log=lambda *a: None)
    assert result.eval_loss is not None
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in rows) >= 2
    rep = json.loads((tmp_path / "t" / "data-report.json").read_text())
    assert rep["train"]["duplicates_dropped"] == 4
    assert rep["eval_examples"] == 2 and rep["train_examples"] == 8


def test_resume_without_checkpoint_and_missing_report_packages(tiny_base, tmp_path):
    from ollama_ft.errors import ConfigError

    base = tiny_base("r1-qwen")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    with pytest.raises(TrainingError, match="no checkpoint in"):
        train_stage(run_cfg(tmp_path, base, data, resume=True, max_steps=2), log=lambda *a: None)
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:  # an optional extra, absent in the test set-up
        with pytest.raises(ConfigError, match=r"--report-to mlflow: the mlflow package is not installed"):
            train_stage(run_cfg(tmp_path, base, data, "m", report_to="mlflow", max_steps=2),
                        log=lambda *a: None)
        assert not (tmp_path / "m").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="report_to"):
        run_cfg(tmp_path, base, data, "m", report_to="tensorboard,comet")
    # --load-in-4bit runs on the CPU now: tests/test_qlora.py


def test_options_dora_rslora_checkpointing_and_eval_file(tiny_base, tmp_path):
    import json as _json

    base = tiny_base("r1-qwen")
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    ev = write_jsonl(tmp_path / "e.jsonl", qa_rows(FACTS[:2]))
    result = train_stage(run_cfg(tmp_path, base, data, max_steps=4, save_steps=2, dora=True,
                                 rslora=True, gradient_checkpointing=True, eval_data=str(ev),
                                 lora_targets=["q_proj", "v_proj"]), log=lambda *a: None)
    cfg = _json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert result.eval_loss is not None
    rep = _json.loads((tmp_path / "t" / "data-report.json").read_text())
    assert rep["eval"]["kept"] == 2
