"""The record schemas: Alpaca's (``instruction``, ``input``, ``output``) and conversations, and their files.

Reads and writes Alpaca JSON (a list of objects, like ``alpaca_data.json``), JSON Lines and Parquet.
Training data may also hold conversations: OpenAI-style ``messages`` (``role``/``content``) or ShareGPT's
``conversations`` (``from``/``value``), read into :class:`ChatRecord`.
Every error names the file, the line (or row) and the field, so a user can fix a 52K-line file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from alpaca_ray.cluster import storage

FIELDS = ("instruction", "input", "output")
FORMATS = ("json", "jsonl", "parquet")


class RecordError(ValueError):
    """A record file that cannot be read, naming the file, line and field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f", line {line}" if line is not None else "")
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}")


@dataclass(frozen=True)
class AlpacaRecord:
    """One instruction-following example. ``input`` is empty for instructions that need none."""

    instruction: str
    input: str = ""
    output: str = ""
    #: Any other fields of the source row (``category``, ``id``...), kept for round trips.
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_dict(self, with_extra: bool = True) -> dict:
        row = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if with_extra:
            row.update({k: v for k, v in self.extra.items() if k not in row})
        return row


def record_from_dict(
    row: object, path: str = "<data>", line: int | None = None, require_output: bool = True
) -> AlpacaRecord:
    """Validate one row and make a record; raise :class:`RecordError` naming what is wrong."""
    if not isinstance(row, dict):
        raise RecordError(path, f"expected a JSON object, got {type(row).__name__}", line)
    values = {}
    for name in FIELDS:
        value = row.get(name)
        if value is None:
            if name == "instruction" or (name == "output" and require_output):
                raise RecordError(path, "is missing", line, name)
            value = ""
        if not isinstance(value, str):
            raise RecordError(path, f"must be a string, got {type(value).__name__}", line, name)
        values[name] = value
    if not values["instruction"].strip():
        raise RecordError(path, "is empty", line, "instruction")
    extra = {k: v for k, v in row.items() if k not in FIELDS}
    return AlpacaRecord(extra=extra, **values)


#: Roles of a conversation as chat templates take them; ``developer`` is OpenAI's newer name for ``system``.
CHAT_ROLES = ("system", "user", "assistant")
#: ShareGPT's speaker names (``from``) mapped to chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


@dataclass(frozen=True)
class ChatRecord:
    """One conversation: ``messages`` of ``{"role": system|user|assistant, "content": str}``, in order.

    Training takes the loss on every assistant turn (see :func:`alpaca_ray.train.data.tokenize_chat`).
    """

    messages: tuple[dict, ...]
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_dict(self, with_extra: bool = True) -> dict:
        row = {"messages": [dict(m) for m in self.messages]}
        if with_extra:
            row.update({k: v for k, v in self.extra.items() if k not in row})
        return row


