"""
title: ollama-ft trainer
author: ollama-ft
description: Fine-tune a DeepSeek base on a data file attached in the chat, through the ollama-ft bridge's training-jobs API; the new model then appears in the model list.
version: 0.1.0
license: MIT
"""

# This file is loaded by Open WebUI (Admin > Functions), not imported by ollama-ft: it runs in
# Open WebUI's Python and uses only what Open WebUI ships (stdlib, httpx, pydantic). One file,
# because a Function is one source text; its parts, top to bottom: what a message asks for,
# the bridge's jobs API, the attached file, what the chat shows, and the Pipe.

import asyncio
import base64
import hashlib
import html
import inspect
import json
import os
import re
import struct
import tempfile
import zlib
from typing import Any, AsyncIterator

import httpx
from pydantic import BaseModel, Field

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l",
          "q3_k_m", "q3_k_s", "q2_k", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "iq4_xs")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
JOB_REF = re.compile(r"job `(\d{8}-\d{6}-[0-9a-f]{6})`")
CHUNK = 1 << 20


# --- what a message asks for ---------------------------------------------------------------
class Ask:
    """What a message asks: command train | stop | status | resume | help; for train, the
    run.yaml keys the message set; for the others, the job it named, if any."""

    def __init__(self, command: str, options: dict | None = None, job_id: str | None = None):
        self.command, self.options, self.job_id = command, options or {}, job_id

    def __repr__(self):
        return f"Ask({self.command!r}, {self.options!r}, {self.job_id!r})"


_COMMANDS = {"stop": "stop", "cancel": "stop", "abort": "stop", "status": "status",
             "progress": "status", "resume": "resume", "continue": "resume", "help": "help",
             "?": "help"}
_JOB_ID = re.compile(r"\b\d{8}-\d{6}-[0-9a-f]{6}\b")
_KEY_VALUE = re.compile(r"\b([a-z][a-z0-9_]*)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s,;]+)", re.I)
_BASE = re.compile(r"\b(?:fine[- ]?tune|train)\s+(?!on\b|this\b|it\b|with\b|as\b|for\b)"
                   r"([^\s,;]+)", re.I)
_NAME = re.compile(r"\bas\s+(?:an?\s+)?[\"'`]?([A-Za-z0-9_][A-Za-z0-9_.:\-]*)", re.I)
_EPOCHS = re.compile(r"\b(\d+(?:\.\d+)?)\s*epochs?\b|\bepochs?\s*:?\s*(\d+(?:\.\d+)?)\b", re.I)
_STEPS = re.compile(r"\b(\d+)\s*steps?\b", re.I)
_QUANT = re.compile(r"\b(" + "|".join(QUANTS) + r")\b", re.I)


def _value(raw: str) -> Any:
    raw = raw.strip("\"'")
    if raw.lower() in ("true", "yes", "on"):
        return True
    if raw.lower() in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_message(text: str) -> Ask:
    """'fine-tune deepseek-r1:1.5b on this as support-bot, 2 epochs' -> train with base, name
    and epochs; 'stop' / 'status' / 'resume' [JOB] -> that command; KEY=VALUE sets any
    run.yaml key (lr=1e-4, max_len=4096)."""
    text = (text or "").strip()
    words = re.findall(r"[\w-]+|\?", text.lower())
    if words and words[0] in _COMMANDS and len(words) <= 6 and "=" not in text:
        job = _JOB_ID.search(text)
        return Ask(_COMMANDS[words[0]], job_id=job.group(0) if job else None)
    options: dict = {}
    rest = text
    for key, raw in _KEY_VALUE.findall(text):
        options[key.lower().replace("-", "_")] = _value(raw)
    rest = _KEY_VALUE.sub(" ", rest)
    if "base" not in options and (m := _BASE.search(rest)):
        options["base"] = m.group(1).rstrip(".:!?")
    if "name" not in options and (m := _NAME.search(rest)):
        options["name"] = m.group(1).rstrip(".:!?")
    if "epochs" not in options and (m := _EPOCHS.search(rest)):
        options["epochs"] = float(m.group(1) or m.group(2))
    if "max_steps" not in options and (m := _STEPS.search(rest)):
        options["max_steps"] = int(m.group(1))
    if "quant" not in options:
        quants = list(dict.fromkeys(q.lower() for q in _QUANT.findall(rest)))
        if quants:
            options["quant"] = ",".join(quants)
    return Ask("train", options)


