"""The Open WebUI trainer Pipe without a browser: what a message asks for, what the chat
shows, the installer's output and errors, and the Pipe driven directly against a real bridge
(upload, job, events, stop) with a recorder in place of Open WebUI's event emitter."""

import asyncio
import json
import struct
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ollama_ft.openwebui import pipe as owpipe
from ollama_ft.openwebui.install import PIPE_FILE, OpenWebUIError, install_pipe
from tests.conftest import FACTS, Server, free_port, qa_rows, write_jsonl


# --- what a message asks for ----------------------------------------------------------------
@pytest.mark.parametrize("text, command, options", [
    ("fine-tune deepseek-r1:1.5b on this as support-bot, 2 epochs", "train",
     {"base": "deepseek-r1:1.5b", "name": "support-bot", "epochs": 2.0}),
    ("train deepseek-ai/DeepSeek-R1-Distill-Qwen-7B as helper. 50 steps, q8_0 and q4_k_m", "train",
     {"base": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "name": "helper", "max_steps": 50,
      "quant": "q8_0,q4_k_m"}),
    ("fine-tune on this as bot, lr=1e-4 max_len=4096 packing=false lora_targets='q_proj,v_proj'",
     "train", {"name": "bot", "lr": 1e-4, "max_len": 4096, "packing": False,
               "lora_targets": "q_proj,v_proj"}),
    ("please learn this", "train", {}),
    ("stop", "stop", {}), ("Stop the training!", "stop", {}), ("cancel", "stop", {}),
    ("status?", "status", {}), ("resume", "resume", {}), ("help", "help", {}), ("?", "help", {}),
])
def test_parse_message(text, command, options):
    ask = owpipe.parse_message(text)
    assert (ask.command, ask.options) == (command, options)


def test_parse_message_names_a_job():
    assert owpipe.parse_message("status of 20261201-130640-a1b2c3").job_id == "20261201-130640-a1b2c3"
    # a long sentence that starts with a command word is an instruction, not the command
    assert owpipe.parse_message("stop words are fine; fine-tune on this as x, 2 epochs").command == "train"


def test_model_name_from_the_file():
    assert owpipe.model_name_for("My Data (v2).jsonl") == "My-Data-v2-ft"
    assert owpipe.model_name_for("???.csv") == "fine-tune-ft"


# --- what the chat shows --------------------------------------------------------------------
def test_progress_and_summary_lines():
    ev = {"step": 10, "max_steps": 80, "loss": 2.31412, "tokens_per_s": 1234.5, "eta_s": 42,
          "rss_mb": 812.0, "gpu_mb": 3200.0}
    assert owpipe.progress_line(ev) == ("step 10/80 · loss 2.3141 · 1,234 tok/s · ETA 0:42 · "
                                        "RSS 812 MB · GPU 3.1 GB")
    assert owpipe.progress_line({"step": 1, "max_steps": 2}) == "step 1/2"
    assert owpipe.fmt_duration(3725) == "1:02:05"
    assert owpipe.summary_line(ev) == "trained 10 steps · final loss 2.3141 · 1,234 tok/s · RSS 812 MB · GPU 3.1 GB"


def test_data_check_names_the_attached_file_not_the_bridges_copy():
    upload = "/srv/home/uploads/" + "ab" * 32 + ".jsonl"
    report = {"file": upload, "format": "messages", "records_read": 12, "kept": 10,
              "rejected": [{"location": f"{upload}:3", "why": "empty assistant turn"},
                           {"location": f"{upload}:7", "why": "no user turn"}],
              "token_lengths": {"p50": 20, "p90": 30, "p99": 31, "max": 31}, "truncated": 0,
              "max_len": 256}
    md = owpipe.data_check_md(report, "support.jsonl")
    assert "12 records read, 10 kept, 2 rejected" in md
    assert "`support.jsonl:3`: empty assistant turn" in md and "`support.jsonl:7`" in md
    assert "p50 20 · p90 30 · p99 31 · max 31; 0 truncated at 256" in md
    assert "uploads/" not in md
    assert owpipe.as_user_file(f"data: {upload}:9: bad record", "d.jsonl") == "data: d.jsonl:9: bad record"


