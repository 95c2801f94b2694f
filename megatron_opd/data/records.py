"""Reading records (one dict per problem) from jsonl and parquet files.

Both prompt datasets and evaluation sets are tables of problems. This module turns a
file into ``(location, record)`` pairs, where ``location`` is ``"file:line"`` (jsonl) or
``"file:row"`` (parquet) so every later error can say exactly where the bad record is.
Fields may be nested: ``reward_model.ground_truth`` reads ``record["reward_model"]
["ground_truth"]`` (the DAPO-Math layout). A prompt stored as a chat (a list of
``{"role", "content"}`` messages) is reduced to its last user message, since the chat
template is applied later by the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """All records of a ``.jsonl`` or ``.parquet`` file, each with its location.

    Raises ValueError for a missing or empty file, an unknown suffix, or a jsonl line
    that is not a JSON object (naming file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        records = list(_read_jsonl(path))
    elif path.suffix == ".parquet":
        records = list(_read_parquet(path))
    else:
        raise ValueError(
            f"data file {path} has suffix {path.suffix!r}; "
            f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not records:
        raise ValueError(f"data file {path} is empty (no records)")
    return records


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{location}: malformed JSON line ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
            yield location, record


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"reading {path} needs pyarrow; `pip install pyarrow` or convert the file to jsonl"
        ) from None
    table = pq.read_table(path)
    for row_number, record in enumerate(table.to_pylist()):
        yield f"{path}:row {row_number}", record


def get_field(record: dict, key: str, location: str, *, setting: str = "the key") -> Any:
    """``record[key]`` with dotted keys for nesting; ValueError naming location and key.

    ``setting`` names the config field that chooses ``key`` (e.g. ``data.answer_key``),
    so the message says what to change.
    """
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            present = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
            raise ValueError(
                f"{location}: missing field {key!r} (fields present: {present}); "
                f"set {setting} to the field that holds it"
            )
        value = value[part]
    return value


def prompt_text(value: Any, key: str, location: str) -> str:
    """A prompt field as text: a string, or the last user message of a chat."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m for m in value if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if users:
            return users[-1]["content"]
    raise ValueError(
        f"{location}: field {key!r} must be a string or a chat with a user message, "
        f"got {type(value).__name__}"
    )


def answer_text(value: Any, key: str, location: str) -> str:
    """An answer field as text (numbers are converted; lists and dicts are errors)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(
            f"{location}: field {key!r} must be a string or a number, got {type(value).__name__}"
        )
    return str(value)


def resolve_prompt_key(record: dict, prompt_key: str | None, location: str) -> str:
    """``prompt_key``, or (when None) the first of ``problem`` / ``prompt`` present."""
    if prompt_key is not None:
        return prompt_key
    for candidate in ("problem", "prompt"):
        if candidate in record:
            return candidate
    raise ValueError(
        f"{location}: no 'problem' or 'prompt' field "
        f"(fields present: {', '.join(sorted(record))}); set data.prompt_key"
    )
