"""Ollama's own endpoints (embedded mode): version, tags, show, ps, blobs, create, copy,
delete, chat and generate. Field names, shapes, statuses and error texts follow Ollama
(shared/OLLAMA.md)."""

from __future__ import annotations

import datetime as dt
import json
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ollama_ft import __version__
from ollama_ft.errors import OllamaError
from ollama_ft.serve import generation as g
from ollama_ft.serve.http import error, feed, json_body, now_iso
from ollama_ft.serve.incidents import disk_full, incident
from ollama_ft.serve.store import DigestMismatch, NotFound

OLLAMA_COMPAT_VERSION = "0.33.0"  # the API level the bridge speaks


class OllamaAPI:
    def __init__(self, bridge):
        self.b = bridge
        self.store, self.registry, self.engine = bridge.store, bridge.registry, bridge.engine

    def routes(self) -> list[Route]:
        return [
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
        ]

    async def body(self, request) -> dict:
        return await json_body(request, self.b.max_body)

    # --- models ------------------------------------------------------------------------------
    async def root(self, request):
        return PlainTextResponse("Ollama is running")

    async def version(self, request):
        return JSONResponse({"version": OLLAMA_COMPAT_VERSION},
                            headers={"X-Ollama-Ft-Version": __version__})

    async def tags(self, request):
        return JSONResponse({"models": self.registry.tags()})

    async def show(self, request):
        body = await self.body(request)
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
                        "details": rec.details(), "size_vram": m.size_vram, "context_length": m.n_ctx,
                        "expires_at": dt.datetime.fromtimestamp(exp, dt.timezone.utc).isoformat()})
        return JSONResponse({"models": out})

    async def blob(self, request):
        digest = request.path_params["digest"]
        try:
            exists = self.store.has_blob(digest)
        except OllamaError as e:
            return error(400, str(e))
        if exists:  # asked for again: a create is coming, the cleaner's hour starts again
            self.store.touch_blob(digest)
        if request.method == "HEAD":
            return Response(status_code=200 if exists else 404)
        if exists:
            return Response(status_code=200)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.b.max_blob:
            return error(413, f"blob larger than the limit of {self.b.max_blob} bytes")
        with self.b.uploads.hold():  # 503 past OLLAMA_FT_MAX_UPLOADS
            w = self.store.blob_writer(digest, self.b.max_blob).open()
            try:
                await feed(request.stream(), w.write)  # hashed and written off the event loop
                await run_in_threadpool(w.commit)  # fsync and rename too
            except DigestMismatch:
                return error(400, "digest mismatch")
            except OllamaError as e:
                return error(400, str(e))
            except ClientDisconnect:  # the client went away mid-upload: nothing is kept
                return error(400, "upload failed: the client went away before the end")
            except Exception as e:
                return error(507 if disk_full(e) else 500, incident("storing the blob", e))
            finally:
                w.discard()
        return Response(status_code=201)

    async def create(self, request):
        body = await self.body(request)
        try:
            statuses = self.registry.create(body)
        except OllamaError as e:  # BadRequest and other refusals before anything streamed
            return error(400, str(e))
        if body.get("stream", True) is False:
            def drain():  # parsing and writing layers: off the event loop
                last = {}
                for last in statuses:
                    pass
                return last
            try:
                return JSONResponse(await run_in_threadpool(drain))
            except OllamaError as e:
                return error(500, str(e))
            except Exception as e:
                return error(507 if disk_full(e) else 500, incident("creating the model", e))
            finally:
                statuses.close()

        def lines():
            try:
                for s in statuses:
                    yield json.dumps(s) + "\n"
            except OllamaError as e:  # after streaming started errors travel in-band
                yield json.dumps({"error": str(e)}) + "\n"
            except Exception as e:
                yield json.dumps({"error": incident("creating the model", e)}) + "\n"
        return g.closing_stream(lines(), statuses, media_type="application/x-ndjson")

    async def copy(self, request):
        body = await self.body(request)
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
        body = await self.body(request)
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

    # --- generation --------------------------------------------------------------------------
    async def chat(self, request):
        body = await self.body(request)
        req = g.prepare(self.registry, body)
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return error(400, "messages must be a list of {role, content} objects")
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                return error(400, f"invalid message role: {m.get('role')!r}")
            if not isinstance(m.get("content", ""), str):
                return error(400, "message content must be a string")
        stream = body.get("stream", True) is not False
        msgs = g.with_system(req.model, messages)
        tools = body.get("tools")
        if body.get("_debug_render_only"):
            return g.rendered(body, "chat", req.model.prompt_template.render(msgs, tools=tools,
                                                                             think=req.think))
        events = await g.start(self.engine, req, msgs, tools=tools, load_only=not messages,
                               on_done=self.b.metrics.generation_done)

        def chunk(ev):
            if "done" in ev:
                return {"model": body["model"], "created_at": now_iso(),
                        "message": {"role": "assistant", "content": ""}, "done": True,
                        "done_reason": ev["done"], **g.stats(ev)}
            msg = {"role": "assistant", "content": ev.get("content", "")}
            if ev.get("thinking"):
                msg["thinking"] = ev["thinking"]
            return {"model": body["model"], "created_at": now_iso(), "message": msg, "done": False}

        def whole(out, text, thinking):
            out["message"]["content"] = text
            if thinking:
                out["message"]["thinking"] = thinking
            return out

        return await g.respond(events, chunk, stream, whole)

    async def generate(self, request):
        body = await self.body(request)
        req = g.prepare(self.registry, body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            return error(400, "prompt must be a string")
        stream = body.get("stream", True) is not False
        raw_text = None
        msgs = []
        template = req.model.prompt_template
        if body.get("template"):
            from ollama_ft.ollamafmt.prompt import PromptTemplate

            try:
                template = PromptTemplate(body["template"])
            except ValueError as e:
                return error(400, f"template error: {e}")
        if body.get("raw"):
            raw_text = prompt
        else:
            system = body.get("system") or req.model.system
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": prompt})
        if body.get("_debug_render_only"):
            return g.rendered(body, "generate", raw_text if raw_text is not None
                              else template.render(msgs, think=req.think))
        events = await g.start(self.engine, req, msgs, raw=raw_text, template=template,
                               context=body.get("context"), load_only=not prompt,
                               on_done=self.b.metrics.generation_done)

        def chunk(ev):
            if "done" in ev:
                out = {"model": body["model"], "created_at": now_iso(), "response": "", "done": True,
                       "done_reason": ev["done"], **g.stats(ev)}
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

        return await g.respond(events, chunk, stream, whole)
