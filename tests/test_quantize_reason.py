"""When llama.cpp refuses to quantize, the error gives llama.cpp's reason (its ERROR line), not
the start of its log (the metadata dump at INFO) (issue #22 item 4)."""

from __future__ import annotations

import pytest
from conftest import FAMILIES
from test_export_support import make_run


def test_a_refused_quantization_says_why(tiny_base, tmp_path):
    """A 2-layer V2-Lite-shaped checkpoint: llama.cpp tells Lite (no q compression) from the
    full V2 by its 27 layers, so it wants deepseek2.attention.q_lora_rank here and refuses."""
    from ollama_ft.export import export_stage
    from ollama_ft.export.errors import QuantizeError

    assert FAMILIES["v2-lite"]["layers"] == 27  # the fixture's own V2-Lite quantizes
    base = tiny_base("v2-lite", layers=2)
    run = make_run(base, tmp_path / "run", "deepseek-llm", targets=["o_proj"])
    with pytest.raises(QuantizeError) as caught:
        export_stage(run, quants="q4_k_m", log=lambda *a: None)
    message = str(caught.value)
    assert "key not found in model: deepseek2.attention.q_lora_rank" in message, message
    assert "llama_model_loader" not in message, message  # no metadata dump
    assert "ollama-ft-plan-" not in message, message  # names the file exported, not the plan


def test_failure_reason_picks_llama_cpp_errors_from_its_log():
    from ollama_ft.export.quantize import failure_reason

    dump = [[2, "llama_model_loader: loaded meta data with 51 key-value pairs\n"],
            [2, "llama_model_loader: - kv  50: tokenizer.chat_template str = "
                "{{ raise_exception('x') }}\n"],
            [2, "llama_model_loader: - type  f16:   22 tensors\n"]]
    error = [4, "llama_model_quantize: failed to quantize: "]
    # an ERROR record continued by a CONT one is one line
    assert failure_reason([*dump, error, [5, "key not found in model: x.y\n"]]) == [
        "llama_model_quantize: failed to quantize: key not found in model: x.y"]
    # a build numbering its levels otherwise (ERROR=3): the line that reads like a reason
    assert failure_reason([[1, t] for _, t in dump] + [[3, "llama_model_quantize: failed to "
                                                         "quantize: unknown model\n"]]) == [
        "llama_model_quantize: failed to quantize: unknown model"]
    # nothing that reads like a reason: the last lines, as before
    assert failure_reason([[2, "a\n"], [2, "b\nc\n"], [2, "d\n"]], keep=2) == ["c", "d"]
