"""Modelfile render/parse: Ollama's quoting and parsing rules, round trips, the REST form,
and the Modelfile of a run (FROM, TEMPLATE, stops, num_ctx, SYSTEM, overrides)."""

import random

import pytest

from ollama_ft.chat_formats import FORMATS
from ollama_ft.errors import OllamaFtError
from ollama_ft.ollama.modelfile import Modelfile, ModelfileError
from ollama_ft.ollama.templates import (NUM_CTX_CAP, TemplateError, build_modelfile, num_ctx_for,
                                        parse_overrides, resolve_chat_format, template_for,
                                        write_modelfile)
from ollama_ft.pipeline import modelfile_for_run

FULL = Modelfile(
    from_="./model-q4_k_m.gguf",
    adapter="./adapter.gguf",
    template=('{{ if .System }}{{ .System }}\n\n{{ end }}'
              '{{ range .Messages }}"{{ .Content }}"{{ end }}'),
    system="  Answer in 中文, briefly. 🎉\tTabs stay.  ",
    parameters=[("stop", "<｜end▁of▁sentence｜>"), ("stop", "User: "), ("stop", '"quoted"'),
                ("num_ctx", "8192"), ("temperature", "0.6"), ("use_mmap", "false")],
    license=["MIT License\n\nCopyright (c) 2025", 'He said "hi"'],
    messages=[("system", "Be brief."), ("user", "Hi\nthere"), ("assistant", "Hello!")],
    other=[("requires", "0.30.0")],
)


def test_full_modelfile_round_trips():
    text = FULL.render(header="written by ollama-ft\nsecond line")
    assert text.startswith("# written by ollama-ft\n# second line\nFROM ./model-q4_k_m.gguf\n")
    assert Modelfile.parse(text) == FULL
    # rendering what was parsed gives the same text
    assert Modelfile.parse(text).render(header="written by ollama-ft\nsecond line") == text


def test_quoting_is_minimal_and_follows_ollama():
    text = FULL.render()
    assert "PARAMETER stop <｜end▁of▁sentence｜>\n" in text  # bare: no spaces at the ends
    assert 'PARAMETER stop "User: "\n' in text  # a trailing space needs quotes
    assert 'PARAMETER stop ""quoted""\n' in text  # starts with a quote: one more pair
    assert "PARAMETER num_ctx 8192\n" in text
    assert 'LICENSE """MIT License\n\nCopyright (c) 2025"""\n' in text
    assert 'LICENSE He said "hi"\n' in text  # quotes inside a bare value are fine
    assert 'MESSAGE user """Hi\nthere"""\n' in text


ALPHABET = ['"', '"""', "\n", " ", "\t", "#", "a", "Z", "中", "🎉", "{{", "}}", "\r\n",
            "'", "\\"]


def test_random_values_round_trip_or_are_refused():
    rng = random.Random(1234)
    refused = 0
    for _ in range(3000):
        value = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        mf = Modelfile(from_="x", system=value, template=value + "y")
        try:
            text = mf.render()
        except ModelfileError as e:
            assert "cannot be written" in str(e)
            refused += 1
            continue
        assert Modelfile.parse(text) == mf, repr(text)
    assert refused < 300  # only values with lines ending in both kinds of quote


def test_unrepresentable_characters_are_refused_on_render():
    with pytest.raises(ModelfileError, match="U\\+3000"):
        Modelfile(from_="x", system="全角\u3000空格").render()
    # and dropped on parse, as Ollama's parser drops them
    assert Modelfile.parse("FROM x\nSYSTEM a\u00a0b\x07c\n").system == "abc"


def test_a_value_no_quote_can_hold_is_refused():
    with pytest.raises(ModelfileError, match="cannot be written"):
        Modelfile(from_="x", system='a"""\nb"\nc').render()


