"""Registered models of the embedded bridge: /api/create, /api/show and /api/tags logic
over the store (manifests + blobs), with Ollama's validation and layer media types."""

from __future__ import annotations

import datetime as dt
import functools
import json
import posixpath
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ollama_ft.errors import OllamaError
from ollama_ft.ollama.names import parse_name
from ollama_ft.ollamafmt.capabilities import capabilities, uses_go_template
from ollama_ft.ollamafmt.ggufinfo import NotGGUF, cached_info, chat_template
from ollama_ft.ollamafmt.prompt import JinjaPrompt, PromptTemplate
from ollama_ft.serve.engine import check_options
from ollama_ft.serve.store import LAYER, Manifest, NotFound, Store, check_digest


class BadRequest(OllamaError):
    """A 400: the message is what Ollama would say."""


class BrokenModel(OllamaError):
    """A manifest whose blobs are not all in the store (it is not listed either)."""


@dataclass
class Model:
    name: str  # short form, e.g. my-ft:latest
    manifest: Manifest
    model_path: Path
    adapter_path: Path | None
    template: str
    system: str
    params: dict
    messages: list
    license: list
    config: dict
    info: dict = field(default_factory=dict)

    @property
    def chat_template(self) -> str | None:
        """The GGUF's tokenizer.chat_template."""
        return chat_template(self.model_path)

    @functools.cached_property
    def go_template(self) -> PromptTemplate | None:
        return PromptTemplate(self.template) if self.template else None

    @property
    def prompt_template(self):
        """What renders this model's prompts, by Ollama >= 0.30's choice (capabilities.py):
        the TEMPLATE, or the GGUF's chat template when that one claims more."""
        go, chat = self.go_template, self.chat_template
        if go is not None and uses_go_template(go, chat):
            return go
        if chat:
            return JinjaPrompt(chat, *_gguf_specials(self.model_path))
        return PromptTemplate(self.template or "{{ .Prompt }}")

    @property
    def capabilities(self) -> list[str]:
        return capabilities(self.go_template, self.chat_template)

    def details(self) -> dict:
        c = self.config
        return {"parent_model": "", "format": c.get("model_format", "gguf"),
                "family": c.get("model_family", ""), "families": c.get("model_families") or
                [c.get("model_family", "")], "parameter_size": c.get("model_type", ""),
                "quantization_level": c.get("file_type", "")}

    def modified_at(self) -> str:
        return iso(self.manifest.modified)


@functools.lru_cache(maxsize=64)
def _gguf_specials(path: Path) -> tuple[str, str]:
    """(BOS text, EOS text) of a GGUF, for Jinja templates that write bos_token."""
    from ollama_ft.ollamafmt.ggufinfo import token_texts

    meta = cached_info(path).metadata
    ids = [meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")]
    texts = token_texts(path, [i for i in ids if isinstance(i, int)])
    return tuple(texts.get(i, "") if isinstance(i, int) else "" for i in ids)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).astimezone().isoformat()


