"""Seed tasks in self-instruct's JSONL format, read with errors that name the file, line and field.

One JSON object a line: ``id``, ``name``, ``instruction``, ``instances: [{"input", "output"}, ...]``,
``is_classification``. Only ``instruction`` and ``instances`` (with at least one instance) are
required; like Alpaca, a prompt shows a task's first instance.
"""

from __future__ import annotations

import json
import os

from alpaca_ray.generate.prompt import SeedExample
from alpaca_ray.records import RecordError


def read_seed_tasks(path: str | os.PathLike, name: str | None = None) -> list[SeedExample]:
    """Every seed task of ``path`` as a :class:`SeedExample`; raise :class:`RecordError` on the first bad line.

    ``name`` is what errors call the file (the URL a cached copy came from)."""
    file_path, path = str(path), str(name or path)
    try:
        with open(file_path, encoding="utf-8") as handle:
            # split("\n"), not splitlines(): that also cuts at U+2028, U+0085... inside a JSON string.
            lines = handle.read().split("\n")
    except FileNotFoundError:
        raise RecordError(path, "no such seed task file (self-instruct JSONL expected)") from None
    except IsADirectoryError:
        raise RecordError(path, "is a directory, not a seed task file") from None
    except UnicodeDecodeError as err:
        raise RecordError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    examples: list[SeedExample] = []
    seen_ids: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(path, f"invalid JSON: {err.msg} (column {err.colno})", number) from None
        example = _seed_example(task, path, number)
        if example.id in seen_ids:
            raise RecordError(path, f"duplicate id {example.id!r} (also on line {seen_ids[example.id]})", number, "id")
        seen_ids[example.id] = number
        examples.append(example)
    if not examples:
        raise RecordError(path, "contains no seed tasks")
    return examples


def _seed_example(task: object, path: str, line: int) -> SeedExample:
    if not isinstance(task, dict):
        raise RecordError(path, f"expected a JSON object, got {type(task).__name__}", line)
    instruction = task.get("instruction")
    if instruction is None:
        raise RecordError(path, "is missing", line, "instruction")
    if not isinstance(instruction, str):
        raise RecordError(path, f"must be a string, got {type(instruction).__name__}", line, "instruction")
    if not instruction.strip():
        raise RecordError(path, "is empty", line, "instruction")
    instances = task.get("instances")
    if instances is None:
        raise RecordError(path, "is missing (a list of {\"input\", \"output\"} objects)", line, "instances")
    if not isinstance(instances, list) or not instances:
        raise RecordError(path, "must be a non-empty list of {\"input\", \"output\"} objects", line, "instances")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RecordError(path, "must be an object with input and output", line, f"instances[{index}]")
        for name in ("input", "output"):
            value = instance.get(name, "" if name == "input" else None)
            if value is None:
                raise RecordError(path, "is missing", line, f"instances[{index}].{name}")
            if not isinstance(value, str):
                raise RecordError(path, f"must be a string, got {type(value).__name__}", line,
                                  f"instances[{index}].{name}")
    task_id = task.get("id", f"line_{line}")
    if not isinstance(task_id, (str, int)):
        raise RecordError(path, f"must be a string, got {type(task_id).__name__}", line, "id")
    first = instances[0]
    return SeedExample(id=str(task_id), instruction=instruction, input=first.get("input", ""), output=first["output"])
