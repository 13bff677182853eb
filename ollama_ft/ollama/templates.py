"""Which Go TEMPLATE and parameters a DeepSeek chat format gets in Ollama, and the Modelfile
of a run.

The data lives in `ollama_ft/modelfiles/`, one pair per chat format of
`ollama_ft.chat_formats.FORMATS`: `<format>.gotmpl` (the TEMPLATE; one trailing newline is
not part of it) and `<format>.json` (default PARAMETERs, Ollama's own layout). For a
conversation that ends with a user turn, each TEMPLATE renders exactly
`FORMATS[format].render_prompt(messages)`, which is what the checkpoint's Hugging Face chat
template renders (tests/test_templates.py runs the templates in Go's text/template).

Thinking (deepseek-r1, deepseek-r1-0528): the templates reference `.Thinking` inside
`range .Messages` between literal `<think>`/`</think>`, so Ollama gives the model the
`thinking` capability and splits replies into `thinking` and `content`. Ollama's /api/chat
and /api/generate turn an unset `think` into `true` for such a model; the reply then opens
as in HF (`<｜Assistant｜><think>\\n` for R1). `think: false` starts the reply after an empty
think block (`<think>\\n\\n</think>\\n\\n`), as training renders an example without reasoning.

The Modelfile of a run (`build_modelfile`): FROM the run's first quantized GGUF by a path
relative to the run directory, the TEMPLATE, the format's stops and defaults, `num_ctx`
(see `num_ctx_for`), SYSTEM when training used one system prompt for every example, then the
user's overrides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from ollama_ft.chat_formats import FORMATS, detect_format
from ollama_ft.errors import OllamaError
from ollama_ft.ollama.modelfile import (
    LIST_PARAMETERS,
    Modelfile,
    ModelfileError,
    parameter_value,
    read_text_file,
)
from ollama_ft.quants import DEFAULT_QUANT, quant_names
from ollama_ft.run import Run, gguf_name

# ollama_ft/modelfiles/ (package data, so wheels carry it too).
MODELFILES_DIR = Path(__file__).resolve().parents[1] / "modelfiles"
# num_ctx is never set below the training length, and otherwise capped here: a longer
# context costs KV-cache memory on every load, and 8192 leaves an R1 model room for a few
# thousand tokens of reasoning. `--param num_ctx=N` (an override) wins.
NUM_CTX_CAP = 8192


class TemplateError(OllamaError):
    """No TEMPLATE for a run: unknown chat format, or a template file that cannot be used."""


def known_formats() -> str:
    return ", ".join(f"{name} ({fmt.description})" for name, fmt in FORMATS.items())


def template_for(chat_format: str) -> tuple[str, dict]:
    """(Go TEMPLATE, default parameters) of a chat format of `FORMATS`."""
    if chat_format not in FORMATS:
        raise TemplateError(f"no Ollama template for chat format {chat_format!r}; known: "
                            f"{known_formats()}; or give your own with --template FILE")
    tmpl_path = MODELFILES_DIR / f"{chat_format}.gotmpl"
    params_path = MODELFILES_DIR / f"{chat_format}.json"
    try:
        template = tmpl_path.read_text(encoding="utf-8")
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TemplateError(f"{e.filename}: missing; ollama-ft's ollama_ft/modelfiles/ data is not "
                            "installed with the package (reinstall from a source checkout)"
                            ) from None
    if template.endswith("\n"):
        template = template[:-1]
    return template, params


def resolve_chat_format(chat_format: str | None = None, chat_template: str | None = None,
                        where: str = "the base") -> str:
    """The chat format of a run: the one named (catalogue, --chat-format, the train report),
    or the one whose signature `chat_template` (the tokenizer's Jinja template) carries."""
    if chat_format:
        if chat_format not in FORMATS:
            raise TemplateError(f"{where}: unknown chat format {chat_format!r}; known: "
                                f"{known_formats()}; or give a Go template with --template FILE")
        return chat_format
    fmt = detect_format(chat_template)
    if fmt is None:
        what = "has no chat template" if not chat_template else \
            "has a chat template that matches none of the DeepSeek chat formats we know"
        raise TemplateError(f"{where} {what}; known formats: {known_formats()}. Name one with "
                            "--chat-format, or give an Ollama Go template with --template FILE")
    return fmt.name


def read_template_file(path: str | Path) -> str:
    """A user's Go template (`--template FILE`), taken as it is (a final newline included)."""
    path = Path(path)
    text = read_text_file(path, TemplateError, "--template ")
    if not text.strip():
        raise TemplateError(f"--template {path}: the file is empty")
    if text.count("{{") != text.count("}}"):
        raise TemplateError(f"--template {path}: unbalanced {{{{ and }}}}; it must be a Go "
                            "text/template as Ollama's TEMPLATE takes (see `ollama show "
                            "--template MODEL` for examples)")
    return text


def _check_bos(template: str, path) -> None:
    """Our GGUFs do not add BOS (every DeepSeek format writes it; training saw exactly one
    first), so a TEMPLATE must render it. Templates copied from elsewhere often do not."""
    from ollama_ft.chat_formats import BOS
    from ollama_ft.ollamafmt.prompt import PromptTemplate

    try:
        rendered = PromptTemplate(template).render([{"role": "user", "content": "hi"}])
    except ValueError as e:
        raise TemplateError(f"--template {path}: not a valid Go template: {e}") from None
    if not rendered.startswith(BOS):
        raise TemplateError(
            f"--template {path}: the prompt it renders does not start with {BOS} "
            f"(it starts {rendered[:40]!r}). The exported GGUF does not add BOS itself, since "
            f"training always saw it first from the chat format; begin the template with "
            f"{BOS} (before any {{{{ .System }}}}), as ollama-ft's own TEMPLATE does")


def num_ctx_for(max_len: int | None, base_context: int | None) -> int | None:
    """max(training max length, min(base context, NUM_CTX_CAP)); None when both are unknown
    (Ollama then chooses)."""
    capped = min(base_context, NUM_CTX_CAP) if base_context else None
    known = [v for v in (max_len, capped) if v]
    return max(known) if known else None


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _override_pairs(overrides) -> list[tuple[str, str]]:
    if not overrides:
        return []
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    pairs = []
    for name, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            v = _format_value(v)
            try:
                parameter_value(name, v)
            except ValueError as e:
                raise ModelfileError(f"parameter override: {e}") from None
            pairs.append((name, v))
    return pairs


def parse_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
    """`--param NAME=VALUE` flags (repeatable; `stop` may repeat) as (name, value) pairs,
    checked like Modelfile PARAMETERs."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ModelfileError(f"--param {item!r}: expected NAME=VALUE, e.g. "
                                 "temperature=0.7 or stop='<|EOT|>'")
        pairs.append((name.strip(), value))
    return _override_pairs(pairs)


def build_modelfile(chat_format: str | None, *, quant: str | Iterable[str] = DEFAULT_QUANT,
                    max_len: int | None = None, base_context: int | None = None,
                    system: str | None = None, overrides=None,
                    template_file: str | Path | None = None, adapter: str | None = None,
                    from_: str | None = None) -> Modelfile:
    """The Modelfile of a run.

    chat_format: a key of FORMATS (None only with template_file: no default stops then).
    quant: the run's quant type(s) (a list, or "q4_k_m,q8_0"); FROM is the first one's GGUF,
        `./model-<quant>.gguf`, relative to the run directory (where the Modelfile is
        written); `from_` replaces it (e.g. "./model-f16.gguf" or a model name).
    max_len / base_context: give num_ctx (`num_ctx_for`).
    system: the system prompt every training example used (None when they differed or
        had none): becomes SYSTEM, used by Ollama when a request brings no system message.
    overrides: {name: value or [values]} or [(name, value)], from flags and the config;
        each replaces the default of that name, except `stop`, whose values are added.
    template_file: a Go template to use instead of the format's.
    adapter: an ADAPTER path (relative to the run directory), e.g. "./adapter.gguf".
    """
    if template_file is not None:
        template = read_template_file(template_file)
        params: dict = {}
        if chat_format is not None:
            params = template_for(resolve_chat_format(chat_format))[1]
            _check_bos(template, template_file)
    else:
        if chat_format is None:
            raise TemplateError(f"no chat format for the run; known: {known_formats()}; or give "
                                "a Go template with --template FILE")
        template, params = template_for(resolve_chat_format(chat_format))

    quants = quant_names(quant)
    if from_ is None:
        if not quants:
            raise TemplateError("no quant type for the run's GGUF (e.g. --quant q4_k_m)")
        from_ = "./" + gguf_name(quants[0])

    defaults: list[tuple[str, str]] = []
    for name, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            defaults.append((name, _format_value(v)))
    num_ctx = num_ctx_for(max_len, base_context)
    if num_ctx:
        defaults.append(("num_ctx", str(num_ctx)))

    parameters = defaults
    for name, value in _override_pairs(overrides):
        if name in LIST_PARAMETERS:
            if (name, value) not in parameters:
                parameters.append((name, value))
        elif any(k == name for k, _ in parameters):  # replace in place; the last one wins
            parameters = [(k, value if k == name else v) for k, v in parameters]
        else:
            parameters.append((name, value))

    return Modelfile(from_=from_, adapter=adapter, template=template,
                     system=system if system else None, parameters=parameters)


# --- a run directory ----------------------------------------------------------------------

def write_modelfile(run_dir: str | Path, modelfile: Modelfile, header: str | None = None) -> Path:
    """Write RUN/Modelfile whole (temporary name, then rename); return its path."""
    from ollama_ft.rundir import atomic_write_text

    path = Run(run_dir).path("modelfile")
    atomic_write_text(path, modelfile.render(header=header))
    return path
