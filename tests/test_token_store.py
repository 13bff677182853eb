"""The token store: the ids and labels `encode` defines, for every chat format, built in
parallel and reused; errors keep their file:line; the report is the same."""

import json

import numpy as np
import pytest

from ollama_ft.chat_formats import FORMATS
from ollama_ft.data import build
from ollama_ft.data.check import check_data, load_examples
from ollama_ft.data.tokenize import IGNORE, encode
from ollama_ft.errors import DataError
from tests.conftest import DATA, write_jsonl

# tokenizer -> the format its family trains with (tests/conftest.py FAMILIES)
TOKENIZERS = {
    "r1-qwen": ("deepseek-r1-distill-qwen-7b", None, None),
    "r1-llama": ("deepseek-r1-distill-llama-8b", None, None),
    "r1-qwen3": ("deepseek-r1-0528-qwen3-8b", None, None),
    "coder": ("deepseek-coder-33b-base", "deepseek-coder-instruct.jinja", {"eos_token": "<|EOT|>"}),
    "llm": ("deepseek-llm-7b-base", "deepseek-llm-chat.jinja", None),
}
FAMILY_FORMAT = {"r1-qwen": "deepseek-r1", "r1-llama": "deepseek-r1", "r1-qwen3": "deepseek-r1-0528",
                 "coder": "deepseek-coder", "llm": "deepseek-llm"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from ollama_ft.tinymodel import write_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    loaded = {}

    def get(family):
        if family not in loaded:
            name, template, overrides = TOKENIZERS[family]
            template = (DATA / "chat_templates" / template).read_text() if template else None
            write_tokenizer(name, root / family, template, overrides)
            loaded[family] = AutoTokenizer.from_pretrained(root / family)
        return loaded[family]

    return get


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(tmp_path / "cache"))


def rows():
    """Conversations that test the boundaries: system prompts, several turns, reasoning in a
    field and inline, Chinese, emoji, code, white space, special tokens written as text, and
    long answers (truncated at a small max_len)."""
    out = []
    for i in range(40):
        msgs = []
        if i % 5 == 0:
            msgs.append({"role": "system", "content": f"You are terse. 你好 {i}"})
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": [f"What is {i}+{t}?", "写一首诗 🙂",
                                                     "Fix:\n```py\ndef f(x):\n\treturn x\n```",
                                                     "  spaced  \n\n", "<think> and </think>?",
                                                     "say <｜end▁of▁sentence｜> <|EOT|>"][(i + t) % 6]})
            answer = {"role": "assistant", "content": f"Answer {i}.{t}: " + "word " * (i % 7 * 9)}
            if (i + t) % 4 == 1:
                answer["reasoning_content"] = f"First, {i}. Then {t}.\n"
            elif (i + t) % 4 == 2:
                answer["content"] = f"<think>\ninline {i}\n</think>\n\n" + answer["content"]
            msgs.append(answer)
        out.append({"messages": msgs})
    return out


def expected(path, tok, fmt, max_len):
    """What encode() gives for the file: the reference every store must equal."""
    examples, _ = load_examples(path)
    out = []
    for ex in examples:
        enc = encode(tok, fmt, ex.messages, max_len)
        if any(x != IGNORE for x in enc.labels):
            out.append((ex, enc))
    return out


def assert_same(path, tok, fmt, max_len, **kw):
    examples, store, report = check_data(path, tok, fmt, max_len, **kw)
    ref = expected(path, tok, fmt, max_len)
    assert len(store) == len(examples) == len(ref) == report.kept
    for i, (ex, enc) in enumerate(ref):
        got = store[i]
        assert got.input_ids == enc.input_ids, (fmt.name, ex.location)
        assert got.labels == enc.labels, (fmt.name, ex.location)
        assert got.truncated == enc.truncated
        assert examples[i].location == ex.location and examples[i].messages == ex.messages
    assert [e.location for e in examples] == [ex.location for ex, _ in ref]
    assert report.trained_tokens == sum(sum(1 for x in e.labels if x != IGNORE) for _, e in ref)
    return store, report