def test_parse_follows_ollamas_rules():
    text = (
        "\ufeff# a comment at the start of a line\n"
        "  # also one after blanks\n"
        "from  ./m.gguf  \n"
        "Template \"\"\"\n"
        "{{ .Prompt }} # not a comment\n"
        "\"\"\"\n"
        "system\tline with\ttabs \n"
        "PARAMETER\tstop\t</s>\n"
        "PARAMETER stop \"<|im_end|>\"\n"

        "PARAMETER num_predict -1\n"
        "PARAMETER top_k 40\r\n"
        "PARAMETER mirostat 0\n"
        "message user hello: there\n"
        "LICENSE \"two\nlines\"\n"
        "SYSTEM second system wins\n"
    )
    mf = Modelfile.parse(text)
    assert mf.from_ == "./m.gguf"
    assert mf.template == "\n{{ .Prompt }} # not a comment\n"
    assert mf.system == "second system wins"
    assert mf.parameters == [("stop", "</s>"), ("stop", "<|im_end|>"), ("num_predict", "-1"),
                             ("top_k", "40"), ("mirostat", "0")]
    assert mf.messages == [("user", "hello: there")]
    assert mf.license == ["two\nlines"]
    req = mf.to_create_request()
    assert req["parameters"] == {"stop": ["</s>", "<|im_end|>"], "num_predict": -1, "top_k": 40}
    assert req["messages"] == [{"role": "user", "content": "hello: there"}]


def test_triple_quote_ends_at_the_first_line_ending_in_triple_quote():
    mf = Modelfile.parse('FROM x\nTEMPLATE """a""" b\nc"""\nSYSTEM s\n')
    assert mf.template == 'a""" b\nc' and mf.system == "s"
    assert Modelfile.parse('FROM x\nSYSTEM """"""\n').system == ""
    assert Modelfile.parse("FROM x\nSYSTEM \"'\"\n").system == "'"
    assert Modelfile.parse('FROM "  spaced name "\n').from_ == "  spaced name "


@pytest.mark.parametrize("text, line, match", [
    ("FROM x\nBADCOMMAND a b\n", 2, "unknown instruction 'BADCOMMAND'"),
    ("FROM x\nPARAMETER temperature 1 # note\n", 2, "temperature must be a number"),
    ("FROM x\n\nPARAMETER Temperature 1\n", 3, "case-sensitive: temperature"),
    ("FROM x\nPARAMETER num_ctx 4k\n", 2, "num_ctx must be an integer"),
    ("FROM x\nPARAMETER use_mmap yes\n", 2, "use_mmap must be true or false"),
    ("FROM x\nPARAMETER bogus 1\n", 2, "unknown parameter 'bogus'"),
    ("FROM x\nPARAMETER stop\n", 2, "PARAMETER needs a parameter name and a value"),
    ("FROM x\nPARAMETER num-ctx 5\n", 2, "PARAMETER needs a parameter name"),
    ("FROM x\nMESSAGE User hi\n", 2, "role 'User' must be one of system, user, assistant"),
    ("FROM x\nMESSAGE tool hi\n", 2, "role 'tool'"),
    ("FROM x\nSYSTEM\n", 2, "SYSTEM needs a value"),
    ("FROM x\nSYSTEM", 2, "SYSTEM needs a value"),
    ("FROM x\nTEMPLATE2 y\n", 2, "unknown instruction 'TEMPLATE2'"),
    ('FROM x\n\nSYSTEM """never\nclosed""\n', 3, "never closed"),
    ('FROM x\r\nSYSTEM "open\r\n', 2, "never closed"),
    ("FROM x\nFROM y\n", 2, "second FROM \\(the first is on line 1\\)"),
    ("FROM \n", 1, "FROM needs a model name"),
])
def test_invalid_input_is_refused_with_its_line(text, line, match):
    with pytest.raises(ModelfileError, match=match) as e:
        Modelfile.parse(text, path="runs/x/Modelfile")
    assert str(e.value).startswith(f"runs/x/Modelfile:{line}: ")


def test_missing_from_is_refused():
    with pytest.raises(ModelfileError, match="no FROM line"):
        Modelfile.parse("# nothing\nSYSTEM hi\n")