def model_name_for(filename: str) -> str:
    stem = os.path.splitext(os.path.basename(filename))[0]
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-.") or "fine-tune"
    return name[:72] + "-ft"


# --- the bridge's jobs API ------------------------------------------------------------------
class BridgeError(Exception):
    """Something the person can fix (bridge down, wrong key, a refused job): the message says
    what and how."""


def user_headers(user: dict | None) -> dict:
    """Who asks, for the bridge: the Open WebUI user's id and role (the bridge shows and lets
    each person control their own jobs, an admin all). No id is someone, never the operator."""
    user = user or {}
    uid = str(user.get("id") or "").strip()
    uid = uid if uid and len(uid) <= 256 and uid.isascii() and uid.isprintable() else "anonymous"
    role = "admin" if user.get("role") == "admin" else "user"
    return {"X-Ollama-Ft-User": uid, "X-Ollama-Ft-Role": role}


class Bridge:
    def __init__(self, url: str, api_key: str = "", timeout: float = 30.0,
                 user: dict | None = None):
        self.url = (url or "").rstrip("/")
        if not re.match(r"^https?://", self.url):
            raise BridgeError(f"the trainer's bridge_url valve {url!r} is not an http(s) URL; "
                              "set it to the ollama-ft bridge, e.g. http://127.0.0.1:11435 "
                              "(Admin > Functions > ollama-ft trainer > Valves)")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.headers.update(user_headers(user))
        self.timeout = timeout

    def _client(self, read_timeout: float | None = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers,
                                 timeout=httpx.Timeout(self.timeout, read=read_timeout))

    def _unreachable(self, e: Exception) -> BridgeError:
        return BridgeError(f"could not reach the ollama-ft bridge at {self.url} ({type(e).__name__}: "
                           f"{e}). Start it with `ollama-ft serve`, or set the trainer's "
                           "bridge_url valve to where it listens")

    def _check(self, r: httpx.Response, what: str) -> Any:
        if r.status_code == 401:
            raise BridgeError(f"the bridge at {self.url} refused the API key ({what}); set the "
                              "trainer's bridge_api_key valve to the bridge's --api-key")
        if r.status_code >= 400:
            try:
                msg = r.json().get("error") or r.text
            except ValueError:
                msg = r.text
            raise BridgeError(f"{what}: the bridge answered {r.status_code}: {msg}")
        try:
            return r.json()
        except ValueError:
            raise BridgeError(f"{what}: {self.url} answered {r.status_code} with something that "
                              "is not JSON; is the trainer's bridge_url valve the ollama-ft "
                              "bridge (`ollama-ft serve`)?") from None

    async def _call(self, method: str, path: str, what: str, **kw) -> Any:
        try:
            async with self._client(read_timeout=kw.pop("read_timeout", 120.0)) as c:
                return self._check(await c.request(method, path, **kw), what)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None

    async def upload(self, path: str, filename: str, digest: str) -> dict:
        async def chunks():
            with open(path, "rb") as f:
                while True:
                    piece = await asyncio.to_thread(f.read, CHUNK)
                    if not piece:
                        return
                    yield piece
        return await self._call("POST", "/api/ft/uploads", f"uploading {filename}",
                                params={"filename": filename, "digest": digest},
                                content=chunks(), read_timeout=600.0)

    async def create_job(self, body: dict) -> dict:
        return await self._call("POST", "/api/ft/jobs", "starting the job", json=body)

    async def job(self, job_id: str) -> dict:
        return await self._call("GET", f"/api/ft/jobs/{job_id}", f"job {job_id}")

    async def jobs(self) -> list[dict]:
        return (await self._call("GET", "/api/ft/jobs", "listing jobs")).get("jobs", [])

    async def cancel(self, job_id: str) -> dict:
        return await self._call("DELETE", f"/api/ft/jobs/{job_id}", f"stopping job {job_id}")

    async def resume(self, job_id: str) -> dict:
        return await self._call("POST", f"/api/ft/jobs/{job_id}/resume", f"resuming job {job_id}")

    async def file(self, job_id: str, name: str) -> bytes | None:
        """A file of the job's run (loss.png, eval.md, ...); None where the bridge has none."""
        try:
            async with self._client() as c:
                r = await c.get(f"/api/ft/jobs/{job_id}/files/{name}")
        except httpx.TransportError:
            return None
        return r.content if r.status_code == 200 else None

    async def events(self, job_id: str) -> AsyncIterator[dict]:
        """The job's events from the first, until its final state; a dropped stream is opened
        again (it replays from the start, so the ones already seen are skipped)."""
        seen, failures = 0, 0
        while True:
            count = 0
            try:
                async with self._client(read_timeout=None) as c:
                    async with c.stream("GET", f"/api/ft/jobs/{job_id}/events") as r:
                        if r.status_code >= 400:
                            await r.aread()
                            self._check(r, f"following job {job_id}")
                        async for line in r.aiter_lines():
                            if not line.strip():
                                continue
                            count += 1
                            if count <= seen:
                                continue
                            seen = count
                            try:
                                ev = json.loads(line)
                            except ValueError:
                                continue
                            yield ev
                            if ev.get("type") == "state" and ev.get("state") in FINAL:
                                return
            except (httpx.TransportError, httpx.StreamError) as e:
                failures += 1
                if failures > 5:
                    raise self._unreachable(e) from None
                await asyncio.sleep(min(2 * failures, 10))
                continue
            # the stream ended without a final state: the job was gone or the bridge restarted
            state = (await self.job(job_id)).get("state")
            if state in FINAL:
                return
            await asyncio.sleep(1)


