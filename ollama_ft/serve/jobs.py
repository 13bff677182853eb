"""Training jobs of the bridge: `train` + `export` + `register` in a worker process.

Each job lives in ROOT/jobs/<id>/: job.json (state and the latest progress), events.ndjson
(every progress line, appended by the worker), worker.log. Jobs run one at a time, in the
order they came; a restarted service marks jobs whose worker is gone as `interrupted`, and
`resume` continues one from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ollama_ft.config import RunConfig, from_mapping
from ollama_ft.errors import ConfigError, OllamaFtError
from ollama_ft.rundir import read_json, write_json

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


class JobNotFound(OllamaFtError):
    pass


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child not yet reaped is a zombie: not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def latest_progress(job_dir: Path) -> dict:
    """The last progress event the worker appended (step, loss, tokens/s, ETA)."""
    path = job_dir / "events.ndjson"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    stage = None
    for line in reversed(lines):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("type") == "stage" and stage is None:
            stage = ev.get("stage")
        if ev.get("type") == "progress":
            return {**{k: v for k, v in ev.items() if k not in ("type", "time")},
                    "stage": stage or "train"}
    return {"stage": stage} if stage else {}


def read_job(job_dir: Path) -> dict | None:
    job = read_json(job_dir / "job.json")
    if job is not None:
        job["progress"] = latest_progress(job_dir)
    return job


def read_jobs(root) -> list[dict]:
    """Every job under ROOT/jobs, newest first (read-only: no worker is touched)."""
    jobs_dir = Path(root) / "jobs"
    if not jobs_dir.is_dir():
        return []
    jobs = [read_job(p) for p in jobs_dir.iterdir() if (p / "job.json").is_file()]
    return sorted((j for j in jobs if j), key=lambda j: j["created_at"], reverse=True)


class JobManager:
    def __init__(self, root: Path, register_host: str | None = None, policy=None):
        from ollama_ft.serve.jobpolicy import JobPolicy

        self.policy = policy or JobPolicy(Path(root))
        self.root = Path(root) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.register_host = register_host
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._recover()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ollama-ft-jobs")
        self._thread.start()

    # --- records ---------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
            raise JobNotFound(f"job '{job_id}' not found")
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        job = read_job(self._dir(job_id))
        if job is None:
            raise JobNotFound(f"job '{job_id}' not found")
        return job

    def state(self, job_id: str) -> str | None:
        """The job's state alone (job.json), without its progress."""
        try:
            return (read_json(self._dir(job_id) / "job.json") or {}).get("state")
        except (OSError, ValueError):
            return None

    def list(self) -> list[dict]:
        return read_jobs(self.root.parent)

    def _save(self, job: dict) -> None:
        # progress is derived from events.ndjson on every read (read_job), not stored
        write_json(self._dir(job["id"]) / "job.json", {k: v for k, v in job.items() if k != "progress"})

    def _update(self, job_id: str, **changes) -> dict:
        with self._lock:
            job = self.get(job_id)
            job.update(changes)
            self._save(job)
            return job

    def events_path(self, job_id: str) -> Path:
        return self._dir(job_id) / "events.ndjson"

    def _event(self, job_id: str, event: dict) -> None:
        event = {"time": time.time(), **event}
        with open(self.events_path(job_id), "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    # --- API ---------------------------------------------------------------------------------
    def submit(self, body: dict) -> dict:
        values = from_mapping(body, "job")
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        cfg = RunConfig(**self.policy.check(values, job_id)).validate("job")
        d = self._dir(job_id)
        d.mkdir(parents=True)
        job = {"id": job_id, "state": "queued", "created_at": time.time(), "config": cfg.to_dict(),
               "run_dir": str(cfg.run_dir), "error": None, "artifacts": {},
               "pid": None, "started_at": None, "finished_at": None, "resumes": 0}
        self._save(job)
        self._event(job_id, {"type": "state", "state": "queued"})
        return self.get(job_id)

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            job = self.get(job_id)
            if job["state"] == "queued":
                self._event(job_id, {"type": "state", "state": "cancelled"})
                return self._update(job_id, state="cancelled", finished_at=time.time())
            if job["state"] != "running":
                return job
            proc = self._procs.get(job_id)
            pid = proc.pid if proc else job.get("pid")
            self._update(job_id, cancel_requested=True)
        if pid and _pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)  # the trainer saves a checkpoint and stops
            except ProcessLookupError:
                pass
            deadline = time.time() + 60
            while _pid_alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        self._finish(job_id, None)
        return self.get(job_id)

    def resume(self, job_id: str) -> dict:
        with self._lock:
            job = self.get(job_id)
            if job["state"] not in ("interrupted", "cancelled", "failed"):
                raise ConfigError(f"job '{job_id}' is {job['state']}; only an interrupted, "
                                  "cancelled or failed job can be resumed")
            job["config"]["resume"] = True
            job.update(state="queued", error=None, finished_at=None, resumes=job["resumes"] + 1,
                       cancel_requested=False)
            self._save(job)
            self._event(job_id, {"type": "state", "state": "queued", "resume": True})
            return job

    def close(self):
        """Service shutdown: running workers save a checkpoint and stop; jobs become
        `interrupted` (resumable), queued ones stay queued for the next start."""
        self._stop.set()
        with self._lock:
            for job_id, proc in list(self._procs.items()):
                self._update(job_id, state="interrupted", finished_at=time.time())
                self._event(job_id, {"type": "state", "state": "interrupted"})
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for proc in self._procs.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            self._procs.clear()

    # --- scheduling ------------------------------------------------------------------------
    def _recover(self):
        for job in self.list():
            if job["state"] == "running" and not _pid_alive(job.get("pid")):
                self._update(job["id"], state="interrupted", finished_at=time.time())
                self._event(job["id"], {"type": "state", "state": "interrupted"})

    def _loop(self):
        while not self._stop.wait(0.5):
            with self._lock:
                for job_id, proc in list(self._procs.items()):
                    if proc.poll() is not None:
                        self._finish(job_id, proc.returncode)
                if self._procs:
                    continue
                jobs = self.list()
                orphans = [j for j in jobs if j["state"] == "running"]
                for j in orphans:  # a worker that outlived a killed service
                    if not _pid_alive(j.get("pid")):
                        self._finish(j["id"], None)
                if any(_pid_alive(j.get("pid")) for j in orphans):
                    continue
                queued = [j for j in jobs if j["state"] == "queued"]
                if queued:
                    self._start(min(queued, key=lambda j: j["created_at"]))

    def _start(self, job: dict):
        d = self._dir(job["id"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.register_host:
            env["OLLAMA_FT_REGISTER_HOST"] = self.register_host
        log = open(d / "worker.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "ollama_ft.serve.jobworker", str(d)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._procs[job["id"]] = proc
        self._update(job["id"], state="running", pid=proc.pid, started_at=time.time())
        self._event(job["id"], {"type": "state", "state": "running"})

    def _finish(self, job_id: str, returncode):
        with self._lock:
            proc = self._procs.pop(job_id, None)
            if proc is not None and returncode is None:
                returncode = proc.wait()
            job = self.get(job_id)
            if job["state"] in FINAL:
                return
            result = read_json(self._dir(job_id) / "result.json", {}) or {}
            if job.get("cancel_requested"):
                state = "cancelled"
            elif returncode == 0 and result.get("ok"):
                state = "succeeded"
            else:
                state = "failed"
            self._update(job_id, state=state, finished_at=time.time(),
                         error=result.get("error") if state == "failed" else None,
                         artifacts=result.get("artifacts", job.get("artifacts", {})))
            self._event(job_id, {"type": "state", "state": state,
                                 **({"error": result.get("error")} if state == "failed" else {})})
