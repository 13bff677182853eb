"""Which web pages may call the bridge: Ollama's Origin and Host rules (v0.33).

A browser sends `Origin` on every cross-origin request, so a page the user visits cannot
drive the bridge unless its origin is allowed: loopback origins (`http(s)://localhost`,
`127.0.0.1`, `0.0.0.0`, any port), app origins (`app://`, `file://`, `tauri://`,
`vscode-webview://`, `vscode-file://`), and those listed in OLLAMA_FT_ORIGINS (comma
separated, `*` wildcards, as OLLAMA_ORIGINS). Requests without Origin (curl, the official
clients, Open WebUI's server) pass. On a loopback bind the Host header must name this
machine too (loopback or private address, `localhost`, `*.localhost`, `*.local`,
`*.internal`, the hostname): a DNS-rebound name is refused.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import socket

from starlette.responses import JSONResponse, Response

CORS_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With"


def allowed_origins() -> list[str]:
    extra = [o.strip() for o in os.environ.get("OLLAMA_FT_ORIGINS", "").split(",") if o.strip()]
    local = [f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
             for scheme in ("http", "https") for port in ("", ":*")]
    return extra + local + ["app://*", "file://*", "tauri://*", "vscode-webview://*",
                            "vscode-file://*"]


def origin_allowed(origin: str, patterns: list[str]) -> bool:
    origin = origin.strip().lower()
    return any(origin == p.lower() or fnmatch.fnmatchcase(origin, p.lower()) for p in patterns)


def host_allowed(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    try:
        ip = ipaddress.ip_address(host)
        return ip.is_loopback or ip.is_private or ip.is_unspecified
    except ValueError:
        pass
    return host.endswith((".localhost", ".local", ".internal"))


class OriginGuard:
    """ASGI middleware: 403 for other origins (and, on loopback binds, other Host names);
    CORS headers and preflight answers for the allowed ones."""

    def __init__(self, app, check_host: bool = True):
        self.app, self.check_host = app, check_host
        self.patterns = allowed_origins()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        if self.check_host and not host_allowed(headers.get("host", "")):
            return await _forbidden("host not allowed")(scope, receive, send)
        origin = headers.get("origin")
        if origin is None:
            return await self.app(scope, receive, send)
        if not origin_allowed(origin, self.patterns):
            return await _forbidden(f"origin {origin!r} not allowed; add it to "
                                    "OLLAMA_FT_ORIGINS to let that page call the bridge")(
                scope, receive, send)
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS":
            resp = Response(status_code=204)
            resp.raw_headers += cors + [
                (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"),
                (b"access-control-allow-headers", CORS_HEADERS.encode())]
            return await resp(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + cors}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _forbidden(message: str) -> JSONResponse:
    return JSONResponse({"error": f"forbidden: {message}"}, status_code=403)
