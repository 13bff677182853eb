"""`ollama-ft serve` with real clients over real HTTP: the official `ollama` client and the
`openai` package against a running bridge, models made by our own export from a trained run."""

import hashlib
import json
import socket
import threading
import urllib.request

import ollama
import pytest

from tests.conftest import FACTS, Server


def digest_of(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def client(bridge):
    return ollama.Client(host=bridge.url)


@pytest.fixture(scope="module")
def models(client, trained_run):
    """Two models on the bridge: the Q4_K_M and the F16 export of one trained run."""
    from ollama_ft.ollama.templates import template_for

    template, params = template_for("deepseek-r1")
    names = {}
    for quant, name in (("q4_k_m", "facts-q4"), ("f16", "facts-f16")):
        path = trained_run / f"model-{quant}.gguf"
        assert client.create_blob(path) == digest_of(path)
        statuses = [s.status for s in client.create(
            model=name, files={"model.gguf": digest_of(path)}, template=template,
            parameters={**params, "temperature": 0}, stream=True)]
        assert statuses[0] == "parsing GGUF" and statuses[-1] == "success"
        names[quant] = name
    return names


def test_version_tags_show(client, models, bridge):
    with urllib.request.urlopen(bridge.url + "/api/version") as r:
        assert json.load(r)["version"].count(".") == 2
    with urllib.request.urlopen(bridge.url + "/") as r:
        assert r.read() == b"Ollama is running"
    listed = {m.model: m for m in client.list().models}
    assert {"facts-q4:latest", "facts-f16:latest"} <= set(listed)
    q4 = listed["facts-q4:latest"]
    assert q4.details.format == "gguf" and q4.details.family == "qwen2"
    assert q4.details.quantization_level == "Q4_K_M" and len(q4.digest) == 64
    show = client.show("facts-q4")
    assert "thinking" in show.capabilities and "completion" in show.capabilities
    assert 'stop                           "<｜end▁of▁sentence｜>"' in show.parameters
    assert show.template.startswith("{{- /*") and show.modelinfo["general.architecture"] == "qwen2"


def test_chat_answers_the_trained_answers(client, models):
    for name in models.values():
        for q, a in FACTS:
            r = client.chat(model=name, messages=[{"role": "user", "content": q}])
            assert r.message.content == a and r.done and r.done_reason == "stop"
            assert r.eval_count > 0 and r.prompt_eval_count > 0 and r.total_duration > 0


def test_chat_stream_generate_and_think_flags(client, models):
    q, a = FACTS[1]
    chunks = list(client.chat(model=models["q4_k_m"], messages=[{"role": "user", "content": q}],
                              stream=True))
    assert "".join(c.message.content for c in chunks) == a
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    g = client.generate(model=models["f16"], prompt=q)
    assert g.response == a and g.context
    g = client.generate(model=models["f16"], prompt=q, think=False)
    assert g.response == a  # thinking off: the template closes the think block itself
    r = client.chat(model=models["f16"], messages=[{"role": "user", "content": q}],
                    options={"num_predict": 2})
    assert r.done_reason == "length" and r.eval_count == 2
    r = client.chat(model=models["f16"], messages=[])
    assert r.done_reason == "load"
    assert any(m.model == "facts-f16:latest" for m in client.ps().models)
    r = client.generate(model=models["f16"], prompt="", keep_alive=0)  # Open WebUI's unload
    assert r.done_reason == "unload"
    assert not any(m.model == "facts-f16:latest" for m in client.ps().models)


def test_openai_compatible_routes(bridge, models):
    import openai

    o = openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused")
    assert {"facts-q4:latest", "facts-f16:latest"} <= {m.id for m in o.models.list()}
    q, a = FACTS[2]
    r = o.chat.completions.create(model="facts-q4", messages=[{"role": "user", "content": q}])
    assert r.choices[0].message.content == a and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    stream = o.chat.completions.create(model="facts-q4", messages=[{"role": "user", "content": q}],
                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == a


def test_copy_delete(client, models):
    client.copy(models["q4_k_m"], "facts-copy:v1")
    assert "facts-copy:v1" in {m.model for m in client.list().models}
    client.delete("facts-copy:v1")
    assert "facts-copy:v1" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("facts-copy:v1")
    assert e.value.status_code == 404


def test_sixteen_concurrent_streams_on_two_models(bridge, models):
    results, errors = {}, []

    def run(i):
        try:
            c = ollama.Client(host=bridge.url)
            q, a = FACTS[i % len(FACTS)]
            name = models["q4_k_m"] if i % 2 else models["f16"]
            text = "".join(ch.message.content for ch in c.chat(
                model=name, messages=[{"role": "user", "content": q}], stream=True))
            results[i] = (text, a)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 16
    assert all(text == want for text, want in results.values())


# --- bad input ---------------------------------------------------------------------------------
def post(url, body: bytes, headers=None, method="POST"):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_blob_digest_checks(bridge, trained_run):
    data = b"not the bytes you promised"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    status, body = post(f"{bridge.url}/api/blobs/sha256:{'0' * 64}", data)
    assert status == 400 and json.loads(body)["error"] == "digest mismatch"
    status, _ = post(f"{bridge.url}/api/blobs/{good.upper().replace('SHA256', 'sha256')}", data)
    assert status == 400  # upper-case hex is a different string: refused
    assert post(f"{bridge.url}/api/blobs/{good}", data)[0] == 201
    assert post(f"{bridge.url}/api/blobs/{good}", b"", method="HEAD")[0] == 200
    assert post(f"{bridge.url}/api/blobs/{good}", data)[0] == 200  # already there


def test_truncated_upload_keeps_nothing(bridge):
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with socket.create_connection(("127.0.0.1", bridge.port)) as s:
        s.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                  .encode() + data[:400])
        s.shutdown(socket.SHUT_WR)
        s.recv(1000)
    assert post(f"{bridge.url}/api/blobs/{digest}", b"", method="HEAD")[0] == 404


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "x", "files": {"../../etc/passwd": "sha256:" + "a" * 64}}, 400, "file path must be relative"),
    ({"model": "x", "files": {"/abs/model.gguf": "sha256:" + "a" * 64}}, 400, "file path must be relative"),
    ({"model": "x", "files": {"m.gguf": "sha256:" + "b" * 64}}, 400, "not found"),
    ({"model": "bad name!", "files": {}}, 400, "invalid model name"),
    ({"model": "x", "from": "never-created"}, 400, "not found"),
    ({"model": "x"}, 400, "neither 'from' or 'files' was specified"),
])
def test_create_refusals(bridge, body, status, needle):
    code, raw = post(f"{bridge.url}/api/create", json.dumps(body).encode())
    assert code == status and needle in json.loads(raw)["error"]


