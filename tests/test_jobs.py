"""Training jobs over HTTP: start one, follow its events to the end, chat with the model it
registered; cancel another mid-way; a restarted service lists and resumes jobs."""

import json
import time
import urllib.request

import ollama
import pytest

from tests.conftest import FACTS, Server, qa_rows, write_jsonl


def call(url, method="GET", body=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_state(url, job_id, states, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = json.loads(call(f"{url}/api/ft/jobs/{job_id}")[1])
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} stuck in {job['state']}")


@pytest.mark.slow
def test_job_trains_registers_and_answers_then_cancel_and_resume(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    home = tmp_path / "home"
    server = Server(home, "--data-dir", str(tmp_path.parent))
    try:
        body = {"name": "jobft", "base": str(tiny_base("r1-qwen", hidden=128)), "data": str(data),
                "max_steps": 60, "save_steps": 60, "lr": 3e-3, "batch_size": 4, "warmup": 0,
                "lora_dropout": 0.0, "seed": 0, "max_len": 128, "logging_steps": 10}
        status, raw = call(f"{server.url}/api/ft/jobs", "POST", body)
        assert status == 201, raw
        job = json.loads(raw)
        # events: replayed and followed until the job ends
        with urllib.request.urlopen(f"{server.url}/api/ft/jobs/{job['id']}/events", timeout=900) as r:
            events = [json.loads(line) for line in r.read().decode().splitlines()]
        kinds = [e["type"] for e in events]
        assert "progress" in kinds and events[-1] == {**events[-1], "type": "state", "state": "succeeded"}
        progress = [e for e in events if e["type"] == "progress"]
        assert progress[-1]["step"] == 60 and "loss" in progress[0] and "eta_s" in progress[0]
        assert {"train", "export", "register"} <= {e.get("stage") for e in events}
        final = json.loads(call(f"{server.url}/api/ft/jobs/{job['id']}")[1])
        assert final["state"] == "succeeded" and final["artifacts"]["model"] == "jobft:latest"
        assert final["progress"]["step"] == 60 and final["progress"]["tokens_per_s"] > 0
        assert {"loss", "eta_s", "max_steps"} <= set(final["progress"])
        client = ollama.Client(host=server.url)
        assert "jobft:latest" in {m.model for m in client.list().models}
        q, a = FACTS[0]
        assert client.chat(model="jobft", messages=[{"role": "user", "content": q}],
                           options={"temperature": 0}).message.content == a

        # a second job, cancelled mid-way: the process stops, its checkpoint stays
        long = {**body, "name": "jobcancel", "max_steps": 100000, "save_steps": 5, "logging_steps": 1}
        job2 = json.loads(call(f"{server.url}/api/ft/jobs", "POST", long)[1])
        deadline = time.time() + 300
        while time.time() < deadline:
            j = json.loads(call(f"{server.url}/api/ft/jobs/{job2['id']}")[1])
            if j["state"] == "running" and (home / "jobs" / job2["id"] / "events.ndjson").read_text().count('"progress"') >= 6:
                break
            time.sleep(0.5)
        status, raw = call(f"{server.url}/api/ft/jobs/{job2['id']}", "DELETE")
        assert status == 200 and json.loads(raw)["state"] == "cancelled"
        run_dir = json.loads(raw)["run_dir"]
        import pathlib

        assert any((pathlib.Path(run_dir) / "checkpoints").glob("checkpoint-*"))
        listed = json.loads(call(f"{server.url}/api/ft/jobs")[1])["jobs"]
        assert {j["id"]: j["state"] for j in listed} == {job["id"]: "succeeded", job2["id"]: "cancelled"}
        assert call(f"{server.url}/api/ft/jobs/nope")[0] == 404
        assert call(f"{server.url}/api/ft/jobs", "POST", {"name": "x"})[0] == 400
    finally:
        server.stop()

    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ollama_ft", "jobs", "--home", str(home)],
                       capture_output=True, text=True, timeout=60)
    assert job["id"] in r.stdout and "succeeded" in r.stdout and "cancelled" in r.stdout

    # a restarted service still lists them; the cancelled one resumes from its checkpoint, and
    # one running while the service stops is marked interrupted and resumes too
    server = Server(home, "--data-dir", str(tmp_path.parent))
    try:
        listed = json.loads(call(f"{server.url}/api/ft/jobs")[1])["jobs"]
        assert len(listed) == 2
        status, raw = call(f"{server.url}/api/ft/jobs/{job2['id']}/resume", "POST")
        assert status == 200 and json.loads(raw)["config"]["resume"] is True
        wait_state(server.url, job2["id"], ("running",), 120)
        time.sleep(3)
    finally:
        server.stop()
    server = Server(home, "--data-dir", str(tmp_path.parent))
    try:
        j = json.loads(call(f"{server.url}/api/ft/jobs/{job2['id']}")[1])
        assert j["state"] == "interrupted" and j["resumes"] == 1
        call(f"{server.url}/api/ft/jobs/{job2['id']}/resume", "POST")
        wait_state(server.url, job2["id"], ("running",), 120)
        status, raw = call(f"{server.url}/api/ft/jobs/{job2['id']}", "DELETE")
        assert json.loads(raw)["state"] == "cancelled" and json.loads(raw)["resumes"] == 2
    finally:
        server.stop()


# --- issue #21: crash safety and cost of the job manager ------------------------------------------
def _job_dir(root, job_id, **fields):
    d = root / "jobs" / job_id
    d.mkdir(parents=True)
    job = {"id": job_id, "state": "succeeded", "created_at": time.time(),
           "config": {"name": "x", "base": "deepseek-r1:1.5b", "data": "/nonexistent.jsonl"},
           "run_dir": str(root / "runs" / job_id), "error": None, "artifacts": {}, "pid": None,
           "started_at": None, "finished_at": None, "resumes": 0, **fields}
    (d / "job.json").write_text(json.dumps(job))
    (d / "events.ndjson").write_text(json.dumps({"type": "progress", "step": 1}) + "\n")
    return d


def test_the_idle_job_loop_reads_no_history(tmp_path, monkeypatch):
    """It re-read every job.json (and 64 KiB of events) every 0.5 s, so its cost grew with
    the history; now it looks at the jobs it holds in memory."""
    import ollama_ft.serve.jobs as jobs

    for i in range(200):
        _job_dir(tmp_path, f"20260101-000000-{i:06x}")
    mgr = jobs.JobManager(tmp_path)
    reads = []
    real_read, real_progress = jobs.read_json, jobs.latest_progress
    monkeypatch.setattr(jobs, "read_json", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    monkeypatch.setattr(jobs, "latest_progress",
                        lambda *a, **k: reads.append(a) or real_progress(*a, **k))
    try:
        time.sleep(1.6)  # three turns of the loop
        assert reads == []
        assert len(mgr.list()) == 200 and mgr.list()[0]["progress"]["step"] == 1
    finally:
        mgr.close()


def test_a_reused_pid_is_neither_trusted_nor_signalled(tmp_path):
    """After a crash the pid in job.json may name another process: the bridge waited for it
    forever (the queue blocked) and `cancel` sent it SIGTERM, then SIGKILL."""
    import subprocess

    from ollama_ft.serve.jobs import JobManager

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _job_dir(tmp_path, "20260101-000000-000001", state="running", pid=other.pid,
                 pid_started=12345.0)  # its worker started then; this process did not
        _job_dir(tmp_path, "20260101-000000-000002", state="running", pid=other.pid)  # old record
        mgr = JobManager(tmp_path)
        try:
            for jid in ("20260101-000000-000001", "20260101-000000-000002"):
                job = mgr.get(jid)
                assert job["state"] == "interrupted" and "resume" in job["error"], job
                mgr.cancel(jid)
            time.sleep(0.3)
            assert other.poll() is None, "another process was signalled"
        finally:
            mgr.close()
    finally:
        other.kill()
        other.wait()


def test_a_killed_worker_leaves_its_job_interrupted_and_resumable(tmp_path):
    import os
    import signal

    from ollama_ft.serve.jobs import JobManager

    _job_dir(tmp_path, "20260101-000000-00000a", state="queued")
    mgr = JobManager(tmp_path)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and mgr.state("20260101-000000-00000a") != "running":
            time.sleep(0.05)
        job = mgr.get("20260101-000000-00000a")
        assert job["pid"]
        os.killpg(job["pid"], signal.SIGKILL)
        while time.time() < deadline and mgr.state("20260101-000000-00000a") == "running":
            time.sleep(0.05)
        job = mgr.get("20260101-000000-00000a")
        assert job["state"] == "interrupted" and "SIGKILL" in job["error"], job
        assert job["pid_started"]  # known by more than its pid
        assert mgr.resume(job["id"])["state"] == "queued"
        mgr.cancel(job["id"])
    finally:
        mgr.close()
