"""The bridge behaves like the real daemon: the same requests to a real Ollama and to
`ollama-ft serve` holding the same models give the same JSON, timings and digests aside.

Opt-in like tests/test_real_ollama.py (OLLAMA_FT_TEST_OLLAMA). Every difference is either
fixed in the bridge or listed in KNOWN with its reason (README, "The bridge and Ollama").
"""

from __future__ import annotations

import json

import pytest
from conftest import FACTS, Server, qa_rows, write_jsonl
from realollama import ollama, ollama_ft, requires_ollama  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, requires_ollama]

# values that differ by nature between two servers: times, digests, sizes on disk
VOLATILE = {"created_at", "modified_at", "expires_at", "total_duration", "load_duration",
            "prompt_eval_duration", "eval_duration", "digest", "size", "size_vram",
            "context", "created", "system_fingerprint", "id"}

# path (with [*] for any list index) -> why the bridge differs from Ollama there
KNOWN = {
    "show.modelfile": "Ollama writes its own blob paths into the generated Modelfile",
    "show.model_info.general.file_type": "Ollama rewrites the model file at create",
    "show.model_info.general.quantization_version": "as general.file_type",
    "chat-json-ft-think.message.content": "format json: llama-server's JSON grammar and "
        "llama-cpp-python's differ; a random tiny model emits whitespace, so the texts differ",
    "chat-json-ft-think.eval_count": "as its content",
    "chat-json-ft-think.done_reason": "as its content",
    "chat-json-ft-coder.message.content": "as chat-json-ft-think",
    "chat-json-ft-coder.eval_count": "as its content",
    "chat-json-ft-coder.done_reason": "as its content",
}


def normalize(value, path=""):
    """Drop VOLATILE keys; compare orders that carry no meaning as sorted: /api/show's
    `parameters` lines (Ollama prints them in Go map order, different from run to run) and
    its `tensors` (in file order; Ollama's create rewrites the file and reorders them)."""
    if isinstance(value, dict) and isinstance(value.get("parameters"), str):
        value = {**value, "parameters": "\n".join(sorted(value["parameters"].splitlines()))}
    if isinstance(value, dict) and isinstance(value.get("tensors"), list):
        value = {**value, "tensors": sorted(value["tensors"], key=lambda t: t.get("name", ""))}
    if isinstance(value, dict):
        return {k: normalize(v, f"{path}.{k}") for k, v in sorted(value.items())
                if k not in VOLATILE}
    if isinstance(value, list):
        return [normalize(v, f"{path}[*]") for v in value]
    return value


def differences(a, b, path="") -> list[tuple[str, object, object]]:
    """(path, ollama value, bridge value) for every leaf that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a or k not in b:
                out.append((p, a.get(k, "<absent>"), b.get(k, "<absent>")))
            else:
                out += differences(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for x, y in zip(a, b) for d in differences(x, y, f"{path}[*]")]
    return [] if a == b else [(path, a, b)]


def unexplained(diffs):
    return [d for d in diffs if not any(d[0] == k or d[0].startswith(k + ".") or
                                        d[0].startswith(k + "[") for k in KNOWN)]


@pytest.fixture(scope="module")
def pair(ollama, tiny_base, tmp_path_factory):
    """(ollama, bridge): both holding ft-think (R1, thinking) and ft-coder (no thinking)."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.trainer import train_stage

    root = tmp_path_factory.mktemp("diff")
    bridge = Server(root / "bridge-home")
    data = write_jsonl(root / "facts.jsonl", qa_rows(FACTS))
    for name, family in (("ft-think", "r1-qwen"), ("ft-coder", "coder-instruct")):
        cfg = RunConfig(name=name, base=str(tiny_base(family, hidden=128)), data=str(data),
                        output_dir=str(root / name), max_steps=60, save_steps=60, lr=3e-3,
                        batch_size=4, warmup=0, lora_dropout=0.0, seed=0,
                        max_len=128).validate()
        train_stage(cfg, log=lambda *a: None)
        export_stage(cfg.run_dir, quants=["q8_0"], log=lambda *a: None)
        for host in (ollama.host, bridge.url):
            proc = ollama_ft("register", str(cfg.run_dir), "--name", name, "--host", host,
                             "--param", "temperature=0")
            assert proc.returncode == 0, proc.stdout + proc.stderr
    yield ollama, bridge
    bridge.stop()


