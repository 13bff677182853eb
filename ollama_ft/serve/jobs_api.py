"""The training-jobs API of the bridge: /api/ft/uploads and /api/ft/jobs (create, list,
get, cancel, resume, and the NDJSON event stream)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ollama_ft.errors import OllamaFtError
from ollama_ft.serve.http import error, json_body
from ollama_ft.serve.jobs import FINAL, JobNotFound

FOLLOW_INTERVAL = 0.3  # seconds between looks at a running job's events
# the files of a job's run a client may read (pictures and reports, never weights)
JOB_FILES = {"loss.png": "image/png", "eval.png": "image/png", "eval.md": "text/markdown",
             "eval.jsonl": "application/x-ndjson", "report.json": "application/json",
             "metrics.jsonl": "application/x-ndjson", "data-report.json": "application/json"}


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
        body = await json_body(request, self.b.max_body)
        try:
            job = self.jobs.submit(body)
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
        try:
            saved = await self.jobs.policy.save_upload(
                request.stream(), request.query_params.get("filename", ""),
                request.query_params.get("digest"))
        except UploadTooLarge as e:
            return error(413, str(e))
        except OllamaFtError as e:
            return error(400, str(e))
        return JSONResponse(saved, status_code=201)

    async def list(self, request):
        return JSONResponse({"jobs": self.jobs.list()})

    def _call(self, fn, job_id):
        try:
            return JSONResponse(fn(job_id))
        except JobNotFound as e:
            return error(404, str(e))
        except OllamaFtError as e:
            return error(400, str(e))

    async def get(self, request):
        return self._call(self.jobs.get, request.path_params["job_id"])

    async def cancel(self, request):  # waits for the worker to stop: in a thread
        return await run_in_threadpool(self._call, self.jobs.cancel, request.path_params["job_id"])

    async def resume(self, request):
        return self._call(self.jobs.resume, request.path_params["job_id"])

    async def file(self, request):
        """One of JOB_FILES from the job's run directory (404 until the job has written it)."""
        from starlette.responses import FileResponse

        job_id, name = request.path_params["job_id"], request.path_params["name"]
        try:
            job = self.jobs.get(job_id)
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
        A follower is a coroutine: it sleeps on the event loop, not in a thread."""
        job_id = request.path_params["job_id"]
        try:
            self.jobs.get(job_id)
        except JobNotFound as e:
            return error(404, str(e))
        path = self.jobs.events_path(job_id)

        async def follow():
            pos = 0
            while True:
                state = self.jobs.state(job_id)
                final = state is None or state in FINAL  # None: the job is gone
                if path.is_file():
                    with open(path, "rb") as f:
                        f.seek(pos)
                        data = f.read()
                    end = data.rfind(b"\n") + 1
                    if end:
                        pos += end
                        yield data[:end].decode("utf-8")
                if final:
                    return
                await asyncio.sleep(FOLLOW_INTERVAL)
        return StreamingResponse(follow(), media_type="application/x-ndjson")
