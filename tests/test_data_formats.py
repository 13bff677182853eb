"""Each data shape and file type normalises to the same conversation; bad input is named."""

import json

import pytest

from ollama_ft.data.check import load_examples
from ollama_ft.errors import DataError
from tests.conftest import write_jsonl

EXPECTED = [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1")]


def roles(example):
    return [(m.role, m.content) for m in example.messages]


SHAPES = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Q1"},
                              {"role": "assistant", "content": "A1"}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},
    "alpaca": {"instruction": "Q1", "input": "", "output": "A1", "system": "Be brief."},
    "prompt-response": {"prompt": "Q1", "completion": "A1", "system": "Be brief."},
    "input-output": {"input": "Q1", "output": "A1", "system": "Be brief."},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_detected_and_normalised(tmp_path, shape):
    f = write_jsonl(tmp_path / "d.jsonl", [SHAPES[shape]])
    examples, report = load_examples(f)
    assert report.format == shape
    assert roles(examples[0]) == EXPECTED


def test_alpaca_input_and_history(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Translate", "input": "hola",
                                            "output": "hello", "history": [["hi", "hey"]]}])
    ex, _ = load_examples(f)
    assert roles(ex[0]) == [("user", "hi"), ("assistant", "hey"), ("user", "Translate\n\nhola"),
                            ("assistant", "hello")]


@pytest.mark.parametrize("record,reasoning,answer", [
    ({"prompt": "Q", "response": "<think>\nstep 1\n</think>\n\nA"}, "step 1", "A"),
    ({"prompt": "Q", "response": "A", "reasoning_content": "why"}, "why", "A"),
    ({"messages": [{"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A", "reasoning": "r"}]}, "r", "A"),
    ({"input": "Q", "output": "A", "think": "t"}, "t", "A"),
])
def test_reasoning_inline_or_separate(tmp_path, record, reasoning, answer):
    ex, report = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    last = ex[0].messages[-1]
    assert (last.reasoning, last.content) == (reasoning, answer)
    assert report.with_reasoning == 1


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    rows = [json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}) for i in range(3)]
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + ("\r\n\r\n".join(rows) + "\r\n\r\n").encode())
    ex, report = load_examples(f)
    assert len(ex) == 3 and report.records_read == 3


def test_json_list_and_data_object(tmp_path):
    rec = {"prompt": "Q", "response": "A"}
    (tmp_path / "a.json").write_text(json.dumps([rec]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [rec]}))
    for name in ("a.json", "b.json"):
        ex, _ = load_examples(tmp_path / name)
        assert roles(ex[0]) == [("user", "Q"), ("assistant", "A")]


def test_csv_with_plain_and_json_columns(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,response\n"Q, with comma","multi\nline"\n', encoding="utf-8")
    ex, _ = load_examples(f)
    assert roles(ex[0]) == [("user", "Q, with comma"), ("assistant", "multi\nline")]
    g = tmp_path / "m.csv"
    msgs = json.dumps([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    g.write_text("messages\n" + '"' + msgs.replace('"', '""') + '"\n', encoding="utf-8")
    ex, report = load_examples(g)
    assert report.format == "messages" and roles(ex[0]) == [("user", "Q"), ("assistant", "A")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["Q1", "Q2"], "output": ["A1", "A2"]}),
                   tmp_path / "d.parquet")
    ex, report = load_examples(tmp_path / "d.parquet")
    assert report.format == "alpaca" and len(ex) == 2


def test_duplicates_and_empty_records_dropped_and_reported(tmp_path):
    rows = [{"prompt": "Q", "response": "A"}, {"prompt": "Q", "response": "A"},
            {"prompt": "Q2", "response": "   "}, {"prompt": "Q3", "response": "A3"}]
    ex, report = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(ex) == 2
    assert report.duplicates_dropped == 1 and "d.jsonl:2 repeats" in report.duplicates[0]
    assert report.rejected == [{"location": f"{tmp_path / 'd.jsonl'}:3", "why": "empty assistant message"}]


@pytest.mark.parametrize("content,needle", [
    (b'{"prompt": "Q", "response": "A"}\n{"prompt": "Q2", "response": \n', "d.jsonl:2: invalid JSON"),
    (b'{"prompt": "Q", "response": "A"}\n{"prompt": "caf\xe9", "response": "A"}\n', "d.jsonl:2: not UTF-8"),
    (b'{"prompt": "Q", "response": "A"}\n{"prompt": "Q", "response": 5.5, "x": [1]}\n'
     b'{"prompt": ["x"], "response": "A"}\n', "d.jsonl:3: 'prompt' must be text"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', "d.jsonl:1: messages[0].role is 'robot'"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: the conversation ends with a user"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}\n', "d.jsonl:1: turn 1 is from 'assistant'"),
    (b'{"text": "hello"}\n', "d.jsonl:1: cannot tell the data format"),
    (b'{"prompt": "Q", "response": "A"}\n{"input": "Q", "output": "A"}\n', "d.jsonl:2: this record looks like input-output"),
    (b'[1, 2]\n', "d.jsonl:1: cannot tell the data format"),
    (b'{"messages": [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": 42}]}\n',
     "d.jsonl:1: 'messages[1].content' must be text, got the int 42; write it as a string"),
])
def test_bad_records_fail_with_file_and_line(tmp_path, content, needle):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_examples(f)
    assert needle in str(e.value)


def test_forced_format_names_missing_key(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "A"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: missing 'messages' for the messages format"):
        load_examples(f, "messages")
    with pytest.raises(DataError, match="--format 'chatml' is not a data format"):
        load_examples(f, "chatml")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_examples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
