"""Ollama model names: `[host/][namespace/]model[:tag]`, validated by Ollama's rules.

Defaults: host `registry.ollama.ai`, namespace `library`, tag `latest`. Each part starts
with a letter, digit or `_`, then letters, digits, `-`, `_` and `.` (namespace: no `.`);
1-80 characters (host up to 350 and may hold `:port`). Lookups are case-insensitive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ollama_ft.errors import OllamaError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,349}(:\d{1,5})?")


class InvalidName(OllamaError):
    pass


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def short(self) -> str:
        """What /api/tags shows: `my-ft:latest`, or the full path off the defaults."""
        prefix = ""
        if self.host != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def key(self) -> tuple:
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def manifest_parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag


def parse_name(name: str) -> ModelName:
    if not isinstance(name, str) or not name.strip():
        raise InvalidName("invalid model name: empty")
    raw = name.strip()
    rest, tag = raw, DEFAULT_TAG
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
    parts = rest.split("/")
    if len(parts) == 1:
        host, ns, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (ns, model) = DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, ns, model = parts
    else:
        raise InvalidName(f"invalid model name {name!r}: at most host/namespace/model:tag")
    checks = [(_HOST, host, "host"), (_NAMESPACE, ns, "namespace"), (_PART, model, "model"),
              (_PART, tag, "tag")]
    for rx, value, what in checks:
        if not rx.fullmatch(value or ""):
            raise InvalidName(f"invalid model name {name!r}: the {what} {value!r} must start with a "
                              "letter, digit or '_' and hold only letters, digits, '-', '_'"
                              f"{'' if what == 'namespace' else ' and .'} (at most 80 characters)")
    return ModelName(host, ns, model, tag)
