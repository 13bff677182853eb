"""A Go text/template interpreter for the subset Ollama's TEMPLATEs use.

Ollama builds prompts by executing the model's TEMPLATE with Go's text/template
(`missingkey=zero`). The bridge does the same here: actions with trim markers, comments,
if / else if / else, range (with `$i, $v :=`, else, break, continue), with / else with,
define / template / block, variables and `$`, field access, pipelines with `|`,
parenthesised sub-pipelines, and the functions Ollama's templates call: eq ne lt le gt ge,
and or not, len slice index, print printf println, json, currentDate, yesterdayDate,
toTypeScriptType. Semantics follow Go: truthiness of zero values, short-circuit and/or,
byte lengths for strings. Tests compare it with Go's real text/template.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import re
from dataclasses import dataclass, field
from typing import Any


class TemplateError(ValueError):
    pass


# --- lexing ----------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-?)(\s*)")
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>/\*.*?\*/)
  | (?P<raw>`[^`]*`)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<char>'(?:[^'\\]|\\.)+')
  | (?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][+-]?\d+)?))
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<dot>\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<pipe>\|)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<comma>,)
""", re.S | re.X)


def _lex_action(src: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m:
            raise TemplateError(f"unexpected {src[pos:pos + 10]!r} in action")
        kind = m.lastgroup
        text = m.group()
        pos = m.end()
        if kind in ("ws", "comment"):
            continue
        if kind in ("field", "var", "rp") and pos < len(src) and src[pos] == ".":
            # chained field access on a variable or parenthesised value: $x.A.B, (..).A
            fm = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+").match(src, pos)
            if fm:
                toks.append((kind, text))
                toks.append(("chain", fm.group()))
                pos = fm.end()
                continue
        toks.append((kind, text))
    return toks


def _split(template: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', inner)] with trim markers applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = template.find("{{", pos)
        if start < 0:
            out.append(("text", template[pos:]))
            break
        text = template[pos:start]
        inner_start = start + 2
        trim_left = template.startswith("{{- ", start) or template.startswith("{{-\t", start) \
            or template.startswith("{{-\n", start) or template.startswith("{{-\r", start)
        if trim_left:
            text = text.rstrip(" \t\r\n")
            inner_start += 1
        out.append(("text", text))
        # find the closing }} that is not inside a string/raw string/comment
        i = inner_start
        while True:
            if i >= len(template):
                raise TemplateError("unclosed action")
            c = template[i]
            if template.startswith("/*", i):
                j = template.find("*/", i + 2)
                if j < 0:
                    raise TemplateError("unclosed comment")
                i = j + 2
                continue
            if c in "\"'`":
                j = i + 1
                while j < len(template) and template[j] != c:
                    if c != "`" and template[j] == "\\":
                        j += 1
                    j += 1
                i = j + 1
                continue
            if template.startswith("}}", i):
                break
            i += 1
        end = i
        inner = template[inner_start:end]
        trim_right = False
        if inner.endswith(" -") or inner.endswith("\t-") or inner.endswith("\n-") or inner.endswith("\r-"):
            inner = inner[:-1]
            trim_right = True
        out.append(("action", inner))
        pos = end + 2
        if trim_right:
            while pos < len(template) and template[pos] in " \t\r\n":
                pos += 1
    return [(k, v) for k, v in out if not (k == "text" and v == "")]


# --- parsing ---------------------------------------------------------------------------------
@dataclass
class Cmd:
    args: list  # argument nodes
@dataclass
class Pipe:
    decl: list[str]
    cmds: list[Cmd]
    assign: bool = False
@dataclass
class Text:
    text: str
@dataclass
class Out:
    pipe: Pipe
@dataclass
class If:
    kind: str  # if | with
    pipe: Pipe
    body: list
    else_: list = field(default_factory=list)
@dataclass
class Range:
    pipe: Pipe
    body: list
    else_: list = field(default_factory=list)
@dataclass
class TemplateCall:
    name: str
    pipe: Pipe | None
@dataclass
class Break:
    pass
@dataclass
class Continue:
    pass


class _Parser:
    def __init__(self, template: str):
        self.items = _split(template)
        self.i = 0
        self.defines: dict[str, list] = {}

    def parse(self):
        body, end = self.block(())
        if end is not None:
            raise TemplateError(f"unexpected {{{{{end[0]}}}}}")
        return body

    def block(self, stops):
        nodes = []
        while self.i < len(self.items):
            kind, val = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(Text(val))
                continue
            toks = _lex_action(val)
            if not toks:
                continue  # a comment
            head = toks[0]
            word = head[1] if head[0] == "ident" else None
            if word in ("end", "else") and word in stops:
                return nodes, (word, toks[1:])
            if word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{{word}}}}}")
            if word in ("if", "with"):
                nodes.append(self.conditional(word, toks[1:]))
            elif word == "range":
                pipe = self.pipeline(toks[1:])
                body, end = self.block(("end", "else"))
                rng = Range(pipe, body)
                if end and end[0] == "else":
                    rng.else_, end2 = self.block(("end",))
                    self._expect_end(end2)
                else:
                    self._expect_end(end)
                nodes.append(rng)
            elif word in ("define", "block"):
                name = _unquote(toks[1])
                body, end = self.block(("end",))
                self._expect_end(end)
                self.defines[name] = body
                if word == "block":
                    nodes.append(TemplateCall(name, self.pipeline(toks[2:]) if len(toks) > 2 else None))
            elif word == "template":
                name = _unquote(toks[1])
                nodes.append(TemplateCall(name, self.pipeline(toks[2:]) if len(toks) > 2 else None))
            elif word == "break":
                nodes.append(Break())
            elif word == "continue":
                nodes.append(Continue())
            else:
                nodes.append(Out(self.pipeline(toks)))
        if stops:
            raise TemplateError("missing {{end}}")
        return nodes, None

    def _expect_end(self, end):
        if end is None or end[0] != "end":
            raise TemplateError("missing {{end}}")

    def conditional(self, kind, toks):
        node = If(kind, self.pipeline(toks), [])
        node.body, end = self.block(("end", "else"))
        if end and end[0] == "else":
            rest = end[1]
            if rest and rest[0][0] == "ident" and rest[0][1] in ("if", "with"):
                # else if / else with: a nested conditional that shares our {{end}}
                node.else_ = [self.conditional(rest[0][1], rest[1:])]
                return node
            node.else_, end2 = self.block(("end",))
            self._expect_end(end2)
        else:
            self._expect_end(end)
        return node

    def pipeline(self, toks) -> Pipe:
        decl, assign = [], False
        # $a := ..., $i, $v := ..., $a = ...
        if toks and toks[0][0] == "var":
            j = 0
            names = [toks[0][1]]
            if len(toks) > 2 and toks[1][0] == "comma" and toks[2][0] == "var":
                names.append(toks[2][1])
                j = 2
            if len(toks) > j + 1 and toks[j + 1][0] in ("decl", "assign"):
                assign = toks[j + 1][0] == "assign"
                decl = names
                toks = toks[j + 2:]
        cmds: list[Cmd] = []
        k = 0
        args: list = []
        while k < len(toks):
            if toks[k][0] == "pipe":
                cmds.append(Cmd(args))
                args = []
                k += 1
                continue
            node, k = self.operand(toks, k)
            args.append(node)
        if args:
            cmds.append(Cmd(args))
        if not cmds:
            raise TemplateError("missing value for command")
        return Pipe(decl, cmds, assign)

    def operand(self, toks, k):
        kind, text = toks[k]
        if kind == "lp":
            depth, j = 1, k + 1
            while j < len(toks) and depth:
                depth += {"lp": 1, "rp": -1}.get(toks[j][0], 0)
                j += 1
            if depth:
                raise TemplateError("unclosed left paren")
            node = ("pipe", self.pipeline(toks[k + 1:j - 1]))
            k = j
            if k < len(toks) and toks[k][0] == "chain":
                node = ("chain", node, toks[k][1][1:].split("."))
                k += 1
            return node, k
        k += 1
        if kind == "field":
            return ("field", text[1:].split(".")), k
        if kind == "dot":
            return ("dot",), k
        if kind == "var":
            node = ("var", text)
            if k < len(toks) and toks[k][0] == "chain":
                node = ("chain", node, toks[k][1][1:].split("."))
                k += 1
            return node, k
        if kind in ("str", "raw", "char"):
            return ("lit", _unquote((kind, text))), k
        if kind == "num":
            t = text.replace("_", "")
            val = int(t, 0) if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|\d+)", t) else float(t)
            return ("lit", val), k
        if kind == "ident":
            if text in ("true", "false"):
                return ("lit", text == "true"), k
            if text == "nil":
                return ("lit", None), k
            return ("func", text), k
        raise TemplateError(f"unexpected {text!r}")


