"""The eval file: a JSONL of prompts or chat exchanges a version may ship as `eval.jsonl` at its
root (and an operator may name in `updates.eval_set`), which the update gate and `edgeagent
eval` score (`edgeagent/eval_set.py`).

Each non-blank line is one JSON object, either `{"prompt": TEXT}` (scored as it is) or
`{"messages": [{"role": ROLE, "content": TEXT}, ...]}` (rendered in the model's chat template),
with no other keys. The file is checked strictly, every error naming its line, and bounded so
that scoring it stays a matter of seconds; a version whose file fails is not committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.jsonl"
MAX_FILE_BYTES = 128 << 10  # with MAX_RECORDS, what keeps the gate's scoring to a few seconds
MAX_RECORDS = 64
ROLES = ("system", "user", "assistant")  # what Phi-4's template renders (it skips any other)


@dataclass(frozen=True)
class EvalRecord:
    """One line: a raw prompt, or the messages of a chat exchange as (role, content)."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()


def read_eval_file(path: Path) -> list[EvalRecord]:
    """The records of `path`; ValueError naming the file and the line of the first problem."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{size} bytes, more than the {MAX_FILE_BYTES} an eval set may have")
        text = path.read_bytes().decode("utf-8")
        return parse_eval_lines(text)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 ({error})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def parse_eval_lines(text: str) -> list[EvalRecord]:
    records: list[EvalRecord] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(records) == MAX_RECORDS:
            raise ValueError(f"line {number}: more than {MAX_RECORDS} prompts")
        try:
            records.append(_record(json.loads(line)))
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
    if not records:
        raise ValueError('no prompts (each line: {"prompt": ...} or {"messages": [...]})')
    return records


def _record(data: Any) -> EvalRecord:
    if not isinstance(data, dict) or set(data) not in ({"prompt"}, {"messages"}):
        raise ValueError('expected an object with one key, "prompt" or "messages"')
    if "prompt" in data:
        return EvalRecord(prompt=_text(data["prompt"], '"prompt"'))
    messages = data["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    return EvalRecord(messages=tuple(_message(m, i) for i, m in enumerate(messages)))


def _message(message: Any, index: int) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or set(message) != {"role", "content"}:
        raise ValueError(f'{where}: expected an object with "role" and "content" only')
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    return role, _text(message["content"], f"{where}.content")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value
