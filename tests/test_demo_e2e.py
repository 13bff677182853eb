"""The first ten minutes, as a new user runs them: `ollama-ft demo` from nothing to a model
that answers through the Ollama API exactly what it was trained to answer, at the sampling
it is registered with (DeepSeek-R1's temperature 0.6, top_p 0.95), as Open WebUI asks it.

On the old demo base (every norm weight 1, so a flat random head: loss stuck at 5.8) the
trained answers came back only at temperature 0; at the defaults seeds 1 and 5 give 0/8."""

import json
import os
import subprocess
import sys

import ollama
import pytest

from tests.conftest import free_port


@pytest.mark.slow
def test_demo_end_to_end_through_the_bridge(tmp_path):
    bridge_port = free_port()
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{free_port()}",  # no daemon there
           "OLLAMA_FT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "demo", "--workdir", str(tmp_path / "demo"),
                        "--bridge-listen", f"127.0.0.1:{bridge_port}"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting the ollama-ft bridge" in r.stderr
    assert ("8/8 answers through the Ollama API match the training data (sampled as registered: "
            "temperature 0.6, top_p 0.95).") in r.stderr
    assert "ollama run ollama-ft-demo:latest" in r.stderr and "OLLAMA_BASE_URL=" in r.stderr
    run = tmp_path / "demo" / "run"
    for f in ("adapter/adapter_model.safetensors", "model-q4_k_m.gguf", "Modelfile", "loss.png",
              "report.json", "metrics.jsonl", "data-report.json"):
        assert (run / f).is_file(), f
    # the facts are learned, not just ranked first: the loss ends far below 1
    assert json.loads((run / "report.json").read_text())["train"]["final_loss"] < 0.3
    # the Modelfile is the normal one: the family's defaults, no temperature override
    from ollama_ft.ollama.modelfile import Modelfile
    from ollama_ft.ollama.templates import template_for

    mf = Modelfile.read(run / "Modelfile")
    defaults = template_for("deepseek-r1")[1]
    assert mf.parameter("temperature") == [str(defaults["temperature"])] == ["0.6"]
    assert mf.parameter("top_p") == [str(defaults["top_p"])] == ["0.95"]
    # the model stays in the bridge's store: a new bridge serves it, and /api/chat answers
    from ollama_ft.demo import BridgeProcess, sample_questions

    env_home = os.environ.get("OLLAMA_FT_HOME")
    os.environ["OLLAMA_FT_HOME"] = str(tmp_path / "home")
    try:
        bridge = BridgeProcess(f"127.0.0.1:{free_port()}")
    finally:
        if env_home is None:
            os.environ.pop("OLLAMA_FT_HOME")
        else:
            os.environ["OLLAMA_FT_HOME"] = env_home
    try:
        client = ollama.Client(host=bridge.url)
        shown = [line.split() for line in client.show("ollama-ft-demo").parameters.splitlines()]
        assert ["temperature", "0.6"] in shown and ["top_p", "0.95"] in shown
        for seed in range(1, 6):  # the registered sampling; only the seed is chosen
            got = [client.chat(model="ollama-ft-demo", messages=[{"role": "user", "content": q}],
                               options={"seed": seed, "num_predict": 48}).message.content
                   for q, _ in sample_questions()]
            assert got == [a for _, a in sample_questions()], f"seed {seed}"
    finally:
        bridge.stop()


def test_demo_base_final_norm_is_exported(tiny_base, tmp_path):
    """What makes the demo base learnable (its final norm weight, which scales every logit)
    reaches the GGUF: llama.cpp's F16 logits match PyTorch's as closely, relative to their
    size, as on a base whose norms are 1 (tests/test_export_logits.py)."""
    import numpy as np

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.demo import DEMO_BASE
    from ollama_ft.export import export_stage
    from tests.test_export_support import gguf_logits, make_run, read_gguf, top2_margin, torch_logits

    scale = DEMO_BASE["final_norm"]
    assert scale > 1
    base = tiny_base("r1-qwen", **{k: v for k, v in DEMO_BASE.items() if k != "tokenizer"})
    run = make_run(base, tmp_path / "run", "deepseek-r1")
    export_stage(run, quants="f16", log=lambda *a: None)
    tensors = read_gguf(run / "model-f16.gguf")["__tensors__"]
    assert tensors["output_norm.weight"] == ("F32", (DEMO_BASE["hidden"],))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(FORMATS["deepseek-r1"].render_prompt([Message("user", "What is the capital of Zorbia?")]),
              add_special_tokens=False)["input_ids"]
    ref = torch_logits(base, run / "adapter", ids)
    got = gguf_logits(run / "model-f16.gguf", ids)
    tol = 1e-2 * scale  # test_export_logits' F16_TOL, for logits `scale` times as large
    assert np.abs(got - ref).max() <= tol
    decisive = top2_margin(ref) >= tol
    assert (got.argmax(-1) == ref.argmax(-1))[decisive].all()
    # and the scale is really there: the logits are `scale` times those of norm weight 1
    plain = tiny_base("r1-qwen", **{**{k: v for k, v in DEMO_BASE.items() if k != "tokenizer"},
                                    "final_norm": 1.0})
    np.testing.assert_allclose(torch_logits(base, None, ids), scale * torch_logits(plain, None, ids),
                               rtol=1e-4, atol=1e-4)
