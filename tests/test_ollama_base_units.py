"""The pieces of `--base ollama:NAME` that need no daemon: names, why a model cannot be a base,
where its blob is, the Modelfile of such a run, and the merged GGUF (the base blob with the
LoRA merged in) computing what llama.cpp computes with the blob + adapter.gguf."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export_support import gguf_logits, kl_divergence, make_run

from ollama_ft.errors import BaseModelError
from ollama_ft.ollama_base import modelfile
from ollama_ft.ollama.daemon import OllamaBase, base_problem, locate_blob, model_name


def test_model_names():
    assert model_name("ollama:smollm2") == "smollm2:latest"
    assert model_name("ollama:deepseek-r1:7b") == "deepseek-r1:7b"
    assert model_name("OLLAMA:me/ft:v2") == "me/ft:v2"
    with pytest.raises(BaseModelError, match="the model name is missing"):
        model_name("ollama:")
    with pytest.raises(BaseModelError, match="ollama:-bad"):
        model_name("ollama:-bad")


def _show(arch="llama", modelfile_text="FROM /x/blobs/sha256-ab\n"):
    return {"model_info": {"general.architecture": arch}, "details": {"format": "gguf"},
            "modelfile": modelfile_text}


def test_why_a_model_cannot_be_a_base():
    assert base_problem(_show()) is None
    assert "deepseek2 cannot be a base yet" in base_problem(_show("deepseek2"))
    assert "itself a base plus an adapter" in base_problem(
        _show(modelfile_text="FROM /x/blobs/sha256-ab\nADAPTER /x/blobs/sha256-cd\n"))


def test_a_store_on_another_machine_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BaseModelError, match="not on this machine.*OLLAMA_MODELS"):
        locate_blob("/srv/ollama/blobs/sha256-" + "a" * 64, "m:latest", "http://gpu-box:11434")
    # the same blob in OLLAMA_MODELS is found
    (tmp_path / "blobs").mkdir()
    blob = tmp_path / "blobs" / ("sha256-" + "a" * 64)
    blob.write_bytes(b"GGUF")
    assert locate_blob("/srv/ollama/blobs/" + blob.name, "m:latest", "http://x") == blob


def _base(**kw):
    return OllamaBase(**{"name": "smollm2:latest", "host": "http://127.0.0.1:11434",
                         "blob": "/b", "digest": "sha256:" + "a" * 64, "architecture": "llama",
                         "quant": "Q4_1", "template": "{{ .Prompt }}",
                         "parameters": [("stop", "<|im_end|>"), ("num_ctx", "2048")],
                         "system": "Be helpful.", "context_length": 8192, **kw})


def test_modelfile_from_the_base_with_its_template_and_a_long_enough_context():
    mf = modelfile.build(_base(context_length=None), max_len=4096, merged=False)
    assert (mf.from_, mf.adapter, mf.template, mf.system) == (
        "smollm2:latest", "./adapter.gguf", "{{ .Prompt }}", "Be helpful.")
    assert ("stop", "<|im_end|>") in mf.parameters and ("num_ctx", "4096") in mf.parameters
    assert ("num_ctx", "2048") not in mf.parameters
    merged = modelfile.build(_base(), max_len=512, merged=True, system="Mine.",
                             overrides=[("temperature", "0")])
    assert merged.from_ == "./model-q4_1.gguf" and merged.adapter is None
    assert merged.system == "Mine." and ("temperature", "0") in merged.parameters
    # the base's own larger num_ctx stays (8192 context, capped: 8192 >= 2048)
    assert ("num_ctx", "8192") in merged.parameters


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_merged_blob_computes_what_the_blob_plus_adapter_computes(tiny_base, tmp_path, quant):
    """llama (rotary rows permuted in the GGUF: the LoRA delta must be permuted the same)."""
    from test_export_logits import _prompt_ids

    from ollama_ft.export import export_stage
    from ollama_ft.export.merge import load_adapter
    from ollama_ft.ollama_base.export import write_merged_blob

    base = tiny_base("r1-llama", hidden=256)  # rows of 256: K-quant blocks, not fallbacks
    run = make_run(base, tmp_path / "run", "deepseek-r1")
    export_stage(run, quants=quant, adapter_only=True, log=lambda *a: None)
    blob = run / f"base-{quant}.gguf"
    config = json.loads((base / "config.json").read_text())
    adapter = load_adapter(run / "adapter")
    try:
        notes = write_merged_blob(blob, adapter, config, tmp_path / "merged.gguf")
    finally:
        adapter.close()
    ids = _prompt_ids(base, "deepseek-r1")
    merged = gguf_logits(tmp_path / "merged.gguf", ids)
    applied = gguf_logits(blob, ids, lora=run / "adapter.gguf")
    plain = gguf_logits(blob, ids)
    kl = kl_divergence(applied, merged)
    assert kl.mean() < 2e-3, kl.mean()
    # the adapter matters: without it the logits are far off
    assert kl_divergence(applied, plain).mean() > 20 * kl.mean()
    if quant == "q4_k_m":  # below 8 bits the merged tensors are written as Q8_0
        assert any("written as Q8_0" in n for n in notes)
    else:
        assert notes == []
    assert np.isfinite(merged).all()