# --- the attached file ----------------------------------------------------------------------
def _file_id(item: dict) -> str | None:
    return item.get("id") or (item.get("file") or {}).get("id")


def _file_name(item: dict) -> str:
    f = item.get("file") or {}
    return (item.get("name") or f.get("filename") or (f.get("meta") or {}).get("name")
            or "data.jsonl")


async def _owui_file_path(file_id: str, user: dict) -> str | None:
    """The stored file's local path, through Open WebUI's own Files table and storage provider
    (local disk or a cloud bucket), when the user owns it or is an admin; None when this
    Open WebUI has no such API (then the HTTP route is tried)."""
    try:
        from open_webui.models.files import Files
        from open_webui.storage.provider import Storage
    except ImportError:
        return None
    record = Files.get_file_by_id(file_id)
    if inspect.isawaitable(record):
        record = await record
    if record is None or not getattr(record, "path", None):
        return None
    if record.user_id != user.get("id") and user.get("role") != "admin":
        return None  # shared with the user some other way: let the HTTP route check access
    return await asyncio.to_thread(Storage.get_file, record.path)


async def _owui_file_over_http(file_id: str, request, dest: str) -> None:
    """GET /api/v1/files/{id}/content on this Open WebUI with the user's own credentials."""
    if request is None:
        raise BridgeError("cannot read the attached file: Open WebUI passed no request to the "
                          "trainer")
    headers = {}
    auth = request.headers.get("authorization")
    if auth:
        headers["Authorization"] = auth
    elif request.cookies.get("token"):
        headers["Authorization"] = f"Bearer {request.cookies['token']}"
    url = str(request.base_url).rstrip("/") + f"/api/v1/files/{file_id}/content"
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=600)) as c:
        async with c.stream("GET", url, headers=headers) as r:
            if r.status_code != 200:
                raise BridgeError(f"cannot read the attached file from Open WebUI ({url}: "
                                  f"{r.status_code})")
            with open(dest, "wb") as f:
                async for piece in r.aiter_bytes(CHUNK):
                    f.write(piece)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(CHUNK), b""):
            h.update(piece)
    return "sha256:" + h.hexdigest()


