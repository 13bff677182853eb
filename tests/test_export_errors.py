"""Proof 5: bad input is a clear error, and nothing half-written is left behind.

Every failure must raise an ExportError whose message says what, where and what to do, and
leave the run directory without any model-*.gguf / adapter.gguf / temp file it did not
have before. Also: merged safetensors (`ollama-ft merge`) and the atomic-rename contract.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_export_support import make_run

from ollama_ft.errors import ExportError, OllamaFtError, QuantTypeError, RunDirError
from ollama_ft.export import export_stage, merge_stage
from ollama_ft.export.errors import (AdapterError, CheckpointError, DiskSpaceError, QuantizeError,
                                     UnsupportedModelError)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base("r1-qwen")


@pytest.fixture(scope="module")
def good_run(base, tmp_path_factory):
    return make_run(base, tmp_path_factory.mktemp("good") / "run", "deepseek-r1")


@pytest.fixture
def run(good_run, tmp_path):
    """A fresh copy of a trained-looking run directory."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def _copy_base(base: Path, dest: Path) -> Path:
    return Path(shutil.copytree(base, dest))


def _point_at(run: Path, base: Path) -> None:
    report = json.loads((run / "report.json").read_text())
    report["train"]["base_path"] = str(base)
    (run / "report.json").write_text(json.dumps(report))


def _outputs(run: Path) -> list[str]:
    """Everything export may create: GGUFs, merged/, temp files."""
    return sorted(p.name for p in run.iterdir()
                  if p.suffix == ".gguf" or ".tmp-" in p.name or p.name == "merged")


def test_errors_are_ollama_ft_errors():
    for cls in (AdapterError, CheckpointError, DiskSpaceError, QuantizeError, QuantTypeError,
                RunDirError, UnsupportedModelError):
        assert issubclass(cls, ExportError) and issubclass(cls, OllamaFtError)


def test_missing_adapter(run):
    shutil.rmtree(run / "adapter")
    with pytest.raises(AdapterError) as e:
        export_stage(run, quants="f16", log=quiet)
    assert str(run / "adapter") in str(e.value) and "ollama-ft train" in str(e.value)
    assert _outputs(run) == []


def test_run_dir_without_training(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RunDirError, match="train this run first"):
        export_stage(tmp_path / "run", quants="f16", log=quiet)
    with pytest.raises(RunDirError, match="no such run directory"):
        export_stage(tmp_path / "nope", quants="f16", log=quiet)


def test_base_moved_away(run, tmp_path):
    _point_at(run, tmp_path / "gone")
    with pytest.raises(RunDirError, match="is not there"):
        export_stage(run, quants="f16", log=quiet)


def test_adapter_for_another_base_names_the_tensor(run, tiny_base, base):
    other = tiny_base("r1-qwen", hidden=128)
    _point_at(run, other)
    with pytest.raises(AdapterError) as e:
        export_stage(run, quants="f16", log=quiet)
    msg = str(e.value)
    # e.g. "shape mismatch at model.layers.0.mlp.down_proj.weight: base weight is [128, 384]
    # but the adapter's lora_A is [8, 192] and lora_B [64, 8] (expects [r, 384] and [128, r])"
    assert "shape mismatch at model.layers.0." in msg and ".weight: base weight is [128," in msg
    assert "lora_A is [8, " in msg
    assert str(base) in msg  # where the adapter came from
    assert "export it with the base it was trained on" in msg
    assert _outputs(run) == []


def test_adapter_for_a_base_with_fewer_layers(run, tiny_base):
    _point_at(run, tiny_base("r1-qwen", layers=1))
    with pytest.raises(AdapterError, match=r"changes model\.layers\.1\..*does not have"):
        export_stage(run, quants="f16", log=quiet)
    assert _outputs(run) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_base_safetensors(run, base, tmp_path, damage):
    broken = _copy_base(base, tmp_path / "broken-base")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10" * 64)
    _point_at(run, broken)
    with pytest.raises(CheckpointError) as e:
        export_stage(run, quants="f16", log=quiet)
    assert str(weights) in str(e.value) and "again" in str(e.value)
    assert _outputs(run) == []


def test_corrupt_adapter_safetensors(run):
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(AdapterError) as e:
        export_stage(run, quants="f16", log=quiet)
    assert str(weights) in str(e.value) and "truncated" in str(e.value)
    assert _outputs(run) == []