class Registry:
    CACHED = 64  # parsed models kept (by manifest digest), least recently used dropped

    def __init__(self, store: Store):
        from collections import OrderedDict

        self.store = store
        self._cache: OrderedDict[str, Model] = OrderedDict()
        self._cache_lock = threading.Lock()

    def get(self, name: str) -> Model:
        try:
            m = self.store.get(name)
        except NotFound:
            raise NotFound(f"model '{name}' not found") from None
        if self.store.missing(m):
            raise BrokenModel(f"model '{m.name.short}' is incomplete: a blob it names is missing "
                              "from the store; create it again")
        with self._cache_lock:
            cached = self._cache.get(m.digest)
            if cached is not None:
                self._cache.move_to_end(m.digest)
                return cached
        model = self._load(m)
        with self._cache_lock:
            self._cache[m.digest] = model
            while len(self._cache) > self.CACHED:
                self._cache.popitem(last=False)
        return model

    def _load(self, m: Manifest) -> Model:
        s = self.store

        def text(kind):
            layers = m.layers(kind)
            return s.read_blob_text(layers[0]["digest"]) if layers else ""

        def js(kind, default):
            layers = m.layers(kind)
            return json.loads(s.read_blob_text(layers[0]["digest"])) if layers else default

        model_layers = m.layers("model")
        if not model_layers:
            raise OllamaError(f"model '{m.name.short}' has no model layer")
        adapters = m.layers("adapter")
        config = json.loads(s.read_blob_text(m.data["config"]["digest"]))
        return Model(m.name.short, m, s.blob_path(model_layers[0]["digest"]),
                     s.blob_path(adapters[0]["digest"]) if adapters else None,
                     text("template"), text("system"), js("params", {}), js("messages", []),
                     [s.read_blob_text(l["digest"]) for l in m.layers("license")], config)

    # --- /api/create ------------------------------------------------------------------------
    def create(self, req: dict) -> Iterator[dict]:
        """Validate (raising BadRequest before anything streams), then yield status lines.
        The blobs the request names are pinned from here until the manifest is written, so
        a delete or the cleaner cannot take one in between."""
        named = [d for field_name in ("files", "adapters") if isinstance(req.get(field_name), dict)
                 for d in req[field_name].values() if isinstance(d, str)]
        pin = self.store.pinned(named)
        pin.__enter__()
        try:
            statuses = self._validate(req)
        except BaseException:
            pin.__exit__(None, None, None)
            raise

        def pinned_statuses():
            try:
                yield from statuses
            finally:
                pin.__exit__(None, None, None)
        return pinned_statuses()

    def _validate(self, req: dict) -> Iterator[dict]:
        name = req.get("model") or req.get("name")
        if not name:
            raise BadRequest("model name is required")
        try:
            target = parse_name(name)
        except OllamaError:
            raise BadRequest("invalid model name") from None
        base: Model | None = None
        if req.get("from"):
            try:
                base = self.get(req["from"])
            except NotFound:
                raise BadRequest(f"model '{req['from']}' not found; the ollama-ft bridge has no "
                                 "registry to pull from: create it from a GGUF file") from None
        files = _files(req.get("files"), "files", self.store)
        adapters = _files(req.get("adapters"), "adapters", self.store)
        if len(adapters) > 1:
            raise BadRequest("only one adapter is currently supported")
        if not files and base is None:
            raise BadRequest("neither 'from' or 'files' was specified")
        if len(files) > 1:
            raise BadRequest("only one GGUF model file is supported by the ollama-ft bridge")
        template = req.get("template")
        if template is not None:
            if not isinstance(template, str):
                raise BadRequest("template must be a string")
            try:
                PromptTemplate(template)
            except ValueError as e:
                raise BadRequest(f"template error: {e}") from None
        params = req.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise BadRequest("parameters must be an object")
            try:
                params = check_options(params, "parameters")
            except OllamaError as e:
                raise BadRequest(str(e)) from None
        messages = req.get("messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content", ""), str) for m in messages):
                raise BadRequest("messages must be a list of {role: system|user|assistant, content}")
        if req.get("quantize"):
            raise BadRequest("quantize is not supported by the ollama-ft bridge; upload the "
                             "quantized GGUF (`ollama-ft export RUN --quant TYPE`)")
        system = req.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRequest("system must be a string")
        lic = req.get("license")
        if lic is not None:
            lic = [lic] if isinstance(lic, str) else lic
            if not isinstance(lic, list) or not all(isinstance(x, str) for x in lic):
                raise BadRequest("license must be a string or a list of strings")
        # GGUF checks happen before streaming too, so a wrong file is a 400
        model_info = adapter_info = None
        if files:
            digest = next(iter(files.values()))
            try:
                model_info = cached_info(self.store.blob_path(digest))
            except NotGGUF as e:
                raise BadRequest(str(e)) from None
            if model_info.general_type == "adapter":
                raise BadRequest("the model file is a LoRA adapter; send it in 'adapters'")
        if adapters:
            try:
                adapter_info = cached_info(self.store.blob_path(next(iter(adapters.values()))))
            except NotGGUF as e:
                raise BadRequest(str(e)) from None
            if adapter_info.general_type != "adapter":
                raise BadRequest("the adapter file is not a LoRA adapter GGUF (general.type must "
                                 "be adapter)")
        return self._create(target, base, files, adapters, model_info, template, system, params,
                            messages, lic)

    def _create(self, target, base, files, adapters, info, template, system, params, messages, lic):
        yield {"status": "parsing GGUF"}
        layers: list[dict] = []
        config = dict(base.config) if base else {}
        if files:
            digest = next(iter(files.values()))
            yield {"status": f"using existing layer {digest}"}
            layers.append(self._layer("model", digest))
            config.update({"model_format": "gguf", "model_family": info.architecture,
                           "model_families": [info.architecture], "model_type": info.parameter_size,
                           "file_type": info.file_type, "context_length": info.context_length})
        else:
            layers += base.manifest.layers("model")
        if adapters:
            digest = next(iter(adapters.values()))
            yield {"status": f"using existing layer {digest}"}
            layers.append(self._layer("adapter", digest))
        elif base and not files:
            layers += base.manifest.layers("adapter")
        inherited = {"template": base.template if base else "", "system": base.system if base else "",
                     "params": base.params if base else {}, "messages": base.messages if base else [],
                     "license": base.license if base else []}
        values = {"template": template if template is not None else inherited["template"],
                  "system": system if system is not None else inherited["system"],
                  "params": params if params is not None else inherited["params"],
                  "messages": messages if messages is not None else inherited["messages"],
                  "license": lic if lic is not None else inherited["license"]}
        for kind in ("template", "system"):
            if values[kind]:
                digest, size = self.store.write_blob([values[kind].encode("utf-8")])
                yield {"status": f"creating new layer {digest}"}
                layers.append(self._layer(kind, digest, size))
        for kind in ("params", "messages"):
            if values[kind]:
                digest, size = self.store.write_json_blob(values[kind])
                yield {"status": f"creating new layer {digest}"}
                layers.append(self._layer(kind, digest, size))
        for text in values["license"]:
            digest, size = self.store.write_blob([text.encode("utf-8")])
            layers.append(self._layer("license", digest, size))
        yield {"status": "writing manifest"}
        gone = [l["digest"] for l in layers if not self.store.has_blob(l["digest"])]
        if gone:
            raise OllamaError(f"blob {gone[0]} is no longer in the store; upload it again")
        config.setdefault("model_format", "gguf")
        config["rootfs"] = {"type": "layers", "diff_ids": [l["digest"] for l in layers]}
        self.store.write_manifest(target, config, layers)
        yield {"status": "success"}

    def _layer(self, kind, digest, size=None):
        return {"mediaType": LAYER.format(kind), "digest": digest,
                "size": size if size is not None else self.store.blob_path(digest).stat().st_size}

    # --- /api/show, /api/tags ------------------------------------------------------------------
    def show(self, name: str) -> dict:
        m = self.get(name)
        info = cached_info(m.model_path)
        params = []
        for k in m.params:  # in the order they were given, as Ollama lists them
            vals = m.params[k] if isinstance(m.params[k], list) else [m.params[k]]
            params += [f"{k:<30} {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else _go(v)}"
                       for v in vals]
        shown = m.prompt_template
        # as Ollama: the template that renders (the GGUF's when it won), and model_info
        # without general.name and the chat template
        model_info = {k: v for k, v in info.metadata.items()
                      if k not in ("general.name", "tokenizer.chat_template")}
        model_info["general.parameter_count"] = info.parameter_count
        out = {"modelfile": modelfile_text(m), "parameters": "\n".join(params),
               "template": shown.text if isinstance(shown, JinjaPrompt) else m.template,
               "details": m.details(), "model_info": model_info, "tensors": info.tensors,
               "capabilities": m.capabilities, "modified_at": m.modified_at()}
        # as Ollama: license, system and messages only when there are some
        for key, value in (("license", "\n".join(m.license)), ("system", m.system),
                           ("messages", m.messages)):
            if value:
                out[key] = value
        return out

    def tags(self) -> list[dict]:
        out = []
        for man in self.store.list():
            try:
                m = self.get(man.name.short)
            except (OllamaError, OSError, ValueError):
                continue
            size = sum(l.get("size", 0) for l in man.data.get("layers", []))
            info = cached_info(m.model_path)
            arch = info.architecture
            details = {**m.details(), "context_length": info.context_length,
                       "embedding_length": info.metadata.get(f"{arch}.embedding_length")}
            out.append({"name": man.name.short, "model": man.name.short,
                        "modified_at": iso(man.modified), "size": size, "digest": man.digest,
                        "details": {k: v for k, v in details.items() if v is not None},
                        "capabilities": m.capabilities})
        out.sort(key=lambda r: r["modified_at"], reverse=True)
        return out


