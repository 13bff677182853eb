"""The first ten minutes, as a new user runs them: `ollama-ft demo` from nothing to a model
that answers through the Ollama API exactly what it was trained to answer."""

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
    assert "8/8 answers through the Ollama API match the training data." in r.stderr
    assert "ollama run ollama-ft-demo:latest" in r.stderr and "OLLAMA_BASE_URL=" in r.stderr
    run = tmp_path / "demo" / "run"
    for f in ("adapter/adapter_model.safetensors", "model-q4_k_m.gguf", "Modelfile", "loss.png",
              "report.json", "metrics.jsonl", "data-report.json"):
        assert (run / f).is_file(), f
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
        for q, a in sample_questions():
            reply = client.chat(model="ollama-ft-demo", messages=[{"role": "user", "content": q}],
                                options={"temperature": 0})
            assert reply.message.content == a
    finally:
        bridge.stop()