@pytest.mark.parametrize("family", TOKENIZERS)
def test_store_has_the_ids_and_labels_of_encode_for_every_format(tokenizer, tmp_path, family):
    path = write_jsonl(tmp_path / "d.jsonl", rows())
    _, report = assert_same(path, tokenizer(family), FORMATS[FAMILY_FORMAT[family]], 48)
    assert report.truncated > 0  # the truncation path is covered


def test_store_matches_encode_for_ollama_templates(tokenizer, tmp_path):
    from ollama_ft.ollama.templates import template_for
    from ollama_ft.ollama_base.chat import template_format
    from tests.test_ollama_base_chat import CHATML

    path = write_jsonl(tmp_path / "d.jsonl", rows())
    template, params = template_for("deepseek-r1")
    assert_same(path, tokenizer("r1-qwen"), template_format("r1", template, params["stop"]), 64)
    assert_same(path, tokenizer("r1-qwen"), template_format("smollm2", CHATML, ["<|im_end|>"],
                                                            system="You are SmolLM."), 64)


def test_worker_processes_and_chunks_give_the_same_store(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "CHUNK_BYTES", 3000)  # many chunks, cut between lines
    path = write_jsonl(tmp_path / "d.jsonl", rows() * 2 + rows()[:3])
    one, r1 = check_data(path, tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 64, num_proc=1,
                         cache=False)[1:]
    store, report = assert_same(path, tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 64, num_proc=2)
    assert report.to_json() == r1.to_json()
    assert report.duplicates_dropped == 43
    assert np.array_equal(np.asarray(one._ids), np.asarray(store._ids))


