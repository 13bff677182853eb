"""The bridge: Ollama's endpoints (embedded mode, ollama_api.py) or a proxy to the daemon
(proxy.py), the jobs API (jobs_api.py) and the OpenAI endpoints (openai_api.py) in one
Starlette app, behind the Origin/Host guard (origins.py) and the API key (auth.py); the
bounds of limits.py, the cleaning of cleaning.py (at start and on a timer), and unexpected
errors answered with an id to find them in the log (incidents.py)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool

from ollama_ft.serve.engine import Engine
from ollama_ft.serve.http import HTTPError, error
from ollama_ft.serve.incidents import incident
from ollama_ft.serve.models import Registry
from ollama_ft.serve.store import Store

MAX_JSON_BODY = int(os.environ.get("OLLAMA_FT_MAX_BODY", 32 * 2**20))
MAX_BLOB = int(os.environ.get("OLLAMA_FT_MAX_BLOB", 512 * 2**30))


class Bridge:
    def __init__(self, home=None, api_key: str | None = None, engine: Engine | None = None,
                 max_body: int = MAX_JSON_BODY, max_blob: int = MAX_BLOB,
                 self_url: str | None = None, upstream: str | None = None,
                 data_dirs=(), allow_remote_code: bool = False):
        from ollama_ft.serve.cleaning import Cleaner
        from ollama_ft.serve.jobpolicy import JobPolicy
        from ollama_ft.serve.jobs import JobManager
        from ollama_ft.serve.limits import Gate, Limits
        from ollama_ft.serve.server import is_loopback
        from ollama_ft.serve.store import default_root

        self.limits = limits = Limits.from_env()
        self.uploads = Gate(limits.uploads, "uploads in flight", "OLLAMA_FT_MAX_UPLOADS")
        self.followers = Gate(limits.followers, "open job event streams",
                              "OLLAMA_FT_MAX_FOLLOWERS")
        self.upstream = upstream
        self.store = Store(home)
        self.registry = Registry(self.store)
        self.engine = engine or Engine()
        # jobs register their models over the REST API: with the daemon in proxy mode,
        # with this very service in embedded mode
        root = Path(home or default_root())
        self.jobs = JobManager(root, register_host=upstream or self_url, policy=JobPolicy(
            root, [Path(d) for d in data_dirs], allow_remote_code),
            max_queued=limits.queued_jobs, own_url=self_url)
        self.cleaner = Cleaner(self.store, self.jobs.policy.uploads, self.jobs)
        self.cleaner.at_start()
        self.cleaner.start()
        self.api_key = api_key
        self.max_body, self.max_blob = max_body, max_blob
        self.loopback = self_url is None or is_loopback(urlsplit(self_url).hostname or "")
        self.proxy = None
        from ollama_ft.serve.metrics import BridgeMetrics

        self.metrics = BridgeMetrics(self)

    def close(self):
        self.cleaner.stop()
        self.jobs.close()
        self.engine.close()

    def app(self) -> Starlette:
        from starlette.routing import Route

        from ollama_ft.serve.auth import ApiKey
        from ollama_ft.serve.jobs_api import JobsAPI
        from ollama_ft.serve.metrics import RequestMetrics
        from ollama_ft.serve.ollama_api import OllamaAPI
        from ollama_ft.serve.openai_api import OpenAIAPI
        from ollama_ft.serve.origins import OriginGuard

        routes = [Route("/metrics", self.metrics.endpoint, methods=["GET"])] + JobsAPI(self).routes()
        if self.upstream:
            from ollama_ft.serve.proxy import Proxy

            self.proxy = Proxy(self.upstream)
            routes += self.proxy.routes()
        else:
            routes += OllamaAPI(self).routes() + OpenAIAPI(self).routes()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            # shutdown: running jobs checkpoint and become `interrupted`; models unload
            await run_in_threadpool(self.close)
            if self.proxy is not None:
                await self.proxy.close()

        app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
            HTTPError: lambda req, exc: error(exc.status, exc.message, exc.headers),
            404: lambda req, exc: error(404, "404 page not found"),
            405: lambda req, exc: error(405, "405 method not allowed"),
            # what failed and an id; the traceback and paths go to the log only
            Exception: lambda req, exc: error(500, incident(
                f"{req.method} {req.url.path} failed", exc)),
        })
        if self.api_key:
            app.add_middleware(ApiKey, key=self.api_key, worker_token_ok=self.jobs.token_ok)
        app.add_middleware(OriginGuard, check_host=self.loopback)  # before the key
        app.add_middleware(RequestMetrics, metrics=self.metrics)  # outermost: counts refusals too
        app.state.bridge = self
        return app
