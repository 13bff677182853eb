"""Training jobs of the bridge: `train` + `export` + `register` in a worker process.

Each job lives in ROOT/jobs/<id>/: job.json (state and the latest progress), events.ndjson
(every progress line, appended by the worker), worker.log. Jobs run one at a time, in the
order they came; at most OLLAMA_FT_MAX_QUEUED_JOBS wait (QueueFull beyond). The manager
keeps every job.json in memory (read once at start, written through), so its loop and the
API never re-read history.

A worker is known by its pid and its start time (procid.py): after a restart the bridge
waits for a worker that outlived it only if it is still that very process, and signals
nothing else. A worker that died without a result (killed, or the machine went down) leaves
its job `interrupted`, which `resume` continues from the newest checkpoint.

A worker registers its model with this bridge using a token of its own, given on its stdin
and valid while it runs (`token_ok`); the bridge's API key never enters its environment.
Each job records its owner (owners.py).
"""

from __future__ import annotations

import copy
import hashlib
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
from ollama_ft.serve import procid

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("interrupted", "cancelled", "failed")
SECRET_ENV = ("OLLAMA_FT_API_KEY",)  # never handed to a worker


class JobNotFound(OllamaFtError):
    pass


class QueueFull(OllamaFtError):
    """Past OLLAMA_FT_MAX_QUEUED_JOBS; the API answers 503."""

    def __init__(self, limit: int):
        super().__init__(f"server busy, please try again.  queued training jobs are at the limit "
                         f"of {limit} (set OLLAMA_FT_MAX_QUEUED_JOBS to change it)")
        self.limit = limit


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


def public(job: dict) -> dict:
    """A job as clients see it (no token hash)."""
    return {k: v for k, v in job.items() if k != "token_sha256"}


def read_job(job_dir: Path) -> dict | None:
    job = read_json(job_dir / "job.json")
    if job is not None:
        job = public(job)
        job["progress"] = latest_progress(job_dir)
    return job