# --- what the chat shows --------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def progress_line(ev: dict) -> str:
    """step 10/80 · loss 2.3140 · 1,234 tok/s · ETA 0:42 · RSS 812 MB · GPU 3.1 GB"""
    parts = [f"step {ev.get('step', '?')}/{ev.get('max_steps', '?')}"]
    if isinstance(ev.get("loss"), (int, float)):
        parts.append(f"loss {ev['loss']:.4f}")
    if isinstance(ev.get("eval_loss"), (int, float)):
        parts.append(f"eval loss {ev['eval_loss']:.4f}")
    if isinstance(ev.get("tokens_per_s"), (int, float)):
        parts.append(f"{ev['tokens_per_s']:,.0f} tok/s")
    if isinstance(ev.get("eta_s"), (int, float)):
        parts.append(f"ETA {fmt_duration(ev['eta_s'])}")
    if isinstance(ev.get("rss_mb"), (int, float)):
        parts.append(f"RSS {fmt_mb(ev['rss_mb'])}")
    if isinstance(ev.get("gpu_mb"), (int, float)):
        parts.append(f"GPU {fmt_mb(ev['gpu_mb'])}")
    return " · ".join(parts)


def summary_line(p: dict) -> str:
    """trained 80 steps · final loss 0.0021 · 103 tok/s · RSS 647 MB"""
    parts = [f"trained {p.get('step', '?')} steps"]
    if isinstance(p.get("loss"), (int, float)):
        parts.append(f"final loss {p['loss']:.4f}")
    if isinstance(p.get("tokens_per_s"), (int, float)):
        parts.append(f"{p['tokens_per_s']:,.0f} tok/s")
    for key, label in (("rss_mb", "RSS"), ("gpu_mb", "GPU")):
        if isinstance(p.get(key), (int, float)):
            parts.append(f"{label} {fmt_mb(p[key])}")
    return " · ".join(parts)


_UPLOAD_PATH = re.compile(r"\S*?uploads/[0-9a-f]{64}\.(?:jsonl|json|csv|parquet)")


def as_user_file(text: str, filename: str) -> str:
    """The bridge names the uploaded copy (HOME/uploads/<sha256>.jsonl:12); say the file the
    person attached (data.jsonl:12)."""
    return _UPLOAD_PATH.sub(filename, text or "")


def data_check_md(report: dict, filename: str, train: int | None = None,
                  held_out: int | None = None) -> str:
    lines = [f"**Data check** of `{filename}`: {report.get('records_read', '?')} records read, "
             f"{report.get('kept', '?')} kept, {len(report.get('rejected') or [])} rejected"
             + (f", {report['duplicates_dropped']} duplicates dropped"
                if report.get("duplicates_dropped") else "")
             + (f" (format {report['format']})" if report.get("format") else "") + "."]
    if held_out:
        lines[0] += f" {train} examples train, {held_out} are held out for the eval."
    t = report.get("token_lengths") or {}
    if t:
        lines.append(f"Tokens per example: p50 {t.get('p50')} · p90 {t.get('p90')} · p99 "
                     f"{t.get('p99')} · max {t.get('max')}; {report.get('truncated', 0)} "
                     f"truncated at {report.get('max_len', '?')}.")
    for r in (report.get("rejected") or [])[:10]:
        lines.append(f"- rejected `{as_user_file(str(r.get('location', '')), filename)}`: "
                     f"{r.get('why', '')}")
    more = len(report.get("rejected") or []) - 10
    if more > 0:
        lines.append(f"- ... and {more} more")
    return "\n".join(lines) + "\n\n"


def eval_md(ev: dict) -> str:
    """The base against the fine-tune on the held-out examples."""
    rows = [("base", ev.get("base") or {}), ("fine-tuned", ev.get("fine_tuned") or {})]
    if not any(m for _, m in rows):
        return ""

    def num(v, f):
        return f.format(v) if isinstance(v, (int, float)) else "-"

    count = next((m.get("count") for _, m in rows if m.get("count")), None)
    out = [f"**Eval** on {count} held-out examples:" if count else "**Eval**:", "",
           "| model | loss | perplexity | exact match | ROUGE-L |", "|---|---|---|---|---|"]
    for label, m in rows:
        out.append(f"| {label} | {num(m.get('loss'), '{:.4f}')} | "
                   f"{num(m.get('perplexity'), '{:.2f}')} | "
                   f"{num(m.get('exact_match'), '{:.0%}')} | {num(m.get('rouge_l'), '{:.3f}')} |")
    return "\n".join(out) + "\n\n"