def _go(v):
    """Go's %v for a parameter value: 0.0 prints as 0, True as true."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _files(value, field_name, store: Store) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field_name} must be an object of file name to digest")
    for fname, digest in value.items():
        norm = posixpath.normpath(fname.replace("\\", "/")) if isinstance(fname, str) else ""
        if (not fname or not norm or norm.startswith("/") or ".." in norm.split("/")
                or re.match(r"^[A-Za-z]:", norm) or "\x00" in norm):
            raise BadRequest("file path must be relative")
        try:
            check_digest(digest)
        except OllamaError as e:
            raise BadRequest(str(e)) from None
        if not store.has_blob(digest):
            raise BadRequest(f"blob {digest} not found; upload it with POST /api/blobs/{digest}")
    return dict(value)


def modelfile_text(m: Model) -> str:
    lines = ["# Modelfile generated by \"ollama show\"",
             "# To build a new Modelfile based on this, replace FROM with:",
             f"# FROM {m.name}", "", f"FROM {m.model_path}"]
    if m.adapter_path:
        lines.append(f"ADAPTER {m.adapter_path}")
    if m.template:
        lines.append(f'TEMPLATE """{m.template}"""')
    if m.system:
        lines.append(f'SYSTEM """{m.system}"""')
    for k in sorted(m.params):
        for v in (m.params[k] if isinstance(m.params[k], list) else [m.params[k]]):
            lines.append(f"PARAMETER {k} {v}")
    for msg in m.messages:
        lines.append(f"MESSAGE {msg['role']} \"\"\"{msg['content']}\"\"\"")
    for lic in m.license:
        lines.append(f'LICENSE """{lic}"""')
    return "\n".join(lines) + "\n"