def call(url, method, path, body=None):
    import httpx

    r = httpx.request(method, url + path, json=body, timeout=300)
    lines = r.text.strip().splitlines()
    if body and body.get("stream", True) is not False and path in ("/api/chat", "/api/generate") \
            and r.status_code == 200:
        chunks = [json.loads(line) for line in lines]
        merged = dict(chunks[-1])
        key = "message" if path == "/api/chat" else "response"
        if key == "message":
            merged["message"] = {
                "role": "assistant",
                "content": "".join(c["message"].get("content", "") for c in chunks),
                "thinking": "".join(c["message"].get("thinking", "") for c in chunks)}
        else:
            merged["response"] = "".join(c.get("response", "") for c in chunks)
            merged["thinking"] = "".join(c.get("thinking", "") for c in chunks)
        return r.status_code, {"stream_chunk_keys": sorted({k for c in chunks[:-1] for k in c}),
                               "merged": merged}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


q0 = FACTS[0][0]
REQUESTS = [
    ("tags", "GET", "/api/tags", None),
    ("version", "GET", "/api/version", None),
    ("show", "POST", "/api/show", {"model": "ft-think"}),
    ("show-coder", "POST", "/api/show", {"model": "ft-coder"}),
    ("show-unknown", "POST", "/api/show", {"model": "nope"}),
]
for model in ("ft-think", "ft-coder"):
    for think in (None, True, False):
        for stream in (False, True):
            body = {"model": model, "messages": [{"role": "user", "content": q0}],
                    "stream": stream, "options": {"temperature": 0, "num_predict": 32}}
            if think is not None:
                body["think"] = think
            REQUESTS.append((f"chat-{model}-think{think}-stream{stream}", "POST", "/api/chat", body))
    REQUESTS += [
        (f"generate-{model}", "POST", "/api/generate",
         {"model": model, "prompt": q0, "stream": False, "options": {"temperature": 0,
                                                                    "num_predict": 32}}),
        (f"generate-stream-{model}", "POST", "/api/generate",
         {"model": model, "prompt": q0, "options": {"temperature": 0, "num_predict": 32}}),
        (f"chat-stop-{model}", "POST", "/api/chat",
         {"model": model, "messages": [{"role": "user", "content": q0}], "stream": False,
          "think": False, "options": {"temperature": 0, "stop": ["capital"]}}),
        (f"chat-num-predict-{model}", "POST", "/api/chat",
         {"model": model, "messages": [{"role": "user", "content": q0}], "stream": False,
          "think": False, "options": {"temperature": 0, "num_predict": 3}}),
        (f"chat-json-{model}", "POST", "/api/chat",
         {"model": model, "messages": [{"role": "user", "content": q0}], "stream": False,
          "think": False, "format": "json", "options": {"temperature": 0, "num_predict": 16}}),
        (f"render-{model}", "POST", "/api/chat",
         {"model": model, "messages": [{"role": "user", "content": q0}], "stream": False,
          "_debug_render_only": True}),
    ]
REQUESTS += [
    ("chat-unknown", "POST", "/api/chat", {"model": "nope", "messages": [], "stream": False}),
    ("copy", "POST", "/api/copy", {"source": "ft-think", "destination": "ft-copy"}),
    ("tags-after-copy", "GET", "/api/tags", None),
    ("delete", "DELETE", "/api/delete", {"model": "ft-copy"}),
    ("delete-again", "DELETE", "/api/delete", {"model": "ft-copy"}),
    ("copy-unknown", "POST", "/api/copy", {"source": "nope", "destination": "x"}),
]


def test_the_bridge_answers_like_ollama(pair):
    ollama, bridge = pair
    report, bad = [], []
    for label, method, path, body in REQUESTS:
        sa, ja = call(ollama.url, method, path, body)
        sb, jb = call(bridge.url, method, path, body)
        prefix = label.split("-")[0] if label.split("-")[0] in ("tags", "show") else label
        diffs = [(f"{prefix}.{p}" if p else prefix, x, y)
                 for p, x, y in differences(normalize(ja), normalize(jb))]
        if label == "version":
            diffs = []  # our own version string
        if sa != sb:
            diffs.append((f"{label}.status", sa, sb))
        report.append((label, diffs))
        bad += [(label, *d) for d in unexplained(diffs)]
    for label, diffs in report:
        for d in diffs:
            print(label, d)
    assert not bad, "\n".join(map(repr, bad))