def test_unsupported_architecture(run, base, tmp_path):
    other = _copy_base(base, tmp_path / "mixtral")
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    _point_at(run, other)
    with pytest.raises(UnsupportedModelError) as e:
        export_stage(run, quants="f16", log=quiet)
    assert "MixtralForCausalLM" in str(e.value) and "Qwen2ForCausalLM" in str(e.value)
    assert _outputs(run) == []


def test_unknown_quant_type_before_any_work(run):
    with pytest.raises(QuantTypeError, match="q4_k_m"):
        export_stage(run, quants="f16,q3_xs", log=quiet)
    assert _outputs(run) == []


def test_not_enough_disk(run, monkeypatch):
    from collections import namedtuple

    import ollama_ft.export.stage as stage

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(DiskSpaceError) as e:
        export_stage(run, quants="f16,q4_k_m", log=quiet)
    msg = str(e.value)
    assert "model-f16.gguf" in msg and "model-q4_k_m.gguf" in msg and "GiB" in msg
    assert _outputs(run) == []


def test_crash_mid_write_leaves_nothing_and_keeps_the_old_file(run, monkeypatch):
    import ollama_ft.export.gguf as g

    (run / "model-f16.gguf").write_bytes(b"an earlier, complete export")
    calls = {"n": 0}
    real = g.StreamedTensor.tofile

    def boom(self, fout):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user pressed ^C half way
        return real(self, fout)

    monkeypatch.setattr(g.StreamedTensor, "tofile", boom)
    with pytest.raises(KeyboardInterrupt):
        export_stage(run, quants="q8_0,f16", log=quiet)
    assert _outputs(run) == ["model-f16.gguf"]
    assert (run / "model-f16.gguf").read_bytes() == b"an earlier, complete export"


def test_failed_quantizer_leaves_nothing(run, monkeypatch):
    import ollama_ft.export.quantize as quantize

    def fail(src, dst, q, nthread=None):
        Path(dst).write_bytes(b"partial")
        raise QuantizeError(f"llama.cpp could not quantize {src} to {q.name} (code 1)")

    monkeypatch.setattr(quantize, "llama_quantize", fail)
    with pytest.raises(QuantizeError):
        export_stage(run, quants="q4_k_m", log=quiet)
    assert _outputs(run) == []  # neither the F16 intermediate nor the partial output


def test_stale_temp_files_of_a_killed_export_are_removed(run):
    stale = run / ".model-q4_k_m.gguf.tmp-999999999"  # no such process
    stale.write_bytes(b"half")
    export_stage(run, quants="f16", log=quiet)
    assert _outputs(run) == ["model-f16.gguf"]


def test_dora_cannot_be_an_adapter_gguf(base, tmp_path):
    run = make_run(base, tmp_path / "dora", "deepseek-r1", targets=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        export_stage(run, quants="f16", adapter_only=True, log=quiet)
    assert _outputs(run) == []
    # merged, DoRA is fine
    assert export_stage(run, quants="f16", log=quiet).files["f16"].is_file()


def test_adapter_only_writes_the_base_once(run):
    first = export_stage(run, quants="f16", adapter_only=True, log=quiet)
    assert set(first.files) == {"f16", "adapter"} and first.reused == []
    assert first.files["f16"].name == "base-f16.gguf"
    mtime = first.files["f16"].stat().st_mtime_ns
    again = export_stage(run, quants="f16", adapter_only=True, log=quiet)
    assert again.reused == ["f16"] and again.files["f16"].stat().st_mtime_ns == mtime
    assert _outputs(run) == ["adapter.gguf", "base-f16.gguf"]
    # a new type is quantized from the kept base-f16.gguf, no intermediate
    more = export_stage(run, quants="f16,q4_k_m", adapter_only=True, log=quiet)
    assert more.reused == ["f16"] and set(more.files) == {"f16", "q4_k_m", "adapter"}
    assert _outputs(run) == ["adapter.gguf", "base-f16.gguf", "base-q4_k_m.gguf"]


def test_license_from_the_model_card(run, base, tmp_path):
    from test_export_support import read_gguf

    carded = _copy_base(base, tmp_path / "carded")
    (carded / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# Model\n")
    _point_at(run, carded)
    result = export_stage(run, quants="f16", log=quiet)
    assert read_gguf(result.files["f16"])["general.license"] == "mit"


def test_merge_stage_writes_merged_safetensors(run, base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = merge_stage(run, log=quiet)
    out = run / "merged"
    assert result.out_dir == out and (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.tensor([[151646, 1, 2, 3, 4, 5]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     run / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits.numpy(), peft(ids).logits.numpy()
    assert np.abs(a - b).max() < 5e-2  # merged weights stored back in the base's bf16
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
