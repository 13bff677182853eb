#!/usr/bin/env python
"""Load test of the bridge: N concurrent chats over two models while a training job runs
and a model is being registered (and deleted, and registered again) beside them.

Everything is real and on loopback: `ollama-ft serve --embedded` in its own process, two
models exported from a trained run (Q4_K_M and F16), a training job through the jobs API,
and `ollama-ft register` of the same run in a loop. Each chat asks one of the trained
questions at temperature 0, so its answer is known beforehand (the answer of a sequential
chat to the same model): a reply with another model's or another question's answer is a
mix-up. A reply is either that answer or Ollama's 503 "server busy" (the queue is bounded
by OLLAMA_MAX_QUEUE); anything else counts as an error. Afterwards every layer of every
manifest must still be in the store ("no blob lost") and both models must still answer.

Also measured while the chats wait: how long /api/tags takes and how many threads the
bridge process holds (a queued request should hold none).

With --soak SECONDS it is a soak instead (issue #21): for that long, --clients streaming
chats over the two models, a client uploading blobs (1-8 MiB) and data files, and a
training job, while the bridge's RSS, threads and open files are sampled every 5 s and
/api/version is timed. The bridge cleans on a short timer meanwhile (unreferenced blobs
older than a minute, every 30 s), so the uploads do not pile up. Reported: requests and
errors per kind, latency percentiles, 503s, and RSS over time (first and last minute).

Usage:
  python scripts/bench_serve_load.py [--chats 64] [--run RUN] [--base BASE]
                                     [--json out.json] [--markdown out.md]
  python scripts/bench_serve_load.py --soak 300 [--clients 4] [--run RUN] [--json out.json]
Without --run it builds a tiny R1-Distill-Qwen-shaped model and trains it on the demo
sample first (about a minute on 2 cores). Timings go to docs/benchmarks.md; the test
(tests/test_bridge_load.py) asserts only the outcomes, never the times.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_run(work: Path) -> Path:
    """A tiny model trained on the demo's sample facts, exported to F16 and Q4_K_M."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.tinymodel import build_tiny_model
    from ollama_ft.train.trainer import train_stage

    base = build_tiny_model(work / "base", tokenizer="deepseek-r1-distill-qwen-7b", arch="qwen2",
                            hidden=128)
    cfg = RunConfig(name="load", base=str(base), data=str(ROOT / "ollama_ft/demo/sample.jsonl"),
                    output_dir=str(work / "run"), max_steps=60, save_steps=60, lr=3e-3,
                    batch_size=4, warmup=0, lora_dropout=0.0, seed=0, max_len=128,
                    logging_steps=10).validate()
    train_stage(cfg, log=lambda *a: None)
    export_stage(cfg.run_dir, quants=["f16", "q4_k_m"], log=lambda *a: None)
    return cfg.run_dir


def questions_of(run: Path) -> tuple[list[str], Path, str, str]:
    """(user questions, data file, base, chat format) of a run."""
    import yaml

    cfg = yaml.safe_load((run / "run.yaml").read_text())
    data = Path(cfg["data"])
    qs = []
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.strip():
            msgs = json.loads(line)["messages"]
            qs.append(next(m["content"] for m in msgs if m["role"] == "user"))
    return qs, data, cfg["base"], cfg.get("chat_format") or "deepseek-r1"


class Bridge:
    def __init__(self, home: Path, data_dir: Path, env: dict):
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home.parent / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollama_ft", "serve", "--embedded", "--listen",
             f"127.0.0.1:{self.port}", "--home", str(home), "--data-dir", str(data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"serve exited: {Path(self.log.name).read_text()}")
                time.sleep(0.2)
        raise SystemExit("serve did not start")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def create(url: str, name: str, gguf: Path, fmt: str) -> None:
    import ollama

    from ollama_ft.ollama.templates import template_for

    client = ollama.Client(host=url, timeout=600)
    digest = client.create_blob(gguf)
    template, params = template_for(fmt)
    for _ in client.create(model=name, files={"model.gguf": digest}, template=template,
                           parameters={**params, "temperature": 0}, stream=True):
        pass


