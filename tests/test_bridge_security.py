"""A web page cannot drive the bridge, and a job request names nothing on this machine.

Each hostile request goes to a real `ollama-ft serve` on loopback without an API key, and
must be refused with nothing created: no job, no run directory, no upload.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest

from tests.conftest import FACTS, Server, qa_rows


def call(url, method="GET", body=None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    server = Server(root / "home", env={"OLLAMA_FT_MAX_UPLOAD": "4096",
                                        "OLLAMA_FT_ORIGINS": "https://app.example"})
    yield server, root / "home"
    server.stop()


def nothing_created(home):
    jobs = home / "jobs"
    assert not jobs.is_dir() or not any(jobs.iterdir()), list(jobs.iterdir())
    assert not (home / "runs").exists()


JOB = {"name": "x", "base": "deepseek-r1:1.5b", "data": "upload:" + "0" * 64}


@pytest.mark.parametrize("label, headers, body, status", [
    ("drive-by from a web page (text/plain, no preflight)",
     {"Origin": "http://evil.example", "Content-Type": "text/plain"},
     {**JOB, "trust_remote_code": True}, 403),
    ("DNS rebinding: our port under another name", {"Host": "evil.example:11435"}, JOB, 403),
    ("trust_remote_code without --allow-remote-code", {}, {**JOB, "trust_remote_code": True}, 400),
    ("allow_pickle without --allow-remote-code", {}, {**JOB, "allow_pickle": True}, 400),
    ("output_dir outside the home", {}, {**JOB, "output_dir": "/etc/ollama-ft"}, 400),
    ("output_dir climbing out", {}, {**JOB, "output_dir": "../../etc"}, 400),
    ("data from a path the request names", {}, {**JOB, "data": "/etc/passwd"}, 400),
    ("eval data from a path", {}, {**JOB, "eval_data": "/etc/passwd", "eval_split": 0}, 400),
    ("a local base outside --data-dir", {}, {**JOB, "base": "/etc"}, 400),
    ("an upload that does not exist", {}, JOB, 400),
])
def test_hostile_job_requests_are_refused(guarded, label, headers, body, status):
    server, home = guarded
    code, raw, _ = call(server.url + "/api/ft/jobs", "POST", body, headers)
    assert code == status, (label, raw)
    assert b"error" in raw
    nothing_created(home)


def test_other_routes_refuse_foreign_origins_too(guarded):
    server, _ = guarded
    for path in ("/api/tags", "/api/ft/jobs"):
        code, _, _ = call(server.url + path, headers={"Origin": "https://evil.example"})
        assert code == 403


def test_allowed_origins_get_cors_and_clients_without_origin_pass(guarded):
    server, _ = guarded
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "app://obsidian.md",
                   "https://app.example"):
        code, _, headers = call(server.url + "/api/tags", headers={"Origin": origin})
        assert code == 200 and headers.get("access-control-allow-origin") == origin, origin
    code, _, headers = call(server.url + "/api/chat", "OPTIONS", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert code == 204 and "POST" in headers["access-control-allow-methods"]
    assert call(server.url + "/api/tags")[0] == 200  # curl, the official clients
    assert call(server.url + "/api/tags", headers={"Host": "localhost:1"})[0] == 200


def test_uploads_are_digest_checked_size_limited_and_named_by_content(guarded):
    server, home = guarded
    data = "".join(json.dumps(r) + "\n" for r in qa_rows(FACTS)).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    up = server.url + "/api/ft/uploads"
    assert call(f"{up}?filename=d.jsonl&digest=sha256:{'0' * 64}", "POST", raw=data)[0] == 400
    assert call(f"{up}?filename=d.exe", "POST", raw=data)[0] == 400
    assert call(f"{up}?filename=big.jsonl", "POST", raw=b"x" * 5000)[0] == 413
    assert not (home / "uploads").exists() or not any((home / "uploads").iterdir())
    code, raw, _ = call(f"{up}?filename=../../../tmp/evil.jsonl&digest={digest}", "POST", raw=data)
    assert code == 201, raw
    saved = json.loads(raw)
    assert saved["data"] == "upload:" + digest[7:] and saved["size"] == len(data)
    assert [p.name for p in (home / "uploads").iterdir()] == [digest[7:] + ".jsonl"]
    nothing_created(home)
    # a job may then use it (accepted, queued: the base alias is not fetched here)
    code, raw, _ = call(server.url + "/api/ft/jobs", "POST", {**JOB, "data": saved["data"],
                                                              "max_steps": 1})
    assert code == 201, raw
    job = json.loads(raw)
    assert job["config"]["data"] == str(home / "uploads" / (digest[7:] + ".jsonl"))
    assert job["run_dir"].startswith(str(home / "runs"))
    call(server.url + f"/api/ft/jobs/{job['id']}", "DELETE")