def _message_text(content: object, path: str, line: int | None, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        if all(isinstance(p, dict) for p in content):
            return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    raise RecordError(path, f"must be a string, got {type(content).__name__}", line, where)


def chat_record_from_dict(row: dict, path: str = "<data>", line: int | None = None) -> ChatRecord:
    """Validate a ``messages`` or ``conversations`` row and make a record; errors name the message."""
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordError(path, "must be a non-empty list of messages", line, key)
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise RecordError(path, f"expected an object, got {type(turn).__name__}", line, where)
        speaker = turn.get(role_key)
        role = ({"developer": "system"}.get(speaker, speaker) if key == "messages"
                else SHAREGPT_ROLES.get(str(speaker).lower()))
        if role not in CHAT_ROLES:
            allowed = CHAT_ROLES + ("developer",) if key == "messages" else tuple(SHAREGPT_ROLES)
            raise RecordError(path, f"unknown {role_key} {speaker!r}: use one of {', '.join(allowed)}", line,
                              f"{where}.{role_key}")
        messages.append({"role": role, "content": _message_text(turn.get(text_key), path, line,
                                                                f"{where}.{text_key}")})
    first_turn = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first_turn != "user":
        raise RecordError(path, "the first message after any system message must be from the user", line, key)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError(path, "has no assistant message with content: nothing to learn from", line, key)
    return ChatRecord(tuple(messages), extra={k: v for k, v in row.items() if k != key})


def training_record_from_dict(row: object, path: str = "<data>", line: int | None = None) -> AlpacaRecord | ChatRecord:
    """A conversation (``messages`` / ``conversations``) or else an Alpaca record."""
    if isinstance(row, dict) and ("messages" in row or "conversations" in row):
        return chat_record_from_dict(row, path, line)
    return record_from_dict(row, path, line)


def detect_format(path: str | os.PathLike) -> str:
    """``json``, ``jsonl`` or ``parquet`` from the file name."""
    name = str(path).lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise RecordError(str(path), "unknown format: use a .json, .jsonl or .parquet file")


def _iter_json_array(text: str, path: str) -> Iterable[tuple[int, object]]:
    """Yield (line, item) for each element of a JSON array, with the line where the element starts."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(path, f"invalid JSON: {err.msg}", err.lineno) from None
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            # {"data": [...]} wrappers, common for exported datasets.
            for item in value["data"]:
                yield None, item
            return
        raise RecordError(path, "expected a JSON array of records (like alpaca_data.json)", 1)
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    # Count newlines incrementally: counting from the start for every record is quadratic.
    line, counted_to = 1, 0
    while True:
        line, counted_to = line + text.count("\n", counted_to, pos), pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise RecordError(path, f"invalid JSON: {err.msg}", err.lineno) from None
        yield line, item
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        line += text.count("\n", counted_to, pos)
        raise RecordError(path, "invalid JSON: expected ',' or ']' between records", line)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_rows(path: str | os.PathLike, fmt: str | None = None) -> Iterable[tuple[int | None, object]]:
    """Yield (line or row number, raw row) from a JSON, JSONL or Parquet file."""
    path = str(path)
    if not storage.exists(path):
        raise RecordError(path, "no such file")
    fmt = fmt or detect_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise RecordError(path, f"cannot read Parquet: {err}") from None
        for index, row in enumerate(table.to_pylist()):
            yield index + 1, row
        return
    with storage.open_text(path) as handle:
        text = handle.read()
    if fmt == "json":
        yield from _iter_json_array(text, path)
        return
    # split("\n"), not splitlines(): U+2028, U+0085 and friends may stand unescaped inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(path, f"invalid JSON: {err.msg} (column {err.colno})", number) from None


def read_records(path: str | os.PathLike, fmt: str | None = None, require_output: bool = True) -> list[AlpacaRecord]:
    """Read an Alpaca-format file (JSON, JSONL or Parquet) into records, validating every row."""
    return [record_from_dict(row, str(path), line, require_output) for line, row in iter_rows(path, fmt)]


def write_records(records: Sequence[AlpacaRecord | dict], path: str | os.PathLike, fmt: str | None = None) -> None:
    """Write records as Alpaca JSON (indented like ``alpaca_data.json``), JSONL or Parquet, atomically."""
    path = str(path)
    fmt = fmt or detect_format(path)
    rows = [r.to_dict() if isinstance(r, AlpacaRecord) else dict(r) for r in records]
    parent = os.path.dirname(storage.local_path(path))
    if parent and not storage.is_remote(path):
        os.makedirs(parent, exist_ok=True)
    # Write to a temporary name and rename, so a reader never sees half a file (local paths).
    target = path if storage.is_remote(path) else path + ".tmp"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [row.get(name, "") for row in rows] for name in FIELDS}
        pq.write_table(pa.table(columns), target)
    else:
        with storage.open_text(target, "w") as handle:
            if fmt == "json":
                json.dump(rows, handle, indent=4, ensure_ascii=False)
                handle.write("\n")
            else:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    if target != path:
        os.replace(target, path)


def load_records(source: str, split: str = "train", parse=record_from_dict) -> list:
    """Records from a file path or URI, or else from a Hugging Face ``datasets`` name (e.g. ``tatsu-lab/alpaca``).

    ``parse(row, path, line)`` makes each record (Alpaca records by default; conversations too with
    :func:`training_record_from_dict`).
    """
    try:
        fmt = detect_format(source)
    except RecordError:
        fmt = None
    if fmt is not None or storage.exists(source):
        return [parse(row, str(source), line) for line, row in iter_rows(source, fmt)]
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub raises many types; say which source failed
        raise RecordError(source, f"not a file and not a loadable dataset: {err}") from None
    return [parse(row, source, index + 1) for index, row in enumerate(dataset)]