def read_jobs(root) -> list[dict]:
    """Every job under ROOT/jobs, newest first (read-only: no worker is touched)."""
    jobs_dir = Path(root) / "jobs"
    if not jobs_dir.is_dir():
        return []
    jobs = []
    for p in jobs_dir.iterdir():
        try:
            job = read_job(p) if (p / "job.json").is_file() else None
        except (OSError, ValueError):
            continue
        if job:
            jobs.append(job)
    return sorted(jobs, key=lambda j: j["created_at"], reverse=True)


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobManager:
    def __init__(self, root: Path, register_host: str | None = None, policy=None,
                 max_queued: int = 16, own_url: str | None = None, poll: float = 0.5):
        from ollama_ft.serve.jobpolicy import JobPolicy

        self.policy = policy or JobPolicy(Path(root))
        self.root = Path(root) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.register_host = register_host
        self.own_url = own_url  # where a worker's token is good
        self.max_queued = max_queued
        self.lock = threading.RLock()
        self._jobs: dict[str, dict] = {}  # job.json of every job, written through
        self._procs: dict[str, subprocess.Popen] = {}
        self._progress: dict[str, tuple] = {}  # job id -> (size, mtime_ns, progress)
        self._load()
        self._recover()
        self._stop = threading.Event()
        self._poll = poll
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ollama-ft-jobs")
        self._thread.start()

    # --- records ---------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
            raise JobNotFound(f"job '{job_id}' not found")
        return self.root / job_id

    def _load(self) -> None:
        for p in self.root.iterdir():
            try:
                job = read_json(p / "job.json") if (p / "job.json").is_file() else None
            except (OSError, ValueError):
                continue  # a job.json a crash cut short: write_json renames, so only by hand
            if isinstance(job, dict) and job.get("id") == p.name:
                self._jobs[p.name] = job

    def _progress_of(self, job_id: str) -> dict:
        path = self.root / job_id / "events.ndjson"
        try:
            st = path.stat()
        except OSError:
            return {}
        cached = self._progress.get(job_id)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        progress = latest_progress(path.parent)
        self._progress[job_id] = (st.st_size, st.st_mtime_ns, progress)
        return progress

    def _record(self, job_id: str, caller=None) -> dict:
        self._dir(job_id)
        job = self._jobs.get(job_id)
        if job is None or (caller is not None and not caller.may_see(job)):
            raise JobNotFound(f"job '{job_id}' not found")
        return job

    def get(self, job_id: str, caller=None) -> dict:
        with self.lock:
            job = public(copy.deepcopy(self._record(job_id, caller)))
        job["progress"] = self._progress_of(job_id)
        return job

    def state(self, job_id: str) -> str | None:
        """The job's state alone, without its progress."""
        job = self._jobs.get(job_id)
        return job.get("state") if job else None

    def list(self, caller=None) -> list[dict]:
        with self.lock:
            jobs = [public(copy.deepcopy(j)) for j in self._jobs.values()
                    if caller is None or caller.may_see(j)]
        for j in jobs:
            j["progress"] = self._progress_of(j["id"])
        return sorted(jobs, key=lambda j: j["created_at"], reverse=True)

    def _save(self, job: dict) -> None:
        # progress is derived from events.ndjson on every read, not stored
        job = {k: v for k, v in job.items() if k != "progress"}
        write_json(self._dir(job["id"]) / "job.json", job)
        self._jobs[job["id"]] = job

    def _update(self, job_id: str, **changes) -> dict:
        with self.lock:
            job = dict(self._record(job_id))
            job.update(changes)
            self._save(job)
            return job

    def events_path(self, job_id: str) -> Path:
        return self._dir(job_id) / "events.ndjson"

    def _event(self, job_id: str, event: dict) -> None:
        event = {"time": time.time(), **event}
        with open(self.events_path(job_id), "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def queued(self) -> int:
        return sum(1 for j in self._jobs.values() if j.get("state") == "queued")

    def needed_files(self) -> set[str]:
        """Real paths of the data files jobs need: queued, running, or resumable ones."""
        out = set()
        for j in self._jobs.values():
            if j.get("state") in ACTIVE + RESUMABLE:
                for key in ("data", "eval_data"):
                    value = (j.get("config") or {}).get(key)
                    if isinstance(value, str) and value:
                        out.add(os.path.realpath(value))
        return out

    def token_ok(self, token: str) -> bool:
        """A running job's worker token (its hash is in job.json, so a restarted bridge
        still knows the token of a worker that outlived it)."""
        h = _token_hash(token)
        return any(j.get("state") == "running" and secrets.compare_digest(j.get("token_sha256") or "", h)
                   for j in list(self._jobs.values()))

    # --- API ---------------------------------------------------------------------------------
    def submit(self, body: dict, owner: str | None = None) -> dict:
        with self.lock:  # the bound, and no cleaning of the upload it names meanwhile
            if self.queued() >= self.max_queued:
                raise QueueFull(self.max_queued)
            values = from_mapping(body, "job")
            job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            cfg = RunConfig(**self.policy.check(values, job_id)).validate("job")
            d = self._dir(job_id)
            d.mkdir(parents=True)
            job = {"id": job_id, "state": "queued", "created_at": time.time(),
                   "config": cfg.to_dict(), "run_dir": str(cfg.run_dir), "error": None,
                   "artifacts": {}, "owner": owner, "pid": None, "pid_started": None,
                   "started_at": None, "finished_at": None, "resumes": 0}
            self._save(job)
            self._event(job_id, {"type": "state", "state": "queued"})
        return self.get(job_id)

    def _alive(self, job_id: str, job: dict) -> bool:
        proc = self._procs.get(job_id)
        if proc is not None:
            return proc.poll() is None
        return procid.alive(job.get("pid"), job.get("pid_started"))

    def cancel(self, job_id: str, caller=None) -> dict:
        with self.lock:
            job = self._record(job_id, caller)
            if job["state"] == "queued":
                self._event(job_id, {"type": "state", "state": "cancelled"})
                self._update(job_id, state="cancelled", finished_at=time.time())
                return self.get(job_id)
            if job["state"] != "running":
                return self.get(job_id)
            job = self._update(job_id, cancel_requested=True)
            proc = self._procs.get(job_id)
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the trainer saves a checkpoint, stops
                except ProcessLookupError:
                    pass
        else:  # a worker that outlived a restart: only if it is still that process
            procid.signal_group(job.get("pid"), job.get("pid_started"), signal.SIGTERM)
        deadline = time.time() + 60
        while self._alive(job_id, job) and time.time() < deadline:
            time.sleep(0.2)
        if self._alive(job_id, job):
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                procid.signal_group(job.get("pid"), job.get("pid_started"), signal.SIGKILL)
        self._finish(job_id, None)
        return self.get(job_id)

    def resume(self, job_id: str, caller=None) -> dict:
        with self.lock:
            job = copy.deepcopy(self._record(job_id, caller))
            if job["state"] not in RESUMABLE:
                raise ConfigError(f"job '{job_id}' is {job['state']}; only an interrupted, "
                                  "cancelled or failed job can be resumed")
            if self.queued() >= self.max_queued:
                raise QueueFull(self.max_queued)
            job["config"]["resume"] = True
            job.update(state="queued", error=None, finished_at=None, resumes=job["resumes"] + 1,
                       cancel_requested=False)
            self._save(job)
            self._event(job_id, {"type": "state", "state": "queued", "resume": True})
        return self.get(job_id)

    def close(self):
        """Service shutdown: running workers save a checkpoint and stop; jobs become
        `interrupted` (resumable), queued ones stay queued for the next start."""
        self._stop.set()
        with self.lock:
            for job_id, proc in list(self._procs.items()):
                self._update(job_id, state="interrupted", finished_at=time.time(),
                             token_sha256=None)
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
        """At start: a `running` job whose worker is gone (or whose pid now names another
        process) is finished by its result, or interrupted."""
        for job in list(self._jobs.values()):
            if job["state"] == "running" and not procid.alive(job.get("pid"), job.get("pid_started")):
                self._finish(job["id"], None)

    def _loop(self):
        while not self._stop.wait(self._poll):
            with self.lock:
                for job_id, proc in list(self._procs.items()):
                    if proc.poll() is not None:
                        self._finish(job_id, proc.returncode)
                if self._procs:
                    continue
                orphans = [j for j in self._jobs.values() if j["state"] == "running"]
                for j in orphans:  # a worker that outlived a killed service
                    if not procid.alive(j.get("pid"), j.get("pid_started")):
                        self._finish(j["id"], None)
                if any(j["state"] == "running" for j in self._jobs.values()):
                    continue
                queued = [j for j in self._jobs.values() if j["state"] == "queued"]
                if queued:
                    self._start(min(queued, key=lambda j: j["created_at"]))

    def _start(self, job: dict):
        d = self._dir(job["id"])
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if self.register_host:
            env["OLLAMA_FT_REGISTER_HOST"] = self.register_host
        if self.own_url:
            env["OLLAMA_FT_BRIDGE_URL"] = self.own_url
        token = secrets.token_urlsafe(32)
        (d / "result.json").unlink(missing_ok=True)  # an earlier run's, before a resume
        with open(d / "worker.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "ollama_ft.serve.jobworker", str(d)],
                                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        try:
            proc.stdin.write((token + "\n").encode())
            proc.stdin.close()
        except OSError:  # it died at once: the loop sees its exit
            pass
        self._procs[job["id"]] = proc
        self._update(job["id"], state="running", pid=proc.pid,
                     pid_started=procid.start_time(proc.pid), started_at=time.time(),
                     token_sha256=_token_hash(token))
        self._event(job["id"], {"type": "state", "state": "running"})

    def _finish(self, job_id: str, returncode):
        with self.lock:
            proc = self._procs.pop(job_id, None)
            if proc is not None and returncode is None:
                returncode = proc.wait()
            job = self._record(job_id)
            if job["state"] in FINAL:
                return
            result = read_json(self._dir(job_id) / "result.json", {}) or {}
            if job.get("cancel_requested"):
                state, err = "cancelled", None
            elif result.get("ok") and returncode in (0, None):
                state, err = "succeeded", None
            elif result.get("error") == "stopped":  # a SIGTERM it was not asked for
                state, err = "interrupted", "the worker was stopped; resume continues it"
            elif result.get("error"):
                state, err = "failed", result["error"]
            elif returncode is not None and returncode > 0:
                state, err = "failed", (f"the worker exited with code {returncode} without a "
                                        "result; its worker.log says why")
            else:  # killed by a signal, or gone while the bridge was down
                how = (f"was killed ({_signal_name(-returncode)})"
                       if returncode is not None and returncode < 0 else "stopped")
                state, err = "interrupted", (f"the worker {how} before it finished; resume "
                                             "continues from the newest checkpoint")
            self._update(job_id, state=state, finished_at=time.time(), error=err,
                         token_sha256=None,
                         artifacts=result.get("artifacts", job.get("artifacts", {})))
            self._event(job_id, {"type": "state", "state": state,
                                 **({"error": err} if err and state == "failed" else {})})