def chat(url: str, model: str, question: str, timeout: float = 900) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/api/chat", timeout=timeout, json={
        "model": model, "stream": False,
        "messages": [{"role": "user", "content": question}]})
    dt = time.perf_counter() - t0
    body = r.json()
    text = body.get("message", {}).get("content", "") if r.status_code == 200 else body.get("error", "")
    return r.status_code, text, dt


def store_intact(home: Path) -> list[str]:
    """Layers named by a manifest that are missing from the store."""
    models = home / "models"
    missing = []
    for p in (models / "manifests").glob("*/*/*/*"):
        if p.is_file() and not p.name.startswith("."):
            m = json.loads(p.read_text())
            for layer in [m["config"], *m.get("layers", [])]:
                if not (models / "blobs" / layer["digest"].replace(":", "-")).is_file():
                    missing.append(f"{p.relative_to(models / 'manifests')}: {layer['digest']}")
    return missing


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else 0.0


def start(bridge, models: dict, fmt, qs, data: Path, base: str, job: dict) -> tuple[dict, dict]:
    """Create the models, take each one's answer to each question (one chat at a time: the
    answers a mixed-up reply would differ from), and start a training job on `data`."""
    for name, gguf in models.items():
        create(bridge.url, name, gguf, fmt)
    expected = {}
    for name in models:
        for q in qs:
            status, text, _ = chat(bridge.url, name, q)
            assert status == 200, text
            expected[name, q] = text
    up = httpx.post(f"{bridge.url}/api/ft/uploads", params={"filename": "data.jsonl"},
                    content=data.read_bytes(), timeout=60).json()
    r = httpx.post(f"{bridge.url}/api/ft/jobs", timeout=60, json={
        "base": base, "data": up["data"], "max_steps": 100000, "batch_size": 2, "max_len": 64,
        **job})
    if r.status_code != 201:
        raise SystemExit(f"the training job was refused: {r.text}")
    return expected, r.json()


