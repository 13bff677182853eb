"""Against a real Ollama daemon and its CLI: register, run and answer exactly as trained.

Opt-in: set OLLAMA_FT_TEST_OLLAMA to an `ollama` binary (e.g. `$(command -v ollama)`); the
tests start their own `ollama serve` on a free loopback port with its own HOME and
OLLAMA_MODELS, so a daemon of yours is never touched. Skipped otherwise (CI has no Ollama).

For every family (R1-Distill-Qwen, R1-Distill-Llama, R1-0528-Qwen3, coder, llm) a tiny model
is trained on FACTS, exported (q8_0, q4_k_m and the adapter form: ADAPTER on the base GGUF)
and registered with `ollama-ft register`. Then:
  - register exits 0 and says which template the daemon uses and that it renders the
    probe as training did, token for token;
  - /api/show holds our TEMPLATE (not the GGUF's Jinja), thinking for the R1 families;
  - for every question, with think unset, true and false: the daemon's render of the chat
    (`_debug_render_only`) tokenizes to the ids training used, `prompt_eval_count` agrees,
    and the greedy /api/chat answer equals the merged PyTorch model's greedy continuation
    of those ids, split into `thinking` and `content` as Ollama does for its deepseek-r1;
  - `ollama run NAME "question"` prints the trained answer;
  - register's fallback (`ollama create NAME -f RUN/Modelfile`) works with the real CLI.
See docs/ollama-compat.md for the versions this ran against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EXPECTED_FORMAT, FACTS, free_port, qa_rows, write_jsonl
from realollama import ollama, ollama_ft, requires_ollama  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, requires_ollama]

FAMILY_NAMES = ["r1-qwen", "r1-llama", "r1-qwen3", "coder-instruct", "llm-chat", "v2-lite", "r1-v3"]
MLA = ("v2-lite", "r1-v3")  # GGUF deepseek2: no adapter.gguf form (llama.cpp applies no LoRA to MLA)
FORMS = {"q8_0": ["--quant", "q8_0"], "q4_k_m": ["--quant", "q4_k_m"],
         "adapter": ["--quant", "q8_0", "--adapter"]}
NUM_PREDICT = 48
GREEDY = {"temperature": 0, "seed": 0, "num_predict": NUM_PREDICT}


class Reference:
    """The merged PyTorch model of a run (fp32), its tokenizer and chat format."""

    def __init__(self, base: Path, run_dir: Path, fmt_name: str):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ollama_ft.chat_formats import FORMATS

        self.tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        from ollama_ft import catalog
        from ollama_ft.train.lora import exact_targets

        arch = catalog.short_name(json.loads((Path(base) / "config.json").read_text())["architectures"][0])
        with exact_targets(arch):
            self.model = PeftModel.from_pretrained(model, run_dir / "adapter").merge_and_unload().eval()
        self.fmt = FORMATS[fmt_name]

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def continue_greedy(self, ids: list[int]) -> str:
        """The greedy continuation as text, ended where Ollama's stops end it."""
        from ollama_ft.train.generate import greedy_continuation

        text = greedy_continuation(self.model, self.tok, self.fmt, ids, NUM_PREDICT)
        for stop in self.fmt.stops:  # text stops (deepseek-llm's "User:") too
            text = text.split(stop)[0]
        return text


