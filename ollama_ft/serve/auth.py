"""The bridge's API key: a Bearer-token check on every request (required when the bridge
binds beyond loopback; see server.py). Origin and Host checks are origins.py's.

A training job's worker never sees the key: it gets a token of its own (jobs.py), good
only while it runs and only for Ollama's model endpoints (to register its model, or read
an `ollama:NAME` base), not for the jobs API or the metrics."""

from __future__ import annotations

import secrets

from ollama_ft.serve.http import error

WORKER_PATHS = ("/api/",)
NOT_FOR_WORKERS = ("/api/ft/",)


class ApiKey:
    def __init__(self, app, key: str, worker_token_ok=None):
        self.app, self.key = app, key
        self.worker_token_ok = worker_token_ok

    def _worker(self, scope, auth: str) -> bool:
        path = scope.get("path", "")
        return (self.worker_token_ok is not None and auth.startswith("Bearer ")
                and path.startswith(WORKER_PATHS) and not path.startswith(NOT_FOR_WORKERS)
                and self.worker_token_ok(auth[len("Bearer "):]))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.key}".encode()) \
                    and not self._worker(scope, auth):
                resp = error(401, "unauthorized: send Authorization: Bearer <api key>")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
