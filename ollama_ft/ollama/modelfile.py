"""Ollama Modelfiles: one dataclass, rendered and parsed with the rules Ollama's own parser
follows (parser/parser.go and api/types.go in github.com/ollama/ollama, v0.33):

- Instructions: FROM (required), ADAPTER, TEMPLATE, SYSTEM, PARAMETER, LICENSE, MESSAGE,
  and REQUIRES, DRAFT, RENDERER, PARSER (kept here as `other`). Keywords are
  case-insensitive; PARAMETER names and MESSAGE roles (system, user, assistant) are not.
- A keyword is followed by a space or tab. A value runs to the end of its line, or is
  wrapped in `\"\"\"…\"\"\"` or `"…"` and may then span lines: at each line end the value so
  far, stripped of surrounding whitespace, ends when it is unquoted or a complete quote.
  Nothing inside quotes is escaped. Values are stripped of surrounding spaces, tabs and
  newlines, and characters Go does not count as printable (control characters, and
  spaces other than ' ' such as U+00A0 or U+3000) are dropped, except tabs and newlines.
- `#` starts a comment only where an instruction could start: `PARAMETER temperature 1 #
  note` is an invalid float, not a comment.
- Parameters are typed (int, float, bool, string list) and checked when the request is
  built; `stop` repeats, one value a line.

Rendering writes each value bare when it parses back the same, else quoted so that it
does (`\"\"\"…\"\"\"` first for values of several lines, `"…"` first for one line), and
refuses values no Modelfile can hold. Parsing refuses what Ollama refuses (and a second
FROM, which this model cannot hold), with file:line in the message.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ollama_ft.errors import OllamaError


class ModelfileError(OllamaError):
    """A Modelfile that Ollama would refuse, or a value no Modelfile can hold."""


# PARAMETER names Ollama knows (api.Options and api.Runner), by type.
INT_PARAMETERS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread",
                            "draft_num_predict", "num_keep", "seed", "num_predict", "top_k",
                            "repeat_last_n"})
FLOAT_PARAMETERS = frozenset({"temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                              "presence_penalty", "frequency_penalty"})
BOOL_PARAMETERS = frozenset({"use_mmap"})
LIST_PARAMETERS = frozenset({"stop"})
# accepted by Ollama with a warning, and ignored
DEPRECATED_PARAMETERS = frozenset({"penalize_newline", "low_vram", "f16_kv", "logits_all",
                                   "vocab_only", "use_mlock", "mirostat", "mirostat_tau",
                                   "mirostat_eta"})
PARAMETERS = INT_PARAMETERS | FLOAT_PARAMETERS | BOOL_PARAMETERS | LIST_PARAMETERS

INSTRUCTIONS = ("from", "adapter", "template", "system", "parameter", "license", "message",
                "requires", "draft", "renderer", "parser")
OTHER_INSTRUCTIONS = ("requires", "draft", "renderer", "parser")
ROLES = ("system", "user", "assistant")

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                    r"|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_SPACE = " \t"
_NEWLINE = "\r\n"


def parameter_value(name: str, value: str):
    """The typed value Ollama sends for `PARAMETER name value`; ValueError says what is wrong."""
    if name in LIST_PARAMETERS:
        return value
    if name in INT_PARAMETERS:
        if not _INT.fullmatch(value) or not -(2**63) <= int(value) < 2**63:
            raise ValueError(f"{name} must be an integer, not {value!r}")
        return int(value)
    if name in FLOAT_PARAMETERS:
        if not _FLOAT.fullmatch(value):
            raise ValueError(f"{name} must be a number, not {value!r}")
        return float(value)
    if name in BOOL_PARAMETERS:
        if value not in _BOOLS:
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return _BOOLS[value]
    if name in DEPRECATED_PARAMETERS:
        return value
    hint = ""
    if name.lower() in PARAMETERS:
        hint = f" (parameter names are case-sensitive: {name.lower()})"
    raise ValueError(f"unknown parameter {name!r}{hint}; known: {', '.join(sorted(PARAMETERS))}")


def _printable(c: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and ' '."""
    return c == " " or unicodedata.category(c)[0] in "LMNPS"


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


def _strip(s: str) -> str:
    return s.strip(_SPACE + _NEWLINE)


