"""Evaluation sets and recorded answers, in the formats people have them in.

One reader takes every format the row tells apart by its fields:

- Alpaca: ``{instruction, input, output}`` (JSON array or JSONL; ``output``, if present, is a reference);
- self-instruct: ``{id, instruction, instances: [{input, output}], motivation_app}``, like the 252
  user-oriented instructions Alpaca was judged on (one item per instance) and our bundled set (which
  adds ``category``);
- AlpacaEval: ``{instruction, output, generator, dataset}`` (``dataset`` is taken as the category);
- recorded answers: any of the above whose ``output`` is a model's answer (``answer``/``response``
  are accepted too);
- a Hugging Face ``datasets`` name, whose rows are read the same way.

Errors name the file, the line and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from alpaca_ray.cluster import storage
from alpaca_ray.config import UserError
from alpaca_ray.records import RecordError, detect_format, iter_rows

FORMATS_HELP = ("expected Alpaca {instruction, input, output}, self-instruct {id, instruction, instances}, "
                "AlpacaEval {instruction, output, generator, dataset} or recorded answers {instruction, output}")
ANSWER_FIELDS = ("output", "answer", "response")


@dataclass(frozen=True)
class EvalItem:
    """One instruction to compare the two models on."""

    id: str
    instruction: str
    input: str = ""
    category: str = "uncategorized"
    #: The set's own answer for the instruction (a reference or a recorded model answer), if it has one.
    reference: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """What recorded answers are matched on when they carry no id: the instruction and input."""
        return (self.instruction.strip(), self.input.strip())

    def to_dict(self) -> dict:
        return {"id": self.id, "instruction": self.instruction, "input": self.input, "category": self.category}


def _string(row: dict, name: str, path: str, line: int | None, required: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RecordError(path, "is missing", line, name)
        return ""
    if not isinstance(value, str):
        raise RecordError(path, f"must be a string, got {type(value).__name__}", line, name)
    return value


def items_from_row(row: object, path: str, line: int | None, index: int) -> list[EvalItem]:
    """The evaluation item(s) in one row of any supported format."""
    if not isinstance(row, dict):
        raise RecordError(path, f"expected a JSON object, got {type(row).__name__}", line)
    if "instruction" not in row:
        raise RecordError(path, f"is missing ({FORMATS_HELP})", line, "instruction")
    instruction = _string(row, "instruction", path, line, required=True)
    if not instruction.strip():
        raise RecordError(path, "is empty", line, "instruction")
    category = row.get("category") or row.get("dataset") or row.get("motivation_app") or "uncategorized"
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, (str, int)):
        raise RecordError(path, f"must be a string or an integer, got {type(row_id).__name__}", line, "id")
    base_id = str(row_id) if row_id is not None else f"item-{index + 1}"
    extra = {k: v for k, v in row.items() if k not in ("id", "instruction", "input", "output", "instances")}

    if "instances" in row:  # self-instruct: the input (and a reference output) live in the instances
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            raise RecordError(path, "must be a non-empty list of {input, output} objects", line, "instances")
        items = []
        for k, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise RecordError(path, f"instance {k} is not an object", line, "instances")
            input_text = _string(instance, "input", path, line)
            reference = instance.get("output")
            if reference is not None and not isinstance(reference, str):
                raise RecordError(path, f"instance {k}: must be a string", line, "instances.output")
            item_id = base_id if len(instances) == 1 else f"{base_id}/{k}"
            items.append(EvalItem(item_id, instruction, input_text, str(category), reference, extra))
        return items

    input_text = _string(row, "input", path, line)
    reference = None
    for name in ANSWER_FIELDS:
        if row.get(name) is not None:
            reference = _string(row, name, path, line)
            break
    return [EvalItem(base_id, instruction, input_text, str(category), reference, extra)]


def _rows(source: str, split: str) -> Iterable[tuple[int | None, object]]:
    """(line, row) pairs from a file, or from a ``datasets`` name when ``source`` is not a file."""
    try:
        fmt = detect_format(source)
    except RecordError:
        fmt = None
    is_dir = not storage.is_remote(source) and os.path.isdir(source)  # a local datasets folder
    if fmt is not None or (storage.exists(source) and not is_dir):
        if not storage.exists(source):
            raise RecordError(source, "no such file")
        if fmt is None:
            raise RecordError(source, "unknown format: use a .json, .jsonl or .parquet file, or a datasets name")
        yield from iter_rows(source, fmt)
        return
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # the hub raises many types; say which source failed and why
        raise RecordError(source, f"not a file and not a loadable datasets name: {err}") from None
    for index, row in enumerate(dataset):
        yield index + 1, row


def load_eval_set(source: str, split: str = "train", limit: int | None = None) -> list[EvalItem]:
    """Read an evaluation set (any supported format); an empty set or repeated ids are errors."""
    source = str(source)
    items: list[EvalItem] = []
    first_line: dict[str, int | None] = {}
    for index, (line, row) in enumerate(_rows(source, split)):
        for item in items_from_row(row, source, line, index):
            if item.id in first_line:
                raise RecordError(source, f"id {item.id!r} repeats (first on line {first_line[item.id]}); "
                                  "ids must be unique", line, "id")
            first_line[item.id] = line
            items.append(item)
    if not items:
        raise UserError(f"{source}: the evaluation set is empty; it needs at least one instruction")
    return items[:limit] if limit else items


def load_answers(source: str, items: list[EvalItem], split: str = "train") -> dict[str, str]:
    """Recorded answers for every item, matched by id or else by identical instruction and input.

    Raises :class:`UserError` naming the items with no answer (a comparison with holes is not one).
    """
    source = str(source)
    by_id: dict[str, str] = {}
    by_key: dict[tuple[str, str], str] = {}
    for index, (line, row) in enumerate(_rows(source, split)):
        for answer in items_from_row(row, source, line, index):
            if answer.reference is None:
                raise RecordError(source, f"has no answer (one of {', '.join(ANSWER_FIELDS)})", line, "output")
            if isinstance(row, dict) and row.get("id") is not None:
                by_id[answer.id] = answer.reference
            by_key.setdefault(answer.key, answer.reference)
    answers: dict[str, str] = {}
    missing: list[EvalItem] = []
    for item in items:
        text = by_id.get(item.id, by_key.get(item.key))
        if text is None:
            missing.append(item)
        else:
            answers[item.id] = text
    if missing:
        shown = "; ".join(f"id {m.id!r} ({_short(m.instruction)})" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{source}: no recorded answer for {len(missing)} of {len(items)} items: {shown}{more}. "
                        "Answers are matched to the evaluation set by 'id', or by identical instruction and input.")
    return answers


def _short(text: str, width: int = 50) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def default_eval_set(bundled: str) -> str:
    """The bundled set's path, with a clear error where a source checkout lacks it."""
    if not os.path.exists(bundled):
        raise UserError(f"the bundled evaluation set {bundled} is missing; pass --eval-set FILE")
    return bundled


def generator_of(source: str, split: str = "train") -> str | None:
    """The ``generator`` an answers file names (AlpacaEval's model_outputs.json carries one), when all its rows
    name the same one; None otherwise."""
    names = {row.get("generator") for _, row in _rows(str(source), split) if isinstance(row, dict)}
    if len(names) == 1:
        (name,) = names
        return name if isinstance(name, str) and name.strip() else None
    return None
