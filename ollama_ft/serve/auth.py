"""The bridge's API key: a Bearer-token check on every request (required when the bridge
binds beyond loopback; see server.py). Origin and Host checks are origins.py's."""

from __future__ import annotations

import secrets

from ollama_ft.serve.http import error


class ApiKey:
    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode()
            if not secrets.compare_digest(auth, f"Bearer {self.key}"):
                resp = error(401, "unauthorized: send Authorization: Bearer <api key>")
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
