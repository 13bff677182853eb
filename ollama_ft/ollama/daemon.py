"""`--base ollama:NAME[:TAG]`: what a daemon says of one of its models, and where its GGUF is.

The daemon (a real Ollama or the ollama-ft bridge, at OLLAMA_HOST or --host) is asked
`/api/show`: the TEMPLATE it serves, the parameters (stops), SYSTEM, the GGUF metadata, and
its Modelfile, whose `FROM` line is the path of the model blob in the daemon's store. That
blob is read where it lies (no copy); a daemon whose store is not on this machine is said so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ollama_ft.errors import BaseModelError

PREFIX = "ollama:"
# GGUF architectures a base can have: the families of DeepSeek that run as these (R1-Qwen,
# R1-Llama, R1-0528-Qwen3, coder, llm) and any other model of them (SmolLM2 is llama)
TRAINABLE_ARCHITECTURES = ("llama", "qwen2", "qwen3")
STORE_DIRS = ("~/.ollama/models", "/usr/share/ollama/.ollama/models")


def is_ollama_spec(spec: str | None) -> bool:
    return bool(spec) and spec.strip().lower().startswith(PREFIX)


@dataclass
class OllamaBase:
    """One model of a daemon, as a base: what training and registration need of it."""

    name: str  # as the daemon names it (short form, e.g. smollm2:latest)
    host: str  # the daemon's URL
    blob: str  # the model GGUF, on this machine
    digest: str  # sha256:<hex> of that blob
    architecture: str  # general.architecture
    quant: str  # details.quantization_level (Q4_K_M, Q4_1, F16, ...)
    template: str  # the Go TEMPLATE the daemon serves the model with
    parameters: list = field(default_factory=list)  # [(name, value)] as in its Modelfile
    system: str = ""
    context_length: int | None = None
    version: str = "?"

    def stops(self) -> list[str]:
        return [v for k, v in self.parameters if k == "stop"]

    def to_json(self) -> dict:
        d = asdict(self)
        d["parameters"] = [list(p) for p in self.parameters]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "OllamaBase":
        d = dict(d)
        d["parameters"] = [tuple(p) for p in d.get("parameters") or []]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def model_name(spec: str) -> str:
    """`ollama:smollm2` -> `smollm2:latest` (the daemon's short form)."""
    from ollama_ft.ollama.names import parse_name

    raw = spec.strip()[len(PREFIX):] if is_ollama_spec(spec) else spec.strip()
    if not raw:
        raise BaseModelError("--base ollama:NAME: the model name is missing (e.g. "
                             "ollama:deepseek-r1:7b); `ollama-ft models` lists the daemon's models")
    try:
        return parse_name(raw).short
    except Exception as e:  # noqa: BLE001 - names.OllamaError with the rule it broke
        raise BaseModelError(f"--base {spec}: {e}") from None


def _client(host: str | None):
    import httpx

    from ollama_ft.ollama.client import auth_headers, ollama_url

    url = ollama_url(host)
    return url, httpx.Client(base_url=url, headers=auth_headers(url), timeout=60.0)


def _unreachable(url: str, e: Exception) -> BaseModelError:
    return BaseModelError(f"no Ollama answered at {url} ({type(e).__name__}); start it (`ollama "
                          "serve`, or `ollama-ft serve`), or set OLLAMA_HOST / --host to the "
                          "daemon that holds the model")


def show(name: str, host: str | None = None) -> tuple[str, str, dict]:
    """(url, version, /api/show of `name`), with errors a user can act on."""
    import httpx

    url, http = _client(host)
    with http:
        try:
            version = http.get("/api/version", timeout=5.0).json().get("version", "?")
            r = http.post("/api/show", json={"model": name})
        except (httpx.HTTPError, ValueError) as e:
            raise _unreachable(url, e) from None
    if r.status_code == 404:
        raise BaseModelError(f"--base ollama:{name}: the daemon at {url} has no model {name!r}; "
                             "`ollama list` (or `ollama-ft models`) shows what it has; `ollama "
                             f"pull {name}` fetches it")
    if r.status_code != 200:
        raise BaseModelError(f"--base ollama:{name}: the daemon at {url} answered HTTP "
                             f"{r.status_code}: {r.text.strip()[:200]}")
    return url, version, r.json()


def _modelfile(text: str, name: str):
    from ollama_ft.ollama.modelfile import Modelfile

    try:
        return Modelfile.parse(text or "", f"the Modelfile the daemon shows for {name}")
    except Exception as e:  # noqa: BLE001 - ModelfileError: the daemon's text, not the user's
        raise BaseModelError(f"--base ollama:{name}: its Modelfile could not be read ({e})") from None


def locate_blob(from_path: str, name: str, url: str) -> Path:
    """The model blob on this machine: the daemon's FROM path, else the usual stores."""
    p = Path(from_path)
    if p.is_file():
        return p
    blob = p.name  # sha256-<hex>
    roots = [os.environ.get("OLLAMA_MODELS")] + list(STORE_DIRS)
    for root in filter(None, roots):
        candidate = Path(root).expanduser() / "blobs" / blob
        if candidate.is_file():
            return candidate
    raise BaseModelError(
        f"--base ollama:{name}: the daemon at {url} keeps the model at {from_path}, which is not "
        "on this machine (a daemon on another machine or in a container). Run ollama-ft where "
        "the daemon's store is, or make the store readable here and set OLLAMA_MODELS to it")


def base_problem(show_reply: dict) -> str | None:
    """Why a model cannot be a base (None: it can)."""
    info = show_reply.get("model_info") or {}
    arch = info.get("general.architecture") or (show_reply.get("details") or {}).get("family")
    if (show_reply.get("details") or {}).get("format", "gguf") != "gguf":
        return "not a GGUF model"
    if _from_lines(show_reply.get("modelfile") or "", "ADAPTER"):
        return "it is itself a base plus an adapter; fine-tune its base instead"
    if not arch:
        return "the daemon does not say its architecture"
    if arch not in TRAINABLE_ARCHITECTURES:
        return (f"architecture {arch} cannot be a base yet (supported: "
                f"{', '.join(TRAINABLE_ARCHITECTURES)})")
    return None


def _from_lines(text: str, keyword: str) -> list[str]:
    out = []
    for line in text.splitlines():
        head, _, rest = line.strip().partition(" ")
        if head.upper() == keyword and rest.strip():
            out.append(rest.strip())
    return out


def read_base(spec: str, host: str | None = None) -> OllamaBase:
    """Everything about `ollama:NAME` a run needs, from the daemon; raises BaseModelError."""
    name = model_name(spec)
    url, version, reply = show(name, host)
    problem = base_problem(reply)
    if problem:
        raise BaseModelError(f"--base ollama:{name}: {problem}")
    mf = _modelfile(reply.get("modelfile") or "", name)
    if not mf.from_:
        raise BaseModelError(f"--base ollama:{name}: the daemon shows no FROM for it")
    blob = locate_blob(mf.from_, name, url)
    hexdigest = blob.name.split("-", 1)[-1] if blob.name.startswith("sha256-") else None
    if hexdigest is None:
        from ollama_ft.ollama.client import sha256_file

        digest = sha256_file(blob)
    else:
        digest = "sha256:" + hexdigest
    info = reply.get("model_info") or {}
    arch = info.get("general.architecture")
    template = reply.get("template") or ""
    if not template.strip():
        raise BaseModelError(f"--base ollama:{name}: the daemon serves it without a TEMPLATE, "
                             "so there is no chat format to train on; create it with one "
                             "(`ollama show --modelfile` of a similar model shows how)")
    return OllamaBase(
        name=name, host=url, blob=str(blob), digest=digest, architecture=arch,
        quant=(reply.get("details") or {}).get("quantization_level") or "?",
        template=template, parameters=list(mf.parameters), system=reply.get("system") or "",
        context_length=info.get(f"{arch}.context_length"), version=version)


def list_models(host: str | None = None) -> tuple[str, list[dict]]:
    """The daemon's models, each with whether it can be a base: (url, [{name, size,
    architecture, quant, base: None | why not}]). Raises BaseModelError when none answers."""
    import httpx

    url, http = _client(host)
    rows = []
    with http:
        try:
            tags = http.get("/api/tags", timeout=10.0).json().get("models") or []
        except (httpx.HTTPError, ValueError) as e:
            raise _unreachable(url, e) from None
        for m in tags:
            name = m.get("model") or m.get("name")
            try:
                r = http.post("/api/show", json={"model": name})
                reply = r.json() if r.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                reply = {}
            problem = base_problem(reply) if reply else "the daemon does not show it"
            if problem is None:
                try:
                    locate_blob(_modelfile(reply.get("modelfile") or "", name).from_ or "", name, url)
                except BaseModelError:
                    problem = "its GGUF is not on this machine"
            details = m.get("details") or {}
            rows.append({"name": name, "size": m.get("size"),
                         "architecture": (reply.get("model_info") or {}).get("general.architecture")
                         or details.get("family"),
                         "quant": details.get("quantization_level"), "base": problem})
    return url, rows