def loss_png(points: list, width: int = 560, height: int = 240) -> bytes:
    """The loss curve as a PNG, drawn from the job's progress events where the bridge serves
    no loss.png (stdlib only: Open WebUI's chat shows data:image/png, not SVG)."""
    pixels = bytearray(b"\xff" * width * height * 3)
    left, right, top, bottom = 12, width - 12, 12, height - 12

    def put(x: int, y: int, rgb: bytes) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = rgb

    for k in range(5):  # grid
        y = top + (bottom - top) * k // 4
        for x in range(left, right + 1):
            put(x, y, b"\xe5\xe7\xeb")
    for x in range(left, right + 1):  # axes
        put(x, bottom, b"\x9c\xa3\xaf")
    for y in range(top, bottom + 1):
        put(left, y, b"\x9c\xa3\xaf")
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s0, s1, lo, hi = min(steps), max(steps), min(losses), max(losses)
    span, rise = max(s1 - s0, 1), (hi - lo) or 1.0

    def xy(s, v):
        return (left + (s - s0) / span * (right - left), bottom - (v - lo) / rise * (bottom - top))

    blue = b"\x25\x63\xeb"
    for (sa, va), (sb, vb) in zip(points, points[1:]):
        (xa, ya), (xb, yb) = xy(sa, va), xy(sb, vb)
        n = int(max(abs(xb - xa), abs(yb - ya))) + 1
        for i in range(n + 1):
            x, y = round(xa + (xb - xa) * i / n), round(ya + (yb - ya) * i / n)
            for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
                put(x + dx, y + dy, blue)
    raw = b"".join(b"\x00" + bytes(pixels[r * width * 3:(r + 1) * width * 3]) for r in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_md(data: bytes, mime: str, alt: str) -> str:
    return f"![{html.escape(alt)}](data:{mime};base64,{base64.b64encode(data).decode()})\n\n"


STAGES = {"train": "training", "export": "exporting GGUF", "register": "registering the model",
          "eval": "evaluating"}


def help_md(valves) -> str:
    return (
        "I fine-tune a DeepSeek base on a data file through the ollama-ft bridge. Attach a "
        "JSONL, JSON, CSV or Parquet file and say what you want, e.g.\n\n"
        "> fine-tune deepseek-r1:1.5b on this as support-bot, 2 epochs\n\n"
        f"Without instructions I use the defaults: base `{valves.default_base}`, "
        f"{valves.epochs:g} epochs, quant `{valves.quant}`, the model named after the file. "
        "Any run.yaml key works as KEY=VALUE (`lr=1e-4`, `max_len=4096`, `lora_r=32`). "
        "While or after a job runs: **status** reports it, **stop** cancels it, **resume** "
        "continues a stopped one.\n")


# --- the Pipe -------------------------------------------------------------------------------
class Pipe:
    class Valves(BaseModel):
        bridge_url: str = Field(default="http://127.0.0.1:11435",
                                description="The ollama-ft bridge (`ollama-ft serve`).")
        bridge_api_key: str = Field(default="", description="The bridge's --api-key, if it has one.")
        default_base: str = Field(default="deepseek-r1:1.5b",
                                  description="Base when the message names none: a catalogue "
                                  "alias, a Hugging Face id, or a folder the bridge may read.")
        epochs: float = Field(default=3.0, description="Epochs when the message says none.")
        quant: str = Field(default="q4_k_m", description="GGUF type(s) to export, e.g. q4_k_m,q8_0.")

    def __init__(self):
        self.valves = self.Valves()

    async def pipe(self, body: dict, __user__: dict | None = None, __files__: list | None = None,
                   __metadata__: dict | None = None, __event_emitter__=None, __request__=None,
                   __task__=None):
        if __task__:  # Open WebUI's title / tags / follow-up / query helpers: no job for those
            yield _task_answer(str(__task__))
            return
        text, files = _user_turn(body, __metadata__, __files__)
        ask = parse_message(text)
        status = _Status(__event_emitter__)
        try:
            bridge = Bridge(self.valves.bridge_url, self.valves.bridge_api_key, user=__user__)
            if ask.command == "help" or (ask.command == "train" and not files):
                yield help_md(self.valves)
                return
            if ask.command == "train":
                steps = self._train(ask, files, __user__ or {}, __request__, bridge, status)
            else:
                job_id = ask.job_id or _job_in_chat(body) or await _newest_job(bridge)
                if job_id is None:
                    yield "There is no training job to report on yet.\n\n" + help_md(self.valves)
                    return
                steps = {"stop": self._stop, "status": self._status,
                         "resume": self._resume}[ask.command](job_id, bridge, status)
            async for piece in steps:
                yield piece
        except BridgeError as e:
            await status(f"error: {e}", done=True)
            yield f"\n\n**Error:** {e}\n"
        except Exception as e:  # a bug here, not the person's doing: say so, in the chat
            await status("error", done=True)
            yield (f"\n\n**Error:** the trainer pipe failed ({type(e).__name__}: {e}). This is a "
                   "bug in ollama-ft's Open WebUI pipe; the job, if one started, goes on: say "
                   "**status** to see it.\n")

    # --- commands ---------------------------------------------------------------------------
    async def _train(self, ask: Ask, files: list, user: dict, request, bridge: Bridge, status):
        item = next((f for f in files if _file_name(f).lower().endswith(DATA_SUFFIXES)), None)
        if item is None:
            names = ", ".join(f"`{_file_name(f)}`" for f in files)
            yield (f"I can train on .jsonl, .json, .csv or .parquet files; the attached {names} "
                   "is none of those. Attach the training data in one of these formats.\n")
            return
        filename = os.path.basename(_file_name(item))
        options = {"base": self.valves.default_base, "epochs": self.valves.epochs,
                   "quant": self.valves.quant, "name": model_name_for(filename), **ask.options}
        what = (f"{options['max_steps']} steps" if options.get("max_steps")
                else f"{options['epochs']:g} epochs" if isinstance(options.get("epochs"), (int, float))
                else "")
        yield (f"Fine-tuning **{options['base']}** on `{filename}` as **{options['name']}** "
               f"({', '.join(x for x in (what, str(options.get('quant') or '')) if x)}).\n\n")
        if not ask.options:
            yield ("_No instructions found, so these are the defaults; say e.g. \"fine-tune "
                   "deepseek-r1:7b on this as support-bot, 2 epochs\" to choose. "
                   "**help** tells more._\n\n")
        await status(f"reading {filename}")
        tmp = None
        try:
            path = await _owui_file_path(_file_id(item), user) if _file_id(item) else None
            if path is None:
                fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(filename)[1])
                os.close(fd)
                await _owui_file_over_http(_file_id(item), request, tmp)
                path = tmp
            size = os.path.getsize(path)
            await status(f"uploading {filename} ({fmt_mb(size / 2**20)}) to the bridge")
            digest = await asyncio.to_thread(_sha256, path)
            up = await bridge.upload(path, filename, digest)
        finally:
            if tmp:
                os.unlink(tmp)
        try:
            job = await bridge.create_job({**options, "data": up["data"]})
        except BridgeError as e:
            raise BridgeError(as_user_file(str(e), filename)) from None
        await status(f"job {job['id']} {job.get('state', 'queued')}")
        yield (f"job `{job['id']}` {job.get('state', 'queued')}: say **stop** to cancel it, "
               "**status** for where it is.\n\n")
        async for piece in self._follow(job["id"], filename, bridge, status):
            yield piece

    async def _follow(self, job_id: str, filename: str, bridge: Bridge, status):
        points: list[tuple[int, float]] = []
        evaluation, checkpoint, stage, last = None, None, None, {}
        async for ev in bridge.events(job_id):
            kind = ev.get("type")
            if kind == "data" and isinstance(ev.get("report"), dict):
                yield data_check_md(ev["report"], filename, ev.get("train_examples"),
                                    ev.get("eval_examples"))
            elif kind == "stage" and ev.get("stage") != stage:
                stage = ev.get("stage")
                label = STAGES.get(stage, str(stage))
                if stage == "train" and ev.get("max_steps"):
                    label += f" ({ev['max_steps']} steps)"
                await status(label)
                yield f"- {label}\n"
            elif kind == "progress":
                last = {**last, **ev}  # an evaluation's line has eval_loss alone: keep the loss
                if isinstance(ev.get("loss"), (int, float)):
                    points.append((int(ev.get("step") or 0), float(ev["loss"])))
                await status(progress_line(last))
                saved = (ev.get("checkpoint") or {}).get("step")
                if saved and saved != checkpoint:
                    checkpoint = saved
                    yield f"- checkpoint saved at step {saved}\n"
            elif kind == "checkpoint" and ev.get("step") and ev["step"] != checkpoint:
                checkpoint = ev["step"]
                yield f"- checkpoint saved at step {checkpoint}\n"
            elif kind == "eval" and isinstance(ev.get("eval"), dict):
                evaluation = ev["eval"]
            elif kind == "log" and stage in ("export", "register") and ev.get("message"):
                await status(str(ev["message"])[:160])
            elif kind == "state" and ev.get("state") == "running":
                await status("running")
        job = await bridge.job(job_id)
        yield "\n" + await self._outcome(job, filename, points, last, evaluation, bridge, status)

    async def _outcome(self, job: dict, filename: str, points, last: dict, evaluation,
                       bridge: Bridge, status) -> str:
        state, job_id = job.get("state"), job["id"]
        progress = {**(job.get("progress") or {}), **last}
        took = ""
        if job.get("started_at") and job.get("finished_at"):
            took = f" in {fmt_duration(job['finished_at'] - job['started_at'])}"
        if state == "succeeded":
            await status(f"done: {(job.get('artifacts') or {}).get('model') or 'trained'}", done=True)
            out = [f"**Done**{took}" + (f": {summary_line(progress)}.\n" if progress else ".\n")]
            png = await bridge.file(job_id, "loss.png")
            if png:
                out.append(image_md(png, "image/png", "loss curve"))
            elif len(points) >= 2:
                out.append(image_md(loss_png(points), "image/png", "loss curve"))
                out.append(f"_training loss {points[0][1]:.4f} at step {points[0][0]} to "
                           f"{points[-1][1]:.4f} at step {points[-1][0]}_\n")
            if evaluation:
                out.append(eval_md(evaluation))
                picture = await bridge.file(job_id, "eval.png")
                if picture:
                    out.append(image_md(picture, "image/png", "base against fine-tune"))
            else:
                md = await bridge.file(job_id, "eval.md")
                if md:
                    out.append(md.decode("utf-8", errors="replace") + "\n\n")
            model = (job.get("artifacts") or {}).get("model")
            if model:
                out.append(f"The new model is **`{model}`**: pick it in the model list to chat "
                           "with it.\n")
            else:
                out.append("Training is done; the job registered no model (export or register "
                           f"was off). Its files are in `{job.get('run_dir')}` on the bridge.\n")
            return "\n".join(out)
        if state == "failed":
            await status("failed", done=True)
            return f"**Failed**{took}: {as_user_file(job.get('error') or 'see the bridge log', filename)}\n"
        if state in ("cancelled", "interrupted"):
            await status(state, done=True)
            at = f" at step {progress.get('step')}/{progress.get('max_steps')}" if progress.get("step") else ""
            why = "" if state == "cancelled" else " (the bridge stopped while it ran)"
            return (f"**{state.capitalize()}**{at}{why}. Its newest checkpoint is kept: say "
                    f"**resume** to continue job `{job_id}`.\n")
        await status(str(state), done=True)
        return f"job `{job_id}` is {state}.\n"

    async def _status(self, job_id: str, bridge: Bridge, status):
        job = await bridge.job(job_id)
        state = job.get("state")
        name = (job.get("config") or {}).get("name")
        head = f"job `{job_id}` ({name}): **{state}**"
        if state not in FINAL:
            p = job.get("progress") or {}
            where = f": {STAGES.get(p.get('stage'), p.get('stage') or 'starting')}"
            if p.get("step"):
                where += f", {progress_line(p)}"
            await status(f"{state}{where}", done=True)
            yield head + where + ". Say **status** again to see it move, **stop** to cancel.\n"
            return
        points, evaluation, last, filename = [], None, {}, "the data file"
        async for ev in bridge.events(job_id):  # a finished job's events, replayed
            if ev.get("type") == "progress":
                last = {**last, **ev}
                if isinstance(ev.get("loss"), (int, float)):
                    points.append((int(ev.get("step") or 0), float(ev["loss"])))
            elif ev.get("type") == "eval" and isinstance(ev.get("eval"), dict):
                evaluation = ev["eval"]
        yield head + ".\n\n" + await self._outcome(job, filename, points, last, evaluation,
                                                   bridge, status)

    async def _stop(self, job_id: str, bridge: Bridge, status):
        await status(f"stopping job {job_id}")
        job = await bridge.cancel(job_id)
        state = job.get("state")
        await status(f"job {job_id} {state}", done=True)
        if state == "cancelled":
            p = job.get("progress") or {}
            at = f" at step {p.get('step')}/{p.get('max_steps')}" if p.get("step") else ""
            yield (f"Stopped job `{job_id}`{at}. Its newest checkpoint is kept: say **resume** "
                   "to continue it.\n")
        else:
            yield f"job `{job_id}` is already {state}; nothing to stop.\n"

    async def _resume(self, job_id: str, bridge: Bridge, status):
        job = await bridge.resume(job_id)
        yield f"Resuming job `{job_id}` from its newest checkpoint ({job.get('state')}).\n\n"
        async for piece in self._follow(job_id, "the data file", bridge, status):
            yield piece


