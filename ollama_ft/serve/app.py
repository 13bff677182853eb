"""The bridge's HTTP API: Ollama's endpoints (embedded mode) on Starlette.

Field names, shapes, statuses and error bodies follow Ollama (see shared/OLLAMA.md):
errors are `{"error": "..."}` with the status Ollama uses, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time
from pathlib import Path
from typing import Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ollama_ft import __version__
from ollama_ft.errors import OllamaError, OllamaFtError
from ollama_ft.serve.engine import BadOption, Engine, check_options, parse_keep_alive
from ollama_ft.serve.models import Model, Registry
from ollama_ft.serve.prompt import ThinkingSplitter
from ollama_ft.serve.store import DigestMismatch, NotFound, Store

OLLAMA_COMPAT_VERSION = "0.33.0"  # the API level the bridge speaks
MAX_JSON_BODY = int(os.environ.get("OLLAMA_FT_MAX_BODY", 32 * 2**20))
MAX_BLOB = int(os.environ.get("OLLAMA_FT_MAX_BLOB", 512 * 2**30))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Bridge:
    def __init__(self, home=None, api_key: str | None = None, engine: Engine | None = None,
                 max_body: int = MAX_JSON_BODY, max_blob: int = MAX_BLOB,
                 self_url: str | None = None, upstream: str | None = None,
                 data_dirs=(), allow_remote_code: bool = False):
        from ollama_ft.serve.jobs import JobManager
        from ollama_ft.serve.store import default_root

        self.upstream = upstream
        self.store = Store(home)
        self.registry = Registry(self.store)
        self.engine = engine or Engine()
        # jobs register their models over the REST API: with the daemon in proxy mode,
        # with this very service in embedded mode
        from ollama_ft.serve.jobpolicy import JobPolicy

        root = Path(home or default_root())
        self.jobs = JobManager(root, register_host=upstream or self_url, policy=JobPolicy(
            root, [Path(d) for d in data_dirs], allow_remote_code))
        self.api_key = api_key
        self.max_body, self.max_blob = max_body, max_blob
        from urllib.parse import urlsplit

        from ollama_ft.serve.server import is_loopback

        self.loopback = self_url is None or is_loopback(urlsplit(self_url).hostname or "")

    def close(self):
        self.jobs.close()
        self.engine.close()

    # --- plumbing ----------------------------------------------------------------------------
    async def json_body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and int(length) > self.max_body:
            raise _HTTP(413, f"request body larger than {self.max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise _HTTP(413, f"request body larger than {self.max_body} bytes")
        if not body:
            return {}
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HTTP(400, f"invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise _HTTP(400, "request body must be a JSON object")
        return data

    def app(self) -> Starlette:
        ollama_routes = [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/show", self.show, methods=["POST"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/blobs/{digest}", self.blob, methods=["HEAD", "POST"]),
            Route("/api/create", self.create, methods=["POST"]),
            Route("/api/copy", self.copy, methods=["POST"]),
            Route("/api/delete", self.delete, methods=["DELETE"]),
            Route("/api/pull", self.no_registry, methods=["POST"]),
            Route("/api/push", self.no_registry, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/v1/models", self.v1_models, methods=["GET"]),
            Route("/v1/chat/completions", self.v1_chat, methods=["POST"]),
        ]
        job_routes = [
            Route("/api/ft/uploads", self.upload, methods=["POST"]),
            Route("/api/ft/jobs", self.jobs_create, methods=["POST"]),
            Route("/api/ft/jobs", self.jobs_list, methods=["GET"]),
            Route("/api/ft/jobs/{job_id}", self.jobs_get, methods=["GET"]),
            Route("/api/ft/jobs/{job_id}", self.jobs_cancel, methods=["DELETE"]),
            Route("/api/ft/jobs/{job_id}/resume", self.jobs_resume, methods=["POST"]),
            Route("/api/ft/jobs/{job_id}/events", self.jobs_events, methods=["GET"]),
        ]
        self.proxy = None
        if self.upstream:
            from ollama_ft.serve.proxy import Proxy

            self.proxy = Proxy(self.upstream)
            routes = job_routes + self.proxy.routes()
        else:
            routes = job_routes + ollama_routes
        import contextlib

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            # shutdown: running jobs checkpoint and become `interrupted`; models unload
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self.close)
            if self.proxy is not None:
                await self.proxy.close()

        app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
            _HTTP: lambda req, exc: error(exc.status, exc.message),
            404: lambda req, exc: error(404, "404 page not found"),
            405: lambda req, exc: error(405, "405 method not allowed"),
            Exception: lambda req, exc: error(500, f"internal error: {type(exc).__name__}: {exc}"),
        })
        if self.api_key:
            app.add_middleware(_ApiKey, key=self.api_key)
        from ollama_ft.serve.origins import OriginGuard

        app.add_middleware(OriginGuard, check_host=self.loopback)  # outermost: before the key
        app.state.bridge = self
        return app

    # --- simple endpoints ------------------------------------------------------------------------
    async def root(self, request):
        return PlainTextResponse("Ollama is running")

    async def version(self, request):
        return JSONResponse({"version": OLLAMA_COMPAT_VERSION},
                            headers={"X-Ollama-Ft-Version": __version__})

    async def tags(self, request):
        return JSONResponse({"models": self.registry.tags()})

    async def show(self, request):
        body = await self.json_body(request)
        name = body.get("model") or body.get("name")
        if not name:
            return error(400, "model is required")
        try:
            return JSONResponse(self.registry.show(name))
        except NotFound:  # /api/show names the tag, /api/chat does not (as Ollama)
            tagged = name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"
            return error(404, f"model '{tagged}' not found")
        except OllamaError as e:
            return error(400, str(e))

    async def ps(self, request):
        out = []
        for m in self.engine.ps():
            try:
                rec = self.registry.get(m.name)
            except OllamaError:
                continue
            exp = m.expires_at if m.expires_at != float("inf") else time.time() + 10 * 365 * 86400
            out.append({"name": m.name, "model": m.name, "size": m.size, "digest": rec.manifest.digest,
                        "details": rec.details(), "size_vram": 0, "context_length": m.n_ctx,
                        "expires_at": dt.datetime.fromtimestamp(exp, dt.timezone.utc).isoformat()})
        return JSONResponse({"models": out})

    async def blob(self, request):
        digest = request.path_params["digest"]
        try:
            exists = self.store.has_blob(digest)
        except OllamaError as e:
            return error(400, str(e))
        if request.method == "HEAD":
            return Response(status_code=200 if exists else 404)
        if exists:
            return Response(status_code=200)
        length = request.headers.get("content-length")
        if length and int(length) > self.max_blob:
            return error(413, f"blob larger than the limit of {self.max_blob} bytes")
        try:
            with self.store.blob_writer(digest, self.max_blob) as w:
                async for chunk in request.stream():
                    w.write(chunk)
        except DigestMismatch:
            return error(400, "digest mismatch")
        except OllamaError as e:
            return error(400, str(e))
        except Exception as e:  # the client went away mid-upload: nothing is kept
            return error(400, f"upload failed: {type(e).__name__}")
        return Response(status_code=201)

    async def create(self, request):
        body = await self.json_body(request)
        try:
            statuses = self.registry.create(body)
        except OllamaError as e:  # BadRequest and other refusals before anything streamed
            return error(400, str(e))
        if body.get("stream", True) is False:
            last = {}
            try:
                for last in statuses:
                    pass
            except OllamaError as e:
                return error(500, str(e))
            return JSONResponse(last)

        def lines():
            try:
                for s in statuses:
                    yield json.dumps(s) + "\n"
            except Exception as e:  # after streaming started errors travel in-band
                yield json.dumps({"error": str(e)}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def copy(self, request):
        body = await self.json_body(request)
        src, dst = body.get("source"), body.get("destination")
        if not src or not dst:
            return error(400, "source and destination are required")
        try:
            self.store.copy(src, dst)
        except NotFound:
            return error(404, f'model "{src}" not found')  # Ollama's quotes, here
        except OllamaError as e:
            return error(400, str(e))
        return Response(status_code=200)

    async def delete(self, request):
        body = await self.json_body(request)
        name = body.get("model") or body.get("name")
        if not name:
            return error(400, "model is required")
        try:
            self.store.delete(name)
        except NotFound:
            return error(404, f"model '{name}' not found")
        except OllamaError as e:
            return error(400, str(e))
        self.engine.unload_name(name)
        return Response(status_code=200)

    async def no_registry(self, request):
        return error(400, "the ollama-ft bridge has no registry to pull from or push to; create "
                          "models from GGUF files with /api/create (ollama-ft register does)")

    # --- generation ------------------------------------------------------------------------------
    def _prepare(self, body: dict):
        name = body.get("model")
        if not name:
            raise _HTTP(400, "model is required")
        try:
            model = self.registry.get(name)
        except NotFound:
            raise _HTTP(404, f"model '{name}' not found") from None
        except OllamaError as e:
            raise _HTTP(400, str(e)) from None
        think = body.get("think")
        if isinstance(think, str):  # think levels ("high", ...) mean on
            think = think.lower() not in ("false", "")
        if think is not None and not isinstance(think, bool):
            raise _HTTP(400, "think must be a boolean")
        if think and "thinking" not in model.capabilities:
            raise _HTTP(400, f'"{name}" does not support thinking')
        if think is None and "thinking" in model.capabilities:
            think = True  # as Ollama: a thinking model thinks unless told not to
        try:
            options = {**check_options(model.params, "parameters"),
                       **check_options(body.get("options"))}
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except BadOption as e:
            raise _HTTP(400, str(e)) from None
        fmt = body.get("format")
        if fmt in ("", None):
            fmt = None
        elif not (fmt == "json" or isinstance(fmt, dict)):
            raise _HTTP(400, f"invalid format: {json.dumps(fmt)}; use \"json\" or a JSON schema")
        return model, think, options, keep_alive, fmt

    def _lease(self, model: Model, options: dict, keep_alive: float):
        n_ctx = options.get("num_ctx") or 4096
        return self.engine.acquire(model.name, model.manifest.digest, model.model_path,
                                   model.adapter_path, int(n_ctx), keep_alive)

    async def chat(self, request):
        body = await self.json_body(request)
        model, think, options, keep_alive, fmt = self._prepare(body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return error(400, "messages must be a list of {role, content} objects")
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                return error(400, f"invalid message role: {m.get('role')!r}")
            if not isinstance(m.get("content", ""), str):
                return error(400, "message content must be a string")
        stream = body.get("stream", True) is not False
        msgs = list(model.messages) + messages
        if model.system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": model.system}] + msgs
        tools = body.get("tools")
        if body.get("_debug_render_only"):
            return _rendered(body, "chat", model.prompt_template.render(msgs, tools=tools,
                                                                        think=think))
        events = self._run(model, options, keep_alive, fmt, think, chat_messages=msgs, tools=tools,
                           load_only=not messages)

        def chunk(ev):
            if "done" in ev:
                return {"model": body["model"], "created_at": now_iso(),
                        "message": {"role": "assistant", "content": ""}, "done": True,
                        "done_reason": ev["done"], **_stats(ev)}
            msg = {"role": "assistant", "content": ev.get("content", "")}
            if ev.get("thinking"):
                msg["thinking"] = ev["thinking"]
            return {"model": body["model"], "created_at": now_iso(), "message": msg, "done": False}

        def whole(out, text, thinking):
            out["message"]["content"] = text
            if thinking:
                out["message"]["thinking"] = thinking
            return out

        return await _respond(events, chunk, stream, whole)

    async def generate(self, request):
        body = await self.json_body(request)
        model, think, options, keep_alive, fmt = self._prepare(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            return error(400, "prompt must be a string")
        stream = body.get("stream", True) is not False
        raw_text = None
        msgs = []
        template = model.prompt_template
        if body.get("template"):
            from ollama_ft.serve.prompt import PromptTemplate

            try:
                template = PromptTemplate(body["template"])
            except ValueError as e:
                return error(400, f"template error: {e}")
        if body.get("raw"):
            raw_text = prompt
        else:
            system = body.get("system") or model.system
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": prompt})
        if body.get("_debug_render_only"):
            return _rendered(body, "generate",
                             raw_text if raw_text is not None else template.render(msgs, think=think))
        events = self._run(model, options, keep_alive, fmt, think, chat_messages=msgs,
                           raw=raw_text, template=template, context=body.get("context"),
                           load_only=not prompt)

        def chunk(ev):
            if "done" in ev:
                out = {"model": body["model"], "created_at": now_iso(), "response": "", "done": True,
                       "done_reason": ev["done"], **_stats(ev)}
                if ev.get("tokens") is not None and not body.get("raw"):
                    out["context"] = ev["tokens"]
                return out
            out = {"model": body["model"], "created_at": now_iso(), "response": ev.get("content", ""),
                   "done": False}
            if ev.get("thinking"):
                out["thinking"] = ev["thinking"]
            return out

        def whole(out, text, thinking):
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
            return out

        return await _respond(events, chunk, stream, whole)

    def _run(self, model: Model, options, keep_alive, fmt, think, chat_messages, tools=None,
             raw=None, template=None, context=None, load_only=False) -> Iterator[dict]:
        """A generator holding the model's lease while it yields content/thinking/done events."""
        template = template or model.prompt_template
        t0 = time.perf_counter()

        def gen():
            if load_only and keep_alive <= 0:  # Ollama's unload request
                self.engine.unload_name(model.name)
                yield {"done": "unload", "total_duration": int((time.perf_counter() - t0) * 1e9)}
                return
            with self._lease(model, options, keep_alive) as lease:
                if load_only:
                    yield {"done": "load", "load_duration": int(lease.load_duration * 1e9),
                           "total_duration": int((time.perf_counter() - t0) * 1e9)}
                    return
                if raw is not None:
                    prompt = raw
                    tokens = lease.llm.tokenize(raw.encode("utf-8"), add_bos=False, special=True)
                else:
                    prompt, _ = template.render_fitting(
                        chat_messages, lease.m.n_ctx, lambda p: len(lease.tokenize(p)), tools=tools,
                        think=think)
                    tokens = lease.tokenize(prompt)
                if context:
                    tokens = list(context) + tokens
                splitter = None
                if template.thinking_tags and think is not False:
                    splitter = ThinkingSplitter(template.thinking_tags, prompt)
                for ev in lease.generate(tokens, options, fmt):
                    if "text" in ev:
                        if splitter:
                            th, co = splitter.feed(ev["text"])
                            if th or co:
                                yield {"thinking": th, "content": co}
                        else:
                            yield {"content": ev["text"]}
                    else:
                        if splitter:
                            th, co = splitter.feed("", final=True)
                            if th or co:
                                yield {"thinking": th, "content": co}
                        ev["total_duration"] = int((time.perf_counter() - t0) * 1e9)
                        yield ev
        return gen()

    # --- training jobs ----------------------------------------------------------------------------
    async def jobs_create(self, request):
        body = await self.json_body(request)
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

    async def jobs_list(self, request):
        return JSONResponse({"jobs": self.jobs.list()})

    def _job_call(self, fn, job_id):
        from ollama_ft.serve.jobs import JobNotFound

        try:
            return JSONResponse(fn(job_id))
        except JobNotFound as e:
            return error(404, str(e))
        except OllamaFtError as e:
            return error(400, str(e))

    async def jobs_get(self, request):
        return self._job_call(self.jobs.get, request.path_params["job_id"])

    async def jobs_cancel(self, request):
        from starlette.concurrency import run_in_threadpool

        job_id = request.path_params["job_id"]
        return await run_in_threadpool(self._job_call, self.jobs.cancel, job_id)

    async def jobs_resume(self, request):
        return self._job_call(self.jobs.resume, request.path_params["job_id"])

    async def jobs_events(self, request):
        """NDJSON: every event so far, then new ones as they come, until the job ends."""
        from ollama_ft.serve.jobs import FINAL, JobNotFound

        job_id = request.path_params["job_id"]
        try:
            self.jobs.get(job_id)
        except JobNotFound as e:
            return error(404, str(e))
        path = self.jobs.events_path(job_id)

        def follow():
            pos = 0
            while True:
                final = self.jobs.get(job_id)["state"] in FINAL
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
                time.sleep(0.3)
        return StreamingResponse(follow(), media_type="application/x-ndjson")

    # --- OpenAI compatible -----------------------------------------------------------------------
    async def v1_models(self, request):
        data = [{"id": t["name"], "object": "model",
                 "created": int(dt.datetime.fromisoformat(t["modified_at"]).timestamp()),
                 "owned_by": t["name"].split("/")[0] if "/" in t["name"] else "library"}
                for t in self.registry.tags()]
        return JSONResponse({"object": "list", "data": data})

    async def v1_chat(self, request):
        body = await self.json_body(request)
        messages = []
        for m in body.get("messages") or []:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            messages.append({"role": m.get("role"), "content": content or ""})
        options = {}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("max_tokens", "num_predict"), ("max_completion_tokens", "num_predict"),
                         ("frequency_penalty", "frequency_penalty"),
                         ("presence_penalty", "presence_penalty")):
            if body.get(src) is not None:
                options[dst] = body[src]
        if body.get("stop") is not None:
            options["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
        rf = body.get("response_format") or {}
        fmt = "json" if rf.get("type") == "json_object" else (
            (rf.get("json_schema") or {}).get("schema") if rf.get("type") == "json_schema" else None)
        chat_body = {"model": body.get("model"), "messages": messages, "options": options,
                     "format": fmt, "keep_alive": body.get("keep_alive")}
        try:
            model, think, opts, keep_alive, fmt = self._prepare(chat_body)
        except _HTTP as e:
            return JSONResponse({"error": {"message": e.message, "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=e.status)
        msgs = list(model.messages) + messages
        if model.system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": model.system}] + msgs
        events = self._run(model, opts, keep_alive, fmt, None, chat_messages=msgs)
        cid = "chatcmpl-" + secrets.token_hex(4)
        created = int(time.time())
        name = body.get("model")

        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage")

            def sse():
                base = {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": name, "system_fingerprint": "fp_ollama"}
                try:
                    for ev in events:
                        if "done" in ev:
                            fin = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": ev["done"]}]}
                            yield f"data: {json.dumps(fin)}\n\n"
                            if include_usage:
                                u = {**base, "choices": [], "usage": _usage(ev)}
                                yield f"data: {json.dumps(u)}\n\n"
                        else:
                            delta = {"role": "assistant", "content": ev.get("content", "")}
                            if ev.get("thinking"):
                                delta["reasoning"] = ev["thinking"]
                            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': None}]})}\n\n"
                except OllamaError as e:
                    yield f"data: {json.dumps({'error': {'message': str(e)}})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            content, reasoning, last = await _collect(events)
        except OllamaError as e:
            return JSONResponse({"error": {"message": str(e)}}, status_code=500)
        msg = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning"] = reasoning
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                             "system_fingerprint": "fp_ollama",
                             "choices": [{"index": 0, "message": msg, "finish_reason": last["done"]}],
                             "usage": _usage(last)})


def _rendered(body: dict, handler: str, prompt: str) -> JSONResponse:
    """Ollama's `_debug_render_only`: the prompt the model would be given, nothing run
    (without the truncation to num_ctx, which needs the model loaded)."""
    out = {"model": body["model"], "created_at": now_iso()}
    out.update({"message": {"role": "", "content": ""}} if handler == "chat" else {"response": ""})
    out.update(done=False, _debug_info={"rendered_template": prompt})
    return JSONResponse(out)


async def _respond(events, chunk, stream: bool, whole):
    """NDJSON chunks, or one object: `whole(last chunk, content, thinking)`."""
    if stream:
        return _ndjson(events, chunk)
    try:
        text, thinking, last = await _collect(events)
    except OllamaError as e:
        return error(500, str(e))
    return JSONResponse(whole(chunk(last), text, thinking))


async def _collect(events) -> tuple[str, str, dict]:
    """Run a generation to its end in a worker thread: (content, thinking, done event)."""
    from starlette.concurrency import run_in_threadpool

    def drain():
        content, thinking, last = [], [], None
        for ev in events:
            if "done" in ev:
                last = ev
            else:
                content.append(ev.get("content", ""))
                thinking.append(ev.get("thinking", ""))
        return "".join(content), "".join(thinking), last

    return await run_in_threadpool(drain)


def _usage(ev):
    p, c = ev.get("prompt_eval_count", 0), ev.get("eval_count", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _stats(ev) -> dict:
    keys = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration")
    return {k: ev[k] for k in keys if k in ev}


def _ndjson(events, chunk) -> StreamingResponse:
    def lines():
        try:
            for ev in events:
                yield json.dumps(chunk(ev), ensure_ascii=False) + "\n"
        except OllamaError as e:
            yield json.dumps({"error": str(e)}) + "\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson")


class _HTTP(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _ApiKey:
    """Bearer-token check on every request (required when binding beyond loopback)."""

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