def _scan_value(text: str, i: int) -> tuple[str | None, int, int]:
    """Read a value starting at text[i]: (value or None if a quote is left open, index after
    it and its line end, number of line breaks consumed)."""
    buf: list[str] = []
    breaks = 0
    n = len(text)
    while i < n:
        c = text[i]
        i += 1
        if c in _NEWLINE:
            value, ok = _unquote(_strip("".join(buf)))
            if c == "\n" or i >= n or text[i] != "\n":
                breaks += 1
            if ok:
                if c == "\r" and i < n and text[i] == "\n":
                    i += 1  # the \n of a CRLF after the value: a blank step in Ollama too
                    breaks += 1
                return value, i, breaks
            buf.append(c)
        elif c in _SPACE or _printable(c):
            buf.append(c)
        # other characters are dropped, as Ollama's parser drops them
    value, ok = _unquote(_strip("".join(buf)))
    return (value if ok else None), i, breaks


def _quote(value: str, what: str) -> str:
    bad = sorted({c for c in value if c not in _SPACE + _NEWLINE and not _printable(c)})
    if bad:
        names = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, 'control character')}"
                          for c in bad[:5])
        raise ModelfileError(f"{what}: holds characters Ollama's Modelfile parser drops "
                             f"({names}); remove them, or register over the REST API, "
                             "which takes the value as it is")
    if value == "":
        return '""'
    triple, single = f'"""{value}"""', f'"{value}"'
    multiline = "\n" in value or "\r" in value
    for candidate in (value, *((triple, single) if multiline else (single, triple))):
        got, end, _ = _scan_value(candidate + "\n", 0)
        if got == value and end == len(candidate) + 1:
            return candidate
    raise ModelfileError(f"{what}: cannot be written in a Modelfile (it has lines ending in "
                         "both \"\"\" and \", which would end the quote early); rephrase it")