def test_create_request_types_every_parameter():
    mf = Modelfile(from_="x", template="T", system="S", license=["L"],
                   parameters=[("num_ctx", "4096"), ("temperature", "0.7"), ("top_p", "1"),
                               ("use_mmap", "True"), ("stop", "a"), ("stop", "b"),
                               ("seed", "+42"), ("min_p", "5e-2"), ("f16_kv", "true")],
                   messages=[("system", "hi")], other=[("parser", "qwen3"),
                                                        ("draft", "./d.gguf")])
    assert mf.to_create_request() == {
        "template": "T", "system": "S", "license": ["L"],
        "parameters": {"num_ctx": 4096, "temperature": 0.7, "top_p": 1.0, "use_mmap": True,
                       "stop": ["a", "b"], "seed": 42, "min_p": 0.05},
        "messages": [{"role": "system", "content": "hi"}], "parser": "qwen3"}
    req = mf.to_create_request()
    assert isinstance(req["parameters"]["num_ctx"], int)
    assert isinstance(req["parameters"]["top_p"], float)


def test_render_refuses_bad_parameters_and_roles():
    with pytest.raises(ModelfileError, match="num_ctx must be an integer"):
        Modelfile(from_="x", parameters=[("num_ctx", "big")]).render()
    with pytest.raises(ModelfileError, match="role 'tool'"):
        Modelfile(from_="x", messages=[("tool", "t")]).render()


def test_read_reports_missing_files(tmp_path):
    with pytest.raises(ModelfileError, match="no such file"):
        Modelfile.read(tmp_path / "Modelfile")
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\nSYSTEM s\n", encoding="utf-8")
    assert Modelfile.read(tmp_path / "Modelfile").system == "s"


# --- the Modelfile of a run ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_build_modelfile_per_format(fmt):
    mf = build_modelfile(fmt, quant="q4_k_m,q8_0", max_len=2048, base_context=131072)
    template, params = template_for(fmt)
    assert mf.from_ == "./model-q4_k_m.gguf"
    assert mf.template == template and mf.system is None and mf.adapter is None
    assert tuple(mf.parameter("stop")) == FORMATS[fmt].stops == tuple(params["stop"])
    assert mf.parameter("num_ctx") == [str(NUM_CTX_CAP)]
    assert Modelfile.parse(mf.render()) == mf


def test_r1_defaults_follow_deepseeks_sampling_advice():
    _, params = template_for("deepseek-r1")
    assert params["temperature"] == 0.6 and params["top_p"] == 0.95


@pytest.mark.parametrize("max_len, ctx, want", [
    (2048, 131072, 8192), (16384, 131072, 16384), (2048, 4096, 4096), (8192, 4096, 8192),
    (None, 16384, 8192), (3000, None, 3000), (None, None, None)])
def test_num_ctx_rule(max_len, ctx, want):
    assert num_ctx_for(max_len, ctx) == want


def test_system_and_overrides():
    mf = build_modelfile("deepseek-r1", quant=["Q8_0"], max_len=1024, base_context=2048,
                         system="You answer in French.",
                         overrides=[("temperature", 0.3), ("stop", "###"), ("num_ctx", 4096),
                                    ("stop", "<｜User｜>"), ("seed", 7)])
    assert mf.from_ == "./model-q8_0.gguf"
    assert mf.system == "You answer in French."
    assert mf.parameters == [
        ("stop", "<｜end▁of▁sentence｜>"), ("stop", "<｜User｜>"),
        ("stop", "<｜Assistant｜>"), ("temperature", "0.3"), ("top_p", "0.95"),
        ("num_ctx", "4096"), ("stop", "###"),
        ("seed", "7")]
    with pytest.raises(ModelfileError, match="unknown parameter 'temp'"):
        build_modelfile("deepseek-r1", overrides={"temp": 1})
    assert build_modelfile("deepseek-r1", system="").system is None


def test_param_flags():
    assert parse_overrides(["temperature=0.7", "stop=User: ", "num_ctx=4096"]) == [
        ("temperature", "0.7"), ("stop", "User: "), ("num_ctx", "4096")]
    with pytest.raises(ModelfileError, match="expected NAME=VALUE"):
        parse_overrides(["temperature"])
    with pytest.raises(ModelfileError, match="num_ctx must be an integer"):
        parse_overrides(["num_ctx=8k"])


