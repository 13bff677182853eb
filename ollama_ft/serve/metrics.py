"""Prometheus metrics of the bridge at GET /metrics (the official prometheus_client):
requests and their latency per route, tokens generated and tokens/s per model, the loaded
models and their memory, the queue of waiting requests, and every training job's state,
step, loss, tokens/s and ETA. One registry per bridge, no global state."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.responses import Response
from starlette.routing import Match

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class BridgeMetrics:
    def __init__(self, bridge):
        self.bridge = bridge
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ollama_ft_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("ollama_ft_request_duration_seconds",
                                 "Time from request to the end of the response (streams included)",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("ollama_ft_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("ollama_ft_prompt_tokens", "Prompt tokens evaluated",
                                     ["model"], registry=r)
        self.generations = Counter("ollama_ft_generations", "Generations finished",
                                   ["model", "done_reason"], registry=r)
        self.last_rate: dict[str, float] = {}
        r.register(_Live(self))

    # --- hooks ----------------------------------------------------------------------------
    def generation_done(self, model: str, ev: dict) -> None:
        n = int(ev.get("eval_count") or 0)
        self.tokens.labels(model).inc(n)
        self.prompt_tokens.labels(model).inc(int(ev.get("prompt_eval_count") or 0))
        self.generations.labels(model, str(ev.get("done", "stop"))).inc()
        dur = (ev.get("eval_duration") or 0) / 1e9
        if n and dur > 0:
            self.last_rate[model] = n / dur

    async def endpoint(self, request):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Live:
    """Gauges read when scraped: loaded models, queue depth, jobs."""

    def __init__(self, m: BridgeMetrics):
        self.m = m

    def collect(self):
        b = self.m.bridge
        rate = GaugeMetricFamily("ollama_ft_tokens_per_second",
                                 "Generation speed of the model's last request", labels=["model"])
        for model, v in sorted(self.m.last_rate.items()):
            rate.add_metric([model], v)
        yield rate
        loaded = GaugeMetricFamily("ollama_ft_loaded_models", "Models loaded in memory")
        size = GaugeMetricFamily("ollama_ft_model_memory_bytes",
                                 "Memory of a loaded model (weights and KV cache estimate)",
                                 labels=["model", "where"])
        queue = GaugeMetricFamily("ollama_ft_queue_depth",
                                  "Requests waiting for a busy model")
        models = b.engine.ps() if b.upstream is None else []
        loaded.add_metric([], len(models))
        for m in models:
            size.add_metric([m.name, "total"], m.size)
            size.add_metric([m.name, "gpu"], m.size_vram)
        queue.add_metric([], b.engine.queued() if b.upstream is None else 0)
        yield loaded
        yield size
        yield queue
        state = GaugeMetricFamily("ollama_ft_job_state", "1 for the job's current state",
                                  labels=["job", "name", "state"])
        step = GaugeMetricFamily("ollama_ft_job_step", "Optimizer steps done", labels=["job", "name"])
        total = GaugeMetricFamily("ollama_ft_job_max_steps", "Optimizer steps in all", labels=["job", "name"])
        loss = GaugeMetricFamily("ollama_ft_job_loss", "Last logged training loss", labels=["job", "name"])
        tps = GaugeMetricFamily("ollama_ft_job_tokens_per_second", "Training tokens/s", labels=["job", "name"])
        eta = GaugeMetricFamily("ollama_ft_job_eta_seconds", "Estimated seconds left", labels=["job", "name"])
        rss = GaugeMetricFamily("ollama_ft_job_memory_bytes", "Training process memory (RSS)",
                                labels=["job", "name"])
        for job in b.jobs.list():
            jid, name = job["id"], (job.get("config") or {}).get("name") or ""
            for s in JOB_STATES:
                state.add_metric([jid, name, s], 1.0 if job.get("state") == s else 0.0)
            p = job.get("progress") or {}
            for fam, key, scale in ((step, "step", 1), (total, "max_steps", 1), (loss, "loss", 1),
                                    (tps, "tokens_per_s", 1), (eta, "eta_s", 1), (rss, "rss_mb", 2**20)):
                if isinstance(p.get(key), (int, float)):
                    fam.add_metric([jid, name], p[key] * scale)
        yield from (state, step, total, loss, tps, eta, rss)


class RequestMetrics:
    """Counts each request and times it to the end of its body (streams included)."""

    def __init__(self, app, metrics: BridgeMetrics):
        self.app, self.m = app, metrics
        self._routes = None

    def route_of(self, scope) -> str:
        if self._routes is None:
            self._routes = list(scope["app"].routes) if "app" in scope else []
        for r in self._routes:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return r.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_)
        finally:
            route, method = self.route_of(scope), scope.get("method", "")
            if route != "/metrics":
                self.m.requests.labels(route, method, str(status["code"])).inc()
                self.m.latency.labels(route, method).observe(time.perf_counter() - t0)