@dataclass
class Modelfile:
    from_: str
    adapter: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)
    # REQUIRES, DRAFT, RENDERER, PARSER as (lower-case keyword, value), kept as written
    other: list[tuple[str, str]] = field(default_factory=list)

    # --- queries ---------------------------------------------------------------------------
    def parameter(self, name: str) -> list[str]:
        """Every value given for PARAMETER `name`, in order."""
        return [v for k, v in self.parameters if k == name]

    # --- rendering -------------------------------------------------------------------------
    def render(self, header: str | None = None) -> str:
        """The Modelfile text; `header` becomes `#` comment lines at the top."""
        lines = [f"# {h}".rstrip() for h in header.splitlines()] if header else []
        if not self.from_:
            raise ModelfileError("Modelfile: FROM is required (a GGUF path or a model name)")
        lines.append(f"FROM {_quote(self.from_, 'FROM')}")
        if self.adapter is not None:
            lines.append(f"ADAPTER {_quote(self.adapter, 'ADAPTER')}")
        if self.template is not None:
            lines.append(f"TEMPLATE {_quote(self.template, 'TEMPLATE')}")
        if self.system is not None:
            lines.append(f"SYSTEM {_quote(self.system, 'SYSTEM')}")
        for name, value in self.parameters:
            _check_parameter(name, value, f"PARAMETER {name}")
            lines.append(f"PARAMETER {name} {_quote(value, f'PARAMETER {name}')}")
        for role, content in self.messages:
            if role not in ROLES:
                raise ModelfileError(f"MESSAGE: role {role!r} must be one of {', '.join(ROLES)}")
            lines.append(f"MESSAGE {role} {_quote(content, f'MESSAGE {role}')}")
        for text in self.license:
            lines.append(f"LICENSE {_quote(text, 'LICENSE')}")
        for keyword, value in self.other:
            if keyword not in OTHER_INSTRUCTIONS:
                raise ModelfileError(f"Modelfile: unknown instruction {keyword!r}")
            lines.append(f"{keyword.upper()} {_quote(value, keyword.upper())}")
        return "\n".join(lines) + "\n"

    # --- the REST form ---------------------------------------------------------------------
    def to_create_request(self) -> dict:
        """The /api/create fields this Modelfile stands for, other than the model name and
        the files: `files`/`adapters`/`from` need blob digests, which the client computes
        from `from_` and `adapter` (paths relative to the Modelfile's folder)."""
        req: dict = {}
        if self.template is not None:
            req["template"] = self.template
        if self.system is not None:
            req["system"] = self.system
        params: dict = {}
        for name, value in self.parameters:
            typed = _check_parameter(name, value, f"PARAMETER {name}")
            if name in DEPRECATED_PARAMETERS:
                continue
            if name in LIST_PARAMETERS:
                params.setdefault(name, []).append(typed)
            else:
                params[name] = typed
        if params:
            req["parameters"] = params
        if self.license:
            req["license"] = list(self.license)
        if self.messages:
            req["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        for keyword, value in self.other:
            if keyword in ("requires", "renderer", "parser"):
                req[keyword] = value
        return req

    # --- parsing ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, path: str | Path | None = None) -> "Modelfile":
        where = str(path) if path is not None else "Modelfile"
        return _parse(text, where)

    @classmethod
    def read(cls, path: str | Path) -> "Modelfile":
        return _parse(read_text_file(path, ModelfileError), str(path))


def read_text_file(path: str | Path, error: type[Exception], label: str = "") -> str:
    """A UTF-8 text file; a missing or undecodable one raises `error` naming `label` + path."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{label}{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise error(f"{label}{path}: not UTF-8 text (byte {e.start})") from None


def _check_parameter(name: str, value: str, where: str):
    try:
        return parameter_value(name, value)
    except ValueError as e:
        raise ModelfileError(f"{where}: {e}") from None


def _scan_name(text: str, i: int, keyword: str, word: str, fail) -> tuple[str, int]:
    """The parameter name or MESSAGE role at text[i:], and the index after its space."""
    n, start = len(text), i
    allowed = (lambda ch: ch.isascii() and (ch.isalnum() or ch == "_")) \
        if keyword == "parameter" else (lambda ch: ch.isascii() and ch.isalpha())
    while i < n and allowed(text[i]):
        i += 1
    name = text[start:i]
    if i >= n or text[i] not in _SPACE or not name:
        what = "a parameter name" if keyword == "parameter" else "a role"
        raise fail(f"{word} needs {what} and a value, separated by a space "
                   f"(got {text[start:i + 1].strip()!r})")
    if keyword == "message" and name not in ROLES:
        raise fail(f"MESSAGE role {name!r} must be one of {', '.join(ROLES)} (lower case)")
    return name, i + 1


def _store(mf: Modelfile, keyword: str, name: str | None, value: str, fail) -> None:
    """Keep one instruction's value (FROM aside) in the Modelfile."""
    if keyword == "adapter":
        mf.adapter = value
    elif keyword == "template":
        mf.template = value
    elif keyword == "system":
        mf.system = value
    elif keyword == "license":
        mf.license.append(value)
    elif keyword == "message":
        mf.messages.append((name, value))
    elif keyword == "parameter":
        try:
            parameter_value(name, value)
        except ValueError as e:
            raise fail(f"PARAMETER {e}") from None
        mf.parameters.append((name, value))
    else:
        mf.other.append((keyword, value))


def _parse(text: str, where: str) -> Modelfile:
    if text.startswith("\ufeff"):
        text = text[1:]

    def fail(line: int, msg: str) -> ModelfileError:
        return ModelfileError(f"{where}:{line}: {msg}")

    mf = Modelfile(from_="")
    from_line = 0
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
            continue
        if c in _NEWLINE:
            if c == "\n" or i + 1 >= n or text[i + 1] != "\n":
                line += 1
            i += 1
            continue
        if c == "#":
            while i < n and text[i] not in _NEWLINE:
                i += 1
            continue
        # an instruction: a keyword, one space or tab, then (name or role, space,) the value
        start = i
        i += 1
        while i < n and text[i].isascii() and text[i].isalpha():
            i += 1
        if i < n and text[i] not in _SPACE + _NEWLINE:
            while i < n and text[i] not in _SPACE + _NEWLINE:
                i += 1  # not a keyword: take the rest of the word for the message
        word = text[start:i]
        keyword = word.lower()
        if keyword not in INSTRUCTIONS or not (word.isascii() and word.isalpha()):
            raise fail(line, f"unknown instruction {word!r}; one of "
                             f"{', '.join(k.upper() for k in INSTRUCTIONS)} (a # comment must "
                             "start its own line)")
        if i >= n or text[i] not in _SPACE:
            raise fail(line, f"{word} needs a value on the same line, after a space")
        i += 1
        name = None
        if keyword in ("parameter", "message"):
            name, i = _scan_name(text, i, keyword, word, lambda msg: fail(line, msg))
        value_line = line
        value, i, breaks = _scan_value(text, i)
        line += breaks
        if value is None:
            raise fail(value_line, f"{word}: the quote opened here is never closed (a value in "
                                   '""" or " ends at the first line that ends with the same quote)')
        if keyword == "from":
            if from_line:
                raise fail(value_line, f"a second FROM (the first is on line {from_line}); "
                                       "ollama-ft handles one FROM per Modelfile")
            if not value:
                raise fail(value_line, "FROM needs a model name or a path")
            mf.from_, from_line = value, value_line
        else:
            _store(mf, keyword, name, value, lambda msg, ln=value_line: fail(ln, msg))
    if not from_line:
        raise ModelfileError(f"{where}: no FROM line; a Modelfile starts from a GGUF file "
                             "(FROM ./model.gguf) or a model (FROM deepseek-r1:7b)")
    return mf