def test_eval_table():
    md = owpipe.eval_md({"base": {"loss": 9.1, "perplexity": 8955.3, "exact_match": 0.0,
                                  "rouge_l": 0.02, "count": 4},
                         "fine_tuned": {"loss": 0.4, "perplexity": 1.49, "exact_match": 0.75,
                                        "rouge_l": 0.9, "count": 4}})
    assert "4 held-out examples" in md
    assert "| base | 9.1000 | 8955.30 | 0% | 0.020 |" in md
    assert "| fine-tuned | 0.4000 | 1.49 | 75% | 0.900 |" in md
    assert owpipe.eval_md({}) == ""


def test_loss_png_is_a_png_of_the_curve():
    png = owpipe.loss_png([(1, 14.6), (5, 13.4), (10, 7.9), (20, 0.8), (80, 0.002)], 200, 100)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, tag = struct.unpack(">I4s", png[8:16])
    width, height = struct.unpack(">II", png[16:24])
    assert (tag, width, height) == (b"IHDR", 200, 100)
    idat = png.index(b"IDAT")
    raw = zlib.decompress(png[idat + 4:idat + 4 + struct.unpack(">I", png[idat - 4:idat])[0]])
    rows = [raw[r * (1 + 600) + 1:(r + 1) * (1 + 600)] for r in range(100)]
    blue = bytes([0x25, 0x63, 0xEB])
    # the curve starts high on the left and ends low on the right
    first = next(r for r, row in enumerate(rows) if blue in row[12 * 3:20 * 3])
    last = next(r for r, row in enumerate(rows) if blue in row[180 * 3:190 * 3])
    assert first < 30 < 70 < last


def test_help_and_helper_tasks():
    async def run(body, **kw):
        return [piece async for piece in owpipe.Pipe().pipe(body, **kw)]

    help_text = "".join(asyncio.run(run({"messages": [{"role": "user", "content": "hi"}]})))
    assert "Attach a JSONL, JSON, CSV or Parquet file" in help_text
    assert "base `deepseek-r1:1.5b`, 3 epochs, quant `q4_k_m`" in help_text
    title = asyncio.run(run({"messages": []}, __task__="title_generation"))
    assert json.loads("".join(title)) == {"title": "ollama-ft fine-tune"}
    assert json.loads("".join(asyncio.run(run({"messages": []}, __task__="query_generation")))) == {"queries": []}


def test_a_bad_bridge_url_or_a_dead_bridge_is_a_message_not_a_traceback():
    async def run(url, text):
        p = owpipe.Pipe()
        p.valves.bridge_url = url
        return "".join([x async for x in p.pipe({"messages": [{"role": "user", "content": text}]})])

    assert "bridge_url valve 'localhost:11435' is not an http(s) URL" in asyncio.run(run("localhost:11435", "status"))
    out = asyncio.run(run(f"http://127.0.0.1:{free_port()}", "status"))
    assert "**Error:** could not reach the ollama-ft bridge at http://127.0.0.1:" in out
    assert "`ollama-ft serve`" in out


def test_a_bridge_url_that_is_not_the_bridge_says_so():
    import httpx

    b = owpipe.Bridge("http://127.0.0.1:8080")
    with pytest.raises(owpipe.BridgeError, match="answered 200 with something that is not JSON; "
                       "is the trainer's bridge_url valve the ollama-ft bridge"):
        b._check(httpx.Response(200, text="<!doctype html>"), "listing jobs")
    with pytest.raises(owpipe.BridgeError, match="refused the API key .* bridge_api_key valve"):
        b._check(httpx.Response(401, json={"error": "unauthorized"}), "listing jobs")
    with pytest.raises(owpipe.BridgeError, match="job x: the bridge answered 404: job 'x' not found"):
        b._check(httpx.Response(404, json={"error": "job 'x' not found"}), "job x")


