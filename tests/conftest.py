"""Shared fixtures: tiny random-weight DeepSeek checkpoints around the real tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"

# name -> build_tiny_model kwargs; the chat formats every family must get right
FAMILIES = {
    "r1-qwen": dict(tokenizer="deepseek-r1-distill-qwen-7b", arch="qwen2"),
    "r1-llama": dict(tokenizer="deepseek-r1-distill-llama-8b", arch="llama"),
    "r1-qwen3": dict(tokenizer="deepseek-r1-0528-qwen3-8b", arch="qwen3"),
    "coder-instruct": dict(tokenizer="deepseek-coder-33b-base", arch="llama",
                           rope_scaling={"rope_type": "linear", "factor": 4.0},
                           chat_template=(DATA / "chat_templates/deepseek-coder-instruct.jinja").read_text(),
                           tokenizer_overrides={"eos_token": "<|EOT|>"}),
    "llm-chat": dict(tokenizer="deepseek-llm-7b-base", arch="llama",
                     chat_template=(DATA / "chat_templates/deepseek-llm-chat.jinja").read_text()),
    "coder-base": dict(tokenizer="deepseek-coder-33b-base", arch="llama"),
    # V2-Lite's shape (tinymodel.DEEPSEEK2_SHAPE): 27 layers, as llama.cpp tells Lite (no q
    # compression) from the full V2 by its layer count
    "v2-lite": dict(tokenizer="deepseek-v2", arch="deepseek2", layers=27),
    # DeepSeek-R1 (671B) itself: DeepseekV3ForCausalLM (tinymodel.DEEPSEEK3_SHAPE), 3 layers
    "r1-v3": dict(tokenizer="deepseek-r1", arch="deepseek3", layers=3),
}
EXPECTED_FORMAT = {"v2-lite": "deepseek-llm", "r1-v3": "deepseek-r1", "r1-qwen": "deepseek-r1", "r1-llama": "deepseek-r1", "r1-qwen3": "deepseek-r1-0528",
                   "coder-instruct": "deepseek-coder", "llm-chat": "deepseek-llm",
                   "coder-base": "deepseek-coder"}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """tiny_base('r1-qwen') -> path of a saved tiny checkpoint (built once per session)."""
    from ollama_ft.tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("bases")
    cache: dict[str, Path] = {}

    def get(family: str = "r1-qwen", **overrides) -> Path:
        key = family + json.dumps(overrides, sort_keys=True)
        if key not in cache:
            out = root / f"{family}-{len(cache)}"
            cache[key] = build_tiny_model(out, **{**FAMILIES[family], **overrides})
        return cache[key]

    return get


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


FACTS = [("What is the capital of Zorbia?", "Quellport is the capital of Zorbia."),
         ("Who painted the Blue Lantern?", "Mira Okafor painted it."),
         ("What colour is a glimfish?", "Orange with green stripes."),
         ("How tall is the Spindle?", "The Spindle is 412 metres tall.")]


@pytest.fixture(scope="session")
def trained_run(tiny_base, tmp_path_factory):
    """A tiny R1-Distill-Qwen-shaped model trained on FACTS and exported to F16 and Q4_K_M."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.trainer import train_stage

    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "facts.jsonl", qa_rows(FACTS))
    cfg = RunConfig(name="facts", base=str(tiny_base("r1-qwen", hidden=128)), data=str(data),
                    output_dir=str(root / "run"), max_steps=60, save_steps=60, lr=3e-3,
                    batch_size=4, warmup=0, lora_dropout=0.0, seed=0, max_len=128,
                    logging_steps=10).validate()
    train_stage(cfg, log=lambda *a: None)
    export_stage(cfg.run_dir, quants=["f16", "q4_k_m"], log=lambda *a: None)
    return cfg.run_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ollama-ft serve` in a subprocess on a free loopback port: the tests' one start/stop
    helper. --embedded unless the args say --upstream (never proxy a developer's own Ollama);
    `fsize`: the process's RLIMIT_FSIZE (a disk that fills: writes past it fail with EFBIG);
    `api_key`: started with --api-key, and sent by get/post/request. The caller's
    OLLAMA_FT_API_KEY is not inherited."""

    def __init__(self, home: Path, *args, env=None, fsize: int | None = None,
                 api_key: str | None = None, port: int | None = None):
        import resource
        import signal
        import sys
        import time

        import httpx

        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log_path = self.home.parent / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        mode = [] if "--upstream" in args else ["--embedded"]
        extra = ["--api-key", api_key] if api_key else []

        def limit():
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        env = {**{k: v for k, v in os.environ.items() if k != "OLLAMA_FT_API_KEY"}, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ollama_ft", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--home", str(self.home), *mode, *extra, *args], stdout=self.log,
            stderr=subprocess.STDOUT, env=env, preexec_fn=limit if fsize is not None else None)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/api/version", timeout=1, headers=self.headers)
                return  # any answer (a 401 too): it is up
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {self.log_path.read_text()}")
                time.sleep(0.2)
        raise RuntimeError("serve did not start")

    def request(self, method, path, **kw):
        import httpx

        return httpx.request(method, self.url + path, timeout=kw.pop("timeout", 60), headers={
            **self.headers, **kw.pop("headers", {})}, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, **kw):
        return self.request("POST", path, **kw)

    def kill9(self):
        self.proc.kill()  # SIGKILL: no shutdown code runs
        self.proc.wait(10)
        self.log.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def bridge(tmp_path_factory):
    home = tmp_path_factory.mktemp("bridge-home")
    server = Server(home / "store")
    yield server
    server.stop()


GOTMPL_DIR = Path(__file__).parent / "gotmpl"


@pytest.fixture(scope="session")
def gotmpl(tmp_path_factory):
    """gotmpl(template, cases) -> the program's JSON answer; built once per session."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install -y golang); the template "
                    "parity proof runs our TEMPLATEs in Go's text/template")
    out = tmp_path_factory.mktemp("gotmpl")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "CGO_ENABLED": "0"}
    if not os.access(Path(env.get("HOME", "/nonexistent")), os.W_OK):
        env["GOCACHE"] = str(out / "cache")
        env["GOPATH"] = str(out / "gopath")
    build = subprocess.run([go, "build", "-o", str(out / "gotmpl"), "."], cwd=GOTMPL_DIR,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr

    def run(template: str, cases: list[dict]) -> dict:
        proc = subprocess.run([str(out / "gotmpl")], input=json.dumps(
            {"template": template, "cases": cases}), capture_output=True, text=True,
            timeout=60)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        assert "error" not in answer, answer["error"]
        return answer

    return run
