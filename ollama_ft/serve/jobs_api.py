"""The training-jobs API of the bridge: /api/ft/uploads and /api/ft/jobs (create, list,
get, cancel, resume, and the NDJSON event stream).

Each request acts for its caller (owners.py): a user sees and controls their own jobs, an
admin or the operator every job. Queued jobs, event followers and uploads in flight are
bounded (limits.py): one more gets Ollama's 503 "server busy" at once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ollama_ft.errors import OllamaFtError
from ollama_ft.serve.http import error, json_body
from ollama_ft.serve.incidents import disk_full, incident
from ollama_ft.serve.jobs import FINAL, JobNotFound, QueueFull
from ollama_ft.serve.owners import Caller

FOLLOW_INTERVAL = 0.3  # seconds between looks at a running job's events
FOLLOW_READ = 1 << 20  # bytes of events sent per look at most
# the files of a job's run a client may read (pictures and reports, never weights)
JOB_FILES = {"loss.png": "image/png", "eval.png": "image/png", "eval.md": "text/markdown",
             "eval.jsonl": "application/x-ndjson", "report.json": "application/json",
             "metrics.jsonl": "application/x-ndjson", "data-report.json": "application/json"}


def queue_full(e: QueueFull):
    return error(503, str(e), headers={"Retry-After": "60"})


class JobsAPI:
    def __init__(self, bridge):
        self.b = bridge
        self.jobs = bridge.jobs

    def routes(self) -> list[Route]:
        return [
            Route("/api/ft/uploads", self.upload, methods=["POST"]),
            Route("/api/ft/jobs", self.create, methods=["POST"]),
            Route("/api/ft/jobs", self.list, methods=["GET"]),
            Route("/api/ft/jobs/{job_id}", self.get, methods=["GET"]),
            Route("/api/ft/jobs/{job_id}", self.cancel, methods=["DELETE"]),
            Route("/api/ft/jobs/{job_id}/resume", self.resume, methods=["POST"]),
            Route("/api/ft/jobs/{job_id}/events", self.events, methods=["GET"]),
            Route("/api/ft/jobs/{job_id}/files/{name}", self.file, methods=["GET"]),
        ]

    async def create(self, request):
        caller = Caller.of(request.headers)
        body = await json_body(request, self.b.max_body)
        try:
            job = self.jobs.submit(body, owner=caller.owner)
        except QueueFull as e:
            return queue_full(e)
        except OllamaFtError as e:
            return error(400, str(e))
        return JSONResponse(job, status_code=201)

    async def upload(self, request):
        """A data file for jobs: raw bytes, ?filename=NAME.jsonl (or .json/.csv/.parquet),
        optional ?digest=sha256:<hex> checked against what arrived."""
        from ollama_ft.serve.jobpolicy import MAX_UPLOAD, UploadTooLarge

        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_UPLOAD:
            return error(413, f"upload larger than {MAX_UPLOAD} bytes")
        with self.b.uploads.hold():  # 503 past OLLAMA_FT_MAX_UPLOADS
            try:
                saved = await self.jobs.policy.save_upload(
                    request.stream(), request.query_params.get("filename", ""),
                    request.query_params.get("digest"))
            except UploadTooLarge as e:
                return error(413, str(e))
            except OllamaFtError as e:
                return error(400, str(e))
            except OSError as e:
                return error(507 if disk_full(e) else 500, incident("storing the upload", e))
        return JSONResponse(saved, status_code=201)

    async def list(self, request):
        return JSONResponse({"jobs": self.jobs.list(Caller.of(request.headers))})

    def _call(self, fn, job_id, caller):
        try:
            return JSONResponse(fn(job_id, caller))
        except JobNotFound as e:
            return error(404, str(e))
        except QueueFull as e:
            return queue_full(e)
        except OllamaFtError as e:
            return error(400, str(e))

    async def get(self, request):
        return self._call(self.jobs.get, request.path_params["job_id"], Caller.of(request.headers))

    async def cancel(self, request):  # waits for the worker to stop: in a thread
        return await run_in_threadpool(self._call, self.jobs.cancel, request.path_params["job_id"],
                                       Caller.of(request.headers))

    async def resume(self, request):
        return self._call(self.jobs.resume, request.path_params["job_id"],
                          Caller.of(request.headers))

    async def file(self, request):
        """One of JOB_FILES from the job's run directory (404 until the job has written it)."""
        from starlette.responses import FileResponse

        job_id, name = request.path_params["job_id"], request.path_params["name"]
        try:
            job = self.jobs.get(job_id, Caller.of(request.headers))
        except JobNotFound as e:
            return error(404, str(e))
        if name not in JOB_FILES:
            return error(404, f"no file '{name}' for jobs; one of {', '.join(JOB_FILES)}")
        path = Path(job["run_dir"]) / name
        if not path.is_file():
            return error(404, f"job {job_id} has no {name} yet")
        return FileResponse(path, media_type=JOB_FILES[name])

    async def events(self, request):
        """NDJSON: every event so far, then new ones as they come, until the job ends.
        A follower is a coroutine: it sleeps on the event loop, not in a thread; it looks at
        the file's size and the job's state in memory, and reads only what was appended."""
        job_id = request.path_params["job_id"]
        try:
            self.jobs.get(job_id, Caller.of(request.headers))
        except JobNotFound as e:
            return error(404, str(e))
        path = self.jobs.events_path(job_id)
        self.b.followers.enter()  # 503 past OLLAMA_FT_MAX_FOLLOWERS

        async def follow():
            pos = 0
            while True:
                state = self.jobs.state(job_id)
                final = state is None or state in FINAL  # None: the job is gone
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = 0
                more = False
                if size > pos:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        data = f.read(FOLLOW_READ)
                    end = data.rfind(b"\n") + 1
                    if end:
                        pos += end
                        yield data[:end].decode("utf-8", errors="replace")
                    more = pos < size and end > 0
                if more:
                    continue
                if final:
                    return
                await asyncio.sleep(FOLLOW_INTERVAL)
        return StreamingResponse(follow(), media_type="application/x-ndjson",
                                 background=BackgroundTask(self.b.followers.leave))