def test_unknown_format_names_the_known_ones_and_the_way_out():
    with pytest.raises(TemplateError) as e:
        resolve_chat_format(None, "{{ messages }} <|im_start|>", where="Qwen/Qwen2.5-7B")
    msg = str(e.value)
    assert msg.startswith("Qwen/Qwen2.5-7B has a chat template that matches none")
    assert all(name in msg for name in FORMATS) and "--template FILE" in msg
    with pytest.raises(TemplateError, match="--template FILE"):
        template_for("deepseek-v3")
    with pytest.raises(TemplateError, match="has no chat template"):
        resolve_chat_format(None, None)
    assert resolve_chat_format("deepseek-llm") == "deepseek-llm"


def test_template_file_replaces_the_formats_template(tmp_path):
    tf = tmp_path / "my.gotmpl"
    tf.write_text("{{ range .Messages }}{{ .Content }}{{ end }}\n", encoding="utf-8")
    mf = build_modelfile(None, template_file=tf)
    assert mf.template == "{{ range .Messages }}{{ .Content }}{{ end }}\n"
    assert mf.parameter("stop") == []
    # for a known format, the template must write the BOS the GGUF does not add
    with pytest.raises(TemplateError, match="does not start with <｜begin▁of▁sentence｜>"):
        build_modelfile("deepseek-coder", template_file=tf)
    tf.write_text("<｜begin▁of▁sentence｜>{{ range .Messages }}{{ .Content }}{{ end }}\n",
                  encoding="utf-8")
    mf = build_modelfile("deepseek-coder", template_file=tf)
    assert mf.parameter("stop") == list(FORMATS["deepseek-coder"].stops)
    tf.write_text("{{ .Prompt ", encoding="utf-8")
    with pytest.raises(TemplateError, match="unbalanced"):
        build_modelfile(None, template_file=tf)


def test_modelfile_for_run_reads_the_run_directory(tmp_path):
    import json

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("name: t\nbase: ./base\nmax_len: 1024\nquant: q8_0\n")
    (run / "report.json").write_text(json.dumps(
        {"train": {"chat_format": "deepseek-llm", "base_path": str(base), "repo_id": None}}))
    mf = modelfile_for_run(run, system="Sys")
    assert mf.from_ == "./model-q8_0.gguf"
    assert mf.parameter("num_ctx") == ["4096"] and mf.system == "Sys"
    assert mf.parameter("stop") == list(FORMATS["deepseek-llm"].stops)
    path = write_modelfile(run, mf, header="ollama create t -f Modelfile")
    assert path == run / "Modelfile"
    assert Modelfile.read(path) == mf


def test_modelfile_for_run_detects_the_format_from_the_base(tmp_path):
    import json

    base = tmp_path / "base"
    base.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"train": {"base_path": str(base)}}))
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ '### Instruction:\\n' }}{{ '### Response:\\n' }}"}))
    assert modelfile_for_run(run).template == template_for("deepseek-coder")[0]
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>"}))
    with pytest.raises(OllamaFtError, match="not one of the DeepSeek formats we know.*--template FILE"):
        modelfile_for_run(run)


def test_the_bridge_takes_options_by_the_modelfile_parameter_table():
    """One table of option names and types: a PARAMETER a Modelfile may carry is an option
    the bridge accepts (mirostat was once known to the Modelfile only)."""
    from ollama_ft.serve.engine import BadOption, check_options

    assert check_options({"mirostat": 0, "use_mlock": True}) == {}  # deprecated: ignored
    assert check_options({"draft_num_predict": 3, "num_ctx": 8.0}) == {"draft_num_predict": 3,
                                                                      "num_ctx": 8}
    with pytest.raises(BadOption, match="invalid option provided: nope"):
        check_options({"nope": 1})
    with pytest.raises(BadOption, match='"top_k" must be of type integer'):
        check_options({"top_k": 0.5})