class _Status:
    """Open WebUI's status line under the reply (a no-op where no emitter was given)."""

    def __init__(self, emitter):
        self.emitter = emitter

    async def __call__(self, description: str, done: bool = False) -> None:
        if self.emitter is None:
            return
        try:
            await self.emitter({"type": "status", "data": {"description": description,
                                                           "done": done, "hidden": False}})
        except Exception:  # the chat went away: the job goes on, and so do we
            pass


def _user_turn(body: dict, metadata: dict | None, files: list | None) -> tuple[str, list]:
    """The person's own words and files of this turn. Open WebUI may have put retrieval
    context into the last user message, so its metadata's copy of the message wins."""
    message = (metadata or {}).get("user_message") or {}
    text = message.get("content")
    if not isinstance(text, str):
        text = ""
        for m in reversed(body.get("messages") or []):
            if m.get("role") == "user":
                c = m.get("content")
                text = c if isinstance(c, str) else " ".join(
                    p.get("text", "") for p in c or [] if isinstance(p, dict))
                break
    if message:  # this turn's attachments only: a later "hello" must not train again
        return text, [f for f in (message.get("files") or []) if f.get("type", "file") == "file"]
    return text, [f for f in (files or []) if f.get("type", "file") == "file"]


def _job_in_chat(body: dict) -> str | None:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "assistant" and isinstance(m.get("content"), str):
            found = JOB_REF.findall(m["content"])
            if found:
                return found[-1]
    return None


async def _newest_job(bridge: Bridge) -> str | None:
    jobs = await bridge.jobs()
    return jobs[0]["id"] if jobs else None


def _task_answer(task: str) -> str:
    return {"title_generation": json.dumps({"title": "ollama-ft fine-tune"}),
            "tags_generation": json.dumps({"tags": ["Fine-tuning"]}),
            "follow_up_generation": json.dumps({"follow_ups": []}),
            "query_generation": json.dumps({"queries": []})}.get(task, "")