@pytest.fixture(scope="module")
def family_run(tiny_base, tmp_path_factory):
    """family -> (run_dir, Reference): trained on FACTS, exported in every form."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.trainer import train_stage

    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        root = tmp_path_factory.mktemp(f"real-{family}")
        data = write_jsonl(root / "facts.jsonl", qa_rows(FACTS))
        base = tiny_base(family, hidden=128)
        cfg = RunConfig(name=f"ft-{family}", base=str(base), data=str(data),
                        output_dir=str(root / "run"), max_steps=80, save_steps=80, lr=3e-3,
                        batch_size=4, warmup=0, lora_dropout=0.0, seed=0, max_len=128,
                        logging_steps=20).validate()
        train_stage(cfg, log=lambda *a: None)
        export_stage(cfg.run_dir, quants=["q8_0", "q4_k_m"], log=lambda *a: None)
        if family not in MLA:  # a LoRA on the MLA projections has no adapter.gguf form
            export_stage(cfg.run_dir, quants=["q8_0"], adapter_only=True, log=lambda *a: None)
        ref = Reference(base, cfg.run_dir, EXPECTED_FORMAT[family])
        # trained until it answers: the PyTorch model gives every trained answer
        from ollama_ft.chat_formats import Message

        for q, a in FACTS:
            ids = ref.ids(ref.fmt.render_prompt([Message("user", q)]))
            _, content = split_like_ollama(ref.continue_greedy(ids), ref.fmt, think=True)
            assert content.strip() == a, (family, q, content)
        cache[family] = (cfg.run_dir, ref)
        return cache[family]

    return get


def split_like_ollama(text: str, fmt, think) -> tuple[str, str]:
    """(thinking, content) of generated text, by the rules of Ollama's thinking parser
    (thinking/parser.go) for a TEMPLATE with <think> tags: with thinking on, a prompt ending
    in the opening tag starts inside the block, otherwise the output must open it; leading
    whitespace of the thinking and of the content after the closing tag is dropped."""
    if not fmt.thinking or think is False:
        return "", text
    inside = fmt.render_prompt([]).rstrip().endswith("<think>")  # R1: yes; R1-0528: no
    rest = text.lstrip()
    if not inside:
        if not rest.startswith("<think>"):
            return "", text
        rest = rest[len("<think>"):]
    rest = rest.lstrip()
    if "</think>" not in rest:
        return rest, ""
    thinking, content = rest.split("</think>", 1)
    return thinking, content.lstrip()


def no_adapters_here(ollama, family, form) -> bool:
    """Before 0.30 Ollama ran qwen3 in its Go engine, which could not apply LoRA adapters.
    DeepSeek-V2's adapter form is refused by export (llama.cpp applies no LoRA to its MLA
    projections; tests/test_deepseek2.py)."""
    if form == "adapter" and family in MLA:
        return True
    major, minor = (int(x) for x in ollama.version.split(".")[:2])
    return form == "adapter" and EXPECTED_FORMAT[family] == "deepseek-r1-0528" and \
        (major, minor) < (0, 30)


class Registered:
    def __init__(self, ollama, run_dir: Path, ref: Reference, name: str, form: str):
        self.name, self.run_dir, self.ref = name, run_dir, ref
        self.proc = ollama_ft("register", str(run_dir), "--name", name, "--host", ollama.host,
                              *FORMS[form])
        self.report = json.loads((run_dir / "report.json").read_text()).get("register", {})


@pytest.fixture(scope="module")
def registered(ollama, family_run):
    """(family, form) -> Registered: `ollama-ft register` run once for that form."""
    cache = {}

    def get(family, form):
        if (family, form) not in cache:
            run_dir, ref = family_run(family)
            cache[family, form] = Registered(ollama, run_dir, ref,
                                             f"ft-{family}-{form.replace('_', '')}", form)
        return cache[family, form]

    return get


# --- registration --------------------------------------------------------------------------

@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_register_exits_0_and_knows_what_ollama_uses(ollama, registered, family, form):
    from ollama_ft.ollama.templates import template_for

    if form == "adapter" and family in MLA:
        pytest.skip("no adapter.gguf for DeepSeek-V2/V3 (refused by export: tests/test_deepseek2.py)")
    reg = registered(family, form)
    name, proc, report = reg.name, reg.proc, reg.report
    if no_adapters_here(ollama, family, form):  # refused, and the user is told why
        assert proc.returncode == 2 and "register the merged GGUF" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = report["verification"]
    assert v["template"] == "modelfile TEMPLATE", v
    assert v["prompt"] == "rendered prompt equals training's, token for token", v
    assert "ollama run " + name in proc.stdout + proc.stderr
    show = ollama.post("/api/show", {"model": name}).json()
    fmt_name = EXPECTED_FORMAT[family]
    assert show["template"] == template_for(fmt_name)[0]
    caps = set(show["capabilities"])
    assert "tools" not in caps and "completion" in caps
    assert ("thinking" in caps) == fmt_name.startswith("deepseek-r1"), caps
    assert report["ollama_version"] == ollama.version
    if form == "adapter":
        assert report["adapter"] == "./adapter.gguf" and report["from"] == "./base-q8_0.gguf"


def test_adapters_of_one_base_share_its_blob(ollama, registered, family_run, tmp_path):
    """A second adapter on the same base uploads only its adapter: the base blob is there."""
    from ollama_ft.config import RunConfig
    from ollama_ft.export import export_stage
    from ollama_ft.train.trainer import train_stage

    registered("r1-qwen", "adapter")
    first_run, _ = family_run("r1-qwen")
    base = json.loads((first_run / "report.json").read_text())["train"]["base_path"]
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(FACTS[:2]))
    cfg = RunConfig(name="ft-second", base=base, data=str(data), output_dir=str(tmp_path / "run"),
                    max_steps=4, save_steps=4, lr=3e-3, batch_size=2, warmup=0, seed=1,
                    max_len=128).validate()
    train_stage(cfg, log=lambda *a: None)
    export_stage(cfg.run_dir, quants=["q8_0"], adapter_only=True, log=lambda *a: None)
    assert (cfg.run_dir / "base-q8_0.gguf").read_bytes() == (first_run / "base-q8_0.gguf").read_bytes()
    proc = ollama_ft("register", str(cfg.run_dir), "--name", "ft-second", "--host", ollama.host,
                     "--adapter", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reg = json.loads((cfg.run_dir / "report.json").read_text())["register"]
    assert reg["skipped"] == ["base-q8_0.gguf"] and reg["uploaded"] == ["adapter.gguf"]


# --- answers -------------------------------------------------------------------------------

def _expected_prompt(fmt, conv, think) -> str:
    """What training renders before the answer: the inference prompt, or with thinking off
    the training text up to the answer (an empty think block)."""
    from ollama_ft.chat_formats import Message

    if think is False and fmt.thinking:
        marker = "\x00ANSWER"
        text = "".join(t for t, _ in fmt.render_training(conv + [Message("assistant", marker)]))
        return text.split(marker)[0]
    return fmt.render_prompt(conv)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_answers_equal_pytorch_for_every_question_and_think_mode(ollama, registered,
                                                                   family, form):
    from ollama_ft.chat_formats import Message

    if no_adapters_here(ollama, family, form):
        pytest.skip(f"Ollama {ollama.version} cannot apply adapters to qwen3, nor llama.cpp to "
                    "DeepSeek-V2's MLA (the refusals are tested)")
    reg = registered(family, form)
    assert reg.proc.returncode == 0, reg.proc.stdout + reg.proc.stderr
    name, ref = reg.name, reg.ref
    fmt = ref.fmt
    mismatches = []
    for q, a in FACTS:
        conv = [Message("user", q)]
        for think in (None, True, False):
            body = {"model": name, "messages": [{"role": "user", "content": q}],
                    "stream": False, "options": GREEDY}
            if think is not None:
                body["think"] = think
            if think is True and not fmt.thinking:
                r = ollama.post("/api/chat", body)
                assert r.status_code == 400 and "does not support thinking" in r.json()["error"]
                continue
            rendered = ollama.post("/api/chat", {**body, "_debug_render_only": True}).json()
            prompt = rendered["_debug_info"]["rendered_template"]
            assert prompt == _expected_prompt(fmt, conv, think), (q, think)
            ids = ref.ids(prompt)
            if think is not False or not fmt.thinking:
                from ollama_ft.data.tokenize import encode

                trained = encode(ref.tok, fmt, conv + [Message("assistant", a)], None).input_ids
                assert trained[:len(ids)] == ids, (q, think)  # what training saw, id for id
            want = split_like_ollama(ref.continue_greedy(ids), fmt, think)
            r = ollama.post("/api/chat", body).json()
            got = (r["message"].get("thinking") or "", r["message"]["content"])
            assert r["prompt_eval_count"] == len(ids), (q, think)
            if got != want:
                mismatches.append((q, think, got, want))
            if fmt.thinking and think is not False:
                assert "<think>" not in got[1] and "</think>" not in got[1]
                assert got[1] == got[1].lstrip()
    assert not mismatches, mismatches


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ollama_run_prints_the_trained_answer(ollama, registered, family):
    reg = registered(family, "q8_0")
    assert reg.proc.returncode == 0
    q, a = FACTS[0]
    # the CLI samples with the model's parameters; the tiny model is sure only greedily
    run_dir = reg.run_dir
    cli_name = reg.name + "-greedy"
    reg = ollama_ft("register", str(run_dir), "--name", cli_name, "--host", ollama.host,
                    "--quant", "q8_0", "--param", "temperature=0")
    assert reg.returncode == 0, reg.stdout + reg.stderr
    out = ollama.cli("run", cli_name, q)
    assert out.returncode == 0, out.stderr
    assert a in out.stdout, out.stdout
    if EXPECTED_FORMAT[family].startswith("deepseek-r1"):
        # thinking off: the CLI prints what /api/chat answers to think:false (the prompt then
        # holds the empty think block as one piece of text: see docs/ollama-compat.md)
        api = ollama.post("/api/chat", {"model": cli_name, "stream": False, "think": False,
                                        "messages": [{"role": "user", "content": q}]}).json()
        out = ollama.cli("run", "--think=false", cli_name, q)
        assert out.returncode == 0, out.stderr
        assert api["message"]["content"].strip() in out.stdout, (out.stdout, api)


def test_registers_fallback_command_works_with_the_real_cli(ollama, family_run):
    run_dir, _ = family_run("r1-qwen")
    closed = f"127.0.0.1:{free_port()}"
    proc = ollama_ft("register", str(run_dir), "--name", "ft-fallback", "--host", closed,
                     "--quant", "q8_0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    command = next(line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                   if line.strip().startswith("ollama create "))
    assert command.startswith("ollama create ft-fallback") and \
        command.endswith(f" -f {run_dir / 'Modelfile'}"), command
    created = ollama.cli(*command.split()[1:], cwd="/")
    assert created.returncode == 0, created.stdout + created.stderr
    q, a = FACTS[1]
    r = ollama.post("/api/chat", {"model": "ft-fallback", "stream": False, "options": GREEDY,
                                  "messages": [{"role": "user", "content": q}]}).json()
    assert r["message"]["content"] == a
