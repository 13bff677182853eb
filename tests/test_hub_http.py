"""The Hub-facing branch of `--base`: huggingface_hub itself talks HTTP to a local server that
answers the way the Hub's API does (the Hub is unreachable here), and every refusal is clear."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

REPOS = {
    "org/binonly": ["config.json", "pytorch_model.bin", "tokenizer.json"],
    "org/notok": ["config.json", "model.safetensors"],
    "org/noweights": ["config.json", "tokenizer.json"],
}


class HubLike(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        prefix = "/api/models/"
        repo = path[len(prefix):].split("/revision/")[0] if path.startswith(prefix) else ""
        if repo == "org/gated":
            return self._err(401, "GatedRepo", "Access to model org/gated is restricted.")
        if repo not in REPOS:
            return self._err(404, "RepoNotFound", "Repository not found")
        body = json.dumps({"id": repo, "modelId": repo, "sha": "0" * 40, "private": False,
                           "siblings": [{"rfilename": f} for f in REPOS[repo]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _err(self, status, code, msg):
        body = json.dumps({"error": msg}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", msg)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def hub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("repo,needle", [
    ("org/missing", "no such repo on the Hugging Face Hub"),
    ("org/gated", "gated repo; accept its licence"),
    ("org/binonly", "only pickle (.bin) weights"),
    ("org/notok", "the repo has no tokenizer"),
    ("org/noweights", "the repo has no model weights"),
])
def test_hub_refusals_are_clear(hub_url, tmp_path, repo, needle):
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    r = subprocess.run([sys.executable, "-m", "ollama_ft", "data", "check", str(tmp_path / "d.jsonl"),
                        "--base", repo], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("how", ["refused", "timeout"])
def test_an_unreachable_hub_is_a_clear_error(tmp_path, how):
    """No network and HF_HUB_OFFLINE unset: a message and exit 2, not a transport traceback."""
    import socket

    from tests.conftest import free_port

    silent = None
    if how == "refused":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:  # accepts the connection, never answers
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "3",
           "HF_HUB_DOWNLOAD_TIMEOUT": "3", "OLLAMA_FT_HUB_TIMEOUT": "3"}
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    try:
        r = subprocess.run([sys.executable, "-m", "ollama_ft", "data", "check",
                            str(tmp_path / "d.jsonl"), "--base", "deepseek-r1:1.5b"],
                           capture_output=True, text=True, env=env, timeout=180)
    finally:
        if silent is not None:
            silent.close()
    assert r.returncode == 2, r.stderr
    assert "could not be reached" in r.stderr and "Traceback" not in r.stderr, r.stderr
