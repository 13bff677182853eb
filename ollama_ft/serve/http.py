"""Request bodies and error replies, the way Ollama shapes them: errors are
`{"error": "..."}` with Ollama's status, never a traceback."""

from __future__ import annotations

import datetime as dt
import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse


class HTTPError(Exception):
    """Raised anywhere in a handler; the app turns it into `{"error": message}` (with
    `headers`, e.g. Retry-After on a 503)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def json_body(request: Request, max_body: int) -> dict:
    """The request's JSON object, read with a size limit (413 beyond it)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body:
        raise HTTPError(413, f"request body larger than {max_body} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise HTTPError(413, f"request body larger than {max_body} bytes")
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return data


BODY_STEP = 4 << 20  # bytes of a big body handed to a worker thread at a time


async def feed(chunks, write, step: int = BODY_STEP) -> None:
    """Pass a big body (async chunks) to `write` in steps of `step` bytes, each in a worker
    thread: the event loop only gathers bytes, while hashing and writing (which let go of
    the GIL) run beside it, so other requests are answered meanwhile."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) >= step:
            data, buf = buf, bytearray()
            await run_in_threadpool(write, data)
    if buf:
        await run_in_threadpool(write, buf)