def run_load(run: Path, work: Path, chats: int, max_queue: int | None, seed: int = 0,
             log=print) -> dict:
    qs, data, base, fmt = questions_of(run)
    home = work / "home"
    env = {"OLLAMA_MAX_QUEUE": str(max_queue)} if max_queue is not None else {}
    bridge = Bridge(home, Path(base).parent, env)  # jobs may read the local base there
    models = {"load-q4": run / "model-q4_k_m.gguf", "load-f16": run / "model-f16.gguf"}
    out: dict = {"chats": chats, "max_queue": max_queue, "cpus": os.cpu_count()}
    try:
        log("reference answers (one chat at a time) ...")
        # beside the chats: a training job and register/delete/register of the same run
        expected, job = start(bridge, models, fmt, qs, data, base,
                              {"name": "loadjob", "save_steps": 20, "logging_steps": 1})
        stop = threading.Event()
        registered = []

        def register_loop():
            env2 = {**os.environ, "OLLAMA_HOST": bridge.url}
            while not stop.is_set():
                r = subprocess.run([sys.executable, "-m", "ollama_ft", "register", str(run),
                                    "--name", "load-reg", "--quant", "q4_k_m"], env=env2,
                                   capture_output=True, text=True)
                registered.append(r.returncode)
                if r.returncode == 0 and not stop.is_set():
                    httpx.request("DELETE", f"{bridge.url}/api/delete", json={"model": "load-reg"},
                                  timeout=60)
        reg = threading.Thread(target=register_loop)
        reg.start()
        deadline = time.time() + 600
        while time.time() < deadline:  # the job is training (a step done) before the chats
            j = httpx.get(f"{bridge.url}/api/ft/jobs/{job['id']}").json()
            if j["state"] not in ("queued", "running") or (j.get("progress") or {}).get("step"):
                break
            time.sleep(0.2)
        log(f"{chats} concurrent chats over {len(models)} models, with a training job and a "
            "registration running ...")
        rng = random.Random(seed)
        plan = [(rng.choice(list(models)), rng.choice(qs)) for _ in range(chats)]
        barrier = threading.Barrier(chats + 1)
        threads_seen, tags_s = [], []

        def one(mq):
            barrier.wait()
            return chat(bridge.url, *mq)

        with cf.ThreadPoolExecutor(chats) as pool:
            futs = [pool.submit(one, mq) for mq in plan]
            barrier.wait()
            t0 = time.perf_counter()
            while not all(f.done() for f in futs):  # the bridge while chats wait
                threads_seen.append(bridge.threads())
                t = time.perf_counter()
                httpx.get(f"{bridge.url}/api/tags", timeout=600)
                tags_s.append(time.perf_counter() - t)
                time.sleep(0.25)
            wall = time.perf_counter() - t0
            results = [f.result() for f in futs]
        stop.set()
        reg.join()
        ok = [dt for (s, _, dt) in results if s == 200]
        busy = sum(1 for (s, text, _) in results if s == 503 and text == BUSY)
        mixed = sum(1 for (mq, (s, text, _)) in zip(plan, results) if s == 200 and text != expected[mq])
        errors = [f"{s}: {text[:120]}" for (s, text, _) in results if s not in (200, 503)
                  or (s == 503 and text != BUSY)]
        job_state = httpx.get(f"{bridge.url}/api/ft/jobs/{job['id']}").json()
        httpx.delete(f"{bridge.url}/api/ft/jobs/{job['id']}", timeout=120)
        after = {name: chat(bridge.url, name, qs[0])[1] == expected[name, qs[0]] for name in models}
        out.update(
            answered=len(ok), busy_503=busy, mixed_up=mixed, errors=errors, wall_s=round(wall, 2),
            p50_s=round(percentile(ok, 0.5), 3), p95_s=round(percentile(ok, 0.95), 3),
            max_s=round(max(ok, default=0), 3),
            tags_p50_s=round(percentile(tags_s, 0.5), 3), tags_max_s=round(max(tags_s, default=0), 3),
            bridge_threads_max=max(threads_seen, default=0),
            job_state_during=job_state["state"], job_step=job_state.get("progress", {}).get("step"),
            registrations=len(registered), registrations_failed=sum(1 for r in registered if r),
            missing_blobs=store_intact(home), models_answer_after=all(after.values()))
    finally:
        bridge.stop()
    return out


