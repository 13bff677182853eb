"""`ollama-ft demo`: a small DeepSeek-R1-shaped model learns the bundled sample dataset.

It needs no Hub: the base is built locally around the real R1 tokenizer (tinymodel.py).
Before training it answers the sample questions wrongly; after, with the trained answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from ollama_ft.quants import DEFAULT_QUANT
from ollama_ft.run import gguf_name

SAMPLE = Path(__file__).with_name("sample.jsonl")
# The LoRA trains the attention and MLP projections only; the embeddings and lm_head stay the
# base's. With every norm weight 1, a random N(0, 0.05) head over the 152k vocabulary gives
# logits of at most |h|*|w| ~ sqrt(128)*0.05*sqrt(128) = 6.4 against a log-sum-exp of the rest
# of ~12, so the loss cannot fall below ~5.8 and the trained answers win only at temperature 0.
# A final norm weight of 4 (a trained checkpoint's norm weights are learned, not 1; F32 in
# every GGUF) scales every logit by 4, so the same head gives confident logits: the facts
# train to loss ~0.002 in the same 80 steps, and the answers come back at the registered
# default sampling (temperature 0.6, top_p 0.95). Greedy answers before training are unchanged.
DEMO_BASE = dict(tokenizer="deepseek-r1-distill-qwen-7b", hidden=128, layers=2, heads=4,
                 kv_heads=2, seed=0, final_norm=4.0)
DEMO_TRAIN = dict(max_steps=80, lr=3e-3, batch_size=8, warmup=5, logging_steps=5, save_steps=40,
                  max_len=256, lora_r=16, lora_alpha=32, lora_dropout=0.0, seed=0)


def sample_questions() -> list[tuple[str, str]]:
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        out.append((msgs[0]["content"], msgs[1]["content"]))
    return out


def build_demo_base(workdir: Path, log=print) -> Path:
    from ollama_ft.tinymodel import build_tiny_model

    base = Path(workdir) / "base"
    recipe = json.dumps(DEMO_BASE, sort_keys=True)
    stamp = base / "demo-base.json"  # the recipe it was built from: an older demo's base is rebuilt
    if not (base / "config.json").is_file() or not stamp.is_file() or stamp.read_text() != recipe:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
        log(f"building a small DeepSeek-R1-Distill-Qwen-shaped base in {base} (random weights, "
            "real R1 tokenizer)")
        build_tiny_model(base, **DEMO_BASE)
        stamp.write_text(recipe)
    return base


def answers_with_torch(base: Path, adapter: Path | None, questions: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ollama_ft.chat_formats import FORMATS, Message
    from ollama_ft.train.generate import greedy_answer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    fmt = FORMATS["deepseek-r1"]
    return [greedy_answer(model, tok, fmt, [Message("user", q)], max_new_tokens=32) for q in questions]


def _answer_only(text: str) -> str:
    return text.split("</think>")[-1].strip()


def _sampling(modelfile: Path) -> str:
    from ollama_ft.ollama.modelfile import Modelfile

    mf = Modelfile.read(modelfile)
    return ", ".join(f"{k} {v}" for k, v in mf.parameters if k in ("temperature", "top_p", "top_k"))


def daemon_answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


class BridgeProcess:
    """`ollama-ft serve` in the background for as long as the demo needs it."""

    def __init__(self, listen: str):
        import subprocess
        import sys
        import time

        self.url = "http://" + listen
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_ft", "serve", "--listen", listen,
                                      "--embedded"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not daemon_answers(self.url):
            if self.proc.poll() is not None or time.time() > deadline:
                err = self.proc.stderr.read() if self.proc.poll() is not None else "timed out"
                raise RuntimeError(f"the bridge did not start: {err}")
            time.sleep(0.3)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:  # pragma: no cover
            self.proc.kill()


def answers_with_ollama(url: str, name: str, questions: list[str]) -> list[str]:
    import ollama

    client = ollama.Client(host=url)  # the model's own sampling (its Modelfile's PARAMETERs)
    return [client.chat(model=name, messages=[{"role": "user", "content": q}],
                        options={"num_predict": 48}).message.content
            for q in questions]


def run_demo(workdir: str | Path = "runs/demo", steps: int | None = None, name: str = "ollama-ft-demo",
             host: str | None = None, bridge_listen: str = "127.0.0.1:11435", log=print):
    import shutil

    from ollama_ft.config import RunConfig
    from ollama_ft.ollama.client import ollama_url
    from ollama_ft.pipeline import register_stage, run_pipeline

    workdir = Path(workdir)
    base = build_demo_base(workdir, log)
    qa = sample_questions()
    questions = [q for q, _ in qa]
    log("asking the base model before training ...")
    before = answers_with_torch(base, None, questions)
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = RunConfig(name=name, base=str(base), data=str(SAMPLE), output_dir=str(run_dir),
                    quant=DEFAULT_QUANT, register=False,
                    **{**DEMO_TRAIN, **({"max_steps": steps} if steps else {})}).validate()
    run_pipeline(cfg, log=log)  # train, export Q4_K_M, Modelfile

    url = ollama_url(host)
    bridge = None
    if daemon_answers(url):
        log(f"an Ollama daemon answers at {url}: registering there")
    else:
        log(f"no Ollama daemon at {url}: starting the ollama-ft bridge on {bridge_listen}")
        bridge = BridgeProcess(bridge_listen)
        url = bridge.url
    try:
        result = register_stage(run_dir, name, host=url, log=log)
        after = answers_with_ollama(url, result.name, questions)
    finally:
        if bridge is not None:
            bridge.stop()
    log("")
    log(f"{'question':<44} {'before (base model)':<32} after (Ollama API, {result.name})")
    right = 0
    for (q, want), b, a in zip(qa, before, after):
        ok = _answer_only(a) == want
        right += ok
        log(f"{q[:43]:<44} {_answer_only(b)[:30]!r:<32} {_answer_only(a)!r} {'✓' if ok else '✗'}")
    log(f"\n{right}/{len(qa)} answers through the Ollama API match the training data "
        f"(sampled as registered: {_sampling(run_dir / 'Modelfile')}).")
    log(f"run directory: {run_dir} (adapter/, {gguf_name(DEFAULT_QUANT)}, Modelfile, loss.png, "
        "report.json)")
    log("")
    if bridge is None:
        log(f"chat with it:   ollama run {result.name}")
        log(f"Open WebUI:     OLLAMA_BASE_URL={url} open-webui serve   (pick {result.name})")
    else:
        from ollama_ft.serve.store import default_root

        log(f"chat with it:   ollama-ft serve            # the bridge; models are kept in {default_root()}")
        log(f"                OLLAMA_HOST={url} ollama run {result.name}")
        log(f"Open WebUI:     OLLAMA_BASE_URL={url} open-webui serve   (pick {result.name})")
        log(f"with Ollama installed: ollama create {name} -f {run_dir / 'Modelfile'}")
    return {"before": before, "after": after, "right": right, "total": len(qa),
            "run_dir": run_dir, "name": result.name, "url": url, "bridge": bridge is not None}