# --- the pipe as Open WebUI loads it ----------------------------------------------------------
def test_pipe_source_is_what_open_webui_can_load():
    src = PIPE_FILE.read_text(encoding="utf-8")
    lines = src.splitlines()
    assert lines[0] == '"""' and "title: ollama-ft trainer" in lines[1:4]  # its frontmatter
    assert "requirements:" not in src.split('"""')[1]  # nothing for Open WebUI to pip-install
    # Open WebUI rewrites these prefixes before exec (utils/plugin.py replace_imports)
    for prefix in ("from utils", "from apps", "from main", "from config"):
        assert prefix not in src
    assert "ollama_ft" not in src.replace("ollama-ft", "")
    # it runs alone: in a fresh interpreter, without ollama_ft on the path, exec'd as Open WebUI does
    code = ("import sys, types; sys.path = [p for p in sys.path if 'work' not in p or 'site-packages' in p]; "
            "m = types.ModuleType('function_x'); sys.modules['function_x'] = m; "
            f"exec(open({str(PIPE_FILE)!r}).read(), m.__dict__); p = m.Pipe(); "
            "print(sorted(p.valves.model_dump()), 'ollama_ft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] ")[0] + "]" == str(["bridge_api_key", "bridge_url", "default_base",
                                                    "epochs", "quant"])
    assert out.stdout.strip().endswith("False")


