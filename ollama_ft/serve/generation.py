"""Generation orchestration, shared by the Ollama and the OpenAI routes: check a request's
model, think flag, options and format; wait for the model (bounded queue, no thread per
waiter); render the prompt to fit num_ctx; stream content/thinking events; and turn the
events into NDJSON chunks or one reply. A stream gives its model back when it ends or its
client goes away (closed at once, not when Python collects it)."""

from __future__ import annotations

import json
import time
from typing import Iterator

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from ollama_ft.errors import OllamaError
from ollama_ft.ollamafmt.prompt import ThinkingSplitter
from ollama_ft.serve.engine import (
    DEFAULT_OPTIONS,
    BadOption,
    Engine,
    ModelTooLarge,
    ServerBusy,
    check_options,
    parse_keep_alive,
)
from ollama_ft.serve.http import HTTPError, error, now_iso
from ollama_ft.serve.incidents import incident
from ollama_ft.serve.models import Model, Registry
from ollama_ft.serve.store import NotFound


class GenRequest:
    """A checked generation request."""

    def __init__(self, model: Model, think, options: dict, keep_alive: float, fmt):
        self.model, self.think, self.options = model, think, options
        self.keep_alive, self.fmt = keep_alive, fmt


def prepare(registry: Registry, body: dict) -> GenRequest:
    name = body.get("model")
    if not name:
        raise HTTPError(400, "model is required")
    try:
        model = registry.get(name)
    except NotFound:
        raise HTTPError(404, f"model '{name}' not found") from None
    except OllamaError as e:
        raise HTTPError(400, str(e)) from None
    think = body.get("think")
    if isinstance(think, str):  # think levels ("high", ...) mean on
        think = think.lower() not in ("false", "")
    if think is not None and not isinstance(think, bool):
        raise HTTPError(400, "think must be a boolean")
    if think and "thinking" not in model.capabilities:
        raise HTTPError(400, f'"{name}" does not support thinking')
    if think is None and "thinking" in model.capabilities:
        think = True  # as Ollama: a thinking model thinks unless told not to
    try:
        options = {**check_options(model.params, "parameters"), **check_options(body.get("options"))}
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except BadOption as e:
        raise HTTPError(400, str(e)) from None
    fmt = body.get("format")
    if fmt in ("", None):
        fmt = None
    elif not (fmt == "json" or isinstance(fmt, dict)):
        raise HTTPError(400, f"invalid format: {json.dumps(fmt)}; use \"json\" or a JSON schema")
    return GenRequest(model, think, options, keep_alive, fmt)


def with_system(model: Model, messages: list[dict]) -> list[dict]:
    """The Modelfile's MESSAGEs, then the request's, with the model's SYSTEM unless the
    conversation brings its own."""
    msgs = list(model.messages) + messages
    if model.system and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": model.system}] + msgs
    return msgs


async def start(engine: Engine, req: GenRequest, chat_messages, tools=None, raw=None, template=None,
                context=None, load_only=False, on_done=None) -> Iterator[dict]:
    """Wait for the model, then return a generator that yields content/thinking events and a
    done event, holding the model until it ends (or is dropped). on_done(model name, done
    event) is told of every finished generation (the metrics)."""
    model, options, keep_alive = req.model, req.options, req.keep_alive
    template = template or model.prompt_template
    think = req.think
    t0 = time.perf_counter()
    if load_only and keep_alive <= 0:  # Ollama's unload request
        def unload():
            engine.unload_name(model.name)
            yield {"done": "unload", "total_duration": int((time.perf_counter() - t0) * 1e9)}
        return unload()
    from ollama_ft.ollamafmt.ggufinfo import cached_info

    try:
        n_ctx = engine.fit_ctx(model.model_path, model.adapter_path,
                               int(options.get("num_ctx") or DEFAULT_OPTIONS["num_ctx"]),
                               cached_info(model.model_path).context_length)
        lease = await engine.acquire(model.name, model.manifest.digest, model.model_path,
                                     model.adapter_path, n_ctx, keep_alive,
                                     int(options.get("num_gpu", -1)))
    except ServerBusy as e:
        raise HTTPError(503, str(e)) from None
    except ModelTooLarge as e:
        raise HTTPError(500, str(e)) from None

    def gen():
        with lease:
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
            for ev in lease.generate(tokens, options, req.fmt):
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
                    if on_done is not None:
                        on_done(model.name, ev)
                    yield ev
    return gen()


def rendered(body: dict, handler: str, prompt: str) -> JSONResponse:
    """Ollama's `_debug_render_only`: the prompt the model would be given, nothing run
    (without the truncation to num_ctx, which needs the model loaded)."""
    out = {"model": body["model"], "created_at": now_iso()}
    out.update({"message": {"role": "", "content": ""}} if handler == "chat" else {"response": ""})
    out.update(done=False, _debug_info={"rendered_template": prompt})
    return JSONResponse(out)


async def respond(events, chunk, stream: bool, whole):
    """NDJSON chunks, or one object: `whole(last chunk, content, thinking)`."""
    if stream:
        return ndjson(events, chunk)
    try:
        text, thinking, last = await collect(events)
    except OllamaError as e:
        return error(500, str(e))
    except Exception as e:  # a bug or the disk: the id, not the details
        return error(500, incident("generation failed", e))
    return JSONResponse(whole(chunk(last), text, thinking))


async def collect(events) -> tuple[str, str, dict]:
    """Run a generation to its end in a worker thread: (content, thinking, done event)."""
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


def stats(ev) -> dict:
    keys = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration")
    return {k: ev[k] for k in keys if k in ev}


def ndjson(events, chunk) -> StreamingResponse:
    def lines():
        try:
            for ev in events:
                yield json.dumps(chunk(ev), ensure_ascii=False) + "\n"
        except OllamaError as e:
            yield json.dumps({"error": str(e)}) + "\n"
        except Exception as e:  # after streaming started errors travel in-band
            yield json.dumps({"error": incident("generation failed", e)}) + "\n"
    return closing_stream(lines(), events, media_type="application/x-ndjson")


def closing_stream(body, *generators, media_type: str) -> StreamingResponse:
    """A streaming reply whose generators (and the model lease they hold) are closed as soon
    as it ends, also when the client went away mid-stream."""
    return StreamingResponse(body, media_type=media_type,
                             background=BackgroundTask(close_all, body, *generators))


def close_all(*generators, wait: float = 120.0) -> None:
    """Close each generator; one still running a step in another thread is closed when
    that step ends (bounded by `wait` seconds)."""
    deadline = time.monotonic() + wait
    for gen in generators:
        close = getattr(gen, "close", None)
        while close is not None:
            try:
                close()
                break
            except ValueError:  # "generator already executing"
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
