"""The offline teacher's recorded responses (``alpaca_ray/data/teacher_replay.jsonl``) parse like Alpaca's.

Each line is one recorded completion of Alpaca's self-instruct prompt, which ends with ``4. Instruction:``;
the text continues from there with tasks 4..20 separated by ``###``. Alpaca's parser prepends
``4. Instruction:``, splits on ``###`` and splits each piece on ``{idx}. Instruction|Input|Output:``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import alpaca_ray

REPLAY = Path(alpaca_ray.__file__).resolve().parent / "data" / "teacher_replay.jsonl"
FIRST, LAST = 4, 20  # the prompt shows 3 seed tasks; the teacher writes tasks 4..20


def _responses() -> list[dict]:
    lines = REPLAY.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _pieces(response: dict) -> list[str]:
    return re.split("###", f"{FIRST}. Instruction:" + response["text"])


def _parse(piece: str, idx: int) -> list[str]:
    return re.split(rf"{idx}\.\s+(Instruction|Input|Output):", piece)


def test_sixteen_well_formed_lines():
    lines = REPLAY.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 16
    for number, line in enumerate(lines, start=1):
        response = json.loads(line)
        assert isinstance(response, dict), number
        assert isinstance(response.get("text"), str) and response["text"].strip(), number
        assert response.get("finish_reason") in {"stop", "length"}, number
        assert response["text"].startswith(" "), f"line {number}: a continuation of '4. Instruction:'"


@pytest.mark.parametrize("index", range(16))
def test_every_task_parses_with_alpacas_rule(index):
    response = _responses()[index]
    pieces = _pieces(response)
    if response["finish_reason"] == "stop":
        assert len(pieces) == LAST - FIRST + 1
    else:  # a truncated answer: Alpaca drops the last, cut-off piece; the rest must still parse
        pieces = pieces[:-1]
        assert pieces
    for offset, piece in enumerate(pieces):
        idx = FIRST + offset
        parts = _parse(piece, idx)
        assert len(parts) == 7, f"line {index + 1}, task {idx}: {piece[:80]!r}"
        assert parts[1::2] == ["Instruction", "Input", "Output"]
        instruction, input_, output = (part.strip() for part in parts[2::2])
        assert instruction and input_ and output, f"line {index + 1}, task {idx}"


def test_enough_distinct_instructions():
    instructions = set()
    for response in _responses():
        pieces = _pieces(response)
        if response["finish_reason"] == "length":
            pieces = pieces[:-1]
        for offset, piece in enumerate(pieces):
            parts = _parse(piece, FIRST + offset)
            if len(parts) == 7:
                instructions.add(parts[2].strip())
    assert len(instructions) >= 250
