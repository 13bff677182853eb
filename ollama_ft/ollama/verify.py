"""After `create`: what will the daemon really feed the model, and is it what training saw?

Ollama (>= 0.11.5, and the bridge) renders a chat without running the model when asked
with `_debug_render_only`, through whichever template it has chosen for the model: our
TEMPLATE, or (Ollama >= 0.30, when the GGUF's chat template claims more capabilities, or
with OLLAMA_GO_TEMPLATE=0) the GGUF's Jinja template rendered by llama-server. The render
of a probe conversation is compared with what training renders for it, as text and as
token ids of the base's tokenizer. A daemon that cannot render on request answers the probe
by generating one token; then its stored TEMPLATE and its `prompt_eval_count` are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.chat_formats import FORMATS, ChatFormat, Message
from ollama_ft.errors import OllamaError

# the daemon adds the Modelfile's SYSTEM itself when a request has no system message
PROBE = [Message("user", "Hi 你好"), Message("assistant", "Hello."),
         Message("user", "2+2?\n\tcode: `x = 1`")]


@dataclass
class Expected:
    """What training renders: the run's chat format, and the base's tokenizer (if found)."""
    chat_format: "str | ChatFormat | None"  # None: a user --template; not checked then
    tokenizer_json: Path | None = None
    system: str | None = None


@dataclass
class Verification:
    template: str  # "modelfile TEMPLATE" | "GGUF chat template" | "another template"
    capabilities: list[str]
    prompt: str  # what was proven about the rendered prompt
    tokens: int | None = None
    notes: list[str] = field(default_factory=list)

    def as_report(self) -> dict:
        return {"template": self.template, "capabilities": self.capabilities,
                "prompt": self.prompt, "prompt_tokens": self.tokens, "notes": self.notes}


def _token_ids(tokenizer_json: Path | None, text: str) -> list[int] | None:
    if tokenizer_json is None or not tokenizer_json.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def template_source(shown: str, sent: str | None, gguf_template: str | None) -> str:
    if sent is not None and shown == sent:
        return "modelfile TEMPLATE"
    if gguf_template and shown == gguf_template:
        return "GGUF chat template"
    return "another template"


def render_probe(http, url: str, name: str, messages: list[dict]) -> dict:
    """POST /api/chat with _debug_render_only (num_predict 1 for daemons that ignore it)."""
    body = {"model": name, "messages": messages, "stream": False,
            "_debug_render_only": True, "options": {"num_predict": 1, "temperature": 0}}
    r = http.post(f"{url}/api/chat", json=body, timeout=120.0)
    if r.status_code != 200:
        hint = ""
        if "loras are not yet implemented" in r.text:  # Ollama < 0.30, Go engine (qwen3, ...)
            hint = ("; this Ollama runs the model's architecture in its own engine, which "
                    "cannot apply LoRA adapters (Ollama before 0.30): register the merged GGUF "
                    "(without --adapter) or update Ollama")
        message = (f"{name} was created but the daemon refused a chat: "
                   f"{r.text.strip()[:300]} (HTTP {r.status_code}){hint}")
        if hint:
            from ollama_ft.ollama.client import AdapterRefused

            raise AdapterRefused(message, "loras are not yet implemented")
        raise OllamaError(message)
    return r.json()


def verify_prompt(http, url: str, name: str, show: dict, sent_template: str | None,
                  gguf_template: str | None, expected: Expected) -> Verification:
    """Check the daemon renders the probe as training does; raise OllamaError if not."""
    shown = show.get("template") or ""
    caps = list(show.get("capabilities") or [])
    source = template_source(shown, sent_template, gguf_template)
    fmt = expected.chat_format if isinstance(expected.chat_format, ChatFormat) else \
        FORMATS.get(expected.chat_format or "")
    where = f"{name}: Ollama uses its {source}"
    if fmt is not None and fmt.thinking and caps and "thinking" not in caps:
        raise OllamaError(f"{where}, which gives the model no thinking capability "
                          f"(capabilities {caps}); `think` requests would be refused")
    answer = render_probe(http, url, name, [{"role": m.role, "content": m.content} for m in PROBE])
    rendered = (answer.get("_debug_info") or {}).get("rendered_template")
    if fmt is None:
        return Verification(source, caps, "not checked (a --template of your own)")
    conv = ([Message("system", expected.system)] if expected.system else []) + PROBE
    want = fmt.render_prompt(conv)
    want_ids = _token_ids(expected.tokenizer_json, want)
    # the BOS llama.cpp adds to an Ollama base's prompt is in training's text, not the render
    bos = getattr(fmt, "bos", "")
    if bos and rendered is not None and want.startswith(bos):
        rendered = bos + rendered
    if rendered is not None:
        if rendered != want:
            i = _first_difference(rendered, want)
            raise OllamaError(
                f"{where} and renders a different prompt from training at character {i}: "
                f"daemon {rendered[max(0, i - 30):i + 30]!r}, training "
                f"{want[max(0, i - 30):i + 30]!r}. The model was created; re-export with "
                f"this ollama-ft (`ollama-ft export RUN`) and register again")
        got_ids = _token_ids(expected.tokenizer_json, rendered)
        if want_ids is None:
            return Verification(source, caps, "rendered text equals training's (the base's "
                                "tokenizer was not found to compare ids)")
        if got_ids != want_ids:  # same text, so only a tokenizer change could do this
            raise OllamaError(f"{where}: the rendered prompt tokenizes differently")
        return Verification(source, caps, "rendered prompt equals training's, token for token",
                            len(want_ids))
    # no render on request: it generated one token instead
    notes = ["the daemon cannot render a prompt on request (_debug_render_only)"]
    if source != "modelfile TEMPLATE":
        raise OllamaError(f"{where} ({shown[:80]!r}...), not the TEMPLATE that was sent, and "
                          "cannot show what it renders; set OLLAMA_GO_TEMPLATE=1 on the daemon")
    count = answer.get("prompt_eval_count")
    if want_ids is not None and isinstance(count, int) and count > 0:
        if count != len(want_ids):
            raise OllamaError(f"{name}: the daemon evaluated {count} prompt tokens for a probe "
                              f"that training tokenizes to {len(want_ids)}")
        return Verification(source, caps, "stores the TEMPLATE sent; prompt token count equals "
                            "training's", count, notes)
    return Verification(source, caps, "stores the TEMPLATE sent", None, notes)