def test_second_check_reuses_the_store_and_any_change_rebuilds_it(tokenizer, tmp_path, monkeypatch):
    from ollama_ft.data import check
    from ollama_ft.ollama_base.chat import template_format
    from tests.test_ollama_base_chat import CHATML

    path = write_jsonl(tmp_path / "d.jsonl", rows())
    tok, fmt = tokenizer("r1-qwen"), FORMATS["deepseek-r1"]
    smol = template_format("smollm2", CHATML, ["<|im_end|>"], system="You are SmolLM.")
    first = {}
    for key, args in {"base": (path, tok, fmt, 64), "max_len": (path, tok, fmt, 65),
                      "tokenizer": (path, tokenizer("r1-llama"), fmt, 64),
                      "format": (path, tok, FORMATS["deepseek-llm"], 64),
                      "template": (path, tok, smol, 64)}.items():
        first[key] = check_data(*args)
    builds = []
    real_build = check._build
    monkeypatch.setattr(check, "_build", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    for key, args in {"base": (path, tok, fmt, 64), "max_len": (path, tok, fmt, 65),
                      "tokenizer": (path, tokenizer("r1-llama"), fmt, 64),
                      "format": (path, tok, FORMATS["deepseek-llm"], 64),
                      "template": (path, tok, smol, 64)}.items():
        again = check_data(*args)
        assert again[1].dir == first[key][1].dir, key  # the same store, not rebuilt
        assert again[2].to_json() == first[key][2].to_json()
    assert builds == []
    assert len({v[1].dir for v in first.values()}) == 5  # each change made its own store
    # a TEMPLATE that renders the same but differs in a field (its system prompt): rebuilt
    check_data(path, tok, template_format("smollm2", CHATML, ["<|im_end|>"], system="Other."), 64)
    # the same bytes under another name: reused, and the locations name the new file
    other = tmp_path / "copy.jsonl"
    other.write_bytes(path.read_bytes())
    ex, store, report = check_data(other, tok, fmt, 64)
    assert len(builds) == 1 and store.dir == first["base"][1].dir
    assert report.file == str(other) and ex[0].location == f"{other}:1"
    # one changed byte: rebuilt
    path.write_text(path.read_text().replace("Answer 3", "Answer 4"))
    check_data(path, tok, fmt, 64)
    assert len(builds) == 2


BAD = {3: '{"messages": [{"role": "robot", "content": "hi"}]}',
       57: '{"messages": [{"role": "user", "content": "hi"}]}',
       90: '{"text": "hello"}'}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_errors_keep_file_and_line_across_chunks(tokenizer, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(build, "CHUNK_BYTES", 2000)
    lines = [json.dumps(r, ensure_ascii=False) for r in (rows() * 3)[:100]]
    for n, bad in BAD.items():
        lines[n - 1] = bad
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tok, fmt = tokenizer("r1-qwen"), FORMATS["deepseek-r1"]
    with pytest.raises(DataError) as e:
        check_data(path, tok, fmt, 64, num_proc=num_proc)
    msg = str(e.value)
    assert msg.startswith(f"3 invalid record(s) in {path}")
    assert [line.split(": ")[0] for line in msg.splitlines()[1:]] == [
        f"  {path}:3", f"  {path}:57", f"  {path}:90"]
    assert "messages[0].role is 'robot'" in msg and "looks like no known format" in msg
    lines[70] = '{"messages": '  # invalid JSON stops the check at its line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:71: invalid JSON"):
        check_data(path, tok, fmt, 64, num_proc=num_proc)
    raw = ("\n".join(lines[:60]) + "\n").encode() + b'{"prompt": "caf\xe9", "response": "A"}\n'
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"{path}:61: not UTF-8 \(byte 0xe9 at offset "
                                        rf"{raw.index(b'caf') + 3}\)"):
        check_data(path, tok, fmt, 64, num_proc=num_proc)
    assert not list((tmp_path / "cache" / "tokens").glob("*"))  # nothing half-made kept


def test_report_counts_duplicates_rejects_truncation_reasoning_and_system(tokenizer, tmp_path):
    qa = lambda q, a, **kw: {"messages": [{"role": "system", "content": "S"},  # noqa: E731
                                          {"role": "user", "content": q},
                                          {"role": "assistant", "content": a, **kw}]}
    data = [qa("Q1", "A1"), qa("Q1", "A1"), qa("Q2", "   "), qa("Q3", "A3", reasoning="r"),
            qa("long " * 80, "A4"), qa("Q5", "A5"), qa("Q1", "A1")]
    path = write_jsonl(tmp_path / "d.jsonl", data)
    ex, store, report = check_data(path, tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 40)
    assert report.records_read == 7 and report.duplicates_dropped == 2
    assert report.duplicates == [f"{path}:2 repeats {path}:1", f"{path}:7 repeats {path}:1"]
    assert report.rejected == [
        {"location": f"{path}:3", "why": "empty assistant message"},
        {"location": f"{path}:5", "why": "no assistant tokens left after truncation at max_len 40"}]
    assert report.kept == 3 == len(store) and [e.location for e in ex] == [
        f"{path}:1", f"{path}:4", f"{path}:6"]
    assert report.system_prompt == "S" and report.with_reasoning == 1
    assert report.token_lengths["max"] > 40 and report.truncated == 0
    assert report.chat_format == "deepseek-r1" and report.max_len == 40 and report.format == "messages"
    with pytest.raises(DataError, match="every record lost its assistant answer"):
        check_data(write_jsonl(tmp_path / "e.jsonl", [qa("long " * 80, "A")]),
                   tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 40)


@pytest.mark.parametrize("kind", ["json", "csv", "parquet"])
def test_other_file_types_and_their_locations(tokenizer, tmp_path, kind):
    recs = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(5)] + [{"prompt": "Q0",
                                                                              "response": "A0"}]
    path = tmp_path / f"d.{kind}"
    if kind == "json":
        path.write_text(json.dumps(recs))
    elif kind == "csv":
        path.write_text("prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in recs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    assert_same(path, tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 64)
    ex, store, report = check_data(path, tokenizer("r1-qwen"), FORMATS["deepseek-r1"], 64)
    first = {"json": f"{path}: item 1", "csv": f"{path}:2", "parquet": f"{path}: row 1"}[kind]
    last = {"json": f"{path}: item 6", "csv": f"{path}:7", "parquet": f"{path}: row 6"}[kind]
    assert ex[0].location == first and report.duplicates == [f"{last} repeats {first}"]
    assert len(store) == 5 and [e.messages[0].content for e in ex] == [f"Q{i}" for i in range(5)]