# --- the soak ---------------------------------------------------------------------------------
class Tally:
    """Latencies and outcomes per kind of request, from several threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []

    def add(self, kind: str, outcome: str, seconds: float | None = None, error: str = ""):
        with self.lock:
            c = self.counts.setdefault(kind, {})
            c[outcome] = c.get(outcome, 0) + 1
            if seconds is not None and outcome == "ok":
                self.seconds.setdefault(kind, []).append(seconds)
            if error and len(self.errors) < 50:
                self.errors.append(f"{kind}: {error[:200]}")

    def summary(self) -> dict:
        out = {}
        for kind, c in sorted(self.counts.items()):
            xs = self.seconds.get(kind, [])
            out[kind] = {**c, **({f"p{int(q * 100)}_s": round(percentile(xs, q), 4)
                                  for q in (0.5, 0.95, 0.99)} if xs else {}),
                         "max_s": round(max(xs, default=0), 4)}
        return out


def stream_chat(url: str, model: str, question: str) -> tuple[int, str, float, float]:
    """(status, text or error, first-chunk seconds, total seconds) of a streaming chat."""
    t0 = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", f"{url}/api/chat", timeout=300, json={
            "model": model, "messages": [{"role": "user", "content": question}]}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json().get("error", ""), 0.0, time.perf_counter() - t0
        for line in r.iter_lines():
            if not line.strip():
                continue
            if first is None:
                first = time.perf_counter() - t0
            ev = json.loads(line)
            if "error" in ev:
                return 500, ev["error"], first, time.perf_counter() - t0
            text.append(ev.get("message", {}).get("content", ""))
    return 200, "".join(text), first or 0.0, time.perf_counter() - t0


def run_soak(run: Path, work: Path, seconds: float, clients: int, seed: int = 0, log=print) -> dict:
    import psutil

    qs, data, base, fmt = questions_of(run)
    home = work / "home"
    env = {"OLLAMA_FT_BLOB_MAX_AGE": "60", "OLLAMA_FT_CLEAN_INTERVAL": "30"}
    bridge = Bridge(home, Path(base).parent, env)
    models = {"load-q4": run / "model-q4_k_m.gguf", "load-f16": run / "model-f16.gguf"}
    tally, samples = Tally(), []
    out: dict = {"soak_s": seconds, "clients": clients, "cpus": os.cpu_count()}
    proc = psutil.Process(bridge.proc.pid)
    try:
        expected, job = start(bridge, models, fmt, qs, data, base,
                              {"name": "soakjob", "save_steps": 50, "logging_steps": 5})
        stop = threading.Event()
        t_start = time.perf_counter()
        end = t_start + seconds

        def chatter(i):
            rng = random.Random(seed + i)
            while not stop.is_set() and time.perf_counter() < end:
                model, q = rng.choice(list(models)), rng.choice(qs)
                try:
                    status, text, first, total = stream_chat(bridge.url, model, q)
                except httpx.HTTPError as e:
                    tally.add("chat", "error", error=f"{type(e).__name__}: {e}")
                    continue
                if status == 200 and text == expected[model, q]:
                    tally.add("chat", "ok", total)
                    tally.add("chat_first_chunk", "ok", first)
                elif status == 200:
                    tally.add("chat", "mixed_up", error=text)
                elif status == 503:
                    tally.add("chat", "busy_503")
                else:
                    tally.add("chat", "error", error=f"{status}: {text}")

        def uploader():
            rng = random.Random(seed + 100)
            n = 0
            while not stop.is_set() and time.perf_counter() < end:
                n += 1
                blob = rng.randbytes(rng.randint(1, 8) << 20)
                digest = "sha256:" + __import__("hashlib").sha256(blob).hexdigest()
                kind, url = (("blob", f"{bridge.url}/api/blobs/{digest}") if n % 4 else
                             ("data_upload", f"{bridge.url}/api/ft/uploads?filename=d{n}.jsonl"))
                t = time.perf_counter()
                try:
                    r = httpx.post(url, content=blob, timeout=300)
                except httpx.HTTPError as e:
                    tally.add(kind, "error", error=f"{type(e).__name__}: {e}")
                    continue
                took = time.perf_counter() - t
                if r.status_code in (200, 201):
                    tally.add(kind, "ok", took)
                elif r.status_code == 503:
                    tally.add(kind, "busy_503")
                else:
                    tally.add(kind, "error", error=f"{r.status_code}: {r.text}")
                time.sleep(0.5)

        def sampler():  # /api/version every second; memory, threads, files every 5 s
            n = 0
            while not stop.is_set() and time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    ok = httpx.get(f"{bridge.url}/api/version", timeout=30).status_code == 200
                    tally.add("version", "ok" if ok else "error", time.perf_counter() - t)
                except httpx.HTTPError as e:
                    tally.add("version", "error", error=f"{type(e).__name__}: {e}")
                n += 1
                if n % 5 != 1:
                    stop.wait(1)
                    continue
                try:
                    jstate = httpx.get(f"{bridge.url}/api/ft/jobs/{job['id']}", timeout=30).json()
                except httpx.HTTPError:
                    jstate = {}
                try:
                    mem = proc.memory_info().rss
                    samples.append({"t_s": round(t - t_start, 1), "rss_mb": round(mem / 2**20, 1),
                                    "threads": proc.num_threads(), "fds": proc.num_fds(),
                                    "job": jstate.get("state"),
                                    "job_step": (jstate.get("progress") or {}).get("step")})
                except psutil.Error:
                    pass
                stop.wait(1)

        threads = [threading.Thread(target=chatter, args=(i,)) for i in range(clients)]
        threads += [threading.Thread(target=uploader), threading.Thread(target=sampler)]
        log(f"soak: {seconds:.0f} s of {clients} chat clients, uploads and a training job ...")
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 600)
        stop.set()
        final = httpx.get(f"{bridge.url}/api/ft/jobs/{job['id']}", timeout=60).json()
        httpx.delete(f"{bridge.url}/api/ft/jobs/{job['id']}", timeout=120)
        first_min = [s["rss_mb"] for s in samples if s["t_s"] <= 60]
        last_min = [s["rss_mb"] for s in samples if s["t_s"] >= seconds - 60]
        out.update(requests=tally.summary(), errors=tally.errors, samples=samples,
                   rss_first_min_mb=[min(first_min, default=0), max(first_min, default=0)],
                   rss_last_min_mb=[min(last_min, default=0), max(last_min, default=0)],
                   job_state_end=final.get("state"),
                   job_step_end=(final.get("progress") or {}).get("step"),
                   missing_blobs=store_intact(home),
                   models_answer_after=all(chat(bridge.url, n, qs[0])[1] == expected[n, qs[0]]
                                           for n in models))
    finally:
        bridge.stop()
    return out


def soak_markdown(r: dict) -> str:
    rows = ["| kind | ok | 503 | errors | p50 | p95 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for kind, c in r["requests"].items():
        rows.append(f"| {kind} | {c.get('ok', 0)} | {c.get('busy_503', 0)} | "
                    f"{c.get('error', 0) + c.get('mixed_up', 0)} | {c.get('p50_s', 0):.3f} s | "
                    f"{c.get('p95_s', 0):.3f} s | {c.get('p99_s', 0):.3f} s | {c.get('max_s', 0):.3f} s |")
    rss = ["", "| t (s) | RSS (MiB) | threads | fds | job | step |", "|---|---|---|---|---|---|"]
    for s in r["samples"][::6] + r["samples"][-1:]:
        rss.append(f"| {s['t_s']} | {s['rss_mb']} | {s['threads']} | {s['fds']} | {s['job']} | "
                   f"{s['job_step']} |")
    return "\n".join(rows + rss + [
        "", f"{r['soak_s']:.0f} s, {r['clients']} chat clients, {r['cpus']} CPUs; RSS first minute "
        f"{r['rss_first_min_mb'][0]}-{r['rss_first_min_mb'][1]} MiB, last minute "
        f"{r['rss_last_min_mb'][0]}-{r['rss_last_min_mb'][1]} MiB; errors {len(r['errors'])}; "
        f"blobs lost {len(r['missing_blobs'])}; models answer after: {r['models_answer_after']}; "
        f"job {r['job_state_end']} at step {r['job_step_end']}."])


def markdown(r: dict) -> str:
    return "\n".join([
        "| chats | answered | 503 busy | mixed up | errors | p50 | p95 | max | /api/tags max "
        "| bridge threads (max) | registrations (failed) | blobs lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['chats']} | {r['answered']} | {r['busy_503']} | {r['mixed_up']} | {len(r['errors'])} "
        f"| {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['max_s']:.2f} s | {r['tags_max_s']:.2f} s "
        f"| {r['bridge_threads_max']} | {r['registrations']} ({r['registrations_failed']}) "
        f"| {len(r['missing_blobs'])} |",
        "", f"{r['cpus']} CPUs, {platform.processor() or platform.machine()}, OLLAMA_MAX_QUEUE="
        f"{r['max_queue'] or 'default (512)'}; the training job was `{r['job_state_during']}` "
        f"(step {r['job_step']}) when the chats ended."])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chats", type=int, default=64)
    ap.add_argument("--run", type=Path, help="an exported run (model-f16.gguf, model-q4_k_m.gguf)")
    ap.add_argument("--max-queue", type=int, help="OLLAMA_MAX_QUEUE for the bridge")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="a soak of this length instead")
    ap.add_argument("--clients", type=int, default=4, help="chat clients of the soak")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="ollama-ft-load-"))
    work.mkdir(parents=True, exist_ok=True)
    run = a.run or build_run(work)
    if a.soak:
        r = run_soak(run, work, a.soak, a.clients)
        md = soak_markdown(r)
    else:
        r = run_load(run, work, a.chats, a.max_queue)
        md = markdown(r)
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=2))
    print(md)
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    if a.markdown:
        a.markdown.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