def _unquote(tok) -> str:
    kind, text = tok
    if kind == "raw":
        return text[1:-1]
    if kind == "char":
        return ord(_json.loads('"' + text[1:-1].replace('"', '\\"') + '"'))
    return _json.loads(text) if "\\x" not in text else bytes(text[1:-1], "utf-8").decode("unicode_escape")


# --- execution -------------------------------------------------------------------------------
class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def truthy(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def go_str(v) -> str:
    if v is None:
        return "<no value>"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, float):
        return repr(v) if not v.is_integer() else str(int(v)) if abs(v) < 1e21 else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_str(x)}" for k, x in sorted(v.items())) + "]"
    return str(v)


def _get(v, name):
    if isinstance(v, dict):
        return v.get(name)  # missingkey=zero: absent keys read as the zero value
    if v is None:
        raise TemplateError(f"nil pointer evaluating .{name}")
    if hasattr(v, name):
        return getattr(v, name)
    raise TemplateError(f"can't evaluate field {name}")


def _cmp_ok(a, b):
    num = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, num) and isinstance(b, num):
        return True
    return type(a) is type(b) or a is None or b is None


def _eq(a, *bs):
    if not bs:
        raise TemplateError("missing argument for comparison")
    for b in bs:
        if not _cmp_ok(a, b):
            raise TemplateError("incompatible types for comparison")
        if a == b:
            return True
    return False


def _ordered(op):
    def f(a, b):
        if not _cmp_ok(a, b) or isinstance(a, (bool, type(None))):
            raise TemplateError("incompatible types for comparison")
        return op(a, b)
    return f


def _len(v):
    if isinstance(v, str):
        return len(v.encode("utf-8"))
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    raise TemplateError(f"len of type {type(v).__name__}")


def _slice(v, *idx):
    if isinstance(v, str):
        b = v.encode("utf-8")
        i = idx[0] if idx else 0
        j = idx[1] if len(idx) > 1 else len(b)
        if not (0 <= i <= j <= len(b)):
            raise TemplateError(f"slice index out of range: {i}:{j}")
        return b[i:j].decode("utf-8", errors="replace")
    if isinstance(v, (list, tuple)):
        i = idx[0] if idx else 0
        j = idx[1] if len(idx) > 1 else len(v)
        if not (0 <= i <= j <= len(v)):
            raise TemplateError(f"slice index out of range: {i}:{j}")
        return list(v[i:j])
    raise TemplateError(f"can't slice item of type {type(v).__name__}")


def _index(v, *keys):
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple, str)):
            if not isinstance(k, int) or not 0 <= k < len(v):
                raise TemplateError(f"index out of range: {k}")
            v = v[k] if not isinstance(v, str) else v.encode("utf-8")[k]
        else:
            raise TemplateError(f"can't index item of type {type(v).__name__}")
    return v


def _printf(fmt, *args):
    out, ai, i = [], 0, 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        i += 1
        if i < len(fmt) and fmt[i] == "%":
            out.append("%")
            i += 1
            continue
        m = re.compile(r"([-+ #0]*)(\d*)(?:\.(\d+))?([a-zA-Z])").match(fmt, i)
        if not m:
            out.append("%!(NOVERB)")
            break
        flags, width, prec, verb = m.groups()
        i = m.end()
        if ai >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[ai]
        ai += 1
        if verb in "vs":
            s = go_str(a)
        elif verb == "q":
            s = _json.dumps(a if isinstance(a, str) else go_str(a), ensure_ascii=False)
        elif verb == "d":
            s = str(int(a))
        elif verb in "fFeg":
            s = format(a, f".{prec or 6}{verb.lower()}") if verb != "g" else format(a, "g")
        elif verb == "t":
            s = go_str(bool(a))
        elif verb == "x":
            s = a.encode().hex() if isinstance(a, str) else format(a, "x")
        else:
            s = go_str(a)
        if width:
            s = s.ljust(int(width)) if "-" in flags else s.rjust(int(width))
        out.append(s)
    return "".join(out)


def _print(*args):
    # Go's fmt.Sprint: spaces between operands when neither is a string
    out = []
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(go_str(a))
    return "".join(out)


_GO_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                    "\u2029": "\\u2029"}


def _json_fn(v):
    """Go's json.Marshal: map keys sorted, HTML characters escaped."""
    s = _json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return re.sub("[<>&\u2028\u2029]", lambda m: _GO_JSON_ESCAPES[m.group()], s)


def _ts_type(v):
    return _json_fn(v)


FUNCS = {
    "eq": _eq, "ne": lambda a, b: not _eq(a, b),
    "lt": _ordered(lambda a, b: a < b), "le": _ordered(lambda a, b: a <= b),
    "gt": _ordered(lambda a, b: a > b), "ge": _ordered(lambda a, b: a >= b),
    "not": lambda v: not truthy(v), "len": _len, "slice": _slice, "index": _index,
    "print": _print, "printf": _printf, "println": lambda *a: " ".join(go_str(x) for x in a) + "\n",
    "json": _json_fn, "toTypeScriptType": _ts_type,
    "currentDate": lambda: _dt.date.today().strftime("%Y-%m-%d"),
    "yesterdayDate": lambda: (_dt.date.today() - _dt.timedelta(days=1)).strftime("%Y-%m-%d"),
    "html": lambda *a: _print(*a).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    .replace('"', "&#34;").replace("'", "&#39;"),
    "urlquery": lambda *a: __import__("urllib.parse").parse.quote_plus(_print(*a)),
    "js": lambda *a: _json.dumps(_print(*a))[1:-1],
    "call": lambda f, *a: f(*a),
}


class Template:
    """Parse once, execute many times: Template(text).execute(data) -> str."""

    def __init__(self, text: str):
        p = _Parser(text)
        self.root = p.parse()
        self.defines = p.defines
        self.text = text

    def execute(self, data: Any) -> str:
        out: list[str] = []
        self._run(self.root, data, [{"$": data}], out)
        return "".join(out)

    # scopes: a stack of dicts of variables
    def _lookup(self, scopes, name):
        for s in reversed(scopes):
            if name in s:
                return s[name]
        raise TemplateError(f"undefined variable: {name}")

    def _set(self, scopes, name, value):
        for s in reversed(scopes):
            if name in s:
                s[name] = value
                return
        raise TemplateError(f"undefined variable: {name}")

    def _run(self, nodes, dot, scopes, out):
        for n in nodes:
            if isinstance(n, Text):
                out.append(n.text)
            elif isinstance(n, Out):
                v = self._pipe(n.pipe, dot, scopes)
                if not n.pipe.decl:
                    out.append(go_str(v))
            elif isinstance(n, If):
                v = self._pipe(n.pipe, dot, scopes, declare_in=None)
                scopes.append({})
                try:
                    if n.pipe.decl:
                        for name in n.pipe.decl:
                            scopes[-1][name] = v
                    if truthy(v):
                        self._run(n.body, v if n.kind == "with" else dot, scopes, out)
                    else:
                        self._run(n.else_, dot, scopes, out)
                finally:
                    scopes.pop()
            elif isinstance(n, Range):
                self._range(n, dot, scopes, out)
            elif isinstance(n, TemplateCall):
                body = self.defines.get(n.name)
                if body is None:
                    raise TemplateError(f'no such template "{n.name}"')
                arg = self._pipe(n.pipe, dot, scopes) if n.pipe else None
                self._run(body, arg, [{"$": arg}], out)
            elif isinstance(n, Break):
                raise _Break
            elif isinstance(n, Continue):
                raise _Continue

    def _range(self, n, dot, scopes, out):
        seq = self._eval_cmds(n.pipe.cmds, dot, scopes)
        if isinstance(seq, dict):
            items = sorted(seq.items())
        elif isinstance(seq, (list, tuple)):
            items = list(enumerate(seq))
        elif isinstance(seq, int) and not isinstance(seq, bool):
            items = [(i, i) for i in range(seq)]
        elif seq is None:
            items = []
        else:
            raise TemplateError(f"range can't iterate over {go_str(seq)}")
        if not items:
            scopes.append({})
            try:
                self._run(n.else_, dot, scopes, out)
            finally:
                scopes.pop()
            return
        for k, v in items:
            scope = {}
            if len(n.pipe.decl) == 1:
                scope[n.pipe.decl[0]] = v
            elif len(n.pipe.decl) == 2:
                scope[n.pipe.decl[0]], scope[n.pipe.decl[1]] = k, v
            scopes.append(scope)
            try:
                self._run(n.body, v, scopes, out)
            except _Continue:
                pass
            except _Break:
                break
            finally:
                scopes.pop()

    def _pipe(self, pipe: Pipe, dot, scopes, declare_in="current"):
        v = self._eval_cmds(pipe.cmds, dot, scopes)
        if pipe.decl and declare_in == "current":
            if pipe.assign:
                self._set(scopes, pipe.decl[0], v)
            else:
                scopes[-1][pipe.decl[0]] = v
        return v

    def _eval_cmds(self, cmds, dot, scopes):
        prev, have_prev = None, False
        for c in cmds:
            prev = self._cmd(c, dot, scopes, prev if have_prev else _NOARG)
            have_prev = True
        return prev

    def _cmd(self, cmd: Cmd, dot, scopes, piped):
        head, rest = cmd.args[0], cmd.args[1:]
        if head[0] == "func":
            name = head[1]
            if name in ("and", "or"):
                vals = rest + ([("value", piped)] if piped is not _NOARG else [])
                v = None
                for a in vals:
                    v = self._arg(a, dot, scopes)
                    if (name == "and") != truthy(v):
                        return v
                return v
            fn = FUNCS.get(name)
            if fn is None:
                raise TemplateError(f'function "{name}" not defined')
            args = [self._arg(a, dot, scopes) for a in rest]
            if piped is not _NOARG:
                args.append(piped)
            try:
                return fn(*args)
            except TypeError as e:
                raise TemplateError(f"wrong number of args for {name}: {e}") from None
        if rest or piped is not _NOARG:
            raise TemplateError(f"can't give argument to non-function {head}")
        return self._arg(head, dot, scopes)

    def _arg(self, a, dot, scopes):
        kind = a[0]
        if kind == "lit":
            return a[1]
        if kind == "value":
            return a[1]
        if kind == "dot":
            return dot
        if kind == "var":
            return self._lookup(scopes, a[1])
        if kind == "field":
            v = dot
            for name in a[1]:
                v = _get(v, name)
            return v
        if kind == "chain":
            v = self._arg(a[1], dot, scopes)
            for name in a[2]:
                v = _get(v, name)
            return v
        if kind == "pipe":
            return self._eval_cmds(a[1].cmds, dot, scopes)
        if kind == "func":
            return self._cmd(Cmd([a]), dot, scopes, _NOARG)
        raise TemplateError(f"bad argument {a}")


_NOARG = object()


def render(template: str, data: Any) -> str:
    return Template(template).execute(data)
