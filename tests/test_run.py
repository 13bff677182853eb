"""The run directory's one owner (ollama_ft/run.py) and the quant table's (ollama_ft/quants.py):
what a Run reads, the one chat-format rule, the GGUF names, and that no other module reads
run.yaml or report.json."""

import ast
import json
import re
from pathlib import Path

import pytest

from ollama_ft.errors import QuantTypeError, RunDirError
from ollama_ft.run import Run

PKG = Path(__file__).resolve().parent.parent / "ollama_ft"
CODER = "deepseek-coder:1.3b"  # a catalogue alias


def make_run(tmp_path, yaml_text="name: t\nquant: q8_0,f16\nmax_len: 512\n", report=None):
    run = tmp_path / "run"
    run.mkdir()
    if yaml_text is not None:
        (run / "run.yaml").write_text(yaml_text)
    if report is not None:
        (run / "report.json").write_text(json.dumps(report))
    return run


def test_run_reads_settings_sections_and_a_typed_config(tmp_path):
    d = make_run(tmp_path, report={"train": {"chat_format": "deepseek-llm", "steps": 3}})
    run = Run.open(d)
    assert run.name == "t" and run.setting("max_len") == 512 and run.setting("lora_r") is None
    assert run.config.max_len == 512 and run.config.quant == "q8_0,f16"
    assert run.config.lora_r == 16  # a default filled in, as --config fills it
    assert run.train["steps"] == 3 and run.export == {} and run.ollama_base is None
    assert Run.open(run) is run  # a Run passes through
    with pytest.raises(RunDirError, match="no such run directory"):
        Run.open(tmp_path / "nope")


def test_a_bad_run_yaml_names_the_file_and_key(tmp_path):
    d = make_run(tmp_path, "name: t\nlora_rr: 4\n")
    with pytest.raises(Exception, match=r"run\.yaml: unknown key 'lora_rr'; did you mean 'lora_r'"):
        Run.open(d).config
    (d / "run.yaml").write_text("name: [t\n")
    with pytest.raises(RunDirError, match=r"run\.yaml: not valid YAML"):
        Run.open(d).settings
    (d / "report.json").write_text("{")
    with pytest.raises(RunDirError, match=r"report\.json: not valid JSON"):
        Run.open(d).report


def test_report_is_read_again_only_when_it_changed(tmp_path, monkeypatch):
    d = make_run(tmp_path, report={"train": {"steps": 1}})
    run = Run.open(d)
    reads = []
    import ollama_ft.run as run_module

    real = run_module.read_json
    monkeypatch.setattr(run_module, "read_json", lambda *a: reads.append(a) or real(*a))
    for _ in range(5):
        assert run.train["steps"] == 1
    assert len(reads) == 1  # five questions, one read
    run.record("export", {"files": {"q8_0": "model-q8_0.gguf"}})
    assert run.export["files"] == {"q8_0": "model-q8_0.gguf"} and run.train["steps"] == 1
    assert json.loads((d / "report.json").read_text())["train"] == {"steps": 1}  # kept


def test_one_chat_format_rule(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ '### Instruction:\\n' }}{{ '### Response:\\n' }}"}))
    d = make_run(tmp_path, "name: t\n", {"train": {"base_path": str(base)}})
    run = Run.open(d)
    assert run.chat_format_name() == "deepseek-coder"  # the base's template, as training picks
    (d / "run.yaml").write_text("name: t\nchat_format: deepseek-llm\n")
    assert run.chat_format_name() == "deepseek-llm"  # run.yaml before the base
    run.record("train", {"base_path": str(base), "chat_format": "deepseek-r1"})
    assert run.chat_format_name() == "deepseek-r1"  # what training used, first
    run.record("train", {"base_path": str(base), "chat_format": "alpaca"})
    with pytest.raises(RunDirError, match="'alpaca' is not one of"):
        run.chat_format_name()
    run.record("train", {"base_path": str(base), "ollama_base": {"name": "smollm2:latest"}})
    assert run.chat_format_name() == "ollama:smollm2:latest"
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>"}))
    run.record("train", {"base_path": str(base)})
    (d / "run.yaml").write_text("name: t\n")
    with pytest.raises(RunDirError, match="not one of the DeepSeek formats.*--template FILE"):
        run.chat_format_name()


def test_without_a_base_checkpoint_the_catalogue_names_the_format(tmp_path):
    d = make_run(tmp_path, f"name: t\nbase: {CODER}\n", {})
    assert Run.open(d).chat_format_name() == "deepseek-coder"
    (d / "run.yaml").write_text("name: t\nbase: ./somewhere\n")
    with pytest.raises(RunDirError, match="cannot tell the run's chat format"):
        Run.open(d).chat_format_name()


def test_gguf_names_and_the_served_quant(tmp_path):
    d = make_run(tmp_path, report={"export": {"files": {"q8_0": "model-q8_0.gguf",
                                                        "f16": "model-f16.gguf"}}})
    run = Run.open(d)
    assert run.gguf("Q8_0") == d / "model-q8_0.gguf" and run.gguf("f16", base=True) == d / "base-f16.gguf"
    assert run.adapter_gguf == d / "adapter.gguf"
    assert run.served_quant() == "q8_0,f16"  # nothing on disk: run.yaml's
    (d / "model-f16.gguf").write_bytes(b"")
    assert run.served_quant() == "f16"  # q8_0's file is missing, f16's is there
    (d / "model-q8_0.gguf").write_bytes(b"")
    assert run.served_quant() == "q8_0,f16"


def test_the_quant_table_is_the_only_one():
    from ollama_ft import quants
    from ollama_ft.config import RunConfig
    from ollama_ft.openwebui import pipe

    assert pipe.QUANTS == tuple(quants.QUANT_TYPES)  # the pipe's copy (a file installed alone)
    assert pipe.Pipe.Valves().quant == quants.DEFAULT_QUANT == RunConfig().quant
    assert [q.name for q in quants.parse_quants(" Q4_K_M,q8_0,q4-k-m ")] == ["q4_k_m", "q8_0"]
    with pytest.raises(QuantTypeError, match="unknown GGUF type 'q4_k_xl'; valid types: f32"):
        quants.parse_quants("q4_k_xl")
    # no other module spells a quant list or the default
    spelled = []
    for path in PKG.rglob("*.py"):
        if path.name == "quants.py" or path.parent.name == "openwebui":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"[\"']q4_k_m[\"']", text) or "q5_k_m" in text:
            spelled.append(path.relative_to(PKG).as_posix())
    assert not spelled, spelled


# The modules allowed to touch run.yaml / report.json: run.py reads and writes them, rundir.py
# holds the file primitives, config.py loads --config files (run.yaml is one) and writes
# run.yaml, and the trainer writes run.yaml through config.
OWNERS = {"run.py", "rundir.py", "config.py", "train/trainer.py"}


def test_no_other_module_reads_run_yaml_or_report_json():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).as_posix()
        if rel in OWNERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("update_report", "RUN_FILES"):
                offenders.append(f"{rel}:{node.lineno}: {node.id}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"(run\.yaml|report\.json)", node.value):
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
    # the bridge names report.json among the files a client may download (a content type)
    offenders = [o for o in offenders if not o.startswith("serve/jobs_api.py")]
    assert not offenders, offenders
