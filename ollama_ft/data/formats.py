"""Detect a record's shape and normalise it to a conversation (a list of Messages).

Shapes (`--format` names):
  messages        {"messages": [{"role": "user", "content": "..."}, ...]}        (OpenAI)
  sharegpt        {"conversations": [{"from": "human", "value": "..."}, ...]}
  alpaca          {"instruction", "input"?, "output", "system"?, "history"?}
  prompt-response {"prompt", "response" | "completion" | "output"}
  input-output    {"input", "output"}
Any shape may carry `system`. Reasoning for R1 models is either inside the assistant text
(`<think>…</think>answer`) or in `reasoning_content` / `reasoning` / `think`.
"""

from __future__ import annotations

import json

from ollama_ft.chat_formats import Message

SHAPES = ("messages", "sharegpt", "alpaca", "prompt-response", "input-output")
REASONING_KEYS = ("reasoning_content", "reasoning", "think", "thinking")
RESPONSE_KEYS = ("response", "completion", "output")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system"}


class RecordError(ValueError):
    """What is wrong with one record (the caller adds the location)."""


class EmptyRecord(RecordError):
    """A record with nothing to learn from: dropped and reported, not fatal."""


def detect_shape(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys and keys & set(RESPONSE_KEYS):
        return "prompt-response"
    if "input" in keys and "output" in keys:
        return "input-output"
    return None


def describe_shapes() -> str:
    return ("messages (OpenAI 'messages'), sharegpt ('conversations' with from/value), alpaca "
            "(instruction/input/output), prompt-response (prompt + response|completion|output), "
            "input-output")


def normalize(record: object, shape: str) -> list[Message]:
    """The record as a validated conversation, or RecordError saying what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    required = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction",),
                "prompt-response": ("prompt",), "input-output": ("input", "output")}[shape]
    missing = [k for k in required if k not in record]
    if shape == "prompt-response" and not any(k in record for k in RESPONSE_KEYS):
        missing.append("response")
    if missing:
        raise RecordError(f"missing {', '.join(repr(k) for k in missing)} for the {shape} format "
                          f"(keys present: {', '.join(sorted(record)) or 'none'})")
    fn = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
          "prompt-response": _from_prompt_response, "input-output": _from_input_output}[shape]
    messages = fn(record)
    system = record.get("system")
    if system not in (None, "") and not any(m.role == "system" for m in messages):
        messages.insert(0, Message("system", _text(system, "system")))
    return _validate(messages)


# --- shapes -------------------------------------------------------------------------------
def _text(value, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI content parts: keep the text parts
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if value is None:
        raise RecordError(f"'{field}' is missing")
    if isinstance(value, (int, float, bool)):  # not silently turned into text
        raise RecordError(f"'{field}' must be text, got the {type(value).__name__} "
                          f"{json.dumps(value)}; write it as a string, e.g. \"{value}\"")
    raise RecordError(f"'{field}' must be text, got {type(value).__name__}")


def _reasoning_of(d: dict, where: str) -> str | None:
    for k in REASONING_KEYS:
        v = d.get(k)
        if v not in (None, ""):
            return _text(v, f"{where}{k}")
    return None


def _from_messages(rec):
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        raise RecordError("'messages' must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}].role is {role!r}; use system, user or assistant")
        content = "" if m.get("content") is None and role == "assistant" else m.get("content")
        out.append(Message(role, _text(content, f"messages[{i}].content"),
                           _reasoning_of(m, f"messages[{i}].")))
    return out


def _from_sharegpt(rec):
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise RecordError("'conversations' must be a list of {from, value} objects")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise RecordError(f"conversations[{i}] must be an object with 'from' and 'value'")
        who = m.get("from", m.get("role"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise RecordError(f"conversations[{i}].from is {who!r}; use human, gpt or system")
        out.append(Message(role, _text(m.get("value", m.get("content")),
                                       f"conversations[{i}].value"),
                           _reasoning_of(m, f"conversations[{i}].")))
    return out


def _from_alpaca(rec):
    out = []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError("'history' must be a list of [instruction, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"history[{i}] must be a pair [instruction, response]")
        out += [Message("user", _text(pair[0], f"history[{i}][0]")),
                Message("assistant", _text(pair[1], f"history[{i}][1]"))]
    user = _text(rec.get("instruction"), "instruction")
    extra = rec.get("input")
    if extra not in (None, ""):
        user = f"{user}\n\n{_text(extra, 'input')}"
    out += [Message("user", user),
            Message("assistant", _text(rec.get("output"), "output"), _reasoning_of(rec, ""))]
    return out


def _from_prompt_response(rec):
    key = next(k for k in RESPONSE_KEYS if k in rec)
    return [Message("user", _text(rec.get("prompt"), "prompt")),
            Message("assistant", _text(rec.get(key), key), _reasoning_of(rec, ""))]


def _from_input_output(rec):
    return [Message("user", _text(rec.get("input"), "input")),
            Message("assistant", _text(rec.get("output"), "output"), _reasoning_of(rec, ""))]


# --- validation ---------------------------------------------------------------------------
def split_reasoning(content: str) -> tuple[str | None, str]:
    """`<think>r</think>answer` -> (r, answer); text without `</think>` has no reasoning."""
    if "</think>" not in content:
        return None, content
    head, _, answer = content.rpartition("</think>")
    head = head.strip()
    if head.startswith("<think>"):
        head = head[len("<think>"):]
    return head.strip() or None, answer.lstrip()


def _validate(messages: list[Message]) -> list[Message]:
    systems = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise EmptyRecord("no user or assistant messages")
    for m in turns:
        if m.role == "assistant":
            reasoning, answer = split_reasoning(m.content)
            m.reasoning = m.reasoning or reasoning
            m.content = answer
    expected = "user"
    for i, m in enumerate(turns):
        if m.role != expected:
            raise RecordError(f"turn {i + 1} is from {m.role!r} but {expected!r} was expected: "
                              "turns must alternate user, assistant, user, ...")
        expected = "assistant" if expected == "user" else "user"
    if turns[-1].role != "assistant":
        raise RecordError("the conversation ends with a user message; the last turn must be "
                          "the assistant's answer to learn from")
    for m in turns:
        if not m.content.strip() and not (m.role == "assistant" and m.reasoning):
            raise EmptyRecord(f"empty {m.role} message")
    out = []
    if systems:
        out.append(Message("system", "\n\n".join(s.content for s in systems)))
    return out + turns
