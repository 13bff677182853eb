"""Proxy mode: every Ollama endpoint is forwarded, streaming included, to a real daemon;
the bridge adds only its training-jobs API (/api/ft/...)."""

from __future__ import annotations

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length",
              "authorization"}


class Proxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(None, connect=10.0))

    async def forward(self, request: Request):
        url = httpx.URL(path=request.url.path, query=request.url.query.encode("utf-8"))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        req = self.client.build_request(request.method, url, headers=headers,
                                        content=request.stream())
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            return JSONResponse({"error": f"the Ollama daemon at {self.upstream} did not answer: "
                                          f"{type(e).__name__}"}, status_code=502)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP
                       and k.lower() != "content-encoding"}
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code,
                                 headers=out_headers, background=_Close(resp))

    def routes(self) -> list[Route]:
        methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
        return [Route("/", self.forward, methods=methods),
                Route("/api/{path:path}", self.forward, methods=methods),
                Route("/v1/{path:path}", self.forward, methods=methods)]

    async def close(self):
        await self.client.aclose()


class _Close:
    """Starlette background task: close the upstream response once the body was sent."""

    def __init__(self, resp: httpx.Response):
        self.resp = resp

    async def __call__(self):
        await self.resp.aclose()
