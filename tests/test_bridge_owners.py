"""Who may do what (issue #21 items 5 and 6): a job belongs to whoever created it, users see
and control their own jobs and admins all; the API key never reaches a job's worker, and
`register` sends a key only to the bridge it is for; an unexpected error tells the client
what failed and an id, and the log the rest."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_bridge_faults import JOB, Bridge, create, tiny_gguf, upload_data

ALICE = {"X-Ollama-Ft-User": "alice", "X-Ollama-Ft-Role": "user"}
BOB = {"X-Ollama-Ft-User": "bob", "X-Ollama-Ft-Role": "user"}
ADMIN = {"X-Ollama-Ft-User": "root-of-owui", "X-Ollama-Ft-Role": "admin"}


def test_users_see_and_control_only_their_own_jobs(tmp_path):
    b = Bridge(tmp_path / "home")
    try:
        data = upload_data(b)
        # queued behind a first job, so each stays queued while we look
        first = b.post("/api/ft/jobs", json={**JOB, "data": data}).json()
        mine = b.post("/api/ft/jobs", json={**JOB, "data": data}, headers=ALICE)
        assert mine.status_code == 201
        jid = mine.json()["id"]
        ids = lambda h: {j["id"] for j in b.get("/api/ft/jobs", headers=h).json()["jobs"]}  # noqa: E731
        assert ids(BOB) == set()
        assert ids(ALICE) == {jid} and mine.json()["owner"] == "alice"
        assert ids(ADMIN) == ids({}) == {jid, first["id"]}  # admins and the operator: all
        for method, path in (("GET", f"/api/ft/jobs/{jid}"), ("DELETE", f"/api/ft/jobs/{jid}"),
                             ("POST", f"/api/ft/jobs/{jid}/resume"),
                             ("GET", f"/api/ft/jobs/{jid}/events"),
                             ("GET", f"/api/ft/jobs/{jid}/files/loss.png")):
            r = b.request(method, path, headers=BOB)
            assert r.status_code == 404 and r.json()["error"] == f"job '{jid}' not found", (path, r.text)
        assert b.get(f"/api/ft/jobs/{jid}", headers=ALICE).json()["state"] == "queued"
        assert b.request("DELETE", f"/api/ft/jobs/{jid}", headers=ALICE).json()["state"] == "cancelled"
        assert b.post(f"/api/ft/jobs/{jid}/resume", headers=ADMIN).json()["state"] == "queued"
        assert b.request("DELETE", f"/api/ft/jobs/{jid}", headers=ADMIN).json()["state"] == "cancelled"
        assert b.get("/api/ft/jobs", headers={"X-Ollama-Ft-User": "x" * 300}).status_code == 400
        b.request("DELETE", f"/api/ft/jobs/{first['id']}", timeout=120)
    finally:
        b.stop()


def test_the_api_key_never_enters_a_workers_environment(tmp_path):
    key = "never-in-a-worker"
    b = Bridge(tmp_path / "home", api_key=key, env={"OLLAMA_FT_API_KEY": key})
    try:
        data = upload_data(b)
        jid = b.post("/api/ft/jobs", json={**JOB, "data": data}).json()["id"]
        environ = None
        deadline = time.time() + 60
        while time.time() < deadline and environ is None:
            j = b.get(f"/api/ft/jobs/{jid}").json()
            if j["state"] == "running" and j.get("pid"):
                try:
                    environ = Path(f"/proc/{j['pid']}/environ").read_bytes()
                except OSError:
                    pass
            elif j["state"] not in ("queued", "running"):
                break
            time.sleep(0.02)
        assert environ is not None, "the worker ended before it could be looked at"
        assert key.encode() not in environ
        assert b"OLLAMA_FT_REGISTER_HOST=" in environ
        assert "token_sha256" not in j  # clients never see the worker's token hash
        b.request("DELETE", f"/api/ft/jobs/{jid}", timeout=120)
    finally:
        b.stop()


def test_a_workers_token_opens_the_model_endpoints_only(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from ollama_ft.serve.app import Bridge as App
    from ollama_ft.serve.engine import Engine

    app = App(home=tmp_path, api_key="the-key", engine=Engine(memory_budget=2**30))
    monkeypatch.setattr(app.jobs, "token_ok", lambda t: t == "worker-token")
    try:
        with TestClient(app.app(), base_url="http://127.0.0.1") as c:
            worker = {"Authorization": "Bearer worker-token"}
            assert c.get("/api/tags", headers=worker).status_code == 200
            assert c.head(f"/api/blobs/sha256:{'0' * 64}", headers=worker).status_code == 404
            assert c.get("/api/ft/jobs", headers=worker).status_code == 401
            assert c.get("/metrics", headers=worker).status_code == 401
            assert c.get("/api/tags", headers={"Authorization": "Bearer guess"}).status_code == 401
            assert c.get("/api/ft/jobs", headers={"Authorization": "Bearer the-key"}).status_code == 200
    finally:
        app.close()


class Recorder:
    """A loopback HTTP server that answers like a daemon and records Authorization headers."""

    def __init__(self):
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                seen.append(self.headers.get("Authorization"))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"version": "0.33.0"} if self.path == "/api/version"
                                  else {"error": "no"}).encode()
                self.send_response(200 if self.path == "/api/version" else
                                   404 if self.command == "HEAD" else 500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_HEAD = _answer

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def test_register_sends_the_key_only_to_the_bridge_it_is_for(tmp_path, monkeypatch):
    from ollama_ft.ollama import client
    from ollama_ft.ollama.modelfile import Modelfile
    from ollama_ft.ollama import daemon as source

    other, bridge = Recorder(), Recorder()
    monkeypatch.setattr(client, "_BRIDGE_TOKEN", None, raising=False)
    monkeypatch.setenv("OLLAMA_FT_API_KEY", "k3y")
    monkeypatch.setenv("OLLAMA_HOST", bridge.url)
    monkeypatch.delenv("OLLAMA_FT_API_KEY_HOST", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    tiny_gguf(run / "model.gguf")
    try:
        for host in (other.url, bridge.url):
            with pytest.raises(Exception):  # the recorder refuses the upload
                client.register(run, Modelfile(from_="./model.gguf"), "x", host=host,
                                log=lambda *a: None, verify=False)
            with pytest.raises(Exception):  # and has no model
                source.show("x", host=host)
        assert other.seen and set(other.seen) == {None}  # --host elsewhere: no key
        assert set(bridge.seen) == {"Bearer k3y"}  # OLLAMA_HOST is the bridge: the key
        monkeypatch.setenv("OLLAMA_FT_API_KEY_HOST", other.url)
        assert client.auth_headers(other.url) == {"Authorization": "Bearer k3y"}
        assert client.auth_headers(bridge.url) == {}
        # a job worker: its own token, to its own bridge only, never the key
        client.use_bridge_token(bridge.url, "tok")
        assert client.auth_headers(bridge.url) == {"Authorization": "Bearer tok"}
        assert client.auth_headers(other.url) == {}
    finally:
        other.stop()
        bridge.stop()


def test_an_unexpected_error_names_what_failed_and_an_id_the_log_explains(tmp_path):
    home = tmp_path / "home"
    b = Bridge(home)
    try:
        assert create(b, "odd", tiny_gguf(tmp_path / "m.gguf"), template="{{ .Prompt }}").status_code == 200
        m = json.loads((home / "models/manifests/registry.ollama.ai/library/odd/latest").read_text())
        layer = next(l for l in m["layers"] if l["mediaType"].endswith("template"))
        blob = home / "models/blobs" / layer["digest"].replace(":", "-")
        blob.write_bytes(b"\xff" * blob.stat().st_size)  # same size, not UTF-8: a bug's stand-in
        r = b.post("/api/show", json={"model": "odd"})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err.startswith("POST /api/show failed: internal error (UnicodeDecodeError); error id ")
        assert str(home) not in err and "Traceback" not in err and "codec" not in err
        eid = err.split("error id ")[1].split()[0]
        log = b.log_text()
        assert f"error id {eid}: POST /api/show failed" in log and "Traceback" in log
        assert "UnicodeDecodeError" in log
    finally:
        b.stop()