def test_create_refuses_non_gguf_and_bad_template(bridge, trained_run):
    data = b"definitely not gguf"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    post(f"{bridge.url}/api/blobs/{digest}", data)
    code, raw = post(f"{bridge.url}/api/create",
                     json.dumps({"model": "x", "files": {"m.gguf": digest}}).encode())
    assert code == 400 and json.loads(raw)["error"] == "supplied file was not in GGUF format"
    gguf = trained_run / "model-q4_k_m.gguf"
    code, raw = post(f"{bridge.url}/api/create", json.dumps(
        {"model": "x", "files": {"m.gguf": digest_of(gguf)}, "template": "{{ if }}"}).encode())
    assert code == 400 and json.loads(raw)["error"].startswith("template error:")
    code, raw = post(f"{bridge.url}/api/create", json.dumps(
        {"model": "x", "files": {"m.gguf": digest_of(gguf)}, "adapters": {"a.gguf": digest_of(gguf)}}).encode())
    assert code == 400 and "not a LoRA adapter" in json.loads(raw)["error"]


@pytest.mark.parametrize("path,body,status,needle", [
    ("/api/chat", b"{not json", 400, "invalid JSON"),
    ("/api/chat", json.dumps({"model": "nope", "messages": []}).encode(), 404, "model 'nope' not found"),
    ("/api/generate", json.dumps({"model": "facts-q4", "prompt": "x", "options": {"temperature": "hot"}}).encode(),
     400, "temperature"),
    ("/api/generate", json.dumps({"model": "facts-q4", "prompt": "x", "options": {"bogus": 1}}).encode(),
     400, "invalid option provided: bogus"),
    ("/api/show", json.dumps({"model": "nope"}).encode(), 404, "not found"),
])
def test_malformed_requests_get_ollama_errors(bridge, models, path, body, status, needle):
    code, raw = post(bridge.url + path, body, {"Content-Type": "application/json"})
    assert code == status and needle in json.loads(raw)["error"]


def test_body_limit_and_api_key(tmp_path):
    server = Server(tmp_path / "store", "--api-key", "s3cret", env={"OLLAMA_FT_MAX_BODY": "1000"})
    try:
        assert post(server.url + "/api/tags", b"", method="GET")[0] == 401
        ok = ollama.Client(host=server.url, headers={"Authorization": "Bearer s3cret"})
        assert ok.list().models == []
        code, raw = post(server.url + "/api/show", b'{"model": "' + b"x" * 5000 + b'"}',
                         {"Authorization": "Bearer s3cret"})
        assert code == 413 and "larger than" in json.loads(raw)["error"]
    finally:
        server.stop()


def test_open_bind_requires_api_key(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ollama_ft", "serve", "--listen", "0.0.0.0:11999",
                        "--home", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr
