"""The bridge's Go-template interpreter against Go's real text/template, on tricky templates
and on every template in ollama_ft/modelfiles/."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ollama_ft.ollamafmt.gotemplate import Template, TemplateError

HERE = Path(__file__).parent
MSGS = [{"Role": "system", "Content": "Sys"}, {"Role": "user", "Content": "Hi <b>&"},
        {"Role": "assistant", "Content": "Yo", "Thinking": "hmm"},
        {"Role": "user", "Content": "你好 🎉\n\tcode"}]
DATA = {"System": "Be brief.", "Messages": MSGS, "Prompt": "p", "Response": "", "Think": True,
        "IsThinkSet": False, "Tools": [], "L": ["a", "b", "c"], "M": {"k": "v", "a": "z"},
        "S": "héllo", "Empty": "", "T": True, "F": False, "N": None}

CORPUS = [
    "plain text only",
    "{{ .System }}|{{.Prompt}}|{{ .Missing }}|{{ .M.k }}|{{ .M.nope }}",
    "a  {{- .S -}}  b\n{{- \"x\" }}\n {{ \"y\" -}} \n z",
    "{{ if .T }}yes{{ else }}no{{ end }}{{ if .F }}yes{{ else if .Empty }}e{{ else if .S }}s{{ end }}",
    "{{ with .System }}[{{ . }}]{{ else }}none{{ end }}{{ with .Empty }}x{{ else }}{{ with .S }}{{.}}{{ end }}{{ end }}",
    "{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}={{ .Content }};{{ end }}",
    "{{ range .Messages }}{{ if eq .Role \"assistant\" }}{{ .Thinking }}{{ break }}{{ end }}{{ .Role }},{{ end }}",
    "{{ range .Messages }}{{ if eq .Role \"system\" }}{{ continue }}{{ end }}{{ .Role }},{{ end }}",
    "{{ range .Tools }}t{{ else }}no tools{{ end }}{{ range .L }}{{ . }}{{ end }}",
    "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
    "{{ if $last }}LAST:{{ .Content }}{{ end }}{{ end }}",
    "{{ $x := 1 }}{{ if .T }}{{ $x = 2 }}{{ end }}{{ $x }}",
    "{{ len .S }} {{ len .L }} {{ len .M }} {{ slice .S 1 3 }} {{ slice .L 1 }} {{ index .L 2 }} {{ index .M \"a\" }}",
    "{{ and .T .S }} {{ and .F .S }} {{ or .Empty .S }} {{ or .Empty .F }} {{ not .Empty }}",
    "{{ eq .S \"héllo\" \"x\" }} {{ ne .S \"x\" }} {{ lt 1 2 }} {{ ge 2 2 }} {{ gt \"b\" \"a\" }}",
    "{{ printf \"%s|%d|%v|%q|%5s|%-3d|\" .S 42 .T \"q\\\"\" \"ab\" 7 }}{{ print \"a\" 1 2 \"b\" }}",
    "{{ json .Messages }} {{ json .M }} {{ json .S }}",
    "{{/* a comment */}}x{{- /* trimmed comment */ -}} y",
    "{{ .T | not }} {{ \"abc\" | len }} {{ .L | len | printf \"%d items\" }}",
    "{{ (index .Messages 1).Content }} {{ $m := index .Messages 2 }}{{ $m.Thinking }}",
    "{{ `raw \\n string` }} {{ \"esc \\t tab\" }} {{ 0x1F }} {{ 1.5 }} {{ -3 }}",
    "{{ define \"T1\" }}[{{ .Role }}]{{ end }}{{ range .Messages }}{{ template \"T1\" . }}{{ end }}",
    "{{ if and $.T (not .F) }}{{ range .Messages }}{{ $.System }}{{ end }}{{ end }}",
    "{{ .Messages.Nope }}",            # error in Go: can't evaluate field on a slice
    "{{ if }}x{{ end }}",              # parse error
    "{{ range .Messages }}",           # missing end
    "{{ nofunc 1 }}",                  # undefined function
    "{{ index .L 7 }}",                # index out of range
    "{{ slice .L 2 1 }}",              # bad slice
]


@pytest.fixture(scope="session")
def go_exec(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.fail("Go is needed for template parity tests: apt-get install -y golang")
    out = tmp_path_factory.mktemp("goref") / "goref"
    env = {"GOCACHE": str(out.parent / "cache"), "HOME": str(out.parent), "GO111MODULE": "off",
           "PATH": "/usr/bin:/bin:/usr/local/bin:/usr/local/go/bin"}
    subprocess.run(["go", "build", "-o", str(out), str(HERE / "gotemplate_ref" / "main.go")],
                   check=True, env=env, capture_output=True)

    def run(jobs):
        r = subprocess.run([str(out)], input=json.dumps(jobs), capture_output=True, text=True,
                           check=True)
        return json.loads(r.stdout)
    return run


def python_render(template, data):
    try:
        return {"out": Template(template).execute(data)}
    except TemplateError as e:
        return {"error": str(e)}


def test_corpus_matches_go(go_exec):
    results = go_exec([{"template": t, "data": DATA} for t in CORPUS])
    for t, go in zip(CORPUS, results):
        py = python_render(t, DATA)
        if "error" in go:
            assert "error" in py, f"Go failed ({go['error']}) but we rendered {py} for {t!r}"
        else:
            assert py == {"out": go["out"]}, t


def test_modelfile_templates_match_go(go_exec):
    """Every TEMPLATE we ship, over conversations of each shape, renders as Go renders it."""
    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.ollama.templates import template_for

    templates = [template_for(name)[0] for name in FORMATS]
    convs = [MSGS[1:2], MSGS, MSGS[1:3], MSGS[:3] + [{"Role": "assistant", "Content": "part"}]]
    jobs = []
    for t in templates:
        for conv in convs:
            for think, is_set in ((False, False), (True, True), (False, True)):
                jobs.append({"template": t, "data": {**DATA, "Messages": conv, "Think": think,
                                                      "IsThinkSet": is_set}})
    for job, go in zip(jobs, go_exec(jobs) if jobs else []):
        assert python_render(job["template"], job["data"]) == {"out": go["out"]}


def test_bridge_prompts_equal_ollamas_pipeline(gotmpl):
    """The bridge's whole prompt path (collate, .System, think defaults, legacy templates) gives
    what Ollama's own pipeline (tests/gotmpl) gives, for every shipped TEMPLATE."""
    from ollama_ft.chat_formats import FORMATS
    from ollama_ft.ollama.templates import template_for
    from ollama_ft.ollamafmt.prompt import PromptTemplate
    from tests.test_templates import SUITE, ollama_messages

    legacy = "{{ if .System }}<<{{ .System }}>>{{ end }}[U]{{ .Prompt }}[A]{{ .Response }}"
    for template in [template_for(name)[0] for name in FORMATS] + [legacy]:
        ours = PromptTemplate(template)
        cases = [{"messages": ollama_messages(conv), "think": think, "handler": "chat"}
                 for conv in SUITE.values() for think in (None, True, False)]
        cases += [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}],
                   "think": None, "handler": "chat"}]
        answer = gotmpl(template, [c for c in cases if not (c["think"] and not ours.thinking)])
        assert ("thinking" in answer["capabilities"]) == ours.thinking
        if ours.thinking:
            assert tuple(answer["thinking_tags"]) == ours.thinking_tags
        kept = [c for c in cases if not (c["think"] and not ours.thinking)]
        for case, result in zip(kept, answer["results"]):
            think = case["think"]
            if think is None and ours.thinking:
                think = True  # /api/chat: a thinking model thinks unless told not to
            assert ours.render(case["messages"], think=think) == result["prompt"], (template[:40], case)
