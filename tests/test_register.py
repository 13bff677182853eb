"""Registration over the Ollama REST API, for real, against a running `ollama-ft serve`."""

import json
import os
import shutil
import subprocess
import sys

import ollama
import pytest

from ollama_ft.ollama.client import OllamaUnreachable, ollama_url
from ollama_ft.pipeline import register_stage
from tests.conftest import FACTS, free_port


@pytest.mark.parametrize("value,url", [
    (None, "http://127.0.0.1:11434"), ("example.com", "http://example.com:11434"),
    ("http://example.com", "http://example.com:80"), ("https://h", "https://h:443"),
    ("0.0.0.0:11435", "http://127.0.0.1:11435"), ("[::1]:9", "http://[::1]:9"),
    ("http://h:1/base/", "http://h:1/base")])
def test_ollama_host_rules(monkeypatch, value, url):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_url(value) == url


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("checkpoints", "model-f16.gguf"))
    return dst


def test_register_then_chat_and_register_again(bridge, run_copy):
    logs = []
    r = register_stage(run_copy, "facts-reg:v1", host=bridge.url, log=logs.append)
    # the bridge may have the blob from another test already: uploaded or skipped, once
    assert r.uploaded + r.skipped == ["model-q4_k_m.gguf"] and r.name == "facts-reg:v1"
    client = ollama.Client(host=bridge.url)
    q, a = FACTS[0]
    reply = client.chat(model="facts-reg:v1", messages=[{"role": "user", "content": q}],
                        options={"temperature": 0})
    assert reply.message.content == a
    show = client.show("facts-reg:v1")
    mf = (run_copy / "Modelfile").read_text()
    assert show.template in mf and 'stop' in show.parameters
    report = json.loads((run_copy / "report.json").read_text())["register"]
    assert report["name"] == "facts-reg:v1" and report["host"] == bridge.url
    # again: the blob is skipped (HEAD says present), the model replaced
    r2 = register_stage(run_copy, "facts-reg:v1", host=bridge.url, log=logs.append)
    assert r2.uploaded == [] and r2.skipped == ["model-q4_k_m.gguf"]
    assert sum(m.model == "facts-reg:v1" for m in client.list().models) == 1


def test_unreachable_daemon_keeps_everything_and_prints_the_command(run_copy):
    before = sorted(p.name for p in run_copy.iterdir())
    with pytest.raises(OllamaUnreachable) as e:
        register_stage(run_copy, "facts-x", host=f"127.0.0.1:{free_port()}", log=lambda *a: None)
    assert f"ollama create facts-x:latest -f {run_copy / 'Modelfile'}" in str(e.value)
    after = sorted(p.name for p in run_copy.iterdir())
    assert set(before) <= set(after) and "Modelfile" in after


def test_a_daemon_that_dies_mid_register_is_a_clean_error(run_copy):
    """The daemon answers /api/version, then drops every other connection without a reply (as
    the bridge did when llama.cpp crashed under it): register says what broke, what is kept
    and how to go on, exit 3 and no traceback."""
    import socketserver
    import threading

    class Dies(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line.startswith(b"GET /api/version"):
                body = b'{"version": "0.33.0"}'
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
            # anything else: the connection closes unanswered

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Dies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = sorted(p.name for p in run_copy.iterdir())
        r = subprocess.run([sys.executable, "-m", "ollama_ft", "register", str(run_copy),
                            "--name", "dies", "--host", f"127.0.0.1:{server.server_address[1]}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        assert "the connection to Ollama at" in r.stderr and "broke while registering" in r.stderr
        assert f"ollama-ft register {run_copy} --name dies:latest" in r.stderr
        assert set(before) <= {p.name for p in run_copy.iterdir()}
    finally:
        server.shutdown()
        server.server_close()

def test_register_cli_errors_are_clean(run_copy, bridge):
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{free_port()}"}
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "register", str(run_copy)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3 and "ollama create facts" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "register", str(run_copy), "--name",
                        "no good", "--host", bridge.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid model name" in r.stderr
    (run_copy / "model-q4_k_m.gguf").unlink()
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "register", str(run_copy), "--host",
                        bridge.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "ollama-ft export" in r.stderr


def test_modelfile_command_prints_and_writes(run_copy):
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "modelfile", str(run_copy), "--param",
                        "temperature=0.2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == "FROM ./model-q4_k_m.gguf"
    assert "PARAMETER temperature 0.2" in r.stdout
    assert (run_copy / "Modelfile").read_text() == r.stdout


def test_register_proves_what_the_daemon_renders(bridge, run_copy):
    """register asks the daemon to render a probe chat (_debug_render_only) through the
    template it really uses and compares it with training, token for token."""
    r = register_stage(run_copy, "facts-verified", host=bridge.url, log=lambda *a: None)
    v = r.verification
    assert v.template == "modelfile TEMPLATE"
    assert v.prompt == "rendered prompt equals training's, token for token" and v.tokens > 5
    report = json.loads((run_copy / "report.json").read_text())["register"]
    assert report["verification"]["prompt_tokens"] == v.tokens


def test_register_refuses_a_daemon_that_renders_differently(bridge, run_copy):
    """A model whose stored template renders other text than training is reported, with
    where it differs, instead of a success."""
    import httpx

    from ollama_ft.errors import OllamaError
    from ollama_ft.ollama.templates import template_for
    from ollama_ft.ollama.verify import Expected, verify_prompt

    register_stage(run_copy, "facts-other", host=bridge.url, log=lambda *a: None)
    other = template_for("deepseek-r1")[0].replace("<｜User｜>{{ .Content }}",
                                                   "<｜User｜> {{ .Content }}")
    body = {"model": "facts-other", "from": "facts-other", "template": other, "stream": False}
    assert httpx.post(bridge.url + "/api/create", json=body, timeout=60).status_code == 200
    with httpx.Client() as http:
        show = http.post(bridge.url + "/api/show", json={"model": "facts-other"}).json()
        with pytest.raises(OllamaError, match="renders a different prompt from training at "
                                              "character"):
            verify_prompt(http, bridge.url, "facts-other", show, other, None,
                          Expected("deepseek-r1", None, None))


def test_modelfile_adapter_form(run_copy):
    from ollama_ft.pipeline import modelfile_stage

    mf, path = modelfile_stage(run_copy, adapter=True, quant="q8_0", log=lambda *a: None)
    text = path.read_text()
    assert "FROM ./base-q8_0.gguf" in text and "ADAPTER ./adapter.gguf" in text
    assert mf.adapter == "./adapter.gguf"