def test_install_print_is_the_pipe_source():
    out = subprocess.run([sys.executable, "-m", "ollama_ft", "openwebui", "install", "--print"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == PIPE_FILE.read_text(encoding="utf-8")


def test_install_errors_say_what_to_do():
    with pytest.raises(OpenWebUIError, match="no Open WebUI token: pass an admin's token"):
        install_pipe("http://127.0.0.1:8080", "")
    with pytest.raises(OpenWebUIError, match="must be an http"):
        install_pipe("127.0.0.1:8080", "t")
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "ollama_ft", "openwebui", "install", "--url",
                          f"http://127.0.0.1:{port}", "--token", "t"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"no Open WebUI answered at http://127.0.0.1:{port}" in out.stderr


# --- the Pipe against a real bridge ---------------------------------------------------------------
class FileServer:
    """Open WebUI's /api/v1/files/{id}/content, for the Pipe's HTTP route to an attachment:
    it answers only with the bearer token the chat request carried."""

    def __init__(self, files: dict, token: str):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fid = self.path.split("/")[4] if self.path.count("/") >= 5 else ""
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_response(401)
                    self.end_headers()
                elif fid in files and self.path == f"/api/v1/files/{fid}/content":
                    data = Path(files[fid]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


class ChatRequest:
    """What the Pipe reads of Open WebUI's request: its base URL and the user's credentials."""

    def __init__(self, base_url, token):
        self.base_url, self.headers, self.cookies = base_url, {"authorization": f"Bearer {token}"}, {}


class Recorder:
    def __init__(self):
        self.events = []

    async def __call__(self, event):
        self.events.append(event)

    def statuses(self):
        return [e["data"]["description"] for e in self.events if e["type"] == "status"]


def attachment(fid, name):
    return {"type": "file", "id": fid, "name": name, "file": {"id": fid, "filename": name}}


@pytest.fixture(scope="module")
def job_bridge(tiny_base, tmp_path_factory):
    base = tiny_base("r1-qwen")
    root = tmp_path_factory.mktemp("owui-bridge")
    server = Server(root / "home", "--data-dir", str(base.parent))
    yield server, base
    server.stop()


def make_pipe(server, base):
    p = owpipe.Pipe()
    p.valves.bridge_url = server.url
    p.valves.default_base = str(base)
    p.valves.quant = "f16"
    return p


def turn(text, files=(), history=()):
    msg = {"role": "user", "content": text, "files": list(files)}
    return ({"messages": [*history, {"role": "user", "content": text}], "stream": True},
            {"user_message": msg, "chat_id": "c1", "message_id": "m1", "session_id": "s1"})


async def collect(p, body, meta, request=None):
    rec = Recorder()
    out = []
    async for piece in p.pipe(body, __user__={"id": "u1", "role": "user"}, __metadata__=meta,
                              __event_emitter__=rec, __request__=request, __files__=meta["user_message"]["files"]):
        out.append(piece)
    return "".join(out), rec


@pytest.mark.slow
def test_pipe_trains_on_an_attached_file_and_names_the_new_model(job_bridge, tmp_path):
    server, base = job_bridge
    data = write_jsonl(tmp_path / "facts.jsonl", qa_rows(FACTS))
    files = FileServer({"f1": data}, token="user-token")
    try:
        body, meta = turn("fine-tune on this as pipe-ft, max_steps=4 logging_steps=1 save_steps=2 "
                          "max_len=64 batch_size=2 lr=1e-3 eval_split=0.25",
                          files=[attachment("f1", "facts.jsonl")])
        text, rec = asyncio.run(collect(make_pipe(server, base), body, meta,
                                        ChatRequest(files.url, "user-token")))
    finally:
        files.stop()
    job_id = owpipe.JOB_REF.search(text).group(1)
    events = [json.loads(x) for x in __import__("urllib.request").request.urlopen(
        f"{server.url}/api/ft/jobs/{job_id}/events", timeout=60).read().decode().splitlines()]
    statuses = rec.statuses()
    assert f"Fine-tuning **{base}** on `facts.jsonl` as **pipe-ft** (4 steps, f16)" in text
    assert statuses[:2] == ["reading facts.jsonl", "uploading facts.jsonl (0 MB) to the bridge"]
    steps = [s for s in statuses if s.startswith("step ")]
    assert steps[0].startswith("step 1/4 · loss ") and steps[-1].startswith("step 4/4 · loss ")
    assert "eval loss" in steps[-1]  # the held-out loss joins the line, the training loss stays
    assert all(" tok/s · ETA " in s for s in steps)
    assert "- training (4 steps)\n" in text and "- exporting GGUF\n" in text
    assert "- registering the model\n" in text
    if any(e["type"] == "data" for e in events):  # bridges that report the data check
        assert "**Data check** of `facts.jsonl`: 4 records read, 4 kept, 0 rejected" in text
        assert "3 examples train, 1 are held out for the eval." in text
    if any(e["type"] == "checkpoint" or e.get("checkpoint") for e in events):
        assert "- checkpoint saved at step 2\n" in text
    assert "**Done** in " in text and "trained 4 steps · final loss " in text
    assert "![loss curve](data:image/png;base64," in text
    assert "The new model is **`pipe-ft:latest`**" in text
    if any(e["type"] == "eval" for e in events):  # bridges that evaluate a held-out split
        assert "- evaluating\n" in text and "**Eval** on 1 held-out examples:" in text
        assert "| base | " in text and "| fine-tuned | " in text
        assert "![base against fine-tune](data:image/png;base64," in text
    assert rec.events[-1]["data"] == {"description": "done: pipe-ft:latest", "done": True, "hidden": False}
    tags = json.loads(__import__("urllib.request").request.urlopen(f"{server.url}/api/tags").read())
    assert "pipe-ft:latest" in {m["name"] for m in tags["models"]}

    # "status" in the same chat finds the job in the earlier reply and reports it
    body, meta = turn("status", history=[{"role": "user", "content": "..."},
                                         {"role": "assistant", "content": text}])
    again, _ = asyncio.run(collect(make_pipe(server, base), body, meta))
    assert again.startswith(f"job `{job_id}` (pipe-ft): **succeeded**.")
    assert "![loss curve](data:image/png;base64," in again and "`pipe-ft:latest`" in again


@pytest.mark.slow
def test_pipe_stop_cancels_the_chats_job(job_bridge, tmp_path):
    server, base = job_bridge
    data = write_jsonl(tmp_path / "facts.jsonl", qa_rows(FACTS))
    files = FileServer({"f2": data}, token="tok")

    async def scenario():
        p = make_pipe(server, base)
        body, meta = turn("fine-tune on this as long-ft, max_steps=100000 logging_steps=1 "
                          "save_steps=3 max_len=64 batch_size=2", files=[attachment("f2", "facts.jsonl")])
        rec, pieces = Recorder(), []

        async def first():
            async for piece in p.pipe(body, __user__={"id": "u1", "role": "user"}, __metadata__=meta,
                                      __event_emitter__=rec, __request__=ChatRequest(files.url, "tok")):
                pieces.append(piece)

        task = asyncio.create_task(first())
        for _ in range(600):  # until a few steps ran
            await asyncio.sleep(0.25)
            if sum(s.startswith("step ") for s in rec.statuses()) >= 3 or task.done():
                break
        assert not task.done(), "".join(pieces)
        so_far = "".join(pieces)
        stop_body, stop_meta = turn("stop", history=[{"role": "assistant", "content": so_far}])
        stopped, stop_rec = await collect(make_pipe(server, base), stop_body, stop_meta)
        await asyncio.wait_for(task, 120)
        return so_far, "".join(pieces), stopped, stop_rec

    try:
        so_far, whole, stopped, stop_rec = asyncio.run(scenario())
    finally:
        files.stop()
    job_id = owpipe.JOB_REF.search(so_far).group(1)
    assert stopped.startswith(f"Stopped job `{job_id}` at step ")
    assert "say **resume** to continue it" in stopped
    assert stop_rec.statuses() == [f"stopping job {job_id}", f"job {job_id} cancelled"]
    # the first reply, still following, ends with the cancellation
    assert "**Cancelled** at step " in whole and f"continue job `{job_id}`" in whole


def test_pipe_refuses_a_file_it_cannot_train_on(job_bridge):
    server, base = job_bridge
    body, meta = turn("fine-tune on this", files=[attachment("x", "notes.txt")])
    text, _ = asyncio.run(collect(make_pipe(server, base), body, meta))
    assert "the attached `notes.txt` is none of those" in text


def test_a_job_the_bridge_refuses_is_reported_with_its_reason(job_bridge, tmp_path):
    server, base = job_bridge
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS))
    files = FileServer({"f3": data}, token="tok")
    try:
        body, meta = turn("fine-tune on this as x, lerning_rate=0.1", files=[attachment("f3", "d.jsonl")])
        text, rec = asyncio.run(collect(make_pipe(server, base), body, meta, ChatRequest(files.url, "tok")))
        # and one whose attachment Open WebUI will not hand over
        body, meta = turn("fine-tune on this", files=[attachment("f3", "d.jsonl")])
        denied, _ = asyncio.run(collect(make_pipe(server, base), body, meta, ChatRequest(files.url, "other")))
    finally:
        files.stop()
    assert "**Error:** starting the job: the bridge answered 400: job: unknown key 'lerning_rate'" in text
    assert rec.events[-1]["data"]["done"] is True
    assert "**Error:** cannot read the attached file from Open WebUI" in denied and "401" in denied


# --- issue #21: each Open WebUI user sees their own jobs ---------------------------------------
def test_the_pipe_acts_for_the_open_webui_user_it_is_given(tmp_path):
    """The Pipe passes the user's id and role with every request: a user's `status` finds
    only their own jobs (before, everyone behind Open WebUI saw the newest job of anyone)."""
    import httpx

    server = Server(tmp_path / "home")
    try:
        data = "".join(json.dumps(r) + "\n" for r in qa_rows(FACTS)).encode()
        up = httpx.post(f"{server.url}/api/ft/uploads", params={"filename": "d.jsonl"},
                        content=data).json()
        job = {"name": "x", "base": "deepseek-r1:1.5b", "data": up["data"], "max_steps": 1}
        theirs = httpx.post(f"{server.url}/api/ft/jobs", json=job,
                            headers={"X-Ollama-Ft-User": "u2", "X-Ollama-Ft-Role": "user"}).json()

        async def status(user):
            p = owpipe.Pipe()
            p.valves.bridge_url = server.url
            body, meta = turn("status")
            return "".join([x async for x in p.pipe(body, __user__=user, __metadata__=meta)])

        assert "There is no training job to report on yet" in asyncio.run(status({"id": "u1", "role": "user"}))
        assert f"job `{theirs['id']}`" in asyncio.run(status({"id": "u2", "role": "user"}))
        assert f"job `{theirs['id']}`" in asyncio.run(status({"id": "a", "role": "admin"}))
        assert "There is no training job" in asyncio.run(status(None))  # nobody: not the operator
        httpx.delete(f"{server.url}/api/ft/jobs/{theirs['id']}", timeout=120)
    finally:
        server.stop()


def test_user_headers_from_open_webuis_user():
    assert owpipe.user_headers({"id": "3f2a-uuid", "role": "admin", "name": "A"}) == {
        "X-Ollama-Ft-User": "3f2a-uuid", "X-Ollama-Ft-Role": "admin"}
    assert owpipe.user_headers({"id": "x", "role": "pending"})["X-Ollama-Ft-Role"] == "user"
    assert owpipe.user_headers({})["X-Ollama-Ft-User"] == "anonymous"
    b = owpipe.Bridge("http://127.0.0.1:1", "k", user={"id": "u1", "role": "user"})
    assert b.headers == {"Authorization": "Bearer k", "X-Ollama-Ft-User": "u1",
                         "X-Ollama-Ft-Role": "user"}
