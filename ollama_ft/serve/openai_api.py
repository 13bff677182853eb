"""The OpenAI-compatible endpoints (/v1/models, /v1/chat/completions): translate the
request to a chat, and the chat's events to OpenAI's objects and SSE chunks, as Ollama."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time

from starlette.responses import JSONResponse
from starlette.routing import Route

from ollama_ft.errors import OllamaError
from ollama_ft.serve import generation as g
from ollama_ft.serve.http import HTTPError, json_body
from ollama_ft.serve.incidents import incident

# OpenAI request field -> Ollama option
OPTION_FIELDS = (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                 ("max_tokens", "num_predict"), ("max_completion_tokens", "num_predict"),
                 ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty"))


def openai_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                   "param": None, "code": None}}, status_code=status)


def usage(ev) -> dict:
    p, c = ev.get("prompt_eval_count", 0), ev.get("eval_count", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_body(body: dict) -> dict:
    """The OpenAI request as an Ollama /api/chat body."""
    messages = []
    for m in body.get("messages") or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        messages.append({"role": m.get("role"), "content": content or ""})
    options = {dst: body[src] for src, dst in OPTION_FIELDS if body.get(src) is not None}
    if body.get("stop") is not None:
        options["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    rf = body.get("response_format") or {}
    fmt = "json" if rf.get("type") == "json_object" else (
        (rf.get("json_schema") or {}).get("schema") if rf.get("type") == "json_schema" else None)
    return {"model": body.get("model"), "messages": messages, "options": options,
            "format": fmt, "keep_alive": body.get("keep_alive")}


class OpenAIAPI:
    def __init__(self, bridge):
        self.b = bridge

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"])]

    async def models(self, request):
        data = [{"id": t["name"], "object": "model",
                 "created": int(dt.datetime.fromisoformat(t["modified_at"]).timestamp()),
                 "owned_by": t["name"].split("/")[0] if "/" in t["name"] else "library"}
                for t in self.b.registry.tags()]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request):
        body = await json_body(request, self.b.max_body)
        cb = chat_body(body)
        try:
            req = g.prepare(self.b.registry, cb)
            req.think = None  # the OpenAI API does not turn thinking on
            events = await g.start(self.b.engine, req, g.with_system(req.model, cb["messages"]),
                                   on_done=self.b.metrics.generation_done)
        except HTTPError as e:
            return openai_error(e.status, e.message)
        cid = "chatcmpl-" + secrets.token_hex(4)
        created = int(time.time())
        name = body.get("model")
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            return g.closing_stream(_sse(events, cid, created, name, include_usage), events,
                                    media_type="text/event-stream")
        try:
            content, reasoning, last = await g.collect(events)
        except OllamaError as e:
            return JSONResponse({"error": {"message": str(e)}}, status_code=500)
        except Exception as e:  # a bug or the disk: the id, not the details
            return openai_error(500, incident("generation failed", e))
        msg = {"role": "assistant", "content": content}
        if reasoning:
            msg["reasoning"] = reasoning
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                             "system_fingerprint": "fp_ollama",
                             "choices": [{"index": 0, "message": msg, "finish_reason": last["done"]}],
                             "usage": usage(last)})


def _sse(events, cid, created, name, include_usage):
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
            "system_fingerprint": "fp_ollama"}
    try:
        for ev in events:
            if "done" in ev:
                fin = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": ev["done"]}]}
                yield f"data: {json.dumps(fin)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(ev)})}\n\n"
            else:
                delta = {"role": "assistant", "content": ev.get("content", "")}
                if ev.get("thinking"):
                    delta["reasoning"] = ev["thinking"]
                chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
    except OllamaError as e:
        yield f"data: {json.dumps({'error': {'message': str(e)}})}\n\n"
    except Exception as e:  # after streaming started errors travel in-band
        yield f"data: {json.dumps({'error': {'message': incident('generation failed', e)}})}\n\n"
    yield "data: [DONE]\n\n"
